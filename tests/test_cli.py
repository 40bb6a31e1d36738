"""The command line as a newcomer meets it: documented commands parse, answers come early,
the store in use is named, and the output is quiet.

Commands run in subprocesses (a fresh interpreter: what a command imports is visible in
sys.modules, and no earlier test has imported it already), each against its own
THYROID_CAD_HOME.
"""

from __future__ import annotations

import itertools
import json
import re
import shlex
import socket
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
HEAVY = ("tensorflow", "keras", "mlflow", "onnxruntime", "tf2onnx", "sklearn", "uvicorn")

# Placeholders the docs write where a number goes; any other placeholder (ROOT, RUN_ID,
# NAME@ALIAS...) is a fine string or path as it stands.
NUMBERS = {"N": "3", "V": "1", "S": "0", "M": "0.3", "P": "8000"}
# A model card's `format` value (`thyroid-cad localiser card v1`) reads like a command.
CARD_FORMAT = re.compile(r"\bcard v\d+$")
_SHELL_STOPS = {"|", "||", "&&", ";", ">", "2>&1", ")"}


def _app():
    import typer

    from cli import app

    return typer.main.get_command(app)


def _commands() -> set[str]:
    return set(_app().commands)


def _words(text: str) -> list[str]:
    """A documented command's words: shell syntax, comments and `...` elisions dropped."""
    words = []
    for word in shlex.split(text, comments=True):
        if word in _SHELL_STOPS:
            break
        words.append(word)
    words = [w.strip("[]") for w in words if w.strip("[]")]  # `[--seed S]`: optional
    kept = []
    for i, word in enumerate(words):
        following = words[i + 1] if i + 1 < len(words) else ""
        if word == "..." or (word.startswith("--") and following == "..."):
            continue  # `--backbone ...`: a value left out on purpose
        kept.append(NUMBERS.get(word, word))
    if len(kept) <= 2 and not any(w.startswith("-") for w in kept):
        kept.append("--help")  # `thyroid-cad score`, `keys list`: the command is named
    return kept


def _variants(words: list[str]) -> list[list[str]]:
    """A synopsis (`--classes 2|3`) as the command lines it stands for."""
    choices = [w.split("|") if "|" in w and not w.startswith("-") else [w] for w in words]
    return [list(c) for c in itertools.product(*choices)]


def documented_commands() -> list[tuple[str, list[str]]]:
    """(where, argv after `thyroid-cad`) of every command in code blocks and table cells."""
    found = []
    start = re.compile(r"(?:^|[\s(/$])thyroid-cad\s+(?=\S)")
    commands = _commands() | {"--help"}
    for doc in DOCS:
        in_code, pending = False, ""
        for number, line in enumerate(doc.read_text().splitlines(), start=1):
            where = f"{doc.relative_to(ROOT)}:{number}"
            if line.lstrip().startswith("```"):
                in_code = not in_code
                continue
            if in_code:
                line = pending + line
                if line.endswith("\\"):
                    pending = line[:-1] + " "
                    continue
                pending = ""
                match = start.search(line)
                if match and line[match.end() :].split()[0] in commands:
                    found.append((where, _words(line[match.end() :])))
            elif line.lstrip().startswith("|"):
                for cell in re.split(r"(?<!\\)\|", line):
                    spans = re.findall(r"`([^`]+)`", cell.replace("\\|", "|"))
                    named = False  # `thyroid-cad keys create ...`, `keys list`: same tool
                    for span in spans:
                        if CARD_FORMAT.search(span):
                            continue
                        if span.startswith("thyroid-cad "):
                            named, span = True, span.removeprefix("thyroid-cad ")
                        elif not (named and span.split()[0] in commands):
                            continue
                        if span.split()[0] in commands:
                            for argv in _variants(_words(span.replace("|", "\\|"))):
                                found.append((where, [w.replace("\\|", "|") for w in argv]))
    return found


