"""Shared fixtures: a phantom dataset made once per session, an isolated MLflow store."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


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
    """A 2-class synthetic dataset, 150 images per class, shared by the whole session."""
    from training import phantom

    root = tmp_path_factory.mktemp("phantom") / "data"
    phantom.generate(root, per_class=150, classes=2, seed=1)
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
