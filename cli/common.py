"""Shared pieces of the `thyroid-cad` command line: the root app, errors, output style.

Heavy modules (TensorFlow, MLflow, onnxruntime) are imported inside the commands that
need them, after their arguments are checked, so `--help` is instant, a bad path is
reported at once and serving never loads TensorFlow. Results that scripts read (run
ids, JSON) go to stdout; logs go to stderr. Third-party warnings and Keras progress
are shown only with --verbose. Every list and show command prints a table for people,
or JSON for scripts with --json.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import sys
import tempfile
import warnings
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Annotated

import typer


def _usage_name(argument) -> str:
    """An argument in a usage line as click and POSIX write it: NAME, [NAME], NAME...
    (typer 0.29 writes a required one as {NAME})."""
    name = argument.metavar or argument.name.upper()
    name = name if argument.required else f"[{name}]"
    return name + ("..." if argument.nargs != 1 else "")


if hasattr(typer.core.TyperArgument, "_usage_display_name"):
    typer.core.TyperArgument._usage_display_name = _usage_name


def group(help: str) -> typer.Typer:
    """A command group. Plain help (click's layout, not Rich's table): whole sentences
    rewrapped to the terminal, arguments by their metavar, flags without a `<bool>`."""
    return typer.Typer(
        help=help, no_args_is_help=True, rich_markup_mode=None, pretty_exceptions_enable=False
    )


app = group(
    "Thyroid nodule CAD: demo data, dataset audit, training, sweeps, ONNX export, "
    "model registry, inference service. Research software: not for diagnostic use."
)
ModelName = Annotated[str, typer.Option("--name", metavar="NAME", help="Registered model name.")]
AsJson = Annotated[
    bool, typer.Option("--json", help="Print JSON (for scripts) instead of a table.")
]

log = logging.getLogger("thyroid_cad")
# Loggers of libraries whose progress and warnings are news only when debugging.
THIRD_PARTY = ("mlflow", "alembic", "urllib3", "h5py", "matplotlib", "PIL", "tf2onnx", "absl")
verbosity = {"verbose": False}  # set once by the root callback, read by commands


@app.callback()
def _main(
    verbose: Annotated[
        bool,
        typer.Option(
            "--verbose",
            "-v",
            help="Also show debug logs, training progress and third-party warnings.",
        ),
    ] = False,
):
    verbosity["verbose"] = verbose
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    if verbose:
        return
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")  # TensorFlow's C++ INFO and WARNING
    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "ERROR")  # MLflow sets its level at import
    warnings.simplefilter("ignore")  # Keras' UserWarnings, MLflow's FutureWarnings...
    for noisy in THIRD_PARTY:
        logging.getLogger(noisy).setLevel(logging.ERROR)


@contextlib.contextmanager
def progress_hidden() -> Iterator[None]:
    """What libraries print while a command works (Keras' epoch lines on stdout, MLflow's
    "Successfully registered" and download bars on stderr): shown on stderr with
    --verbose, else dropped. Our own log lines still reach stderr (their handler holds
    the real one), and stdout stays for the results scripts read."""
    if verbosity["verbose"]:
        with contextlib.redirect_stdout(sys.stderr):
            yield
        return
    with (
        open(os.devnull, "w") as sink,
        contextlib.redirect_stdout(sink),
        contextlib.redirect_stderr(sink),
    ):
        yield


def table(rows: Sequence[dict], columns: Sequence[tuple[str, str | Callable[[dict], object]]]):
    """Rows as aligned columns for people: (heading, key or function of the row) each."""
    cells = [[_cell(c(r) if callable(c) else r.get(c)) for _, c in columns] for r in rows]
    head = [h for h, _ in columns]
    widths = [max(len(x) for x in col) for col in zip(head, *cells, strict=False)]
    for row in (head, *cells):
        typer.echo("  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)).rstrip())


def _cell(value) -> str:
    if value in (None, "", []):
        return "-"
    return ",".join(map(str, value)) if isinstance(value, list) else str(value)


def fields(record: dict, indent: str = "") -> None:
    """One record as aligned `key  value` lines for people; a nested record below its key,
    indented."""
    width = max((len(k) for k in record), default=0)
    for key, value in record.items():
        if isinstance(value, dict):
            typer.echo(f"{indent}{key}")
            fields(value, indent + "  ")
        else:
            typer.echo(f"{indent}{key.ljust(width)}  {_cell(value)}")


def check_path(path: Path | str | None, what: str) -> None:
    """Refuse, before any heavy import, a path that does not exist (`--data nope` is
    answered at once, not after TensorFlow has loaded); None is no path given."""
    if path is not None and not Path(path).exists():
        raise fail(f"{what} not found: {path}")


def existing_store(required: bool = True) -> bool:
    """Whether the MLflow store exists; reading one that does not would create an empty
    one in whatever folder the command runs from. Missing: refused (exit 2) when
    `required`, else said on stderr (a list command then lists nothing)."""
    from thyroid_cad import settings

    db = settings.local_store()
    if db is None or db.exists():
        return True
    message = (
        f"no MLflow store at {db}: nothing was trained or registered with "
        f"THYROID_CAD_HOME={settings.home()}; {settings.ELSEWHERE}"
    )
    if required:
        raise fail(message)
    log.info(message)
    return False


def missing_database() -> str | None:
    """Why the service's database cannot be read (its SQLite file does not exist), or None."""
    from service.config import get_settings

    local = get_settings().local_database()
    if local is None or local.exists():
        return None
    return (
        f"no {describe_database()}: nothing was recorded there yet; set THYROID_CAD_HOME "
        "to another folder, or DATABASE_URL to the service's database"
    )


