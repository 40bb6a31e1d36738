"""`thyroid-cad train`, `sweep` and `export`: the ML engineer's jobs."""

from __future__ import annotations

import contextlib
import json
import sys
from enum import Enum, StrEnum
from pathlib import Path
from typing import Annotated

import typer

from cli.common import app, fail, log, start_tensorflow, user_errors


class Backbone(StrEnum):
    tiny = "tiny"
    vgg16 = "vgg16"
    vgg19 = "vgg19"
    resnet50 = "resnet50"
    efficientnetb0 = "efficientnetb0"
    mobilenetv2 = "mobilenetv2"
    squeezenet = "squeezenet"


class Strategy(StrEnum):
    frozen = "frozen"
    partial = "partial"
    full = "full"
    two_phase = "two-phase"


class Classifier(StrEnum):
    softmax = "softmax"
    svm = "svm"
    rf = "rf"
    logreg = "logreg"


class ClassWeights(StrEnum):
    global_ = "global"
    source = "source"


# `train` options that are not TrainConfig fields.
_NOT_FIELDS = ("config", "progressive_via", "via_epochs", "via_max_images")


def _plain(value):
    """An option's value as TrainConfig holds it (enum -> its value, path -> str)."""
    if isinstance(value, Enum):
        return value.value
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
    return {**values, **{k: v for k, v in from_file.items() if k not in given}}


class Roi(StrEnum):
    off = "off"
    annotations = "annotations"
    localiser = "localiser"


@app.command()
def train(
    ctx: typer.Context,
    data: Annotated[
        Path | None, typer.Option(help="Dataset root (or `data:` in the --config file).")
    ] = None,
    backbone: Annotated[Backbone, typer.Option(help="Convolutional base.")] = Backbone.tiny,
    strategy: Annotated[Strategy, typer.Option(help="Fine-tuning strategy.")] = Strategy.full,
    classifier: Annotated[
        Classifier,
        typer.Option(help="Head: softmax, or SVM / RF / logistic regression on pooled features."),
    ] = Classifier.softmax,
    epochs: Annotated[int, typer.Option(help="Training epochs (two-phase: both phases).")] = 10,
    image_size: Annotated[int, typer.Option(help="Model input side in pixels.")] = 224,
    weights: Annotated[
        str,
        typer.Option(
            help="'imagenet' (Keras cache), 'none', or a local weights file: Keras .h5 / "
            ".weights.h5, an ImageNet TFLite MobileNetV2 (mobilenetv2), the Keras-1 SqueezeNet "
            "v1.1 .h5 (squeezenet)."
        ),
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
        ClassWeights,
        typer.Option(
            help="'global': classes balanced over the training set; 'source': balanced "
            "within every image source (scanner), each source weighing the same."
        ),
    ] = ClassWeights.global_,
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
            help="Intermediate dataset for progressive transfer: radiographs (chest-xray) or "
            "ultrasound (breast-us: its images/ folder of benign / malignant / normal)."
        ),
    ] = None,
    via_epochs: Annotated[
        int | None, typer.Option(help="Epochs on the intermediate dataset.")
    ] = None,
    via_max_images: Annotated[
        int | None, typer.Option(help="Subsample of the intermediate dataset.")
    ] = None,
    roi: Annotated[
        Roi,
        typer.Option(
            help="Nodule-centred input: off (whole frame), annotations (annotated box, the "
            "localiser's for the rest) or localiser (its box everywhere)."
        ),
    ] = Roi.off,
    roi_margin: Annotated[
        float, typer.Option(help="Context around the ROI per side, fraction of its longer side.")
    ] = 0.3,
    roi_jitter: Annotated[
        float, typer.Option(help="Random shift/scale of training boxes, fraction of their side.")
    ] = 0.0,
    annotations: Annotated[
        Path | None,
        typer.Option(
            help="Annotation CSV (default: annotations.csv / ddti-annotations.csv in ROOT)."
        ),
    ] = None,
    localiser: Annotated[
        str | None,
        typer.Option(help="Localiser: its MLflow run id, export folder or localiser.onnx."),
    ] = None,
    descriptors: Annotated[
        bool,
        typer.Option(
            help="Also train ACR TI-RADS descriptor heads (composition, echogenicity, margin, "
            "echogenic foci) from the annotation file, loss masked where a descriptor is "
            "missing; softmax classifier only (ignored, with a note, for svm / rf)."
        ),
    ] = False,
    experiment: Annotated[str, typer.Option(help="MLflow experiment.")] = "thyroid-cad",
    config: Annotated[
        Path | None,
        typer.Option(
            help="YAML file of training options (TrainConfig fields, e.g. configs/best.yaml); "
            "options given on the command line override it."
        ),
    ] = None,
):
    """Train one model and log it to MLflow; prints the run id last."""
    start_tensorflow()
    from training.train import TrainConfig, train_progressive
    from training.train import train as run

    with user_errors():
        values = _options(ctx, config)
        if not values.get("data"):
            raise ValueError("no dataset: give --data ROOT or `data:` in the --config file")
        via, via_epochs, via_max_images = (values.pop(k, None) for k in _NOT_FIELDS[1:])
        cfg = TrainConfig(**{k: v for k, v in values.items() if k not in _NOT_FIELDS})
    with user_errors(), contextlib.redirect_stdout(sys.stderr):
        if via:
            run_id = train_progressive(cfg, via, via_epochs, None, via_max_images)
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
    start_tensorflow()
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
    start_tensorflow()
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
