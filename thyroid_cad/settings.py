"""Where thyroid-cad keeps its files when nothing else is configured.

Everything lives under THYROID_CAD_HOME (default ``./.thyroid-cad``): the SQLite
MLflow store, the artifact folder and caches. ``MLFLOW_TRACKING_URI`` overrides the
tracking store. Read at call time, never at import, so tests can point it elsewhere.
"""

from __future__ import annotations

import os
from pathlib import Path


def home() -> Path:
    return Path(os.environ.get("THYROID_CAD_HOME", ".thyroid-cad")).resolve()


def cache_dir() -> Path:
    return home() / "cache"


def tracking_uri() -> str:
    """MLFLOW_TRACKING_URI, else a SQLite store in the home folder."""
    uri = os.environ.get("MLFLOW_TRACKING_URI")
    if uri:
        return uri
    home().mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{home() / 'mlflow.db'}"


def artifact_root() -> str:
    """Artifact location for experiments created on the default local store."""
    return (home() / "artifacts").as_uri()
