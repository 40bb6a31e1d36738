"""The request audit store (the ``requests`` table of service/store/db.py).

One row per inference request in ``requests``: who asked (API key id), which model answered,
a digest of the input, the outcome and timings. Never pixels and never free-text patient data:
:meth:`AuditStore.record` keeps only the columns below and drops every other key.

Auditing must not take the service down with the database: ``record`` never raises. When the
database is unreachable the record goes to a spool folder (one JSON file per record, written
atomically) and :meth:`AuditStore.replay_spool` (or the replayer thread) writes it later.
``request_id`` is the primary key, so replaying is idempotent.

Requests do not write their records themselves: :meth:`AuditStore.submit` hands a record to
one writer thread and returns a future at once (write-behind). The writer commits whatever
has queued meanwhile in one transaction (group commit), so neither the event loop nor the
request threads ever wait on the database. Once a commit fails (the database is down, or
locked for longer than its busy timeout) the writer spools every record at once instead of
waiting on the database again, until the replayer has written the spool back: a slow or
locked database costs one busy timeout, not one per request.

Nothing is created at import time: no engine, no settings.
"""

from __future__ import annotations

import collections
import contextlib
import hashlib
import json
import logging
import math
import os
import pathlib
import re
import tempfile
import threading
import uuid
from concurrent.futures import Future
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    Engine,
    String,
    func,
    insert,
    select,
)
from sqlalchemy.engine import Connection
from sqlalchemy.exc import DataError, IntegrityError, StatementError

from service.store.db import Database, RequestRecord, _as_utc, _utcnow

log = logging.getLogger(__name__)

MAX_QUERY_LIMIT = 1000
SPOOL_REJECTED = "rejected"
# Records per transaction of the writer thread: one commit for a burst of requests, but
# a bounded transaction (and a bounded loss to the spool when it fails).
WRITE_BATCH = 500

RECORD_KEYS: tuple[str, ...] = tuple(c.key for c in RequestRecord.__table__.columns)
_STR_LIMITS: dict[str, int] = {
    c.key: c.type.length
    for c in RequestRecord.__table__.columns
    if isinstance(c.type, String) and c.type.length
}
_INT_KEYS = (
    "model_version",
    "image_width",
    "image_height",
    "status_code",
    "roi_x",
    "roi_y",
    "roi_w",
    "roi_h",
)
_JSON_KEYS = ("probabilities", "timings")


def _parse_datetime(value: Any) -> datetime | None:
    if isinstance(value, datetime):
        return _as_utc(value)
    if isinstance(value, str):
        return _as_utc(datetime.fromisoformat(value))
    return None


def normalize_record(rec: dict[str, Any]) -> dict[str, Any]:
    """The auditable part of ``rec``: exactly :data:`RECORD_KEYS`, coerced to column types.

    Unknown keys are dropped (so e.g. DICOM tags can never be stored by accident); strings are
    cut to their column length; a value that cannot be coerced becomes None (and is logged);
    non-finite floats in the JSON maps become None (PostgreSQL's JSON rejects NaN).
    Never raises for a dict.
    """
    out: dict[str, Any] = {key: None for key in RECORD_KEYS}
    dropped = sorted(str(k) for k in rec if k not in out)
    if dropped:
        log.debug("audit record: dropping unknown keys %s", dropped)

    rid = rec.get("request_id")
    out["request_id"] = str(rid) if rid else uuid.uuid4().hex
    if not rid:
        log.warning("audit record without request_id; generated %s", out["request_id"])

    try:
        out["created_at"] = _parse_datetime(rec.get("created_at"))
    except (ValueError, TypeError, OverflowError):
        log.warning("audit record %s: unparsable created_at", out["request_id"])
    if out["created_at"] is None:
        out["created_at"] = _utcnow()

    for key in _INT_KEYS:
        value = rec.get(key)
        if value is None:
            continue
        try:
            out[key] = int(value)
        except (ValueError, TypeError, OverflowError):
            log.warning("audit record %s: %s=%r is not an int", out["request_id"], key, value)

    score = rec.get("ood_score")
    if score is not None:
        try:
            out["ood_score"] = float(score) if math.isfinite(float(score)) else None
        except (ValueError, TypeError, OverflowError):
            log.warning("audit record %s: ood_score=%r is not a float", out["request_id"], score)
    if rec.get("in_distribution") is not None:
        out["in_distribution"] = bool(rec["in_distribution"])

    for key in ("api_key_id", "route", "model_name", "input_sha256", "content_type", "label",
                "error_code", "roi_source"):  # fmt: skip
        value = rec.get(key)
        if value is not None:
            out[key] = str(value)

    for key in _JSON_KEYS:
        value = rec.get(key)
        if value is None:
            continue
        try:
            out[key] = {
                str(k): (float(v) if v is not None and math.isfinite(float(v)) else None)
                for k, v in dict(value).items()
            }
        except (ValueError, TypeError, OverflowError):
            log.warning("audit record %s: %s is not a map of floats", out["request_id"], key)

    if out["route"] is None:
        out["route"] = ""
    if out["status_code"] is None:
        out["status_code"] = 0
    for key, limit in _STR_LIMITS.items():
        if isinstance(out[key], str) and len(out[key]) > limit:
            out[key] = out[key][:limit]
    return out


