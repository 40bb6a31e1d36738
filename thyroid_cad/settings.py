"""Where thyroid-cad keeps its files when nothing else is configured.

Everything lives under THYROID_CAD_HOME (default ``./.thyroid-cad``): the SQLite
MLflow store, the artifact folder and caches. ``MLFLOW_TRACKING_URI`` overrides the
tracking store. Read at call time, never at import, so tests can point it elsewhere.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

log = logging.getLogger(__name__)
# How to use another store, said wherever one is missing, empty or new.
ELSEWHERE = (
    "set THYROID_CAD_HOME to the folder that holds mlflow.db, "
    "or MLFLOW_TRACKING_URI to an MLflow tracking server"
)
_announced: set[Path] = set()


def home() -> Path:
    return Path(os.environ.get("THYROID_CAD_HOME", ".thyroid-cad")).resolve()


def cache_dir() -> Path:
    return home() / "cache"


def local_store() -> Path | None:
    """The SQLite file of the MLflow store, unless MLFLOW_TRACKING_URI names another."""
    return None if os.environ.get("MLFLOW_TRACKING_URI") else home() / "mlflow.db"


def describe_store() -> str:
    """Which MLflow store this process uses, and what chose it, for messages."""
    db = local_store()
    if db is None:
        return f"MLflow store {os.environ['MLFLOW_TRACKING_URI']} (MLFLOW_TRACKING_URI)"
    return f"MLflow store {db} (THYROID_CAD_HOME={home()})"


def tracking_uri() -> str:
    """MLFLOW_TRACKING_URI, else a SQLite store in the home folder (created, and said so,
    when it does not exist yet)."""
    db = local_store()
    if db is None:
        return os.environ["MLFLOW_TRACKING_URI"]
    if not db.exists() and db not in _announced:
        _announced.add(db)
        log.info("new %s; to use another, %s", describe_store(), ELSEWHERE)
    home().mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{db}"


def artifact_root() -> str:
    """Artifact location for experiments created on the default local store."""
    return (home() / "artifacts").as_uri()


def use_experiment(name: str) -> str:
    """Point MLflow at the configured store and make `name` its active experiment,
    created if needed; returns its id.

    On the default local store, artifacts go to THYROID_CAD_HOME/artifacts rather than
    a folder (./mlruns) relative to wherever the command happens to run.
    """
    import mlflow

    uri = tracking_uri()
    mlflow.set_tracking_uri(uri)
    found = mlflow.get_experiment_by_name(name)
    if found is not None:
        mlflow.set_experiment(experiment_id=found.experiment_id)
        return found.experiment_id
    local = uri.startswith("sqlite:")
    experiment_id = mlflow.create_experiment(
        name, artifact_location=artifact_root() if local else None
    )
    mlflow.set_experiment(experiment_id=experiment_id)
    return experiment_id
