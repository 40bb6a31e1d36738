"""`thyroid-cad outcomes import` and `thyroid-cad performance log`: post-market follow-up."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated

import typer

from cli.common import (
    app,
    existing_store,
    fail,
    group,
    log,
    service_database,
    user_errors,
)

outcomes_app = group(
    "Outcomes (Bethesda cytology, histology) of earlier requests (docs/safety.md)."
)
performance_app = group(
    "Live performance of a model version against recorded outcomes (docs/safety.md)."
)
app.add_typer(
    outcomes_app, name="outcomes", short_help="Import outcomes (cytology, histology) of requests."
)
app.add_typer(
    performance_app, name="performance", short_help="Live performance of a model version."
)
IMPORTED_BY = "csv-import"


@outcomes_app.command("import")
def outcomes_import(
    file: Annotated[
        Path,
        typer.Argument(
            metavar="FILE",
            help="CSV with the columns request_id,kind,pathology,date (kind bethesda with "
            "pathology I..VI, or histology with benign|malignant; date YYYY-MM-DD).",
        ),
    ],
):
    """Import outcomes. Every row is validated first; any bad row: nothing is written, a
    report per row, exit 1. Else all rows are written in one transaction (entered by
    'csv-import'); a row equal to the latest outcome of its request changes nothing."""
    if not file.is_file():
        raise fail(f"{file}: no such file")
    from service.store.outcomes import OutcomeStore

    with user_errors():
        text = file.read_text(encoding="utf-8-sig")
        with service_database(create=True) as db:
            reports, written = OutcomeStore(db).import_csv(text, IMPORTED_BY)
    for r in reports:
        typer.echo(
            f"line {r.line}\t{r.request_id or '-'}\t{'ok' if r.ok else 'ERROR'}\t{r.message}"
        )
    bad = sum(not r.ok for r in reports)
    if not written:
        raise fail(f"{bad} of {len(reports)} rows are invalid; nothing was imported", code=1)
    log.info("imported %d outcome rows from %s", len(reports), file)


@performance_app.command("log", short_help="Live performance from the service's database.")
def performance_log(
    to_mlflow: Annotated[
        bool, typer.Option("--to-mlflow", help="Also log it as an MLflow evaluation run.")
    ] = False,
    model_version: Annotated[
        int | None,
        typer.Option(
            metavar="VERSION",
            help="Registered version; default: the one THYROID_CAD_MODEL points at.",
        ),
    ] = None,
    since: Annotated[
        str | None,
        typer.Option(metavar="DATE", help="Only requests from this ISO date or date-time on."),
    ] = None,
    experiment: Annotated[
        str, typer.Option(metavar="NAME", help="MLflow experiment of the evaluation runs.")
    ] = "thyroid-cad-live",
):
    """Compute live performance from the service's database (as GET /v1/performance) and
    print it as JSON; with --to-mlflow, log it as a run tagged with the registered model
    name and version and linked to the version's source run."""
    existing_store()
    from registry import store
    from service.config import get_settings
    from service.store import performance
    from service.store.outcomes import OutcomeStore

    with user_errors():
        start = datetime.fromisoformat(since) if since else None
        if start is not None and start.tzinfo is None:
            start = start.replace(tzinfo=UTC)
        name, alias, _ = store.parse_uri(get_settings().model)
        ref = f"{name}/{model_version}" if model_version else f"{name}@{alias}"
        resolved = store.resolve(ref)
        with service_database(create=False) as db:
            report = performance.compute(
                OutcomeStore(db), resolved.card, name, resolved.version, start
            )
        if to_mlflow:
            report["mlflow_run_id"] = _log_run(report, experiment)
    typer.echo(json.dumps(report, indent=1, default=str))


def _log_run(report: dict, experiment: str) -> str:
    import mlflow

    from registry import store
    from service.store import performance
    from thyroid_cad import settings

    settings.use_experiment(experiment)  # artifacts under THYROID_CAD_HOME, not ./mlruns
    name, version = report["model"]["name"], report["model"]["version"]
    info = store.show(version, name)
    tags = {
        "kind": "live-evaluation",
        "registered_model_name": name,
        "registered_model_version": str(version),
        "source_run_id": info.source_run,
        "mlflow.note.content": (
            f"Live performance of {name} v{version} against recorded outcomes; validation "
            f"and test numbers are in its source run {info.source_run}."
        ),
    }
    with mlflow.start_run(run_name=f"live-{name}-v{version}", tags=tags) as run:
        mlflow.log_params(
            {
                "since": report["since"],
                "threshold": report["threshold"],
                "positive_class": report["positive_class"],
            }  # fmt: skip
        )
        mlflow.log_metrics(performance.mlflow_metrics(report))
        mlflow.log_dict(report, "live_performance.json")
    return run.info.run_id