def _record_to_json(rec: dict[str, Any]) -> str:
    return json.dumps({**rec, "created_at": rec["created_at"].isoformat()}, allow_nan=False)


def _record_from_json(data: str) -> dict[str, Any]:
    obj = json.loads(data)
    if not isinstance(obj, dict):
        raise ValueError("spooled record is not a JSON object")
    return normalize_record(obj)


def _row_to_dict(row: Any) -> dict[str, Any]:
    out = {key: row[key] for key in RECORD_KEYS}
    out["created_at"] = out["created_at"].isoformat()
    return out


def _is_record_problem(exc: BaseException) -> bool:
    """True when the failure is about this record, not about the database being down."""
    if isinstance(exc, IntegrityError | DataError):
        return True
    # Bind-parameter processing failed before reaching the database (e.g. unserialisable JSON).
    return isinstance(exc, StatementError) and not hasattr(exc, "connection_invalidated")


class AuditStore:
    """The request audit log, in the service's SQL database (SQLite or PostgreSQL)."""

    def __init__(self, database_url: str, spool_dir: pathlib.Path | str):
        self.db = Database(database_url)
        self.database_url = database_url
        self.spool_dir = pathlib.Path(spool_dir)
        self.engine: Engine = self.db.engine
        self._replay_lock = threading.Lock()
        self._replayer: threading.Thread | None = None
        self._stop = threading.Event()
        # Set by a failed write, cleared by a successful one or a complete spool replay. The
        # writer thread spools without trying the database while it is set.
        self._outage = False
        self._pending: collections.deque[tuple[dict[str, Any], Future[bool]]] = collections.deque()
        self._wake = threading.Condition()
        self._closing = False
        self._writer: threading.Thread | None = None
        self._last: Future[bool] | None = None

    def migrate(self) -> None:
        """``alembic upgrade head`` (see Database.migrate)."""
        self.db.migrate()

    def healthy(self) -> bool:
        """Whether ``SELECT 1`` succeeds."""
        return self.db.healthy()

    # ------------------------------------------------------------------ audit records

    def record(self, rec: dict[str, Any]) -> bool:
        """Store one audit record. Never raises.

        True when it is in the database (an id already there counts: it is not written twice);
        False when the database failed and the record went to the spool instead (or, if even
        the spool failed, was logged and lost).
        """
        try:
            clean = normalize_record(rec)
        except Exception:
            log.exception("audit record could not be normalised; dropped")
            return False
        try:
            with self.engine.begin() as conn:
                written = self._insert_ignore(conn, clean)
        except Exception as exc:
            if self._outage:
                log.debug("audit DB still failing (%s); spooling %s", exc, clean["request_id"])
            else:
                log.warning("audit DB write failed; spooling to %s", self.spool_dir, exc_info=True)
                self._outage = True
            self._spool(clean)
            return False
        if self._outage:
            log.info("audit DB writes succeed again")
            self._outage = False
        if not written:
            log.warning(
                "audit record %s was already stored; not written again", clean["request_id"]
            )
        return True

    @staticmethod
    def _insert_ignore(conn: Connection, rec: dict[str, Any]) -> int:
        """Insert ``rec`` unless its request_id is already there; 1 if written, else 0."""
        table = RequestRecord.__table__
        dialect = conn.dialect.name
        if dialect in ("sqlite", "postgresql"):
            if dialect == "sqlite":
                from sqlalchemy.dialects.sqlite import insert as dialect_insert
            else:
                from sqlalchemy.dialects.postgresql import insert as dialect_insert
            stmt = dialect_insert(table).on_conflict_do_nothing(index_elements=["request_id"])
            return conn.execute(stmt, rec).rowcount
        present = conn.scalar(
            select(func.count()).select_from(table).where(table.c.request_id == rec["request_id"])
        )
        if present:
            return 0
        conn.execute(insert(table), rec)
        return 1

    # ------------------------------------------------------------------ write-behind

    def submit(self, rec: dict[str, Any]) -> Future[bool]:
        """Queue one record for the writer thread. Never raises and never blocks.

        The future resolves as :meth:`record` would answer (True: in the database; False:
        spooled, or lost and logged) once the writer has dealt with it.
        """
        landed: Future[bool] = Future()
        try:
            clean = normalize_record(rec)
        except Exception:
            log.exception("audit record could not be normalised; dropped")
            landed.set_result(False)
            return landed
        with self._wake:
            if self._closing:  # after close(): nobody would write it
                landed.set_result(self.record(clean))
                return landed
            if self._writer is None:
                self._writer = threading.Thread(
                    target=self._write_behind, name="audit-writer", daemon=True
                )
                self._writer.start()
            self._pending.append((clean, landed))
            self._last = landed  # records are written in order: this one lands last
            self._wake.notify()
        return landed

    def _write_behind(self) -> None:
        while True:
            with self._wake:
                while not self._pending and not self._closing:
                    self._wake.wait()
                if not self._pending:
                    return  # closing, and everything is written
                batch = [
                    self._pending.popleft() for _ in range(min(WRITE_BATCH, len(self._pending)))
                ]
            try:
                self._write_batch(batch)
            except BaseException as exc:  # noqa: BLE001 - a waiting request must not hang
                log.exception("audit writer failed; spooling its batch")
                for clean, landed in batch:
                    if not landed.done():
                        self._spool(clean)
                        landed.set_result(False)
                if not isinstance(exc, Exception):
                    raise

    def _write_batch(self, batch: list[tuple[dict[str, Any], Future[bool]]]) -> None:
        """One transaction for the batch; the spool for all of it when the database fails."""
        if not self._outage:
            try:
                with self.engine.begin() as conn:
                    for clean, _ in batch:
                        self._insert_ignore(conn, clean)
            except Exception as exc:
                if _is_record_problem(exc):  # one bad record: write them one by one
                    for clean, landed in batch:
                        landed.set_result(self.record(clean))
                    return
                log.warning("audit DB write failed; spooling to %s until it is back",
                            self.spool_dir, exc_info=True)  # fmt: skip
                self._outage = True
            else:
                for _, landed in batch:
                    landed.set_result(True)
                return
        for clean, landed in batch:
            self._spool(clean)
            landed.set_result(False)

    def flush(self, timeout_s: float = 30.0) -> None:
        """Wait until every record submitted so far is in the database or the spool (so a
        query after a request sees its record)."""
        with self._wake:
            last = self._last
        if last is not None:
            with contextlib.suppress(TimeoutError):
                last.exception(timeout=timeout_s)

    # ------------------------------------------------------------------ spool

    def _spool_name(self, rec: dict[str, Any]) -> str:
        stamp = rec["created_at"].astimezone(UTC).strftime("%Y%m%dT%H%M%S%fZ")
        rid = rec["request_id"]
        if not re.fullmatch(r"[A-Za-z0-9_-]{1,64}", rid):
            rid = hashlib.sha256(rid.encode("utf-8")).hexdigest()[:32]
        return f"{stamp}-{rid}.json"

    def _spool(self, rec: dict[str, Any]) -> bool:
        """Write ``rec`` atomically to the spool (temp file in the same folder, then rename)."""
        tmp_name: str | None = None
        try:
            payload = _record_to_json(rec)
            self.spool_dir.mkdir(parents=True, exist_ok=True)
            fd, tmp_name = tempfile.mkstemp(dir=self.spool_dir, prefix=".", suffix=".tmp")
            with os.fdopen(fd, "w", encoding="utf-8") as fh:
                fh.write(payload)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp_name, self.spool_dir / self._spool_name(rec))
            tmp_name = None
            return True
        except Exception:
            log.exception("audit record %s could not be spooled; lost", rec.get("request_id"))
            return False
        finally:
            if tmp_name is not None:
                with contextlib.suppress(OSError):
                    os.unlink(tmp_name)

    def _spool_files(self) -> list[pathlib.Path]:
        try:
            entries = list(os.scandir(self.spool_dir))
        except FileNotFoundError:
            return []
        return sorted(
            pathlib.Path(e.path)
            for e in entries
            if e.name.endswith(".json") and not e.name.startswith(".") and e.is_file()
        )

    def spooled(self) -> int:
        """How many records wait in the spool."""
        return len(self._spool_files())

    def _reject(self, path: pathlib.Path, why: str) -> None:
        """Move a spooled record the database will never take aside, so it blocks nothing."""
        log.error("audit spool: %s cannot be stored (%s); moved to %s/", path.name, why,
                  SPOOL_REJECTED)  # fmt: skip
        rejected = self.spool_dir / SPOOL_REJECTED
        with contextlib.suppress(OSError):
            rejected.mkdir(exist_ok=True)
            os.replace(path, rejected / path.name)

    def replay_spool(self) -> int:
        """Write spooled records to the database, oldest first; returns how many were written.

        Each file is deleted once its record is committed (or found already present). Stops
        quietly at the first database error, leaving the rest spooled. A record the database
        rejects on its own merits (integrity or data error) is moved to ``rejected/``.
        """
        written = 0
        with self._replay_lock:
            for path in self._spool_files():
                try:
                    rec = _record_from_json(path.read_text(encoding="utf-8"))
                except FileNotFoundError:
                    continue  # replayed by another process meanwhile
                except Exception as exc:
                    self._reject(path, f"unreadable: {exc}")
                    continue
                try:
                    with self.engine.begin() as conn:
                        written += self._insert_ignore(conn, rec)
                except Exception as exc:
                    if _is_record_problem(exc):
                        self._reject(path, str(exc).splitlines()[0])
                        continue
                    log.info("audit spool replay stopped (%s); %d written", exc, written)
                    break
                path.unlink(missing_ok=True)
            else:  # every spooled record is back: the writer may use the database again
                if self._outage and (written or self.db.healthy()):
                    log.info("audit DB writes succeed again")
                    self._outage = False
        if written:
            log.info("audit spool: %d record(s) replayed", written)
        return written

    def start_replayer(self, interval_s: float = 5.0) -> None:
        """Start a daemon thread that replays the spool every ``interval_s`` while it is not
        empty (idempotent; stopped by :meth:`close`)."""
        if self._replayer is not None and self._replayer.is_alive():
            return
        self._stop.clear()

        def loop() -> None:
            while not self._stop.wait(interval_s):
                try:
                    if self._outage or self.spooled() > 0:
                        self.replay_spool()
                except Exception:
                    log.exception("audit spool replayer failed; retrying")

        self._replayer = threading.Thread(target=loop, name="audit-spool-replayer", daemon=True)
        self._replayer.start()

    def close(self) -> None:
        """Write (or spool) every submitted record, stop the writer and the replayer, and
        dispose of the engine's connections."""
        with self._wake:
            self._closing = True
            self._wake.notify()
        if self._writer is not None:
            self._writer.join(timeout=60)
        self._stop.set()
        if self._replayer is not None:
            self._replayer.join(timeout=30)
            self._replayer = None
        self.db.dispose()

    # ------------------------------------------------------------------ queries

    def query(
        self,
        start: datetime | None = None,
        end: datetime | None = None,
        model_version: int | None = None,
        label: str | None = None,
        limit: int = 50,
        offset: int = 0,
    ) -> tuple[list[dict[str, Any]], int]:
        """Records with ``start <= created_at < end`` (naive datetimes are UTC) and the given
        model version / label, newest first: ``(page, total matching)``. Records submitted
        before the call are included (it waits for the writer)."""
        self.flush()
        if not 0 <= limit <= MAX_QUERY_LIMIT:
            raise ValueError(f"limit must be between 0 and {MAX_QUERY_LIMIT}")
        if offset < 0:
            raise ValueError("offset must be >= 0")
        table = RequestRecord.__table__
        conditions = []
        if start is not None:
            conditions.append(table.c.created_at >= _as_utc(start))
        if end is not None:
            conditions.append(table.c.created_at < _as_utc(end))
        if model_version is not None:
            conditions.append(table.c.model_version == model_version)
        if label is not None:
            conditions.append(table.c.label == label)
        with self.engine.connect() as conn:
            total = conn.scalar(select(func.count()).select_from(table).where(*conditions)) or 0
            rows = conn.execute(
                select(table)
                .where(*conditions)
                .order_by(table.c.created_at.desc(), table.c.request_id.desc())
                .limit(limit)
                .offset(offset)
            ).mappings()
            page = [_row_to_dict(row) for row in rows]
        return page, int(total)