@contextlib.contextmanager
def service_database(create: bool):
    """The service's database (DATABASE_URL / THYROID_CAD_DATABASE_URL, else SQLite under
    THYROID_CAD_HOME), migrated; disposed of afterwards. A missing SQLite file is made,
    and said so, when `create`; else refused (no empty database as a side effect)."""
    from service.config import get_settings
    from service.store.db import Database

    missing = missing_database()
    if missing and not create:
        raise fail(missing)
    if missing:
        log.info("new %s", describe_database())
    db = Database(get_settings().audit_url())
    try:
        db.migrate()
        yield db
    finally:
        db.dispose()


def describe_database() -> str:
    """Which service database this process uses (password hidden), for messages."""
    from service.config import get_settings
    from thyroid_cad import settings as paths

    settings = get_settings()
    local = settings.local_database()
    if local is not None:
        return f"service database {local} (THYROID_CAD_HOME={paths.home()})"
    from sqlalchemy.engine import make_url

    return f"service database {make_url(settings.database_url).render_as_string()} (DATABASE_URL)"


def fail(message: str, code: int = 2) -> typer.Exit:
    typer.echo(f"error: {message}", err=True)
    return typer.Exit(code)


@contextlib.contextmanager
def user_errors():
    """Turn bad input into one clear line and exit status 2, not a traceback."""
    try:
        yield
    except KeyError as e:
        raise fail(f"missing {e}") from e
    except (ValueError, FileNotFoundError) as e:
        raise fail(str(e)) from e
    except Exception as e:
        if type(e).__name__ in ("MlflowException", "RestException"):
            raise fail(f"MLflow: {e}") from e
        raise


# What TensorFlow's and onnxruntime's C++ sides write to stderr on a host without an
# NVIDIA GPU, straight to file descriptor 2 (so no logging setting reaches all of it):
# TensorFlow looks for CUDA at import and calls cuInit at the first device query;
# onnxruntime-gpu, asked for its CUDA provider (MLflow validates a logged ONNX model
# that way), prints a red [E] and a yellow [W] line. None of it is news on a CPU host.
CPU_HOST_NOISE = (
    "All log messages before absl::InitializeLog() is called",
    "cudart_stub.cc",
    "cuda_platform.cc",
    "cuInit",
    "oneDNN custom operations are on",
    "provider_bridge_ort.cc",
    "CreateExecutionProviderFactoryInstance",
)
_COLOUR_ONLY = re.compile(r"^(\x1b\[[0-9;]*m)+\s*$")  # what is left of a colour reset


def has_nvidia_gpu() -> bool:
    """An NVIDIA driver is present (its device nodes or its /proc entry)."""
    return any(Path(p).exists() for p in ("/dev/nvidiactl", "/proc/driver/nvidia/version"))


@contextlib.contextmanager
def stderr_without(noise: tuple[str, ...]):
    """Capture file descriptor 2 (C++ libraries write there directly); afterwards, write
    back every captured line that contains none of `noise`."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as captured:
        os.dup2(captured.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            captured.seek(0)
            for line in captured.read().decode(errors="replace").splitlines(keepends=True):
                if not any(n in line for n in noise) and not _COLOUR_ONLY.match(line):
                    sys.stderr.write(line)
            sys.stderr.flush()


@contextlib.contextmanager
def quiet_cuda_probes():
    """On a host without an NVIDIA GPU, drop TensorFlow's and onnxruntime's CUDA probing
    messages from stderr (anything else they print still gets through). On a GPU host
    nothing is filtered: there those messages can matter."""
    if has_nvidia_gpu():
        yield
        return
    with stderr_without(CPU_HOST_NOISE):
        yield


def start_tensorflow() -> None:
    """Import TensorFlow for a command that trains or exports, quietly on a CPU host:
    its CUDA probing is replaced by one plain log line."""
    if "tensorflow" in sys.modules:
        return
    with quiet_cuda_probes():
        import tensorflow as tf

        gpus = tf.config.list_physical_devices("GPU")  # cuInit happens here, once
    if not gpus:
        log.info("no NVIDIA GPU found: TensorFlow runs on the CPU")
