"""Archive scoring throughput: what `thyroid-cad score` does per image, per core, per engine.

    python benchmarks/archive_scoring.py --export EXPORT_DIR --images FOLDER [--spark]

EXPORT_DIR is a `thyroid-cad export` folder (model.onnx + model_card.json; no registry
needed), FOLDER the images (e.g. ../shared/data/thyroid-seed). Measured, in one process:

1. decode + crop + letterbox (`service.inference.pipeline.prepare`) alone, one thread: ms per image;
2. the local engine (scoring/local.py) with 1 and with every core's worker: images/s;
3. with --spark, the Spark engine in local[N] mode: images/s, session start apart.

Prints a markdown table for docs/scale.md. Run it on a quiet machine: the numbers are
wall-clock rates, only as good as the machine is idle.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from scoring import SPARK_READS, archive, inputs, local  # noqa: E402
from service import inference  # noqa: E402
from service.inference.models import Runtime  # noqa: E402

MAX_PIXELS = 40_000_000


def prepare_ms(paths: list[str], size: int) -> float:
    times = []
    for path in paths:
        data = Path(path).read_bytes()
        t0 = time.perf_counter()
        inference.prepare(data, size, MAX_PIXELS)
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def engine_rate(run, job: archive.Job, paths: list[str]) -> float:
    t0 = time.perf_counter()
    n = run(job, paths)
    seconds = time.perf_counter() - t0
    assert n == len(paths), (n, len(paths))
    return len(paths) / seconds


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--export", required=True, type=Path)
    ap.add_argument("--images", required=True)
    ap.add_argument("--limit", type=int, default=800)
    ap.add_argument("--spark", action="store_true")
    args = ap.parse_args()

    export = Path(args.export)
    card_path = export / "model_card.json"
    files = archive.ModelFiles.from_card_file("benchmark", 1, export / "model.onnx", card_path)
    paths = inputs.discover(args.images)[: args.limit]
    cores = local.available_cores()
    runtime = Runtime(providers=("CPUExecutionProvider",))
    size = int(files.card["input_size"])
    rows = [("decode + crop + letterbox, 1 thread", f"{prepare_ms(paths, size):.1f} ms/image")]
    with tempfile.TemporaryDirectory() as tmp:
        for workers in sorted({1, cores}):
            job = archive.Job(files, paths, Path(tmp) / f"local-{workers}", runtime, MAX_PIXELS)
            rate = engine_rate(lambda j, p, w=workers: local.run(j, p, w), job, paths)
            rows.append((f"local engine, {workers} worker(s)", f"{rate:.0f} images/s"))
        size_bytes = sum(f.stat().st_size for f in job.out.glob("*.parquet"))
        rows.append(("output size", f"{size_bytes / len(paths):.0f} bytes/row"))
        if args.spark:
            from scoring import spark

            os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
            t0 = time.perf_counter()
            session = spark.session(f"local[{cores}]", {"spark.ui.enabled": "false"})
            rows.append(("Spark session start", f"{time.perf_counter() - t0:.0f} s"))
            for read in SPARK_READS:
                job = archive.Job(files, paths, Path(tmp) / f"spark-{read}", runtime, MAX_PIXELS)
                rate = engine_rate(
                    lambda j, p, r=read: spark.run(j, p, f"local[{cores}]", read=r), job, paths
                )
                rows.append(
                    (
                        f"Spark local[{cores}], read={read} (incl. worker start)",
                        f"{rate:.0f} images/s",
                    )
                )
            session.stop()
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(
        f"{len(paths)} images from {args.images}; model {files.card.get('backbone')} at "
        f"{size} px ({files.sha256[:12]}); {platform.machine()}, {cores} cores, Python "
        f"{platform.python_version()}, load average {load:.1f} at the end.\n"
    )
    print("| step | rate |\n|---|---|")
    for step, rate in rows:
        print(f"| {step} | {rate} |")


if __name__ == "__main__":
    main()
