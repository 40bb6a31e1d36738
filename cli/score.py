"""`thyroid-cad score`: archive scoring with one registered model version (scoring/)."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Annotated

import typer

from cli.common import app, existing_store, fail, log, user_errors
from scoring import ENGINES, SPARK_READS


def _spark_conf(pairs: list[str]) -> dict[str, str]:
    conf = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"--conf takes KEY=VALUE, got {pair!r}")
        conf[key.strip()] = value
    return conf


def _check_spark() -> None:
    try:
        import pyspark  # noqa: F401
    except ImportError as e:
        raise fail("--engine spark needs pyspark: pip install 'thyroid-cad[spark]'") from e
    if not (os.environ.get("JAVA_HOME") or shutil.which("java")):
        raise fail(
            "--engine spark needs Java 17 or later (e.g. apt-get install openjdk-17-jre-headless)"
        )


def _progress_bar():
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    return Progress(
        TextColumn("scoring"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TextColumn("eta"),
        TimeRemainingColumn(),
        console=Console(stderr=True),
    )


@app.command(short_help="Score an archive of images into Parquet rows.")
def score(
    source: Annotated[
        str,
        typer.Argument(
            metavar="INPUT",
            help="A folder (searched recursively), a list file (.txt/.lst, one path per line) "
            "or a .csv / .parquet table of image paths (PNG, JPEG, BMP, TIFF, DICOM).",
        ),
    ],
    out: Annotated[
        Path,
        typer.Option(
            "--out",
            metavar="DIR",
            help="Output folder: a Parquet dataset, appended to; a rerun resumes.",
        ),
    ],
    model: Annotated[
        str,
        typer.Option(
            metavar="REFERENCE", help="NAME@ALIAS (resolved once, at the start) or NAME/VERSION."
        ),
    ] = "thyroid-nodule-classifier@champion",
    engine: Annotated[
        str,
        typer.Option(
            metavar="ENGINE", help=f"{' or '.join(ENGINES)}: a local process pool, or Spark."
        ),
    ] = "local",
    workers: Annotated[
        int | None, typer.Option(help="local: worker processes (default: one per core).")
    ] = None,
    master: Annotated[
        str,
        typer.Option(
            metavar="URL", help="spark: master URL (local[*], spark://host:7077, yarn, ...)."
        ),
    ] = "local[*]",
    spark_read: Annotated[
        str,
        typer.Option(
            metavar="MODE",
            help=f"spark: {' or '.join(SPARK_READS)} (Spark reads the bytes, or each task does).",
        ),
    ] = "binaryfile",
    conf: Annotated[
        list[str] | None,
        typer.Option(metavar="KEY=VALUE", help="spark: KEY=VALUE Spark setting (repeatable)."),
    ] = None,
    glob: Annotated[
        str | None,
        typer.Option(
            metavar="PATTERN",
            help="Folder input: file-name pattern, e.g. '*' for extension-less DICOM.",
        ),
    ] = None,
    column: Annotated[
        str | None,
        typer.Option(metavar="NAME", help="Table input: the column of paths (default path/image)."),
    ] = None,
    retry_errors: Annotated[
        bool, typer.Option(help="Score again images whose earlier row has an error.")
    ] = False,
    chunk_size: Annotated[
        int | None,
        typer.Option(help="Images per output file (local, default 512) or per Spark job (4096)."),
    ] = None,
):
    """Score stored images with one model version into Parquet rows (resumable).

    One row per image: path, SHA-256, model name/version/ONNX SHA-256, probabilities,
    decision, TI-RADS estimates where the model has them, and an error column (a bad
    image never stops the job). The numbers are /v1/predict's. Prints a JSON summary.
    """
    existing_store()
    from scoring import archive, inputs
    from service.config import get_settings

    try:
        import pyarrow  # noqa: F401
    except ImportError as e:
        raise fail("thyroid-cad score writes Parquet: pip install 'thyroid-cad[score]'") from e
    if engine not in ENGINES:
        raise fail(f"--engine must be one of {', '.join(ENGINES)}, got {engine!r}")
    if engine == "spark":
        _check_spark()
    with user_errors():
        if chunk_size is not None and chunk_size < 1:
            raise ValueError("--chunk-size must be at least 1")
        spark_conf = _spark_conf(conf or [])
        paths = inputs.discover(source, glob=glob, column=column)
        out = archive.check_output(out)
        files = archive.ModelFiles.resolve(model)
        settings = get_settings()
        job = archive.Job(
            files, paths, out, settings.runtime(), settings.max_image_pixels, retry_errors
        )
        todo = job.todo()
    skipped = len(paths) - len(todo)
    log.info(
        "%s v%s (onnx %s): %d images, %d already scored, %d to score with the %s engine",
        files.name, files.version, files.sha256[:12], len(paths), skipped, len(todo), engine,
    )  # fmt: skip
    written = 0
    try:
        if todo:
            with _progress_bar() as bar:
                task = bar.add_task("scoring", total=len(todo))

                def advance(n: int) -> None:
                    bar.advance(task, n)

                with user_errors():
                    written = _run(
                        engine, job, todo, advance, workers, master, spark_read, spark_conf,
                        chunk_size,
                    )  # fmt: skip
    except KeyboardInterrupt as e:
        raise fail(
            f"interrupted; rows written so far stay in {out}: run the same command to resume",
            130,
        ) from e
    summary = archive.summarize(out, files, len(paths), skipped, written)
    typer.echo(json.dumps(summary))


def _run(engine, job, todo, advance, workers, master, spark_read, spark_conf, chunk_size) -> int:
    if engine == "local":
        from scoring import local

        count = workers or local.available_cores()
        return local.run(job, todo, count, advance, flush_rows=chunk_size or 512)
    from scoring import spark

    try:
        return spark.run(job, todo, master, advance, spark_read, chunk_size or 4096, spark_conf)
    except Exception as e:
        if type(e).__module__.split(".")[0] in ("pyspark", "py4j"):
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise fail(f"the Spark job failed: {first}", 1) from e
        raise
