"""`thyroid-cad localiser ...`: the nodule localiser that proposes the ROI."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from cli.common import (
    app,
    check_path,
    existing_store,
    fail,
    group,
    log,
    progress_hidden,
    user_errors,
)

localiser_app = group(
    "Train and export the nodule localiser (proposes the ROI the classifier sees)."
)
app.add_typer(localiser_app, name="localiser", short_help="Train and export the nodule localiser.")


@localiser_app.command("train", short_help="Train the localiser; prints the run id.")
def localiser_train(
    data: Annotated[
        list[Path] | None,
        typer.Option(
            metavar="ROOT",
            help="Dataset folder holding annotations.csv or ddti-annotations.csv (repeatable).",
        ),
    ] = None,
    annotations: Annotated[
        list[Path] | None,
        typer.Option(
            metavar="CSV", help="Annotation CSV, images relative to its folder (repeatable)."
        ),
    ] = None,
    image_size: Annotated[int, typer.Option(help="Input side in pixels.")] = 128,
    filters: Annotated[
        str,
        typer.Option(
            metavar="WIDTHS", help="U-Net widths per level, comma-separated (last: bottleneck)."
        ),
    ] = "8,16,32,64,128",
    encoder: Annotated[
        str,
        typer.Option(
            help="Down path: unet (compact, from scratch) or mobilenetv2 (pretrained, "
            "frozen; --filters then give the up path's widths at strides 1..16)."
        ),
    ] = "unet",
    weights: Annotated[
        str | None,
        typer.Option(
            metavar="FILE|imagenet",
            help="The mobilenetv2 encoder's weights: a local ImageNet file (TFLite or "
            "Keras h5) or imagenet (Keras' download).",
        ),
    ] = None,
    epochs: Annotated[int, typer.Option(help="Training epochs (early stopping on val).")] = 30,
    batch_size: Annotated[int, typer.Option(help="Batch size.")] = 16,
    learning_rate: Annotated[float, typer.Option(help="Adam learning rate.")] = 2e-3,
    patience: Annotated[int, typer.Option(help="Early-stopping patience (epochs).")] = 6,
    seed: Annotated[int, typer.Option(help="Seed for the split and the initialisation.")] = 0,
    max_images: Annotated[
        int | None, typer.Option(help="Subsample per source share (quick runs).")
    ] = None,
    experiment: Annotated[
        str, typer.Option(metavar="NAME", help="MLflow experiment.")
    ] = "thyroid-cad-localiser",
):
    """Train the localiser on nodule outlines / lesion masks; prints the run id last."""
    for root in data or []:
        check_path(root, "dataset folder")
    for csv in annotations or []:
        check_path(csv, "annotation file")
    from training.annotations import ANNOTATION_NAMES, find_annotations
    from training.localiser import LocaliserConfig, train_localiser

    files = [str(a) for a in annotations or []]
    for root in data or []:
        found = find_annotations(root)
        if found is None:
            raise fail(f"{root} holds none of {', '.join(ANNOTATION_NAMES)}; use --annotations")
        files.append(str(found))
    if not files:
        raise fail("give --data or --annotations")
    with user_errors():
        widths = tuple(int(f) for f in filters.split(","))
        cfg = LocaliserConfig(
            annotations=files,
            image_size=image_size,
            filters=widths,
            encoder=encoder,
            weights=weights,
            epochs=epochs,
            batch_size=batch_size,
            learning_rate=learning_rate,
            patience=patience,
            seed=seed,
            max_images=max_images,
            experiment=experiment,
        )
    with user_errors(), progress_hidden():
        run_id = train_localiser(cfg)
    typer.echo(run_id)


@localiser_app.command("export", short_help="Copy a localiser run's ONNX file and card.")
def localiser_export(
    run_id: Annotated[str, typer.Argument(metavar="RUN_ID", help="Localiser training run.")],
    out: Annotated[
        Path, typer.Option(metavar="DIR", help="Folder for localiser.onnx and localiser_card.json.")
    ] = Path("localiser"),
):
    """Copy a localiser run's ONNX file and card (exported and parity-checked at training)."""
    existing_store()
    from training import localiser, tracking

    with user_errors(), progress_hidden():
        tracking.setup_uri()
        card = localiser.export_run(run_id, out)
    log.info("localiser parity: %s", json.dumps(card["parity"]))
    typer.echo(str(out / localiser.ONNX_FILE))
    if not card["parity"]["passed"]:
        raise fail("the exported localiser failed its parity check", code=1)
