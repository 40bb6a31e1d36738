"""The event loop never waits on the audit database (issue 17, item 3).

A real served process (uvicorn in a subprocess, the tiny model, SQLite audit) takes /v1 and
/v2 requests while another connection holds an exclusive lock on the audit database for
longer than the busy timeout: liveness must keep answering at once, the requests must be
answered, and every record must land once the lock is released. And no per-request
work sits on the loop: the frame checks and the check of a known key.
"""

from __future__ import annotations

import asyncio
import base64
import io
import os
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
from conftest import free_port, wait_ready
from PIL import Image

from service.store import db
from training import phantom

ROOT = Path(__file__).resolve().parents[1]


def _png(seed: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(phantom.make_image("benign", np.random.default_rng(seed), 96)).save(buf, "PNG")
    return buf.getvalue()


@pytest.fixture
def process(served, tmp_path):
    """The service in its own process, configured through the environment like a pod."""
    port = free_port()
    env = {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "THYROID_CAD_MODEL": served.settings.model,
        "THYROID_CAD_DATABASE_URL": served.settings.database_url,
        "THYROID_CAD_SPOOL_DIR": str(served.spool),
    }
    log = (tmp_path / "server.log").open("w")
    serve = "-m uvicorn service.api.app:create_app --factory --host 127.0.0.1 --log-level warning"
    proc = subprocess.Popen(
        [sys.executable, *serve.split(), "--port", str(port)],
        env=env,
        cwd=ROOT,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        wait_ready(f"{base}/readyz", proc)
        yield base
    finally:
        proc.terminate()
        proc.wait(timeout=60)
        log.close()


def _send(client: httpx.Client, served, i: int, data: bytes) -> httpx.Response:
    """Alternately a /v1 predict and a /v2 infer of a small PNG, through `client` (an
    httpx.Client on the served process, or a TestClient on an app in this one)."""
    auth = {"Authorization": f"Bearer {served.predict_key}"}
    if i % 2:
        return client.post(
            "/v1/predict",
            params={"heatmap": "none"},
            files={"file": ("x.png", data, "image/png")},
            headers=auth,
        )
    tensor = {"name": "image", "datatype": "BYTES", "shape": [1],
              "data": [base64.b64encode(data).decode()]}  # fmt: skip
    body = {"inputs": [tensor], "outputs": [{"name": "probabilities"}]}
    return client.post(f"/v2/models/{served.name}/infer", json=body, headers=auth)


def _stored_ids(path: Path) -> set[str]:
    with sqlite3.connect(path, timeout=30) as conn:
        return {r[0] for r in conn.execute("SELECT request_id FROM requests")}


def _request_id(response: httpx.Response) -> str:
    if "/v1/" in str(response.url):
        return response.json()["request_id"]
    return response.json()["id"]  # /v2: the request's id unless it sent one


def _under_load(base: str, served, seconds: float) -> tuple[list[float], list[httpx.Response]]:
    """/healthz latencies (s) every 50 ms for `seconds` while two clients send predictions,
    and the clients' answers."""
    answers: list[httpx.Response] = []
    stop = threading.Event()
    files = [_png(i) for i in range(8)]  # made now: the clients only send

    def client(i: int) -> None:
        with httpx.Client(base_url=base, timeout=60) as http:
            while not stop.is_set():
                answers.append(_send(http, served, i, files[i % len(files)]))
                i += 2

    clients = [threading.Thread(target=client, args=(k,)) for k in range(2)]
    for t in clients:
        t.start()
    probes = []
    until = time.monotonic() + seconds
    while time.monotonic() < until:
        t0 = time.perf_counter()
        assert httpx.get(f"{base}/healthz", timeout=30).status_code == 200
        probes.append(time.perf_counter() - t0)
        time.sleep(0.05)
    stop.set()
    for t in clients:
        t.join(timeout=120)
    return probes, answers


def test_a_locked_audit_database_blocks_no_probe_and_loses_no_record(process, served):
    base = process
    for i in range(4):  # warm: model, key cache, connections
        with httpx.Client(base_url=base, timeout=60) as http:
            assert _send(http, served, i, _png(i)).status_code == 200
    # The same load with the database free: what this (shared, busy) machine gives.
    free, _ = _under_load(base, served, 4.0)

    lock = sqlite3.connect(served.db_path, isolation_level=None, timeout=30)
    lock.execute("BEGIN EXCLUSIVE")
    try:  # held longer than any write could wait for it
        locked, answers = _under_load(base, served, db.SQLITE_BUSY_TIMEOUT_S + 3)
    finally:
        lock.execute("COMMIT")
        lock.close()

    assert [r.status_code for r in answers] == [200] * len(answers)
    # Before: each /v2 answer waited out the busy timeout, so two clients got ~2 answers.
    assert len(answers) >= 10, len(answers)
    # Before: /healthz waited behind those writes, seconds. Now what the free database
    # gives; 50 ms on a quiet machine (issue 17), more where the cores are shared.
    p99, p99_free = (float(np.percentile(p, 99)) for p in (locked, free))
    assert p99 < 0.050 + 2 * p99_free, (
        f"/healthz p99 {p99 * 1e3:.0f} ms (free: {p99_free * 1e3:.0f})"
    )

    # Every record lands: spooled during the lock, replayed once it is released.
    wanted = {_request_id(r) for r in answers}
    deadline = time.monotonic() + 60
    while not wanted <= (stored := _stored_ids(served.db_path)):
        assert time.monotonic() < deadline, f"{len(wanted - stored)} records never landed"
        time.sleep(0.5)
    assert httpx.get(f"{base}/readyz", timeout=30).json()["audit_database"] is True


def _on_loop() -> bool:
    """Whether the caller runs on an event loop's thread (not in a worker thread)."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return False
    return True


def _where_called(monkeypatch, module, name: str) -> list[bool]:
    """Replace module.name by a spy; the list fills with _on_loop() of each call."""
    calls: list[bool] = []
    real = getattr(module, name)

    def spy(*args, **kwargs):
        calls.append(_on_loop())
        return real(*args, **kwargs)

    monkeypatch.setattr(module, name, spy)
    return calls


def test_no_frame_check_runs_on_the_event_loop(served, monkeypatch):
    """/v2 used to check every frame (modality + OOD verdicts, ~5 ms a frame) inside its
    async handler: the whole loop waited for it. Both routes now run it in a thread."""
    from fastapi.testclient import TestClient

    from service.api.app import create_app
    from service.inference import safety

    calls = _where_called(monkeypatch, safety, "of_outputs")
    with TestClient(create_app(served.settings)) as client:
        for i in range(4):
            assert _send(client, served, i, _png(i)).status_code == 200
    assert calls == [False] * 4, calls


def test_a_verified_key_is_checked_without_a_thread(served, monkeypatch):
    """Only a key not in the cache needs the database (in a thread); before, every
    request took two thread hops for its key (the auth-first check and the scope)."""
    from fastapi.testclient import TestClient

    from service.api import deps
    from service.api.app import create_app

    calls = _where_called(monkeypatch, deps, "authorize")
    with TestClient(create_app(served.settings)) as client:
        assert _send(client, served, 0, _png(0)).status_code == 200
        first = len(calls)
        assert False in calls  # the first sight of the key: looked up off the loop
        for i in range(1, 5):
            assert _send(client, served, i, _png(i)).status_code == 200
        assert calls[first:] and all(calls[first:]), calls
        wrong = client.post(
            f"/v2/models/{served.name}/infer",
            json={"inputs": []},
            headers={"Authorization": "Bearer not-a-key"},
        )
    assert wrong.status_code == 401  # an unknown key still reaches the store and fails
    assert "invalid_api_key" in wrong.json()["error"]  # OIP errors: one message string
