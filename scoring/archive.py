"""Scoring stored images with one model version: the model files, the rows, the output.

`Scorer` is the one function every engine maps over images: bytes -> the service's
`inference.prepare` / `inference.score` (which calls `inference.decide`) -> one row. An
image that cannot be read or decoded gets a row with its error, never an exception that
stops the job.

The output is a folder of Parquet files (a dataset any Parquet reader opens as one
table): each engine appends whole files, written under a hidden name and renamed, so an
interrupted job leaves only complete files behind and the next run skips what they hold.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import uuid
from collections import Counter
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from registry import store
from service.errors import ApiError
from service.inference import models
from service.inference import pipeline as inference
from service.schemas import DISCLAIMER

log = logging.getLogger(__name__)

# The row, in order: (name, type). Types are Arrow's names; the Spark engine maps them.
FIELDS: tuple[tuple[str, str], ...] = (
    ("path", "string"),  # absolute path (or the URI Spark read it from)
    ("sha256", "string"),  # of the file's bytes
    ("size_bytes", "int64"),
    ("content_type", "string"),  # what the bytes are (sniffed), not the extension
    ("width", "int32"),
    ("height", "int32"),
    ("model_name", "string"),
    ("model_version", "int64"),
    ("onnx_sha256", "string"),
    ("label", "string"),  # most probable class
    ("decision", "string"),  # label at the card's operating point
    ("positive_class", "string"),
    ("threshold", "double"),
    ("probabilities", "map<string,double>"),  # class -> probability, as /v1/predict
    ("tirads", "string"),  # JSON: TI-RADS estimates, where the model has them
    ("error_code", "string"),  # null when scored; else why not (corrupt_image, not_found...)
    ("error", "string"),
    ("engine", "string"),
    ("scored_at", "string"),  # ISO 8601 UTC
    ("disclaimer", "string"),
)
COLUMNS = tuple(name for name, _ in FIELDS)
KEY_COLUMNS = ["path", "model_name", "model_version", "onnx_sha256", "error_code"]


def arrow_schema():
    import pyarrow as pa

    types = {
        "string": pa.string(),
        "int64": pa.int64(),
        "int32": pa.int32(),
        "double": pa.float64(),
        "map<string,double>": pa.map_(pa.string(), pa.float64()),
    }
    return pa.schema([(name, types[kind]) for name, kind in FIELDS])


@dataclass(frozen=True)
class ModelFiles:
    """What travels with a job: one registered version's ONNX file and model card."""

    name: str
    version: int
    onnx_path: Path
    card: dict

    @property
    def sha256(self) -> str:
        return self.card["sha256"]

    @classmethod
    def resolve(cls, reference: str) -> ModelFiles:
        """`NAME@ALIAS` (resolved once, now: the whole job uses that version) or
        `NAME/VERSION`, through the registry's SHA-256-checked cache."""
        resolved = store.resolve(reference)
        return cls(resolved.name, resolved.version, resolved.onnx_path, resolved.card)

    @classmethod
    def from_card_file(cls, name: str, version: int, onnx_path: str, card_path: str):
        card = json.loads(Path(card_path).read_text())
        return cls(name, version, Path(onnx_path), card)

    def as_resolved(self) -> store.Resolved:
        return store.Resolved(self.name, self.version, None, self.onnx_path, self.card, False)

    def identity(self) -> dict:
        return {
            "model_name": self.name,
            "model_version": self.version,
            "onnx_sha256": self.sha256,
        }


def tirads_estimates(model: models.LoadedModel, scored: inference.Scored) -> str | None:
    """The image's TI-RADS estimates as JSON, where the model's card declares descriptors.

    The hook for models with a descriptor head: the scoring core hands their estimates
    back with the prediction (`scored.prediction.tirads`); models without one (every
    model so far) give None.
    """
    if not model.card.get("descriptors"):
        return None
    estimates = getattr(scored.prediction, "tirads", None)
    if estimates is None:
        return None
    if hasattr(estimates, "model_dump"):
        estimates = estimates.model_dump()
    return json.dumps(estimates, sort_keys=True)


def now() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds")


def blank_row(path: str, files: ModelFiles, engine: str) -> dict:
    """A row for `path` with the model and engine filled in, nothing scored yet."""
    row = dict.fromkeys(COLUMNS)
    row.update(path=path, engine=engine, disclaimer=DISCLAIMER, **files.identity())
    return row


