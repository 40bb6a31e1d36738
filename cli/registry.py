"""`thyroid-cad registry ...`: versions, aliases, the promotion gate."""

from __future__ import annotations

import contextlib
import json
import sys
from pathlib import Path
from typing import Annotated

import typer

from cli.common import ModelName, app, quiet_cuda_probes, user_errors

registry_app = typer.Typer(
    help="MLflow model registry: versions, aliases (champion, challenger), promotion gate.",
    no_args_is_help=True,
)
app.add_typer(registry_app, name="registry")


@registry_app.command("register")
def registry_register(
    directory: Annotated[Path, typer.Argument(help="Folder written by `thyroid-cad export`.")],
    name: ModelName = "thyroid-nodule-classifier",
):
    """Log an exported model (MLflow ONNX flavor) and register a new version; prints it last."""
    from registry import store

    # MLflow checks the logged model in onnxruntime with its CUDA provider first.
    with user_errors(), contextlib.redirect_stdout(sys.stderr), quiet_cuda_probes():
        version = store.register(directory, name)
    typer.echo(str(version))


@registry_app.command("list")
def registry_list(
    name: ModelName = "thyroid-nodule-classifier",
    as_json: Annotated[bool, typer.Option("--json", help="JSON on stdout.")] = False,
):
    """Versions with their aliases, validation AUC, source-robust score, parity, source run."""
    from registry import store

    with user_errors():
        versions = [v.to_json() for v in store.list_versions(name)]
    if as_json:
        typer.echo(json.dumps(versions, indent=1))
        return
    for v in versions:
        auc = f"{v['val_auc']:.3f}" if v["val_auc"] is not None else "-"
        robust = f"{v['robust_score']:.3f}" if v["robust_score"] is not None else "-"
        typer.echo(
            f"v{v['version']:<4} {','.join(v['aliases']) or '-':<20} val_auc {auc}  "
            f"robust {robust}  "
            f"parity {'ok' if v['parity_passed'] else 'FAILED'}  run {v['source_run_id']}"
        )


@registry_app.command("show")
def registry_show(
    version: Annotated[int, typer.Argument(help="Version number.")],
    name: ModelName = "thyroid-nodule-classifier",
    as_json: Annotated[bool, typer.Option("--json", help="JSON on stdout.")] = False,
):
    """One version in full."""
    from registry import store

    with user_errors():
        info = store.show(version, name).to_json()
    typer.echo(
        json.dumps(info, indent=1)
        if as_json
        else "\n".join(f"{k}: {v}" for k, v in info.items() if k != "tags")
    )


@registry_app.command("promote")
def registry_promote(
    version: Annotated[int, typer.Argument(help="Version to promote.")],
    alias: Annotated[
        str, typer.Option(help="champion, challenger, or another alias.")
    ] = "champion",
    force: Annotated[bool, typer.Option(help="Override the gate (needs --reason).")] = False,
    reason: Annotated[str | None, typer.Option(help="Why; recorded in the registry.")] = None,
    name: ModelName = "thyroid-nodule-classifier",
):
    """Point an alias at a version; refused if parity failed, validation AUC is lower, or the
    card shows a shortcut (not above the source/size floor, or at chance within a source)."""
    from registry import store

    with user_errors():
        event = store.promote(version, alias, name, force=force, reason=reason)
    typer.echo(json.dumps(event))


@registry_app.command("rollback")
def registry_rollback(
    alias: Annotated[str, typer.Option(help="Alias to move back.")] = "champion",
    reason: Annotated[str | None, typer.Option(help="Why; recorded in the registry.")] = None,
    name: ModelName = "thyroid-nodule-classifier",
):
    """Point the alias back at the version it held before the current one."""
    from registry import store

    with user_errors():
        event = store.rollback(alias, name, reason)
    typer.echo(json.dumps(event))


@registry_app.command("resolve")
def registry_resolve(
    reference: Annotated[str, typer.Argument(help="NAME@ALIAS or NAME/VERSION.")],
    out: Annotated[Path, typer.Option(help="Folder for model.onnx and model_card.json.")] = Path(
        "model"
    ),
):
    """Download (cached by version and SHA-256) the ONNX file and card a reference names."""
    from registry import store

    with user_errors():
        resolved = store.resolve(reference, out)
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
