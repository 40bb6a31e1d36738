"""`thyroid-cad serve` and `thyroid-cad keys ...`: the inference service."""

from __future__ import annotations

import contextlib
import json
from typing import Annotated

import typer

from cli.common import app, fail, log, user_errors

keys_app = typer.Typer(help="API keys of the inference service.", no_args_is_help=True)
app.add_typer(keys_app, name="keys")


@app.command()
def serve(
    host: Annotated[str, typer.Option(help="Interface to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="TCP port.")] = 8000,
    workers: Annotated[int, typer.Option(help="uvicorn worker processes.")] = 1,
):
    """Run the inference service (configured by THYROID_CAD_* variables, see README)."""
    import uvicorn

    from service.config import get_settings

    with user_errors():  # a bad THYROID_CAD_* value: one clear message, exit 2
        get_settings()

    uvicorn.run(
        "service.api.app:create_app",
        factory=True,
        host=host,
        port=port,
        workers=workers,
        log_level="info",
        access_log=False,
    )


@contextlib.contextmanager
def _key_store():
    """The service database's key store, migrated; disposed of afterwards."""
    from service.config import get_settings
    from service.store.db import Database
    from service.store.keys import KeyStore

    db = Database(get_settings().audit_url())
    try:
        db.migrate()
        yield KeyStore(db)
    finally:
        db.dispose()


@keys_app.command("create")
def keys_create(
    scope: Annotated[
        str,
        typer.Option(
            help="predict (clients), feedback (record outcomes, read live performance) or "
            "admin (everything, audit trail too)."
        ),
    ] = "predict",
    name: Annotated[str | None, typer.Option(help="Who or what the key is for.")] = None,
):
    """Create an API key; prints it last (it is shown once, only its hash is stored)."""
    with user_errors():
        with _key_store() as store:
            key_id, token = store.create_key(scope, name)
    log.info("created %s key %s", scope, key_id)
    typer.echo(token)


@keys_app.command("list")
def keys_list():
    """Keys with their id, scope and state (never the secret)."""
    with user_errors():
        with _key_store() as store:
            keys = store.list_keys()
    typer.echo(json.dumps(keys, indent=1, default=str))


@keys_app.command("revoke")
def keys_revoke(key_id: Annotated[str, typer.Argument(help="Key id (from keys list).")]):
    """Revoke a key (each running replica may trust a key it verified for up to
    THYROID_CAD_KEY_CACHE_S seconds, 300 by default)."""
    with user_errors():
        with _key_store() as store:
            found = store.revoke_key(key_id)
    if not found:
        raise fail(f"no key {key_id}")
    typer.echo(key_id)
