"""`thyroid-cad train`, `sweep` and `export`: the ML engineer's jobs."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Literal

import typer

from cli.common import (
    app,
    check_path,
    existing_store,
    fail,
    log,
    progress_hidden,
    start_tensorflow,
    user_errors,
)
from training import choices

# `train` options (and config-file keys) that are not TrainConfig fields.
_NOT_FIELDS = ("config", "progressive_via", "via_epochs", "via_max_images", "members")


def _plain(value):
    """An option's value as TrainConfig holds it (a path as str)."""
    return str(value) if isinstance(value, Path) else value


def _options(ctx: typer.Context, config: Path | None) -> dict:
    """Every option's value: the command line's, else the config file's, else the default.

    An option counts as given when click saw it on the command line (or in the
    environment), whatever its value, so `--epochs 10` overrides a file's `epochs: 3`.
    """
    values = {name: _plain(v) for name, v in ctx.params.items() if name != "config"}
    if config is None:
        return values
    from training.config import load_train_config

    # By name: typer 0.29 vendors click (typer._click), so click.core.ParameterSource is
    # another enum than the one its context returns.
    defaulted = ("DEFAULT", "DEFAULT_MAP", None)
    given = {
        n for n in values if getattr(ctx.get_parameter_source(n), "name", None) not in defaulted
    }
    from_file = load_train_config(config)
    for i, member in enumerate(from_file.get("members") or []):
        clash = sorted(given & set(member))
        if clash:
            flag = "--" + clash[0].replace("_", "-")
            raise ValueError(
                f"{flag} is set by members[{i}] of {config}, which the command line cannot "
                "override: edit the file"
            )
    return {**values, **{k: v for k, v in from_file.items() if k not in given}}


