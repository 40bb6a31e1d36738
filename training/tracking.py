"""MLflow set-up shared by every training job."""

from __future__ import annotations

import mlflow

from thyroid_cad import settings


def setup_uri() -> str:
    """Point MLflow at the configured store (no experiment needed: exports, lookups)."""
    uri = settings.tracking_uri()
    mlflow.set_tracking_uri(uri)
    return uri


def setup(experiment: str) -> str:
    """Point MLflow at the configured store and make sure the experiment exists.

    On the default local store, artifacts go to THYROID_CAD_HOME/artifacts rather than
    a folder relative to wherever the command happens to run.

    Returns:
        The experiment id.
    """
    return settings.use_experiment(experiment)
