"""Several API replicas sharing one PostgreSQL database and one MLflow server.

- The API-key cache (THYROID_CAD_KEY_CACHE_S), in process: how long a revoked key lives.
- Two real `thyroid-cad serve` processes on loopback ports, one audit database, one
  registry: both serve, a promotion reaches both, both audit into one table (no request id
  lost or doubled), a key created once works on both, a revoked key stops on both.
"""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient
from test_deploy import fresh_databases  # noqa: F401 - a fixture: fresh PostgreSQL databases
from test_registry_server import _isolated_mlflow_state, mlflow_server  # noqa: F401 - fixtures

from service.api.app import create_app
from service.store.db import Database
from service.store.keys import KeyStore


def _png() -> bytes:
    import io

    import numpy as np
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.full((64, 64, 3), 90, np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def _predict(client: TestClient, token: str) -> int:
    files = {"file": ("x.png", _png(), "image/png")}
    headers = {"Authorization": f"Bearer {token}"}
    return client.post("/v1/predict?heatmap=none", files=files, headers=headers).status_code


@pytest.mark.parametrize("cache_s", [300.0, 0.0])
def test_a_revoked_key_lives_as_long_as_the_key_cache(served, cache_s):
    settings = served.settings.model_copy(update={"key_cache_s": cache_s})
    db = Database(settings.audit_url())
    keys = KeyStore(db)
    key_id, token = keys.create_key("predict", "cache-test")
    with TestClient(create_app(settings)) as client:
        assert _predict(client, token) == 200  # verified once, now cached
        assert keys.revoke_key(key_id)
        # 300 s: this process still trusts what it verified; 0 s: it asks every time.
        assert _predict(client, token) == (200 if cache_s else 401)
    db.dispose()


def test_the_key_cache_is_a_setting(monkeypatch):
    from service.config import Settings

    monkeypatch.setenv("THYROID_CAD_KEY_CACHE_S", "1.5")
    assert Settings().key_cache_s == 1.5
    monkeypatch.setenv("THYROID_CAD_KEY_CACHE_S", "-1")
    with pytest.raises(ValueError):
        Settings()


# -- two real replicas ------------------------------------------------------------------------
POLL_S = 1.0  # THYROID_CAD_POLL_INTERVAL_S of both replicas
KEY_CACHE_S = 1.0  # THYROID_CAD_KEY_CACHE_S of both replicas


def _replica(index: int, port: int, root, server_url: str, audit_url: str, model: str):
    import os
    import sys

    from test_deploy import ROOT, Container

    home = root / f"replica-{index}"
    home.mkdir()
    env = {
        "PATH": os.environ["PATH"],
        "HOME": str(home),
        "LANG": "C.UTF-8",
        "PYTHONPATH": str(ROOT),
        "THYROID_CAD_HOME": str(home),  # each replica its own model cache, like a pod
        "MLFLOW_TRACKING_URI": server_url,
        "DATABASE_URL": audit_url,
        "THYROID_CAD_MODEL": model,
        "THYROID_CAD_EXTRA_ALIASES": "[]",
        "THYROID_CAD_POLL_INTERVAL_S": str(POLL_S),
        "THYROID_CAD_KEY_CACHE_S": str(KEY_CACHE_S),
        "THYROID_CAD_PROVIDERS": '["CPUExecutionProvider"]',
        "THYROID_CAD_INTRA_OP_THREADS": "1",
    }
    argv = [sys.executable, "-m", "cli", "serve", "--host", "127.0.0.1", "--port", str(port)]
    return Container(f"replica-{index}", argv, env, home, None)


@pytest.mark.postgres
@pytest.mark.usefixtures("_isolated_mlflow_state")
def test_two_replicas_share_one_database_and_one_registry(
    tiny_export,
    mlflow_server,  # noqa: F811 - the imported fixture
    fresh_databases,  # noqa: F811 - the imported fixture
    tmp_path,
    monkeypatch,
):
    import uuid
    from contextlib import ExitStack

    import httpx
    import test_deploy
    import test_registry_server
    from test_deploy import PG_PORT, Process, _free_port, _query, _wait

    from registry import store

    # Three servers start here at once (MLflow, two replicas): on a loaded 2-core machine
    # each can take minutes. The waits are for conditions; only a failure waits this long.
    monkeypatch.setattr(test_registry_server, "SERVER_START_TIMEOUT_S", 300)
    monkeypatch.setattr(test_deploy, "START_TIMEOUT_S", 300)

    audit_db = fresh_databases(["audit"])["audit"]
    audit_url = f"postgresql+psycopg2://postgres@127.0.0.1:{PG_PORT}/{audit_db}"
    server = mlflow_server(f"sqlite:///{tmp_path / 'mlflow.db'}")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", server.url)
    monkeypatch.setenv("THYROID_CAD_HOME", str(tmp_path / "operator"))
    name = f"replicas-{uuid.uuid4().hex[:8]}"
    assert [store.register(tiny_export, name) for _ in range(2)] == [1, 2]
    store.promote(1, "champion", name)

    with ExitStack() as stack:
        # Both start at once on an empty database: they migrate it between them.
        ports = [_free_port(), _free_port()]
        replicas = []
        for i, port in enumerate(ports):
            container = _replica(i, port, tmp_path, server.url, audit_url, f"{name}@champion")
            process = Process.start(container, tmp_path / f"replica-{i}.log")
            stack.callback(process.stop)
            replicas.append(process)
        clients = [
            stack.enter_context(httpx.Client(base_url=f"http://127.0.0.1:{p}", timeout=60))
            for p in ports
        ]

        def ready(client) -> bool:
            try:
                return client.get("/readyz").status_code == 200
            except httpx.HTTPError:
                return False

        for client, process in zip(clients, replicas, strict=True):
            _wait(lambda c=client: ready(c), f"{process.name} ready", process)

        # One key, created once in the shared database, works on both.
        db = Database(audit_url)
        stack.callback(db.dispose)
        keys = KeyStore(db)
        key_id, token = keys.create_key("predict", "replicas")
        headers = {"Authorization": f"Bearer {token}"}
        png = _png()
        served: list[tuple[int, str, int]] = []  # (replica, request id, model version)

        def predict(i: int) -> httpx.Response:
            files = {"file": ("x.png", png, "image/png")}
            r = clients[i].post("/v1/predict?heatmap=none", files=files, headers=headers)
            if r.status_code == 200:
                body = r.json()
                assert r.headers["X-Request-ID"] == body["request_id"]
                served.append((i, body["request_id"], body["model"]["version"]))
            return r

        for n in range(10):
            assert predict(n % 2).status_code == 200
        assert {(i, v) for i, _, v in served} == {(0, 1), (1, 1)}

        # A promotion reaches both within the poll interval (waited for, not timed).
        store.promote(2, "champion", name, reason="replica test")
        for i in (0, 1):
            _wait(lambda i=i: predict(i).json()["model"]["version"] == 2, f"replica {i} on v2")
        for n in range(6):
            assert predict(n % 2).json()["model"]["version"] == 2
        for client in clients:
            assert [m["version"] for m in client.get("/readyz").json()["models"]] == [2]

        # One audit table: every request id of both replicas exactly once, nothing else.
        ids = [rid for _, rid, _ in served]
        assert len(set(ids)) == len(ids)

        def audited() -> list[tuple]:
            return _query(
                audit_db,
                "SELECT request_id, COUNT(*), MIN(model_version), MIN(status_code) "
                "FROM requests GROUP BY request_id",
            )

        _wait(lambda: len(audited()) >= len(ids), "every request in the audit table")
        rows = {r[0]: r[1:] for r in audited()}
        # Requests that hit a replica before its swap count too (the wait loop's probes).
        assert set(ids) <= set(rows) and all(n == 1 for n, _, _ in rows.values())
        assert {rows[rid][1] for _, rid, v in served if v == 2} == {2}
        assert all(status == 200 for _, _, status in rows.values())

        # Revoked once: refused by both replicas within the key cache's lifetime.
        assert keys.revoke_key(key_id)
        for i in (0, 1):
            _wait(lambda i=i: predict(i).status_code == 401, f"replica {i} refusing the key")
        assert predict(0).json()["error"]["code"] == "invalid_api_key"
        for process in replicas:
            assert process.proc.poll() is None, process.tail()