def _read(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


class Scorer:
    """One process's loaded model, scoring images into rows (once per worker/executor)."""

    def __init__(self, files: ModelFiles, runtime: models.Runtime, max_pixels: int, engine: str):
        self.files, self.max_pixels, self.engine = files, max_pixels, engine
        self.model = models.load(files.as_resolved(), runtime)
        batcher = self.model.batcher
        # As many frames in flight as the model's batch policy gathers (1 on CPU): the
        # batcher forms the batches, exactly as it does for concurrent /v1 requests.
        self.concurrency = batcher.policy.max_batch_size if batcher is not None else 1

    def close(self) -> None:
        self.model.close()

    def score_many(self, items: Iterable[tuple[str, bytes | None]]) -> list[dict]:
        """(path, its bytes, or None to read them from path) -> rows, in the same order."""
        items = list(items)
        if self.concurrency > 1 and len(items) > 1:
            with ThreadPoolExecutor(min(self.concurrency, len(items))) as pool:
                return list(pool.map(lambda item: self.score_one(*item), items))
        return [self.score_one(path, data) for path, data in items]

    def score_one(self, path: str, data: bytes | None = None) -> dict:
        row = blank_row(path, self.files, self.engine)
        try:
            if data is None:
                data = _read(path)
            row.update(sha256=hashlib.sha256(data).hexdigest(), size_bytes=len(data))
            prepared = inference.prepare(data, self.model.input_size, self.max_pixels, self.model)
            row.update(
                content_type=prepared.content_type,
                height=int(prepared.size[0]),
                width=int(prepared.size[1]),
            )
            scored = inference.score(self.model, prepared)
            prediction = scored.prediction
            row.update(
                label=prediction.label,
                decision=prediction.decision,
                positive_class=prediction.positive_class,
                threshold=prediction.threshold,
                probabilities=dict(prediction.probabilities),
                tirads=tirads_estimates(self.model, scored),
            )
        except ApiError as e:  # the image's own fault: what /v1/predict would answer
            row.update(error_code=e.code, error=e.message)
        except OSError as e:
            code = "not_found" if e.errno == errno.ENOENT else "unreadable"
            row.update(error_code=code, error=f"{type(e).__name__}: {e.strerror or e}")
        except Exception as e:  # noqa: BLE001 - one image never stops the job
            log.exception("scoring %s failed", path)
            row.update(error_code="internal_error", error=f"{type(e).__name__}: {e}")
        row["scored_at"] = now()
        return row


_scorers: dict[tuple, Scorer] = {}


def scorer_for(files: ModelFiles, runtime: models.Runtime, max_pixels: int, engine: str) -> Scorer:
    """This process's Scorer for the model, loaded on first use and then reused (a Spark
    Python worker serves many tasks: the ONNX session is built once per worker)."""
    key = (files.sha256, files.version, runtime, max_pixels, engine)
    if key not in _scorers:
        _scorers[key] = Scorer(files, runtime, max_pixels, engine)
    return _scorers[key]


# -- the output dataset ---------------------------------------------------------------------
def check_output(out: Path) -> Path:
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} exists and is not a folder (the output is a folder)")
    out.mkdir(parents=True, exist_ok=True)
    return out


def write_part(rows: list[dict], out: Path, engine: str) -> Path | None:
    """Append rows as one new Parquet file of the dataset (atomically: hidden, then renamed)."""
    if not rows:
        return None
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.Table.from_pylist(rows, schema=arrow_schema())
    Path(out).mkdir(parents=True, exist_ok=True)
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S")
    name = f"part-{engine}-{stamp}-{uuid.uuid4().hex[:12]}.parquet"
    tmp = Path(out) / f".{name}.tmp"
    pq.write_table(table, tmp)
    os.replace(tmp, Path(out) / name)
    return Path(out) / name


def read_output(out: Path, columns: list[str] | None = None):
    """The output folder as one Arrow table (files of both engines; hidden and `_` files,
    such as Spark's `_SUCCESS` and unfinished parts, are skipped). None when empty."""
    import pyarrow.dataset as ds

    out = Path(out)
    if not out.is_dir():
        return None
    dataset = ds.dataset(out, format="parquet", exclude_invalid_files=False)
    if not dataset.files:
        return None
    return dataset.to_table(columns=columns)


def done_paths(out: Path, files: ModelFiles, retry_errors: bool = False) -> set[str]:
    """Paths the output already holds a row for with this exact model version and file
    (with `retry_errors`, only rows without an error count)."""
    table = read_output(out, KEY_COLUMNS)
    if table is None:
        return set()
    identity = files.identity()
    done = set()
    for row in table.to_pylist():
        if any(row[k] != v for k, v in identity.items()):
            continue
        if retry_errors and row["error_code"] is not None:
            continue
        done.add(row["path"])
    return done


def summarize(out: Path, files: ModelFiles, requested: int, skipped: int, scored: int) -> dict:
    """What the output holds for this model version, and what this run did."""
    table = read_output(out, KEY_COLUMNS)
    rows = [] if table is None else table.to_pylist()
    identity = files.identity()
    mine = [r for r in rows if all(r[k] == v for k, v in identity.items())]
    errors = Counter(r["error_code"] for r in mine if r["error_code"] is not None)
    return {
        "out": str(out),
        "model": f"{files.name}/{files.version}",
        "onnx_sha256": files.sha256,
        "requested": requested,
        "skipped_already_scored": skipped,
        "scored_now": scored,
        "rows_for_this_version": len(mine),
        "errors_for_this_version": dict(sorted(errors.items())),
    }


@dataclass
class Job:
    """One archive-scoring run: these paths, this model version, into this folder."""

    files: ModelFiles
    paths: list[str]
    out: Path
    runtime: models.Runtime
    max_pixels: int
    retry_errors: bool = False

    def todo(self) -> list[str]:
        """The paths still to score (resume: those already in the output are skipped)."""
        done = done_paths(self.out, self.files, self.retry_errors)
        return [p for p in self.paths if p not in done]