def parse(argv: list[str]):
    """Parse a command line as `thyroid-cad` would, down to its last subcommand, without
    running anything. Raises the click error a user would see."""
    command = _app()
    ctx = command.make_context("thyroid-cad", list(argv))
    while hasattr(command, "resolve_command"):
        rest = [*ctx._protected_args, *ctx.args]
        if not rest:
            break
        name, command, rest = command.resolve_command(ctx, rest)
        ctx = command.make_context(name, rest, parent=ctx)
    return ctx


def test_every_documented_command_parses():
    import typer

    commands = documented_commands()
    assert len(commands) > 40  # the extraction still finds the docs' commands
    assert any(argv[:3] == ["train", "--backbone", "unet"] for _, argv in commands)
    refused = []
    for where, argv in commands:
        try:
            parse(argv)
        except typer.Exit as e:  # --help
            assert e.exit_code == 0
        except typer.TyperException as e:  # what click refuses (typer 0.29 vendors click)
            refused.append(f"{where}: thyroid-cad {shlex.join(argv)}: {e.format_message()}")
    assert not refused, "\n".join(refused)


def test_a_wrong_choice_is_still_refused_by_the_parser():
    import typer

    with pytest.raises(typer.BadParameter, match="unet"):
        parse(["train", "--backbone", "alexnet"])
    ctx = parse(["train", "--backbone", "unet", "--weights", "configs/localiser"])
    assert (ctx.params["backbone"], ctx.params["weights"]) == ("unet", "configs/localiser")


def test_training_choices_are_the_implementations():
    """The CLI's choices are the tuples the training code checks against."""
    from training import choices, models, roi, sources, train

    assert models.BACKBONES is choices.BACKBONES and models.STRATEGIES is choices.STRATEGIES
    assert train.CLASSIFIERS is choices.CLASSIFIERS and roi.ROI_MODES is choices.ROI_MODES
    assert sources.CLASS_WEIGHTINGS is choices.CLASS_WEIGHTINGS
    import typer

    for option, names in [
        ("--backbone", choices.BACKBONES),
        ("--strategy", choices.STRATEGIES),
        ("--classifier", choices.CLASSIFIERS),
        ("--roi", choices.ROI_MODES),
        ("--class-weights", choices.CLASS_WEIGHTINGS),
    ]:
        for name in names:
            assert parse(["train", option, name]).params[option[2:].replace("-", "_")] == name
        with pytest.raises(typer.BadParameter):
            parse(["train", option, "nonesuch"])


# -- what a command imports, and what it says -------------------------------------------
_PROBE = """
import json, sys
from typer.testing import CliRunner
from cli import app
result = CliRunner().invoke(app, sys.argv[1:])
print(json.dumps({
    "exit": result.exit_code,
    "stdout": result.stdout,
    "stderr": result.stderr,
    "heavy": sorted(m for m in HEAVY if m in sys.modules),
}))
""".replace("HEAVY", repr(HEAVY))


def run_cli(*args: str, home: Path | None, cwd: Path, env: dict | None = None) -> dict:
    """`thyroid-cad ARGS` in a fresh interpreter: exit code, stdout, stderr and which heavy
    modules it imported."""
    environment = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT), **(env or {})}
    if home is not None:
        environment["THYROID_CAD_HOME"] = str(home)
    done = subprocess.run(
        [sys.executable, "-c", _PROBE, *args],
        capture_output=True,
        text=True,
        env=environment,
        cwd=cwd,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout)


@pytest.mark.parametrize(
    "args",
    [["--help"], ["train", "--help"], ["registry", "show", "--help"], ["serve", "--help"]],
)
def test_help_imports_no_heavy_module_and_shows_real_metavars(args, tmp_path):
    result = run_cli(*args, home=tmp_path / "home", cwd=tmp_path)
    assert result["exit"] == 0 and result["heavy"] == []
    help_text = result["stdout"]
    assert "Usage:" in help_text
    assert not re.search(r"\{[a-z_]+\}|<bool>", help_text, re.IGNORECASE), help_text


def _command_paths(command=None, path=()):
    command = command or _app()
    yield path
    for name, sub in getattr(command, "commands", {}).items():
        yield from _command_paths(sub, (*path, name))


