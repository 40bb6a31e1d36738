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
    uri = setup_uri()
    found = mlflow.get_experiment_by_name(experiment)
    if found is not None:
        mlflow.set_experiment(experiment_id=found.experiment_id)
        return found.experiment_id
    local = uri.startswith("sqlite:")
    experiment_id = mlflow.create_experiment(
        experiment, artifact_location=settings.artifact_root() if local else None
    )
    mlflow.set_experiment(experiment_id=experiment_id)
    return experiment_id
