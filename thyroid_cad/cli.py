"""The `thyroid-cad` command line: one entry point for every job.

Heavy modules (TensorFlow, MLflow) are imported inside the commands that need them,
so `--help` is instant and serving never loads TensorFlow. Results that scripts read
(run ids, JSON) go to stdout; logs and Keras progress go to stderr.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sys
from enum import StrEnum
from pathlib import Path
from typing import Annotated

import typer

app = typer.Typer(
    help="Thyroid nodule CAD: demo data, dataset audit, training, sweeps, ONNX export, "
    "model registry, inference service. Research software: not for diagnostic use.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
data_app = typer.Typer(help="Inspect and split datasets.", no_args_is_help=True)
app.add_typer(data_app, name="data")
keys_app = typer.Typer(help="API keys of the inference service.", no_args_is_help=True)
app.add_typer(keys_app, name="keys")
registry_app = typer.Typer(
    help="MLflow model registry: versions, aliases (champion, challenger), promotion gate.",
    no_args_is_help=True,
)
app.add_typer(registry_app, name="registry")
ModelName = Annotated[str, typer.Option("--name", help="Registered model name.")]

log = logging.getLogger("thyroid_cad")


class Backbone(StrEnum):
    tiny = "tiny"
    vgg16 = "vgg16"
    vgg19 = "vgg19"
    resnet50 = "resnet50"
    efficientnetb0 = "efficientnetb0"


class Strategy(StrEnum):
    frozen = "frozen"
    partial = "partial"
    full = "full"
    two_phase = "two-phase"


class Classifier(StrEnum):
    softmax = "softmax"
    svm = "svm"
    rf = "rf"


@app.callback()
def _main(verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Debug logs.")] = False):
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    for noisy in ("mlflow", "alembic", "urllib3", "h5py", "matplotlib", "PIL"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def fail(message: str, code: int = 2) -> typer.Exit:
    typer.echo(f"error: {message}", err=True)
    return typer.Exit(code)


@contextlib.contextmanager
def user_errors():
    """Turn bad input into one clear line and exit status 2, not a traceback."""
    try:
        yield
    except KeyError as e:
        raise fail(f"missing {e}") from e
    except (ValueError, FileNotFoundError) as e:
        raise fail(str(e)) from e
    except Exception as e:
        if type(e).__name__ in ("MlflowException", "RestException"):
            raise fail(f"MLflow: {e}") from e
        raise


@app.command("demo-data")
def demo_data(
    out: Annotated[Path, typer.Argument(help="Folder to write the phantom dataset to.")],
    per_class: Annotated[int, typer.Option(help="Images per class.")] = 100,
    classes: Annotated[int, typer.Option(help="2 (benign/malignant) or 3 (+ normal).")] = 2,
    seed: Annotated[int, typer.Option(help="Random seed (same seed, same bytes).")] = 0,
    size: Annotated[int, typer.Option(help="Image side in pixels.")] = 256,
):
    """Write a SYNTHETIC ultrasound phantom dataset (not patient data) for demos and tests."""
    from training import phantom

    with user_errors():
        counts = phantom.generate(out, per_class=per_class, classes=classes, seed=seed, size=size)
    log.info("wrote synthetic phantom images to %s: %s", out, counts)
    typer.echo(str(out))


@data_app.command("audit")
def data_audit(
    root: Annotated[
        Path, typer.Argument(help="Dataset root: ROOT/<class>/* or ROOT/<split>/<class>/*.")
    ],
    manifest: Annotated[Path | None, typer.Option(help="CSV with image,case_id columns.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="One JSON object on stdout.")] = False,
):
    """Counts, sizes, unreadable files, exact and near duplicates, leaks across splits."""
    from training import audit, data

    with user_errors():
        report = audit.audit(data.scan(root, manifest))
    typer.echo(json.dumps(report, indent=1) if as_json else audit.format_report(report))


@data_app.command("split")
def data_split(
    root: Annotated[Path, typer.Argument(help="Dataset root.")],
    out: Annotated[Path, typer.Option(help="Where to write the split JSON.")] = Path("split.json"),
    manifest: Annotated[Path | None, typer.Option(help="CSV with image,case_id columns.")] = None,
    val: Annotated[float, typer.Option(help="Validation fraction.")] = 0.15,
    test: Annotated[float, typer.Option(help="Test fraction.")] = 0.15,
    seed: Annotated[int, typer.Option(help="Random seed.")] = 0,
):
    """Write a leak-free, stratified train/val/test split (what `train` does itself)."""
    from training import data, splits

    with user_errors():
        split = splits.grouped_split(data.scan(root, manifest), val, test, seed)
    split.save(out)
    typer.echo(json.dumps({"split_id": split.split_id, "counts": split.to_json()["counts"]}))


@app.command()
def train(
    data: Annotated[Path, typer.Option(help="Dataset root.")],
    backbone: Annotated[Backbone, typer.Option(help="Convolutional base.")] = Backbone.tiny,
    strategy: Annotated[Strategy, typer.Option(help="Fine-tuning strategy.")] = Strategy.full,
    classifier: Annotated[
        Classifier, typer.Option(help="Head: softmax, or SVM / RF on pooled features.")
    ] = Classifier.softmax,
    epochs: Annotated[int, typer.Option(help="Training epochs (two-phase: both phases).")] = 10,
    image_size: Annotated[int, typer.Option(help="Model input side in pixels.")] = 224,
    weights: Annotated[
        str, typer.Option(help="'imagenet' (Keras cache), 'none', or a local weights file.")
    ] = "none",
    init_from: Annotated[
        str | None, typer.Option(help="Start the backbone from this MLflow run's model.")
    ] = None,
    manifest: Annotated[Path | None, typer.Option(help="CSV with image,case_id columns.")] = None,
    unfreeze_blocks: Annotated[
        int, typer.Option(help="Blocks from the top that 'partial' and 'two-phase' unfreeze.")
    ] = 1,
    batch_size: Annotated[int, typer.Option(help="Batch size.")] = 32,
    learning_rate: Annotated[
        float | None, typer.Option(help="Default: 1e-3, or 1e-4 when fine-tuning learned weights.")
    ] = None,
    seed: Annotated[
        int, typer.Option(help="Seed for the split, initialisation and augmentation.")
    ] = 0,
    max_images: Annotated[
        int | None, typer.Option(help="Stratified subsample of the dataset (quick runs).")
    ] = None,
    target_sensitivity: Annotated[
        float, typer.Option(help="Operating point chosen on validation.")
    ] = 0.90,
    progressive_via: Annotated[
        Path | None,
        typer.Option(help="Intermediate dataset (radiographs) for progressive transfer."),
    ] = None,
    via_epochs: Annotated[
        int | None, typer.Option(help="Epochs on the intermediate dataset.")
    ] = None,
    via_max_images: Annotated[
        int | None, typer.Option(help="Subsample of the intermediate dataset.")
    ] = None,
    experiment: Annotated[str, typer.Option(help="MLflow experiment.")] = "thyroid-cad",
):
    """Train one model and log it to MLflow; prints the run id last."""
    from training.train import TrainConfig, train_progressive
    from training.train import train as run

    cfg = TrainConfig(
        data=str(data),
        backbone=backbone.value,
        strategy=strategy.value,
        classifier=classifier.value,
        epochs=epochs,
        image_size=image_size,
        weights=weights,
        init_from=init_from,
        manifest=str(manifest) if manifest else None,
        unfreeze_blocks=unfreeze_blocks,
        batch_size=batch_size,
        learning_rate=learning_rate,
        seed=seed,
        max_images=max_images,
        target_sensitivity=target_sensitivity,
        experiment=experiment,
    )
    with user_errors(), contextlib.redirect_stdout(sys.stderr):
        if progressive_via:
            run_id = train_progressive(cfg, str(progressive_via), via_epochs, None, via_max_images)
        else:
            run_id = run(cfg)
    typer.echo(run_id)


@app.command()
def sweep(
    config: Annotated[
        Path, typer.Argument(help="YAML sweep configuration (see docs/training.md).")
    ],
    fresh: Annotated[
        bool, typer.Option(help="Start a new sweep instead of resuming an unfinished one.")
    ] = False,
):
    """Train a grid of backbone x strategy x classifier x stage; prints the parent run id last."""
    from training import sweep as sweeps

    with user_errors():
        spec = sweeps.load_config(config)
    with user_errors(), contextlib.redirect_stdout(sys.stderr):
        parent_id, table = sweeps.run_sweep(spec, resume=not fresh)
    typer.echo(table)
    typer.echo(parent_id)


@app.command()
def export(
    run_id: Annotated[str, typer.Argument(help="Training run (or progressive / sweep parent).")],
    out: Annotated[Path, typer.Option(help="Folder for model.onnx and model_card.json.")] = Path(
        "export"
    ),
):
    """Export a run to ONNX (probabilities + in-graph Grad-CAM) with its model card."""
    from training import export as exporter
    from training import tracking

    with user_errors(), contextlib.redirect_stdout(sys.stderr):
        tracking.setup_uri()
        card = exporter.export_run(run_id, out)
    parity = card["parity"]
    log.info("parity %s: %s", "passed" if parity["passed"] else "FAILED", json.dumps(parity))
    typer.echo(str(out / "model.onnx"))
    if not parity["passed"]:
        raise fail(
            "the exported model failed its parity check; the registry will refuse to promote it",
            code=1,
        )


@registry_app.command("register")
def registry_register(
    directory: Annotated[Path, typer.Argument(help="Folder written by `thyroid-cad export`.")],
    name: ModelName = "thyroid-nodule-classifier",
):
    """Log an exported model (MLflow ONNX flavor) and register a new version; prints it last."""
    from registry import store

    with user_errors(), contextlib.redirect_stdout(sys.stderr):
        version = store.register(directory, name)
    typer.echo(str(version))


@registry_app.command("list")
def registry_list(
    name: ModelName = "thyroid-nodule-classifier",
    as_json: Annotated[bool, typer.Option("--json", help="JSON on stdout.")] = False,
):
    """Versions with their aliases, validation AUC, parity result and source run."""
    from registry import store

    with user_errors():
        versions = [v.to_json() for v in store.list_versions(name)]
    if as_json:
        typer.echo(json.dumps(versions, indent=1))
        return
    for v in versions:
        auc = f"{v['val_auc']:.3f}" if v["val_auc"] is not None else "-"
        typer.echo(
            f"v{v['version']:<4} {','.join(v['aliases']) or '-':<20} val_auc {auc}  "
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
    """Point an alias at a version; refused if parity failed or validation AUC is lower."""
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


@app.command()
def serve(
    host: Annotated[str, typer.Option(help="Interface to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="TCP port.")] = 8000,
    workers: Annotated[int, typer.Option(help="uvicorn worker processes.")] = 1,
):
    """Run the inference service (configured by THYROID_CAD_* variables, see README)."""
    import uvicorn

    uvicorn.run(
        "service.app:create_app",
        factory=True,
        host=host,
        port=port,
        workers=workers,
        log_level="info",
        access_log=False,
    )


def _audit_store():
    from service.config import get_settings
    from service.db import AuditStore

    settings = get_settings()
    store = AuditStore(settings.audit_url(), settings.audit_spool())
    store.migrate()
    return store


@keys_app.command("create")
def keys_create(
    scope: Annotated[
        str, typer.Option(help="predict (clients) or admin (audit trail too).")
    ] = "predict",
    name: Annotated[str | None, typer.Option(help="Who or what the key is for.")] = None,
):
    """Create an API key; prints it last (it is shown once, only its hash is stored)."""
    with user_errors():
        store = _audit_store()
        key_id, token = store.create_key(scope, name)
        store.close()
    log.info("created %s key %s", scope, key_id)
    typer.echo(token)


@keys_app.command("list")
def keys_list():
    """Keys with their id, scope and state (never the secret)."""
    with user_errors():
        store = _audit_store()
        keys = store.list_keys()
        store.close()
    typer.echo(json.dumps(keys, indent=1, default=str))


@keys_app.command("revoke")
def keys_revoke(key_id: Annotated[str, typer.Argument(help="Key id (from keys list).")]):
    """Revoke a key (a running service may trust a key it verified for up to 5 minutes)."""
    with user_errors():
        store = _audit_store()
        found = store.revoke_key(key_id)
        store.close()
    if not found:
        raise fail(f"no key {key_id}")
    typer.echo(key_id)


if __name__ == "__main__":
    app()
