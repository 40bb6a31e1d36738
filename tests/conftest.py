"""Shared fixtures: a phantom dataset made once per session, an isolated MLflow store."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def pytest_collection_modifyitems(config, items):
    """`fuzz` tests (long schemathesis runs) run only when asked for: `-m fuzz`."""
    if "fuzz" in (config.option.markexpr or ""):
        return
    skip = pytest.mark.skip(reason="long fuzz run: select it with -m fuzz")
    for item in items:
        if "fuzz" in item.keywords:
            item.add_marker(skip)


def _shared_dataset(name: str) -> Path:
    """A folder of ../shared/data, or skip the test saying why."""
    path = SHARED_DATA / name
    if not path.is_dir():
        pytest.skip(f"real data not available: {path} is absent (only on dev and CI machines)")
    return path


@pytest.fixture(scope="session")
def thyroid_seed() -> Path:
    """The thesis's 795 real ultrasound images (skips where ../shared/data is absent)."""
    return _shared_dataset("thyroid-seed")


@pytest.fixture(scope="session")
def phantom_root(tmp_path_factory) -> Path:
    """A 2-class synthetic dataset, 200 images per class, shared by the whole session."""
    from training import phantom

    root = tmp_path_factory.mktemp("phantom") / "data"
    phantom.generate(root, per_class=200, classes=2, seed=1)
    return root


