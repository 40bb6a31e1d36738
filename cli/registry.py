"""`thyroid-cad registry ...`: versions, aliases, the promotion gate."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from cli.common import (
    AsJson,
    ModelName,
    app,
    existing_store,
    fields,
    group,
    log,
    progress_hidden,
    quiet_cuda_probes,
    table,
    user_errors,
)
from registry import DEFAULT_NAME

registry_app = group(
    "MLflow model registry: versions, aliases (champion, challenger), promotion gate."
)
app.add_typer(
    registry_app, name="registry", short_help="Model registry: versions, aliases, promotion gate."
)


@registry_app.command("register", short_help="Register an exported model; prints the version.")
def registry_register(
    directory: Annotated[
        Path, typer.Argument(metavar="DIR", help="Folder written by `thyroid-cad export`.")
    ],
    name: ModelName = DEFAULT_NAME,
):
    """Log an exported model (MLflow ONNX flavor) and register a new version; prints it last."""
    from registry import store

    # MLflow checks the logged model in onnxruntime with its CUDA provider first.
    with user_errors(), quiet_cuda_probes(), progress_hidden():
        version = store.register(directory, name)
    typer.echo(str(version))


NEXT = "`thyroid-cad registry register DIR` adds one (DIR written by `thyroid-cad export`)"
VERSION_COLUMNS = (
    ("version", "version"),
    ("aliases", "aliases"),
    ("val_auc", lambda v: _num(v["val_auc"])),
    ("robust", lambda v: _num(v["robust_score"])),
    ("parity", lambda v: "ok" if v["parity_passed"] else "FAILED"),
    ("created", "created"),
    ("source run", "source_run_id"),
)


def _num(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


@registry_app.command("list", short_help="List versions with aliases and metrics.")
def registry_list(name: ModelName = DEFAULT_NAME, as_json: AsJson = False):
    """Versions with their aliases, validation AUC, source-robust score, parity and source
    run, newest first."""
    versions = []
    if existing_store(required=False):
        from registry import store
        from thyroid_cad import settings

        with user_errors():
            versions = [v.to_json() for v in store.list_versions(name)]
        if not versions:
            log.info("no versions of %s in the %s; %s", name, settings.describe_store(), NEXT)
    if as_json:
        typer.echo(json.dumps(versions, indent=1))
    elif versions:
        table(versions, VERSION_COLUMNS)


@registry_app.command("show")
def registry_show(
    version: Annotated[
        str,
        typer.Argument(
            metavar="VERSION",
            help="A version number, an alias (champion) or a full NAME@ALIAS / NAME/VERSION.",
        ),
    ],
    name: ModelName = DEFAULT_NAME,
    as_json: AsJson = False,
):
    """One version in full, its tags included."""
    existing_store()
    from registry import store

    with user_errors():
        info = store.find(version, name).to_json()
    if as_json:
        typer.echo(json.dumps(info, indent=1))
    else:
        fields(info)


@registry_app.command("promote")
def registry_promote(
    version: Annotated[int, typer.Argument(metavar="VERSION", help="Version to promote.")],
    alias: Annotated[
        str, typer.Option(metavar="ALIAS", help="champion, challenger, or another alias.")
    ] = "champion",
    force: Annotated[bool, typer.Option(help="Override the gate (needs --reason).")] = False,
    reason: Annotated[
        str | None, typer.Option(metavar="TEXT", help="Why; recorded in the registry.")
    ] = None,
    name: ModelName = DEFAULT_NAME,
):
    """Point an alias at a version; prints the recorded event as JSON.

    Refused if parity failed, validation AUC is lower, or the card shows a shortcut (not
    above the source/size floor, or at chance within a source). Warns when the service,
    as configured here, would not load the alias.
    """
    existing_store()
    from registry import store

    with user_errors():
        event = store.promote(version, alias, name, force=force, reason=reason)
    _say_moved(name, event)
    typer.echo(json.dumps(event))
    _warn_if_not_served(name, alias)


def _warn_if_not_served(name: str, alias: str) -> None:
    """The service loads its THYROID_CAD_MODEL alias and THYROID_CAD_EXTRA_ALIASES only."""
    from registry import store
    from service.config import get_settings

    with user_errors():
        settings = get_settings()
    served_name, default_alias, _ = store.parse_uri(settings.model)
    served = [default_alias, *settings.extra_aliases]
    if served_name != name:
        log.warning(
            "the service serves %s (THYROID_CAD_MODEL), not %s: set THYROID_CAD_MODEL=%s@%s "
            "to serve this alias",
            settings.model, name, name, alias,
        )  # fmt: skip
    elif alias not in served:
        wanted = json.dumps([*settings.extra_aliases, alias])
        log.warning(
            "the service loads only %s of %s: to serve @%s too, start it with "
            "THYROID_CAD_EXTRA_ALIASES='%s'",
            ", ".join(served), name, alias, wanted,
        )  # fmt: skip


@registry_app.command("rollback", short_help="Move an alias back to its previous version.")
def registry_rollback(
    alias: Annotated[str, typer.Option(metavar="ALIAS", help="Alias to move back.")] = "champion",
    reason: Annotated[
        str | None, typer.Option(metavar="TEXT", help="Why; recorded in the registry.")
    ] = None,
    name: ModelName = DEFAULT_NAME,
):
    """Point the alias back at the version it held before the current one; prints the
    recorded event as JSON."""
    existing_store()
    from registry import store

    with user_errors():
        event = store.rollback(alias, name, reason)
    _say_moved(name, event)
    typer.echo(json.dumps(event))


def _say_moved(name: str, event: dict) -> None:
    """One sentence for people on stderr; stdout keeps the JSON event for scripts."""
    was = f"version {event['previous']}" if event.get("previous") else "no version"
    log.info(
        "%s@%s -> version %s (was %s)%s",
        name, event["alias"], event["version"], was,
        " [forced: " + event["why"] + "]" if event.get("forced") else "",
    )  # fmt: skip


@registry_app.command("resolve", short_help="Download the ONNX file and card of a version.")
def registry_resolve(
    reference: Annotated[
        str,
        typer.Argument(
            metavar="REFERENCE",
            help="An alias (champion), a version number, or NAME@ALIAS / NAME/VERSION.",
        ),
    ],
    out: Annotated[
        Path | None,
        typer.Option(
            metavar="DIR",
            help="Folder for model.onnx and model_card.json; default: "
            "THYROID_CAD_HOME/resolved/NAME-VERSION.",
        ),
    ] = None,
    name: ModelName = DEFAULT_NAME,
):
    """Download (cached by version and SHA-256) the ONNX file and card a reference names;
    prints where they are as JSON."""
    existing_store()
    from registry import store
    from thyroid_cad import settings

    with user_errors():
        resolved = store.resolve(store.reference(reference, name))
        if out is None:
            out = settings.home() / "resolved" / f"{resolved.name}-{resolved.version}"
        store.copy_out(resolved, out)
    via = f" (@{resolved.alias})" if resolved.alias else ""
    log.info("%s version %s%s: model.onnx and model_card.json in %s",
             resolved.name, resolved.version, via, out)  # fmt: skip
    typer.echo(
        json.dumps(
            {
                "name": resolved.name,
                "version": resolved.version,
                "alias": resolved.alias,
                "sha256": resolved.card["sha256"],
                "out": str(out),
            }
        )
    )