def test_every_help_text_has_real_metavars_and_whole_summaries():
    from typer.testing import CliRunner

    from cli import app

    paths = list(_command_paths())
    assert ("registry", "show") in paths and len(paths) > 20
    for path in paths:
        result = CliRunner().invoke(app, [*path, "--help"], terminal_width=80)
        assert result.exit_code == 0, path
        text = result.stdout
        assert not re.search(r"\{[A-Za-z_]+\}|<bool>", text), (path, text)
        # command lists give each command's summary whole, never cut with "..."
        listed = text.split("Commands:")[1] if "Commands:" in text else ""
        assert not re.search(r"\.\.\.$", listed, re.MULTILINE), (path, listed)


def test_a_missing_data_folder_is_refused_before_tensorflow_loads(tmp_path):
    result = run_cli("train", "--data", "nope", home=tmp_path / "home", cwd=tmp_path)
    assert result["exit"] == 2 and "dataset folder not found: nope" in result["stderr"]
    assert result["heavy"] == []
    assert not (tmp_path / "home").exists()


def test_keys_and_registry_list_on_a_fresh_home_name_the_store_and_create_nothing(tmp_path):
    """Run from another folder with no THYROID_CAD_HOME: nothing appears in it."""
    keys = run_cli("keys", "list", home=None, cwd=tmp_path)
    assert keys["exit"] == 0 and keys["stdout"] == ""
    assert f"no service database {tmp_path / '.thyroid-cad' / 'requests.db'}" in keys["stderr"]
    assert "DATABASE_URL" in keys["stderr"]
    assert not {"mlflow", "onnxruntime", "tensorflow"} & set(keys["heavy"])
    listed = run_cli("registry", "list", "--json", home=None, cwd=tmp_path)
    assert listed["exit"] == 0 and json.loads(listed["stdout"]) == []
    assert f"no MLflow store at {tmp_path / '.thyroid-cad' / 'mlflow.db'}" in listed["stderr"]
    assert "THYROID_CAD_HOME" in listed["stderr"] and "MLFLOW_TRACKING_URI" in listed["stderr"]
    for command in (["registry", "show", "champion"], ["registry", "resolve", "champion"]):
        refused = run_cli(*command, home=None, cwd=tmp_path)
        assert refused["exit"] == 2 and "no MLflow store at" in refused["stderr"], command
    assert list(tmp_path.iterdir()) == []


def test_keys_list_prints_a_table_or_json(tmp_path):
    home = tmp_path / "home"
    created = run_cli(
        "keys", "create", "--scope", "admin", "--name", "ops", home=home, cwd=tmp_path
    )
    assert created["exit"] == 0 and "new service database" in created["stderr"]
    table = run_cli("keys", "list", home=home, cwd=tmp_path)
    header, row = table["stdout"].splitlines()
    assert header.split()[:3] == ["id", "name", "scope"] and row.split()[1:3] == ["ops", "admin"]
    assert not {"mlflow", "onnxruntime", "tensorflow"} & set(table["heavy"])
    (key,) = json.loads(run_cli("keys", "list", "--json", home=home, cwd=tmp_path)["stdout"])
    assert (key["name"], key["scope"], key["revoked_at"]) == ("ops", "admin", None)


def test_serve_refuses_a_busy_port_before_loading_anything(tmp_path):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = run_cli("serve", "--port", str(port), home=tmp_path / "home", cwd=tmp_path)
    assert result["exit"] == 2
    assert f"cannot listen on 127.0.0.1:{port}" in result["stderr"] and "--port" in result["stderr"]
    assert result["heavy"] == [] and not (tmp_path / "home").exists()