@pytest.fixture(scope="session")
def session_home(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("home")


@pytest.fixture
def home(session_home, monkeypatch) -> Path:
    """THYROID_CAD_HOME (SQLite MLflow store, artifacts, caches) in a temp folder.

    Session-wide, so the image cache and trained runs are reused across tests.
    """
    monkeypatch.setenv("THYROID_CAD_HOME", str(session_home))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    return session_home


def _isolate(mp: pytest.MonkeyPatch, home_dir: Path) -> None:
    """Point everything at home_dir; MLflow copies its URIs into os.environ, so set them
    through the monkeypatch, which then removes them again on exit."""
    mp.setenv("THYROID_CAD_HOME", str(home_dir))
    uri = f"sqlite:///{home_dir / 'mlflow.db'}"
    mp.setenv("MLFLOW_TRACKING_URI", uri)
    mp.setenv("MLFLOW_REGISTRY_URI", uri)


@pytest.fixture(scope="session")
def tiny_run(phantom_root, session_home) -> str:
    """A tiny softmax model trained on the phantom, logged to the session's MLflow store."""
    from training.train import TrainConfig, train

    with pytest.MonkeyPatch.context() as mp:
        _isolate(mp, session_home)
        return train(
            TrainConfig(
                data=str(phantom_root),
                backbone="tiny",
                strategy="full",
                epochs=20,
                image_size=64,
                batch_size=16,
                experiment="tests",
                patience=8,
            )
        )


@pytest.fixture(scope="session")
def tiny_export(tiny_run, session_home, tmp_path_factory) -> Path:
    """`thyroid-cad export` of tiny_run: a folder with model.onnx and model_card.json."""
    from training import export, tracking

    out = tmp_path_factory.mktemp("export") / "tiny"
    with pytest.MonkeyPatch.context() as mp:
        _isolate(mp, session_home)
        tracking.setup_uri()
        export.export_run(tiny_run, out)
    return out


def make_served(export: Path, work: Path, label: str, force: str = ""):
    """Register `export` as a fresh model's champion; settings and keys to serve it.

    `force`: the reason to promote past the registry's gate (a few-epoch test model).

    Returns a SimpleNamespace: settings (service.config.Settings), name (registered
    model), version, predict_key and admin_key (bearer tokens), export, db_path, spool.
    Call it with THYROID_CAD_HOME / MLFLOW_TRACKING_URI already pointing at the store.
    """
    import uuid
    from types import SimpleNamespace

    from registry import store
    from service.config import Settings
    from service.store.audit import AuditStore
    from service.store.keys import KeyStore

    name = f"{label}-{uuid.uuid4().hex[:8]}"
    version = store.register(export, name)
    store.promote(version, "champion", name, force=bool(force), reason=force or None)
    settings = Settings(
        model=f"{name}@champion",
        poll_interval_s=0.5,
        database_url=f"sqlite:///{work / 'requests.db'}",
        spool_dir=work / "spool",
    )
    audit = AuditStore(settings.audit_url(), settings.audit_spool())
    audit.migrate()
    keys = KeyStore(audit.db)
    predict_key = keys.create_key("predict", label)[1]
    admin_key = keys.create_key("admin", label)[1]
    audit.close()
    return SimpleNamespace(
        settings=settings,
        name=name,
        version=version,
        export=export,
        predict_key=predict_key,
        admin_key=admin_key,
        db_path=work / "requests.db",
        spool=work / "spool",
    )


@pytest.fixture
def served(home, tiny_export, tmp_path):
    """make_served() for one test; the app is made by the test:
    `TestClient(create_app(served.settings))`."""
    return make_served(tiny_export, tmp_path, "served")


@pytest.fixture(scope="module")
def served_module(session_home, tiny_export, tmp_path_factory):
    """make_served() shared by a module's tests (the store stays pointed at it)."""
    with pytest.MonkeyPatch.context() as mp:
        _isolate(mp, session_home)
        yield make_served(tiny_export, tmp_path_factory.mktemp("served"), "module")


@pytest.fixture(scope="session")
def run_server():
    """`with run_server(app) as base_url:` the app served over real HTTP (see below)."""
    return running_server


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_ready(url: str, proc, timeout_s: float = 120) -> None:
    """Poll GET `url` until it answers 200; fail if `proc` (a Popen) exits first."""
    import time

    import httpx

    deadline = time.monotonic() + timeout_s
    while True:
        assert proc.poll() is None, f"the server exited ({proc.returncode}) while starting"
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        assert time.monotonic() < deadline, f"{url} did not answer 200 in {timeout_s} s"
        time.sleep(0.2)


@contextlib.contextmanager
def running_server(app, ready_path: str = "/v2/health/ready"):
    """`app` under uvicorn in a background thread on a free 127.0.0.1 port, ready.

    Yields the base URL (http://127.0.0.1:PORT); stops the server on exit.
    """
    import socket
    import threading
    import time

    import httpx
    import uvicorn

    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while True:
        try:
            if httpx.get(base + ready_path, timeout=2).status_code == 200:
                break
        except httpx.TransportError:
            pass
        assert thread.is_alive(), "uvicorn exited during start-up"
        assert time.monotonic() < deadline, "the service did not become ready in 60 s"
        time.sleep(0.1)
    try:
        yield base
    finally:
        server.should_exit = True
        thread.join(timeout=15)
        sock.close()
    assert not thread.is_alive(), "uvicorn did not stop"


@pytest.fixture(scope="session")
def phantom_localiser(phantom_root, session_home) -> str:
    """A small nodule localiser trained on the phantom's outlines (MLflow run id)."""
    from training import localiser

    with pytest.MonkeyPatch.context() as mp:
        _isolate(mp, session_home)
        return localiser.train_localiser(
            localiser.LocaliserConfig(
                annotations=[str(phantom_root / "annotations.csv")],
                image_size=64,
                filters=(8, 16, 32, 48),
                # 16 epochs of batches of 8 (~300 steps): test Dice 0.67-0.81 over seeds
                # 0-5 here; 12 epochs of 16 (84 steps) left some seeds still learning
                # (0.21-0.45), which is how CI saw this fixture fail.
                epochs=16,
                batch_size=8,
                max_images=160,
                experiment="tests-localiser",
            )
        )


@pytest.fixture(scope="session")
def roi_export(phantom_localiser, phantom_root, session_home, tmp_path_factory) -> Path:
    """A tiny classifier trained on the localiser's ROI crops, exported with it bundled."""
    from training import export, tracking
    from training.train import TrainConfig, train

    out = tmp_path_factory.mktemp("export") / "roi"
    with pytest.MonkeyPatch.context() as mp:
        _isolate(mp, session_home)
        run_id = train(
            TrainConfig(
                data=str(phantom_root),
                backbone="tiny",
                epochs=8,
                image_size=64,
                batch_size=16,
                max_images=200,
                roi="localiser",
                localiser=phantom_localiser,
                roi_margin=0.4,
                experiment="tests-roi",
            )
        )
        tracking.setup_uri()
        export.export_run(run_id, out)
    return out
