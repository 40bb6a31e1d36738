"""`thyroid-cad serve` and `thyroid-cad keys ...`: the inference service."""

from __future__ import annotations

import contextlib
import json
import socket
from typing import Annotated, Literal

import typer

from cli.common import (
    AsJson,
    app,
    describe_database,
    existing_store,
    fail,
    group,
    log,
    missing_database,
    service_database,
    table,
    user_errors,
)
from service.store import SCOPES

keys_app = group("API keys of the inference service.")
app.add_typer(keys_app, name="keys")


@app.command(short_help="Run the inference service.")
def serve(
    host: Annotated[
        str, typer.Option(metavar="HOST", help="Interface to listen on.")
    ] = "127.0.0.1",
    port: Annotated[int, typer.Option(metavar="PORT", help="TCP port.")] = 8000,
    workers: Annotated[int, typer.Option(help="uvicorn worker processes.")] = 1,
):
    """Run the inference service (configured by THYROID_CAD_* variables, see README)."""
    from service.config import get_settings

    with user_errors():  # a bad THYROID_CAD_* value: one clear message, exit 2
        get_settings()
    busy = _bind_error(host, port)
    if busy:  # said now, not after the models have loaded
        raise fail(f"cannot listen on {host}:{port} ({busy}); choose another with --port")
    existing_store(required=False)  # it may be made later: the service polls for its model
    import uvicorn

    uvicorn.run(
        "service.api.app:create_app",
        factory=True,
        host=host,
        port=port,
        workers=workers,
        log_level="info",
        access_log=False,
    )


def _bind_error(host: str, port: int) -> str | None:
    """Why the service could not listen on host:port (in use, bad address), or None.
    SO_REUSEADDR as uvicorn sets it, so a port left in TIME_WAIT counts as free."""
    try:
        family, kind, _, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        with socket.socket(family, kind) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            probe.bind(address)
    except OSError as e:
        return e.strerror or str(e)
    return None


@contextlib.contextmanager
def _key_store(create: bool = False):
    """The key store of the service's database (see cli.common.service_database)."""
    from service.store.keys import KeyStore

    with service_database(create) as db:
        yield KeyStore(db)


KEY_COLUMNS = (
    ("id", "id"),
    ("name", "name"),
    ("scope", "scope"),
    ("created", "created_at"),
    ("revoked", "revoked_at"),
    ("last used", "last_used_at"),
)


@keys_app.command("create", short_help="Create an API key; prints it (shown once).")
def keys_create(
    scope: Annotated[
        Literal[SCOPES],
        typer.Option(
            help="predict (clients), feedback (record outcomes, read live performance) or "
            "admin (everything, audit trail too)."
        ),
    ] = "predict",
    name: Annotated[
        str | None, typer.Option(metavar="NAME", help="Who or what the key is for.")
    ] = None,
):
    """Create an API key; prints it last (it is shown once, only its hash is stored)."""
    with user_errors():
        with _key_store(create=True) as store:
            key_id, token = store.create_key(scope, name)
    log.info("created %s key %s", scope, key_id)
    typer.echo(token)


@keys_app.command("list")
def keys_list(as_json: AsJson = False):
    """Keys with their id, name, scope and state (never the secret)."""
    keys = []
    with user_errors():
        missing = missing_database()
        if missing:
            log.info(missing)
        else:
            with _key_store() as store:
                keys = store.list_keys()
    if not keys and not missing:
        log.info("no API keys in the %s; `thyroid-cad keys create` makes one", describe_database())
    if as_json:
        typer.echo(json.dumps(keys, indent=1, default=str))
    elif keys:
        table(keys, KEY_COLUMNS)


@keys_app.command("revoke", short_help="Revoke an API key.")
def keys_revoke(
    key_id: Annotated[str, typer.Argument(metavar="ID", help="Key id (from `keys list`).")],
):
    """Revoke a key (each running replica may trust a key it verified for up to
    THYROID_CAD_KEY_CACHE_S seconds, 300 by default)."""
    with user_errors():
        with _key_store() as store:
            found = store.revoke_key(key_id)
    if not found:
        raise fail(f"no key {key_id}")
    typer.echo(key_id)