@app.command()
def train(
    ctx: typer.Context,
    data: Annotated[
        Path | None,
        typer.Option(metavar="ROOT", help="Dataset root (or `data:` in the --config file)."),
    ] = None,
    backbone: Annotated[
        Literal[choices.BACKBONES], typer.Option(help="Convolutional base.")
    ] = "tiny",
    strategy: Annotated[
        Literal[choices.STRATEGIES], typer.Option(help="Fine-tuning strategy.")
    ] = "full",
    classifier: Annotated[
        Literal[choices.CLASSIFIERS],
        typer.Option(help="Head: softmax, or SVM / RF / logistic regression on pooled features."),
    ] = "softmax",
    epochs: Annotated[int, typer.Option(help="Training epochs (two-phase: both phases).")] = 10,
    image_size: Annotated[int, typer.Option(help="Model input side in pixels.")] = 224,
    weights: Annotated[
        str,
        typer.Option(
            metavar="WEIGHTS",
            help="'imagenet' (Keras cache), 'none', or a local weights file: Keras .h5 / "
            ".weights.h5, an ImageNet TFLite MobileNetV2 (mobilenetv2), the Keras-1 SqueezeNet "
            "v1.1 .h5 (squeezenet).",
        ),
    ] = "none",
    init_from: Annotated[
        str | None,
        typer.Option(metavar="RUN_ID", help="Start the backbone from this MLflow run's model."),
    ] = None,
    manifest: Annotated[
        Path | None, typer.Option(metavar="CSV", help="CSV with image,case_id columns.")
    ] = None,
    unfreeze_blocks: Annotated[
        int, typer.Option(help="Blocks from the top that 'partial' and 'two-phase' unfreeze.")
    ] = 1,
    batch_size: Annotated[int, typer.Option(help="Batch size.")] = 32,
    learning_rate: Annotated[
        float | None, typer.Option(help="The head's learning rate (default 1e-3).")
    ] = None,
    backbone_lr_factor: Annotated[
        float | None,
        typer.Option(
            help="Backbone learning rate = head's x this (default 0.1 from learned weights, "
            "1 from scratch)."
        ),
    ] = None,
    warmup_epochs: Annotated[
        int | None, typer.Option(help="two-phase: epochs of head-only warm-up (default a third).")
    ] = None,
    classifier_c: Annotated[
        float, typer.Option(help="svm / logreg: C, the inverse regularisation strength.")
    ] = 1.0,
    seed: Annotated[
        int, typer.Option(help="Seed for the split, initialisation and augmentation.")
    ] = 0,
    max_images: Annotated[
        int | None, typer.Option(help="Stratified subsample of the dataset (quick runs).")
    ] = None,
    class_weights: Annotated[
        Literal[choices.CLASS_WEIGHTINGS],
        typer.Option(
            help="'global': classes balanced over the training set; 'source': balanced "
            "within every image source (scanner), each source weighing the same."
        ),
    ] = "global",
    scanner_augment: Annotated[
        bool,
        typer.Option(
            help="Also vary what scanners differ in: crops, resolution, speckle, gain, TGC."
        ),
    ] = False,
    loso: Annotated[
        bool,
        typer.Option(
            help="Leave-one-source-out: also train on all but one source and test on it, "
            "for every source (one extra training each)."
        ),
    ] = False,
    target_sensitivity: Annotated[
        float, typer.Option(help="Operating point chosen on validation.")
    ] = 0.90,
    progressive_via: Annotated[
        Path | None,
        typer.Option(
            metavar="ROOT",
            help="Intermediate dataset for progressive transfer: radiographs (chest-xray) or "
            "ultrasound (breast-us: its images/ folder of benign / malignant / normal).",
        ),
    ] = None,
    via_epochs: Annotated[
        int | None, typer.Option(help="Epochs on the intermediate dataset.")
    ] = None,
    via_max_images: Annotated[
        int | None, typer.Option(help="Subsample of the intermediate dataset.")
    ] = None,
    roi: Annotated[
        Literal[choices.ROI_MODES],
        typer.Option(
            help="Nodule-centred input: off (whole frame), annotations (annotated box, the "
            "localiser's for the rest) or localiser (its box everywhere)."
        ),
    ] = "off",
    roi_margin: Annotated[
        float, typer.Option(help="Context around the ROI per side, fraction of its longer side.")
    ] = 0.3,
    roi_jitter: Annotated[
        float, typer.Option(help="Random shift/scale of training boxes, fraction of their side.")
    ] = 0.0,
    annotations: Annotated[
        Path | None,
        typer.Option(
            metavar="CSV",
            help="Annotation CSV (default: annotations.csv / ddti-annotations.csv in ROOT).",
        ),
    ] = None,
    localiser: Annotated[
        str | None,
        typer.Option(
            metavar="LOCALISER",
            help="Localiser: its MLflow run id, export folder or localiser.onnx.",
        ),
    ] = None,
    descriptors: Annotated[
        bool,
        typer.Option(
            help="Also train ACR TI-RADS descriptor heads (composition, echogenicity, margin, "
            "echogenic foci) from the annotation file, loss masked where a descriptor is "
            "missing; softmax classifier only (ignored, with a note, for svm / rf)."
        ),
    ] = False,
    tta: Annotated[
        Literal[choices.TTA_MODES],
        typer.Option(
            help="Evaluate with test-time augmentation (softmax on whole frames): none, flips "
            "or full; `export` then builds the same views into the graph (docs/models.md)."
        ),
    ] = "none",
    experiment: Annotated[
        str, typer.Option(metavar="NAME", help="MLflow experiment.")
    ] = "thyroid-cad",
    config: Annotated[
        Path | None,
        typer.Option(
            metavar="FILE",
            help="YAML file of training options (TrainConfig fields, e.g. configs/best.yaml); "
            "options given on the command line override it.",
        ),
    ] = None,
):
    """Train one model and log it to MLflow; prints the run id last. A --config file
    with `members:` trains an ensemble's members under one parent run (export the parent)."""
    check_path(data, "dataset folder")
    check_path(config, "configuration")
    check_path(manifest, "manifest")
    check_path(annotations, "annotation file")
    check_path(progressive_via, "intermediate dataset")
    check_path(None if weights in ("imagenet", "none", "") else weights, "weights file")
    start_tensorflow()
    from training.train import TrainConfig, train_members, train_progressive
    from training.train import train as run

    with user_errors():
        values = _options(ctx, config)
        if not values.get("data"):
            raise ValueError("no dataset: give --data ROOT or `data:` in the --config file")
        via, via_epochs, via_max_images, members = (values.pop(k, None) for k in _NOT_FIELDS[1:])
        if via and members:
            raise ValueError("progressive_via and members cannot be combined")
        cfg = TrainConfig(**{k: v for k, v in values.items() if k not in _NOT_FIELDS})
    with user_errors(), progress_hidden():
        if via:
            run_id = train_progressive(cfg, via, via_epochs, None, via_max_images)
        elif members:
            run_id = train_members(cfg, members)
        else:
            run_id = run(cfg)
    typer.echo(run_id)


