"""`thyroid-cad pacs`: the PACS gateway (watch a PACS, score ultrasound, store SRs back)."""

from __future__ import annotations

import json
import os
import signal
import threading
from typing import Annotated

import typer

from cli.common import app, existing_store, fail, log, user_errors


@app.command(short_help="Watch a PACS; store a DICOM SR of each new image.")
def pacs(
    dicomweb_url: Annotated[
        str | None,
        typer.Option(
            metavar="URL", help="DICOMweb root of the PACS [env THYROID_CAD_PACS_DICOMWEB_URL]."
        ),
    ] = None,
    orthanc_url: Annotated[
        str | None,
        typer.Option(
            metavar="URL",
            help="Orthanc REST root: watch its change feed instead of polling QIDO-RS "
            "[env THYROID_CAD_PACS_ORTHANC_URL].",
        ),
    ] = None,
    once: Annotated[
        bool, typer.Option("--once", help="Handle what the PACS has now, print counts, exit.")
    ] = False,
    model_timeout: Annotated[
        float, typer.Option(help="Seconds to wait for the served model to load.")
    ] = 120.0,
):
    """Watch a PACS: score new ultrasound instances, store a DICOM SR of each back.

    Configured by THYROID_CAD_* variables (the served model, DATABASE_URL for the ledger,
    THYROID_CAD_PACS_*); see docs/integration.md. Runs until SIGTERM or Ctrl-C.
    """
    existing_store(required=False)  # the gateway waits --model-timeout for a model
    from service.config import get_settings
    from service.hospital.gateway import Gateway
    from service.hospital.ledger import Ledger
    from service.hospital.pacs import Pacs, PacsUnavailable
    from service.inference.models import ModelManager
    from service.store.db import Database
    from thyroid_cad import settings as paths

    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
    settings = get_settings()
    overrides = {"pacs_dicomweb_url": dicomweb_url, "pacs_orthanc_url": orthanc_url}
    settings = settings.model_copy(update={k: v for k, v in overrides.items() if v is not None})
    with user_errors():
        client = Pacs(
            settings.pacs_dicomweb_url,
            settings.pacs_orthanc_url,
            settings.pacs_username,
            settings.pacs_password.get_secret_value(),
            settings.pacs_timeout_s,
        )
        db = Database(settings.audit_url())
        db.migrate()
    models = ModelManager(settings.model, [], settings.runtime(), settings.max_loaded_models)
    models.start(settings.poll_interval_s)
    try:
        if not models.wait_ready(model_timeout):
            raise fail(f"no model loaded for {settings.model}: {models.last_error}")
        gateway = Gateway(client, models, Ledger(db), settings)
        if once:
            try:
                counts = gateway.poll()
            except PacsUnavailable as e:
                raise fail(f"PACS unavailable: {e}", code=1) from e
            typer.echo(json.dumps(dict(counts), sort_keys=True))
            return
        stop = threading.Event()
        signal.signal(signal.SIGTERM, lambda *_: stop.set())
        log.info("PACS gateway: %s, model %s", gateway.source, settings.model)
        paths.home().mkdir(parents=True, exist_ok=True)
        try:
            gateway.run(stop, heartbeat=paths.home() / "pacs-heartbeat")
        except KeyboardInterrupt:
            stop.set()
    finally:
        models.stop()
        db.dispose()
