"""`thyroid-cad demo-data` and `thyroid-cad data ...`: datasets."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from cli.common import app, group, log, user_errors

data_app = group("Inspect and split datasets.")
app.add_typer(data_app, name="data")


@app.command("demo-data", short_help="Write a SYNTHETIC phantom dataset (no patient data).")
def demo_data(
    out: Annotated[
        Path, typer.Argument(metavar="OUT", help="Folder to write the phantom dataset to.")
    ],
    per_class: Annotated[int, typer.Option(metavar="FILE", help="Images per class.")] = 100,
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


@data_app.command("audit", short_help="Counts, sizes, duplicates and leaks of a dataset.")
def data_audit(
    root: Annotated[
        Path,
        typer.Argument(
            metavar="ROOT", help="Dataset root: ROOT/<class>/* or ROOT/<split>/<class>/*."
        ),
    ],
    manifest: Annotated[
        Path | None, typer.Option(metavar="CSV", help="CSV with image,case_id columns.")
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="One JSON object on stdout.")] = False,
):
    """Counts, sizes, unreadable files, exact and near duplicates, leaks across splits."""
    from training import audit, data

    with user_errors():
        report = audit.audit(data.scan(root, manifest))
    typer.echo(json.dumps(report, indent=1) if as_json else audit.format_report(report))


@data_app.command("split", short_help="Write a leak-free stratified train/val/test split.")
def data_split(
    root: Annotated[Path, typer.Argument(metavar="ROOT", help="Dataset root.")],
    out: Annotated[
        Path, typer.Option(metavar="FILE", help="Where to write the split JSON.")
    ] = Path("split.json"),
    manifest: Annotated[
        Path | None, typer.Option(metavar="CSV", help="CSV with image,case_id columns.")
    ] = None,
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
