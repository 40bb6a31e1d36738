"""`--engine spark`: the local Scorer, mapped over Spark executors as a pandas iterator UDF.

- The model travels with the job: its ONNX file and card are added to the SparkContext
  (`addFile`) and each executor opens its copy (`SparkFiles.get`); no task asks the
  registry for anything.
- The UDF gets batches of rows (path, bytes) and builds its Scorer on first use in each
  Python worker (`archive.scorer_for` keeps it), so the ONNX session is made once per
  worker and reused by every task it runs, then scores batch after batch.
- Images are read by Spark's `binaryFile` source (`read="binaryfile"`), or by the tasks
  themselves from their paths (`read="paths"`); both need the paths visible to every
  executor (a local or mounted file system).
- The output is appended chunk by chunk, one Spark write job per chunk: a job that dies
  loses at most the chunk in flight, and the next run skips every finished one.
"""

# No `from __future__ import annotations`: Spark reads the UDF's type hints (an iterator
# of pandas Series) at definition time, where pandas is imported.
import contextlib
import dataclasses
import math
import os
import re
import shutil
import sys
import tempfile
import threading
import uuid
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path

from scoring import SPARK_READS, archive
from service.inference.models import Runtime

ENGINE = "spark"
SPARK_TYPES = {
    "string": "string",
    "int64": "bigint",
    "int32": "int",
    "double": "double",
    "map<string,double>": "map<string,double>",
}
# Defaults for a session this module creates (--conf overrides them).
SESSION_CONF = {
    "spark.sql.execution.arrow.pyspark.enabled": "true",
    # Rows per Arrow batch handed to the UDF: bytes of 64 images, a few MB to ~100 MB.
    "spark.sql.execution.arrow.maxRecordsPerBatch": "64",
    "spark.ui.showConsoleProgress": "false",  # thyroid-cad draws its own progress bar
}
# Explicit file lists are listed on the driver (a plain stat per file), not by a Spark
# job per chunk: cheaper, and the write job is then the only one the progress bar follows.
_LISTING = ("spark.sql.sources.parallelPartitionDiscovery.threshold", str(2**31 - 1))


def row_ddl() -> str:
    """The output row as a Spark DDL schema (the same columns and types as archive.FIELDS)."""
    return ", ".join(f"{name} {SPARK_TYPES[kind]}" for name, kind in archive.FIELDS)


@contextlib.contextmanager
def _pandas_3_accepted():
    """pyspark 4.3 warns that pandas 3 is not fully supported; its Arrow UDFs, which are
    all this module uses, work with it (tests/test_score.py)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*pandas >= 3", category=FutureWarning)
        yield


def session(master: str, conf: dict[str, str] | None = None):
    """The active SparkSession (spark-submit, a notebook, tests), else a new one on master."""
    with _pandas_3_accepted():
        return _session(master, conf)


def _session(master: str, conf: dict[str, str] | None):
    from pyspark.sql import SparkSession

    active = SparkSession.getActiveSession()
    if active is not None:
        return active
    if master.startswith("local"):
        # Local mode runs Python workers from PATH's python3 unless told: use this one.
        os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
    builder = SparkSession.builder.master(master).appName("thyroid-cad score")
    for key, value in {**SESSION_CONF, **(conf or {})}.items():
        builder = builder.config(key, value)
    return builder.getOrCreate()


def local_path(path: str) -> str:
    """binaryFile's `file:/x` (or `file:///x`) back to the `/x` the job was given."""
    if path.startswith("file:"):
        return "/" + path[5:].lstrip("/")
    return path


def _glob_literal(path: str) -> str:
    """A path Spark's reader takes literally (it expands glob characters in paths)."""
    return re.sub(r"([\\*?\[\]{}])", r"\\\1", path)


def _ship(sc, files: archive.ModelFiles) -> tuple[str, str]:
    """Add the model file and card to the job under names unique to their hash."""
    stem = f"thyroid-cad-{files.sha256[:16]}"
    folder = Path(tempfile.gettempdir()) / "thyroid-cad-spark-files" / files.sha256[:16]
    folder.mkdir(parents=True, exist_ok=True)
    onnx, card = folder / f"{stem}.onnx", folder / f"{stem}.card.json"
    for src, dst in ((files.onnx_path, onnx), (None, card)):
        if not dst.exists():
            tmp = dst.with_name(f".{dst.name}.{uuid.uuid4().hex[:8]}")
            if src is None:
                import json

                tmp.write_text(json.dumps(files.card, indent=1))
            else:
                shutil.copyfile(src, tmp)
            os.replace(tmp, dst)
    # Once per SparkContext (Spark refuses to re-add a name); the name differs per file.
    added = {Path(f).name for f in sc.listFiles}
    for path in (onnx, card):
        if path.name not in added:
            sc.addFile(str(path))
    return onnx.name, card.name