# -- a registered model: aliases, resolve, promotion warnings ----------------------------
def test_registry_commands_take_aliases_and_say_what_will_not_be_served(
    session_home, tiny_export, tmp_path
):
    name = f"test-cli-{uuid.uuid4().hex[:8]}"

    def cli(*args, env=None):
        served = {"THYROID_CAD_MODEL": f"{name}@champion", **(env or {})}
        return run_cli(*args, "--name", name, home=session_home, cwd=tmp_path, env=served)

    empty = cli("registry", "list")
    assert empty["exit"] == 0 and empty["stdout"] == ""
    assert (
        f"no versions of {name} in the MLflow store {session_home / 'mlflow.db'}"
        in (empty["stderr"])
    )
    registered = cli("registry", "register", str(tiny_export))
    assert registered["exit"] == 0 and registered["stdout"].strip() == "1"
    for noise in ("Successfully registered", "mlflow", "Warning", "CUDA"):  # quiet by default
        assert noise not in registered["stderr"], registered["stderr"]
    promoted = cli("registry", "promote", "1", "--alias", "champion")
    assert promoted["exit"] == 0 and json.loads(promoted["stdout"])["version"] == 1
    assert "THYROID_CAD_EXTRA_ALIASES" not in promoted["stderr"]  # champion is served
    # JSON on stdout for scripts, one sentence on stderr for people
    assert f"{name}@champion -> version 1 (was no version)" in promoted["stderr"]

    shown = {}
    for reference in ("1", "champion", f"{name}@champion", f"{name}/1"):
        result = cli("registry", "show", reference, "--json")
        assert result["exit"] == 0, (reference, result["stderr"])
        shown[reference] = json.loads(result["stdout"])["version"]
    assert set(shown.values()) == {1}
    table = cli("registry", "show", "champion")["stdout"]
    assert re.search(r"^aliases\s+champion$", table, re.MULTILINE), table
    missing = cli("registry", "show", "challenger")
    assert missing["exit"] == 2 and "the alias is not set" in missing["stderr"]
    assert "Traceback" not in missing["stderr"]

    listed = cli("registry", "list")["stdout"].splitlines()
    assert listed[0].split()[:3] == ["version", "aliases", "val_auc"]
    assert listed[1].split()[:2] == ["1", "champion"]

    # resolve writes under THYROID_CAD_HOME, never into the working folder
    result = cli("registry", "resolve", "champion")
    resolved = json.loads(result["stdout"])
    out = Path(resolved["out"])
    assert (
        f"{name} version 1 (@champion): model.onnx and model_card.json in {out}"
        in (result["stderr"])
    )
    assert out == session_home / "resolved" / f"{name}-1" and (out / "model.onnx").is_file()
    assert list(tmp_path.iterdir()) == []

    prod = cli("registry", "promote", "1", "--alias", "prod")
    assert prod["exit"] == 0
    assert """THYROID_CAD_EXTRA_ALIASES='["challenger", "prod"]'""" in prod["stderr"]
    served = cli(
        "registry", "promote", "1", "--alias", "prod", env={"THYROID_CAD_EXTRA_ALIASES": '["prod"]'}
    )
    assert served["exit"] == 0 and "THYROID_CAD_EXTRA_ALIASES" not in served["stderr"]


def test_an_unset_extra_alias_is_not_an_error(home, tiny_export):
    """A fresh registry has a champion and no challenger: normal, said as `not set`."""
    from registry import store
    from service.errors import ApiError
    from service.inference.models import ModelManager, Runtime

    name = f"test-cli-{uuid.uuid4().hex[:8]}"
    store.promote(store.register(tiny_export, name), "champion", name)
    manager = ModelManager(
        f"{name}@champion", ["challenger"], Runtime(providers=("CPUExecutionProvider",)), 2
    )
    try:
        manager.refresh()
        assert manager.errors == {} and manager.not_set == {"challenger"}
        assert [m["aliases"] for m in manager.loaded()] == [["champion"]]
        for alias, why in [
            ("challenger", "no version holds that alias"),
            ("prod", "only champion, challenger are served (THYROID_CAD_EXTRA_ALIASES)"),
        ]:
            with pytest.raises(ApiError) as refused:
                manager.get(alias=alias)
            assert refused.value.status == 404 and why in refused.value.message, alias
    finally:
        manager.stop()
    missing = ModelManager(f"{name}@gone", [], Runtime(providers=("CPUExecutionProvider",)), 2)
    missing.refresh()  # the served alias itself missing is an error: nothing to serve
    assert "not set" in missing.errors["gone"] and missing.not_set == set()
