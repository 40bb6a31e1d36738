"""The registry against a real `mlflow server` (REST API, proxied artifacts).

Two backends: SQLite (the store API driven in-process, through an alias's whole life:
register, promote, rollback, resolve, cache, offline fallback) and PostgreSQL (driven
through the `thyroid-cad` CLI as subprocesses, then checked in the database itself).
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
SERVER_START_TIMEOUT_S = 60
SERVER_STOP_TIMEOUT_S = 30
CLI_TIMEOUT_S = 300
PG_ADMIN_DSN = "dbname=test user=postgres host=127.0.0.1 port=5432 connect_timeout=5"
# MLflow mirrors its process-wide settings in these variables (set_tracking_uri,
# set_registry_uri, set_experiment write them); a leftover value would point a later
# test, or a CLI subprocess, at the wrong store.
MLFLOW_ENV = ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI", "MLFLOW_EXPERIMENT_ID")


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/health", timeout=2) as response:
            return response.status == 200
    except (urllib.error.URLError, OSError):
        return False


@dataclass
class MlflowServer:
    """An `mlflow server` subprocess (leader of its own process group)."""

    proc: subprocess.Popen
    port: int
    log: Path
    artifacts: Path
    _log_file: object = field(repr=False, default=None)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def log_tail(self, chars: int = 4000) -> str:
        return self.log.read_text(errors="replace")[-chars:] if self.log.exists() else ""

    def stop(self) -> None:
        """SIGTERM the whole group (the CLI and its uvicorn workers), then wait."""
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGTERM)
                self.proc.wait(timeout=SERVER_STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=SERVER_STOP_TIMEOUT_S)
            except ProcessLookupError:
                pass
        # Workers left behind by a leader that exited on its own.
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None


@pytest.fixture
def mlflow_server(tmp_path_factory) -> Iterator[Callable[[str], MlflowServer]]:
    """Factory: start(backend_store_uri) -> a running server, stopped at teardown."""
    servers: list[MlflowServer] = []

    def start(backend_store_uri: str) -> MlflowServer:
        workdir = tmp_path_factory.mktemp("mlflow-server")
        artifacts = workdir / "artifacts"
        artifacts.mkdir()
        port = _free_port()
        log = workdir / "server.log"
        log_file = open(log, "wb")  # closed by MlflowServer.stop
        env = {k: v for k, v in os.environ.items() if k not in MLFLOW_ENV}
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "mlflow",
                "server",
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
                "--workers",
                "1",
                "--backend-store-uri",
                backend_store_uri,
                "--serve-artifacts",
                "--artifacts-destination",
                str(artifacts),
            ],
            cwd=workdir,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        server = MlflowServer(proc, port, log, artifacts, log_file)
        servers.append(server)
        deadline = time.monotonic() + SERVER_START_TIMEOUT_S
        while not _healthy(server.url):
            if proc.poll() is not None:
                pytest.fail(
                    f"mlflow server exited with status {proc.returncode} before answering "
                    f"/health; its output ends:\n{server.log_tail()}"
                )
            if time.monotonic() > deadline:
                server.stop()
                pytest.fail(
                    f"mlflow server did not answer {server.url}/health within "
                    f"{SERVER_START_TIMEOUT_S} s; its output ends:\n{server.log_tail()}"
                )
            time.sleep(0.25)
        return server

    yield start
    for server in reversed(servers):
        server.stop()


@pytest.fixture(autouse=True)
def _isolated_mlflow_state(monkeypatch) -> Iterator[None]:
    """Start from, and give back, clean MLflow process-wide state.

    register() and resolve() call mlflow.set_tracking_uri / set_registry_uri /
    set_experiment, which persist in module globals and in os.environ.
    """
    import mlflow.tracking._model_registry.utils as registry_utils
    import mlflow.tracking._tracking_service.utils as tracking_utils
    import mlflow.tracking.fluent as fluent

    monkeypatch.setattr(tracking_utils, "_tracking_uri", None)
    monkeypatch.setattr(registry_utils, "_registry_uri", None)
    monkeypatch.setattr(fluent, "_active_experiment_id", None)
    saved = {k: os.environ.get(k) for k in MLFLOW_ENV}
    for k in MLFLOW_ENV:
        os.environ.pop(k, None)
    yield
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


def _check_export(out: Path, card: dict) -> dict:
    """out holds model.onnx and model_card.json matching the registered card."""
    onnx_path, card_path = out / "model.onnx", out / "model_card.json"
    assert onnx_path.is_file() and card_path.is_file(), sorted(p.name for p in out.iterdir())
    got = json.loads(card_path.read_text())
    assert got["sha256"] == card["sha256"]
    assert _sha256(onnx_path) == card["sha256"]
    assert got["class_names"] == card["class_names"]
    assert got["input_size"] == card["input_size"]
    return got


def _check_inference(onnx_path: Path, card: dict, n: int = 5) -> None:
    import onnxruntime as ort

    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    size = int(card["input_size"])
    batch = np.random.default_rng(0).integers(0, 256, size=(n, size, size, 3), dtype=np.uint8)
    (probabilities,) = session.run(["probabilities"], {session.get_inputs()[0].name: batch})
    assert probabilities.shape == (n, len(card["class_names"])) == (n, 2)
    assert np.all((probabilities >= 0) & (probabilities <= 1))
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, atol=1e-5)


def test_registry_against_mlflow_server_sqlite(tiny_export, mlflow_server, tmp_path, monkeypatch):
    from registry import store

    server = mlflow_server(f"sqlite:///{tmp_path / 'server.db'}")
    home = tmp_path / "home"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", server.url)
    monkeypatch.setenv("THYROID_CAD_HOME", str(home))
    monkeypatch.setenv("THYROID_CAD_USER", "pytest")
    name = f"thyroid-test-{uuid.uuid4().hex[:8]}"
    card = json.loads((tiny_export / "model_card.json").read_text())
    ref = f"{name}@champion"

    # register: two versions, logged to the fallback experiment on the server, artifacts
    # uploaded through the server's proxy into --artifacts-destination.
    assert store.register(tiny_export, name) == 1
    assert store.register(tiny_export, name) == 2
    versions = store.list_versions(name)
    assert [v.version for v in versions] == [2, 1]
    assert all(v.aliases == [] for v in versions)
    for v in versions:
        assert v.tags["sha256"] == card["sha256"]
        assert v.tags["parity_passed"] == "true"
    c = store.client()
    run = c.get_run(c.get_model_version(name, "1").run_id)
    assert c.get_experiment(run.info.experiment_id).name == "thyroid-cad-registry"
    uploaded = list(server.artifacts.rglob("model.onnx"))
    assert uploaded, f"no model.onnx under the server's artifacts destination {server.artifacts}"
    assert {_sha256(p) for p in uploaded} == {card["sha256"]}
    assert not (home / "mlflow.db").exists(), "a local store was used instead of the server"

    # promote v1, then v2 (same validation AUC: the gate allows it), roll back to v1.
    val_aucs = {v.version: v.to_json()["val_auc"] for v in versions}
    assert val_aucs[1] is not None and val_aucs[1] == val_aucs[2]
    first = store.promote(1, "champion", name)
    assert (first["previous"], first["forced"], first["who"]) == (None, False, "pytest")
    second = store.promote(2, "champion", name)
    assert (second["previous"], second["forced"]) == (1, False)
    assert store.alias_version(name, "champion") == 2
    back = store.rollback("champion", name, reason="server test")
    assert (back["version"], back["previous"]) == (1, 2)
    assert store.alias_version(name, "champion") == 1
    assert [(e["action"], e["version"]) for e in store.history(name)] == [
        ("promote", 1),
        ("promote", 2),
        ("rollback", 1),
    ]
    assert {v.version: v.aliases for v in store.list_versions(name)} == {2: [], 1: ["champion"]}

    # resolve: downloaded once, SHA-256 checked, runnable.
    downloads = []
    real_download = store._download
    monkeypatch.setattr(
        store, "_download", lambda mv, dst: downloads.append(mv.version) or real_download(mv, dst)
    )
    out = tmp_path / "out"
    resolved = store.resolve(ref, out)
    assert (resolved.name, resolved.version, resolved.alias) == (name, 1, "champion")
    assert downloads == ["1"]
    assert resolved.onnx_path.is_relative_to(home / "models")
    assert _sha256(resolved.onnx_path) == card["sha256"]
    got = _check_export(out, card)
    _check_inference(out / "model.onnx", got)

    # resolve again: the cached copy, untouched.
    before = resolved.onnx_path.stat()
    again = store.resolve(ref, tmp_path / "out2")
    assert downloads == ["1"], "the second resolve downloaded the model again"
    assert again.onnx_path == resolved.onnx_path and again.version == 1
    after = again.onnx_path.stat()
    assert (after.st_mtime_ns, after.st_ino) == (before.st_mtime_ns, before.st_ino)
    _check_export(tmp_path / "out2", card)

    # registry gone: resolve says so, cached() still answers with the champion.
    server.stop()
    assert not _healthy(server.url)
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "5")
    with pytest.raises(store.RegistryUnavailable, match="registry unavailable"):
        store.resolve(ref)
    offline = store.cached(ref)
    assert offline is not None
    assert (offline.version, offline.alias, offline.cached) == (1, "champion", True)
    assert offline.onnx_path == resolved.onnx_path
    assert _sha256(offline.onnx_path) == offline.card["sha256"] == card["sha256"]
    assert store.cached(f"{name}/1").onnx_path == resolved.onnx_path
    assert store.cached(f"{name}/2") is None  # never resolved on this host
    assert store.cached(f"{name}@challenger") is None


@dataclass
class PostgresDatabase:
    name: str

    @property
    def uri(self) -> str:
        # An explicit driver: SQLAlchemy 2.1 maps a bare postgresql:// to psycopg (v3), and the
        # project's dev extra installs psycopg2.
        return f"postgresql+psycopg2://postgres@127.0.0.1:5432/{self.name}"

    def query(self, sql: str, params: tuple = ()) -> list[tuple]:
        import psycopg2

        conn = psycopg2.connect(
            dbname=self.name, user="postgres", host="127.0.0.1", port=5432, connect_timeout=5
        )
        try:
            with conn.cursor() as cur:
                cur.execute(sql, params)
                return cur.fetchall()
        finally:
            conn.close()


@pytest.fixture
def postgres_db() -> Iterator[PostgresDatabase]:
    """A fresh, empty database on the local PostgreSQL server, dropped at teardown."""
    psycopg2 = pytest.importorskip("psycopg2", reason="psycopg2 is not installed")
    from psycopg2 import sql

    try:
        admin = psycopg2.connect(PG_ADMIN_DSN)
    except psycopg2.OperationalError as e:
        pytest.skip(f"PostgreSQL is not reachable at 127.0.0.1:5432 ({str(e).strip()})")
    admin.autocommit = True
    db = PostgresDatabase(f"thyroid_cad_test_{uuid.uuid4().hex[:8]}")
    try:
        with admin.cursor() as cur:
            cur.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(db.name)))
    finally:
        admin.close()
    yield db
    admin = psycopg2.connect(PG_ADMIN_DSN)
    admin.autocommit = True
    try:
        with admin.cursor() as cur:
            cur.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                "WHERE datname = %s AND pid <> pg_backend_pid()",
                (db.name,),
            )
            cur.execute(sql.SQL("DROP DATABASE IF EXISTS {}").format(sql.Identifier(db.name)))
    finally:
        admin.close()


@pytest.mark.postgres
def test_registry_with_postgresql_backend(tiny_export, postgres_db, mlflow_server, tmp_path):
    # postgres_db comes before mlflow_server: the server is stopped before the drop.
    server = mlflow_server(postgres_db.uri)
    env = {k: v for k, v in os.environ.items() if k not in MLFLOW_ENV}
    env.update(
        MLFLOW_TRACKING_URI=server.url,
        THYROID_CAD_HOME=str(tmp_path / "home"),
        THYROID_CAD_USER="pytest",
        PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")])),
    )
    name = f"thyroid-test-{uuid.uuid4().hex[:8]}"
    card = json.loads((tiny_export / "model_card.json").read_text())

    def cli(*args: str, ok: bool = True) -> subprocess.CompletedProcess:
        done = subprocess.run(
            [sys.executable, "-m", "cli", "registry", *args],
            cwd=tmp_path,
            env=env,
            capture_output=True,
            text=True,
            timeout=CLI_TIMEOUT_S,
        )
        assert (done.returncode == 0) == ok, (
            f"thyroid-cad registry {' '.join(args)} exited {done.returncode}\n"
            f"stdout:\n{done.stdout[-3000:]}\nstderr:\n{done.stderr[-3000:]}\n"
            f"server log:\n{server.log_tail(2000)}"
        )
        return done

    registered = cli("register", str(tiny_export), "--name", name)
    assert registered.stdout.strip().splitlines()[-1] == "1"

    refused = cli("promote", "7", "--alias", "champion", "--name", name, ok=False)
    assert "has no version 7" in refused.stderr

    event = json.loads(cli("promote", "1", "--alias", "champion", "--name", name).stdout)
    assert (event["action"], event["alias"], event["version"]) == ("promote", "champion", 1)
    assert (event["previous"], event["forced"], event["who"]) == (None, False, "pytest")

    listed = json.loads(cli("list", "--json", "--name", name).stdout)
    assert [(v["version"], v["aliases"]) for v in listed] == [(1, ["champion"])]
    assert listed[0]["sha256"] == card["sha256"]
    assert listed[0]["parity_passed"] is True

    out = tmp_path / "out"
    resolved = json.loads(cli("resolve", f"{name}@champion", "--out", str(out)).stdout)
    assert resolved == {
        "name": name,
        "version": 1,
        "alias": "champion",
        "sha256": card["sha256"],
        "out": str(out),
    }
    got = _check_export(out, card)
    _check_inference(out / "model.onnx", got)

    # The registry really lives in PostgreSQL, in MLflow's own schema.
    assert postgres_db.query(
        "SELECT alias, version FROM registered_model_aliases WHERE name = %s", (name,)
    ) == [("champion", 1)]
    assert postgres_db.query("SELECT version FROM model_versions WHERE name = %s", (name,)) == [
        (1,)
    ]