@app.command(short_help="Train a grid of options; prints the parent run id.")
def sweep(
    config: Annotated[
        Path,
        typer.Argument(metavar="CONFIG", help="YAML sweep configuration (see docs/training.md)."),
    ],
    fresh: Annotated[
        bool,
        typer.Option(
            metavar="FILE", help="Start a new sweep instead of resuming an unfinished one."
        ),
    ] = False,
):
    """Train a grid of backbone x strategy x classifier x stage; prints the parent run id last."""
    check_path(config, "sweep configuration")
    start_tensorflow()
    from training import sweep as sweeps

    with user_errors():
        spec = sweeps.load_config(config)
    with user_errors(), progress_hidden():
        parent_id, table = sweeps.run_sweep(spec, resume=not fresh)
    typer.echo(table)
    typer.echo(parent_id)


@app.command(short_help="Export a run to ONNX with its model card.")
def export(
    run_ids: Annotated[
        list[str],
        typer.Argument(
            metavar="RUN_ID...",
            help="Training run (or progressive / sweep parent); several: one ensemble graph.",
        ),
    ],
    out: Annotated[
        Path, typer.Option(metavar="DIR", help="Folder for model.onnx and model_card.json.")
    ] = Path("export"),
    tta: Annotated[
        str | None,
        typer.Option(
            metavar="MODE",
            help="Test-time augmentation in the graph: none; flips (left-right); full (flips, "
            "shifts and zooms). Probabilities averaged over the views (docs/models.md). "
            "Default: the run's own --tta from training, else none.",
        ),
    ] = None,
    ensemble: Annotated[
        str | None,
        typer.Option(
            metavar="folds",
            help="'folds': export the leave-one-source-out fold models of RUN_ID (trained "
            "with --loso) as one ensemble graph.",
        ),
    ] = None,
    weights: Annotated[
        str | None,
        typer.Option(
            metavar="W1,W2,...",
            help="Ensemble member weights, comma-separated (default: equal).",
        ),
    ] = None,
):
    """Export a run to ONNX (probabilities + in-graph Grad-CAM) with its model card;
    with --tta, several runs or --ensemble folds: one graph averaging views and members."""
    if tta is not None and tta not in choices.TTA_MODES:
        fail(f"--tta must be one of {', '.join(choices.TTA_MODES)}; got {tta!r}")
    existing_store()
    start_tensorflow()
    from training import ensemble as combined
    from training import tracking

    with user_errors(), progress_hidden():
        tracking.setup_uri()
        try:
            mix = [float(w) for w in weights.split(",")] if weights else None
        except ValueError as e:
            raise ValueError(f"--weights must be comma-separated numbers: {e}") from e
        card = combined.export_runs(run_ids, out, tta, mix, ensemble)
    parity = card["parity"]
    log.info("parity %s: %s", "passed" if parity["passed"] else "FAILED", json.dumps(parity))
    typer.echo(str(out / "model.onnx"))
    if not parity["passed"]:
        raise fail(
            "the exported model failed its parity check; the registry will refuse to promote it",
            code=1,
        )