def _make_udf(files: archive.ModelFiles, shipped: tuple[str, str], runtime, max_pixels: int):
    import pandas as pd
    from pyspark.sql.functions import pandas_udf

    name, version = files.name, files.version
    onnx_name, card_name = shipped
    dtypes = {"size_bytes": "Int64", "model_version": "Int64", "width": "Int32", "height": "Int32"}

    @pandas_udf(row_ddl())
    def score(batches: Iterator[tuple[pd.Series, pd.Series]]) -> Iterator[pd.DataFrame]:
        from pyspark import SparkFiles

        model = archive.ModelFiles.from_card_file(
            name, version, SparkFiles.get(onnx_name), SparkFiles.get(card_name)
        )
        scorer = archive.scorer_for(model, runtime, max_pixels, ENGINE)
        for paths, contents in batches:
            items = [
                (local_path(p), None if c is None else bytes(c))
                for p, c in zip(paths, contents, strict=True)
            ]
            frame = pd.DataFrame(scorer.score_many(items), columns=list(archive.COLUMNS))
            yield frame.astype(dtypes)

    return score


def _frame(spark, paths: list[str], read: str):
    from pyspark.sql import functions as F

    if read == "binaryfile":
        df = spark.read.format("binaryFile").load([_glob_literal(p) for p in paths])
        return df.select("path", "content")
    sc = spark.sparkContext
    slices = max(sc.defaultParallelism, math.ceil(len(paths) / 64))
    rdd = sc.parallelize([(p,) for p in paths], min(slices, len(paths)))
    return spark.createDataFrame(rdd, "path string").withColumn(
        "content", F.lit(None).cast("binary")
    )


@contextlib.contextmanager
def _watch(sc, group: str, total: int, advance: Callable[[int], None]):
    """Advance the progress bar as the tasks of the job group finish."""
    stop = threading.Event()
    reported = 0

    def fraction() -> float:
        tracker = sc.statusTracker()
        done = tasks = 0
        for job_id in tracker.getJobIdsForGroup(group):
            job = tracker.getJobInfo(job_id)
            for stage_id in job.stageIds if job else []:
                stage = tracker.getStageInfo(stage_id)
                if stage is not None:
                    done, tasks = done + stage.numCompletedTasks, tasks + stage.numTasks
        return done / tasks if tasks else 0.0

    def poll() -> None:
        nonlocal reported
        while not stop.wait(0.5):
            with contextlib.suppress(Exception):  # the tracker may race the job's end
                now = min(total, int(total * fraction()))
                if now > reported:
                    advance(now - reported)
                    reported = now

    thread = threading.Thread(target=poll, daemon=True, name="spark-progress")
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()
    advance(total - reported)


def _unreachable(paths: list[str], files: archive.ModelFiles) -> tuple[list[str], list[dict]]:
    """binaryFile fails a whole job on a missing file: those get their error row here."""
    keep, rows = [], []
    for path in paths:
        if os.path.isfile(path) and os.access(path, os.R_OK):
            keep.append(path)
            continue
        row = archive.blank_row(path, files, ENGINE)
        code = "not_found" if not os.path.exists(path) else "unreadable"
        message = f"{code.replace('_', ' ')}: {path}"
        row.update(error_code=code, error=message, scored_at=archive.now())
        rows.append(row)
    return keep, rows


def run(
    job: archive.Job,
    todo: list[str],
    master: str,
    progress: Callable[[int], None] | None = None,
    read: str = "binaryfile",
    chunk_size: int = 4096,
    conf: dict[str, str] | None = None,
) -> int:
    """Score `todo` into job.out with Spark; returns the rows written."""
    if read not in SPARK_READS:
        raise ValueError(f"--spark-read must be one of {SPARK_READS}, got {read!r}")
    progress = progress or (lambda n: None)
    with _pandas_3_accepted():
        return _run(_session(master, conf), job, todo, progress, read, chunk_size)


def _run(spark, job, todo, progress, read, chunk_size) -> int:
    sc = spark.sparkContext
    # Each Python worker's onnxruntime gets the cores of one task (spark.task.cpus).
    runtime: Runtime = job.runtime
    if not runtime.intra_op_threads:
        cpus = int(sc.getConf().get("spark.task.cpus", "1"))
        runtime = dataclasses.replace(runtime, intra_op_threads=cpus)
    written = 0
    if read == "binaryfile":
        todo, missing = _unreachable(todo, job.files)
        archive.write_part(missing, job.out, ENGINE)
        written += len(missing)
        progress(len(missing))
    if not todo:
        return written
    udf = _make_udf(job.files, _ship(sc, job.files), runtime, job.max_pixels)
    group = f"thyroid-cad-score-{uuid.uuid4().hex[:8]}"
    previous = spark.conf.get(_LISTING[0], None)
    spark.conf.set(*_LISTING)
    try:
        for start in range(0, len(todo), chunk_size):
            chunk = todo[start : start + chunk_size]
            sc.setJobGroup(group, f"thyroid-cad score: {job.files.name}/{job.files.version}")
            rows = _frame(spark, chunk, read).select(udf("path", "content").alias("row"))
            with _watch(sc, group, len(chunk), progress):
                rows.select("row.*").write.mode("append").parquet(str(job.out))
            written += len(chunk)
    finally:
        if previous is None:
            spark.conf.unset(_LISTING[0])
        else:
            spark.conf.set(_LISTING[0], previous)
        sc.setLocalProperty("spark.jobGroup.id", None)
    return written
