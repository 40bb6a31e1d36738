"""The request audit store and API keys (SQLAlchemy 2 ORM, Alembic migrations).

One row per inference request in ``requests``: who asked (API key id), which model answered,
a digest of the input, the outcome and timings. Never pixels and never free-text patient data:
:meth:`AuditStore.record` keeps only the columns below and drops every other key.

Auditing must not take the service down with the database: ``record`` never raises. When the
database is unreachable the record goes to a spool folder (one JSON file per record, written
atomically) and :meth:`AuditStore.replay_spool` (or the replayer thread) writes it later.
``request_id`` is the primary key, so replaying is idempotent.

API keys are ``tcad_<id>_<secret>`` tokens; only the SHA-256 of the secret is stored.

Nothing is created at import time: no engine, no settings.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import hmac
import json
import logging
import math
import os
import pathlib
import re
import secrets
import tempfile
import threading
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import (
    JSON,
    DateTime,
    Dialect,
    Engine,
    Integer,
    String,
    create_engine,
    event,
    func,
    insert,
    select,
    text,
    update,
)
from sqlalchemy.engine import Connection, make_url
from sqlalchemy.exc import DataError, IntegrityError, SQLAlchemyError, StatementError
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column
from sqlalchemy.pool import StaticPool
from sqlalchemy.types import TypeDecorator

log = logging.getLogger(__name__)

MIGRATIONS_DIR = pathlib.Path(__file__).resolve().parent / "migrations"

SCOPES = frozenset({"predict", "admin"})
TOKEN_PREFIX = "tcad_"
_TOKEN_RE = re.compile(r"tcad_([0-9a-f]{12})_([A-Za-z0-9_-]{32,128})")
_KEY_ID_RE = re.compile(r"[0-9a-f]{12}")
# verify_key of an unknown id still compares against something, so timing says little.
_DUMMY_HASH = hashlib.sha256(b"thyroid-cad: no such key").hexdigest()
# last_used_at is written at most this often per key (a write per request would be a hot spot).
LAST_USED_RESOLUTION = timedelta(seconds=60)

# pg_advisory_xact_lock key serialising concurrent `migrate()` calls on one PostgreSQL database.
_PG_MIGRATE_LOCK = 0x7443_4144_6D69_67  # "tCADmig"
PG_CONNECT_TIMEOUT_S = 3
PG_STATEMENT_TIMEOUT_MS = 15_000
SQLITE_BUSY_TIMEOUT_S = 10
POOL_TIMEOUT_S = 5

MAX_QUERY_LIMIT = 1000
SPOOL_REJECTED = "rejected"


# --------------------------------------------------------------------------- schema


class UTCDateTime(TypeDecorator[datetime]):
    """A timezone-aware UTC datetime on every backend.

    PostgreSQL stores ``timestamptz``; SQLite has no time zones, so the value is stored as
    naive UTC (its string form then sorts and compares chronologically) and read back aware.
    Naive datetimes given to it are taken to be UTC.
    """

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        value = _as_utc(value)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        return _as_utc(value)


class Base(DeclarativeBase):
    pass


class RequestRecord(Base):
    """One audited inference request (no pixels, no patient data)."""

    __tablename__ = "requests"

    request_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), index=True)
    api_key_id: Mapped[str | None] = mapped_column(String(32))
    route: Mapped[str] = mapped_column(String(200))
    model_name: Mapped[str | None] = mapped_column(String(200))
    model_version: Mapped[int | None] = mapped_column(Integer, index=True)
    input_sha256: Mapped[str | None] = mapped_column(String(64))
    content_type: Mapped[str | None] = mapped_column(String(100))
    image_width: Mapped[int | None] = mapped_column(Integer)
    image_height: Mapped[int | None] = mapped_column(Integer)
    label: Mapped[str | None] = mapped_column(String(100), index=True)
    probabilities: Mapped[dict[str, float] | None] = mapped_column(JSON)
    timings: Mapped[dict[str, float] | None] = mapped_column(JSON)
    status_code: Mapped[int] = mapped_column(Integer)
    error_code: Mapped[str | None] = mapped_column(String(100))


class ApiKeyRow(Base):
    """An API key: only the SHA-256 of its secret is stored."""

    __tablename__ = "api_keys"

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    name: Mapped[str | None] = mapped_column(String(200))
    scope: Mapped[str] = mapped_column(String(16))
    hash: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime())
    revoked_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    last_used_at: Mapped[datetime | None] = mapped_column(UTCDateTime())


RECORD_KEYS: tuple[str, ...] = tuple(c.key for c in RequestRecord.__table__.columns)
_STR_LIMITS: dict[str, int] = {
    c.key: c.type.length
    for c in RequestRecord.__table__.columns
    if isinstance(c.type, String) and c.type.length
}
_INT_KEYS = ("model_version", "image_width", "image_height", "status_code")
_JSON_KEYS = ("probabilities", "timings")


@dataclasses.dataclass(frozen=True, slots=True)
class ApiKey:
    """A verified API key."""

    id: str
    name: str | None
    scope: str


# --------------------------------------------------------------------------- helpers


def _utcnow() -> datetime:
    return datetime.now(UTC)


def _as_utc(value: datetime) -> datetime:
    if value.tzinfo is None:
        return value.replace(tzinfo=UTC)
    return value.astimezone(UTC)


def _parse_datetime(value: Any) -> datetime | None:
    if isinstance(value, datetime):
        return _as_utc(value)
    if isinstance(value, str):
        return _as_utc(datetime.fromisoformat(value))
    return None


def _sha256_hex(secret: str) -> str:
    return hashlib.sha256(secret.encode("utf-8")).hexdigest()


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

    for key in ("api_key_id", "route", "model_name", "input_sha256", "content_type", "label",
                "error_code"):  # fmt: skip
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


# --------------------------------------------------------------------------- the store


class AuditStore:
    """The request audit log and API keys, in one SQL database (SQLite or PostgreSQL)."""

    def __init__(self, database_url: str, spool_dir: pathlib.Path | str):
        self.database_url = database_url
        self.spool_dir = pathlib.Path(spool_dir)
        self.engine: Engine = self._make_engine(database_url)
        self._replay_lock = threading.Lock()
        self._replayer: threading.Thread | None = None
        self._stop = threading.Event()
        self._outage = False  # logs the first failure of an outage loudly, the rest quietly

    @staticmethod
    def _make_engine(database_url: str) -> Engine:
        url = make_url(database_url)
        backend = url.get_backend_name()
        kwargs: dict[str, Any] = {"pool_pre_ping": True}
        if backend == "sqlite":
            kwargs["connect_args"] = {
                "check_same_thread": False,
                "timeout": SQLITE_BUSY_TIMEOUT_S,
            }
            if url.database in (None, "", ":memory:"):
                kwargs["poolclass"] = StaticPool
            engine = create_engine(url, **kwargs)

            @event.listens_for(engine, "connect")
            def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
                cursor = dbapi_connection.cursor()
                try:
                    cursor.execute("PRAGMA journal_mode=WAL")
                    cursor.execute("PRAGMA synchronous=NORMAL")
                finally:
                    cursor.close()

            return engine
        kwargs["pool_timeout"] = POOL_TIMEOUT_S
        if backend == "postgresql" and url.get_driver_name() in ("psycopg2", "psycopg"):
            kwargs["connect_args"] = {
                "connect_timeout": PG_CONNECT_TIMEOUT_S,
                "application_name": "thyroid-cad-audit",
                # A hung server must not hold request threads for ever.
                "options": f"-c statement_timeout={PG_STATEMENT_TIMEOUT_MS}",
            }
        return create_engine(url, **kwargs)

    # ------------------------------------------------------------------ schema

    def migrate(self) -> None:
        """``alembic upgrade head`` on this store's database (a no-op when already there).

        Concurrent calls are serialised: on PostgreSQL by a transaction-scoped advisory lock
        taken in the migration's own transaction, on SQLite by a file lock next to the database.
        """
        from alembic import command
        from alembic.config import Config

        cfg = Config()
        cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
        url = self.engine.url.render_as_string(hide_password=False)
        cfg.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
        with self._migration_file_lock(), self.engine.begin() as conn:
            if conn.dialect.name == "postgresql":
                conn.execute(text("SET LOCAL statement_timeout = 0"))
                conn.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": _PG_MIGRATE_LOCK})
            cfg.attributes["connection"] = conn
            command.upgrade(cfg, "head")

    @contextlib.contextmanager
    def _migration_file_lock(self) -> Iterator[None]:
        url = self.engine.url
        if url.get_backend_name() != "sqlite" or url.database in (None, "", ":memory:"):
            yield
            return
        import fcntl

        lock_path = pathlib.Path(f"{url.database}.migrate.lock")
        with open(lock_path, "a+b") as fh:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(fh.fileno(), fcntl.LOCK_UN)

    def healthy(self) -> bool:
        """Whether ``SELECT 1`` succeeds."""
        try:
            with self.engine.connect() as conn:
                conn.execute(text("SELECT 1"))
            return True
        except Exception:
            return False

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
                    if self.spooled() > 0:
                        self.replay_spool()
                except Exception:
                    log.exception("audit spool replayer failed; retrying")

        self._replayer = threading.Thread(target=loop, name="audit-spool-replayer", daemon=True)
        self._replayer.start()

    def close(self) -> None:
        """Stop the replayer and dispose of the engine's connections."""
        self._stop.set()
        if self._replayer is not None:
            self._replayer.join(timeout=30)
            self._replayer = None
        self.engine.dispose()

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
        model version / label, newest first: ``(page, total matching)``."""
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

    # ------------------------------------------------------------------ API keys

    def create_key(self, scope: str, name: str | None = None) -> tuple[str, str]:
        """A new key: ``(key_id, token)``. The token is shown once; only its hash is kept."""
        if scope not in SCOPES:
            raise ValueError(f"scope must be one of {sorted(SCOPES)}, not {scope!r}")
        if name is not None and len(name) > 200:
            raise ValueError("key name longer than 200 characters")
        table = ApiKeyRow.__table__
        for _ in range(5):
            key_id = secrets.token_hex(6)
            secret = secrets.token_urlsafe(32)
            try:
                with self.engine.begin() as conn:
                    conn.execute(
                        insert(table),
                        {
                            "id": key_id,
                            "name": name,
                            "scope": scope,
                            "hash": _sha256_hex(secret),
                            "created_at": _utcnow(),
                        },
                    )
            except IntegrityError:
                continue  # id collision: astronomically rare, try another
            return key_id, f"{TOKEN_PREFIX}{key_id}_{secret}"
        raise RuntimeError("could not allocate an API key id")

    def verify_key(self, token: str) -> ApiKey | None:
        """The key a token belongs to; None for unknown, malformed or revoked tokens.

        Database errors propagate (an outage is not an authentication failure).
        """
        if not isinstance(token, str):
            return None
        match = _TOKEN_RE.fullmatch(token)
        if match is None:
            return None
        key_id, secret = match.groups()
        table = ApiKeyRow.__table__
        with self.engine.connect() as conn:
            row = conn.execute(select(table).where(table.c.id == key_id)).mappings().first()
        stored = row["hash"] if row is not None else _DUMMY_HASH
        ok = hmac.compare_digest(_sha256_hex(secret).encode(), stored.encode())
        if row is None or not ok or row["revoked_at"] is not None:
            return None
        now = _utcnow()
        last_used = row["last_used_at"]
        if last_used is None or now - last_used >= LAST_USED_RESOLUTION:
            try:
                with self.engine.begin() as conn:
                    conn.execute(update(table).where(table.c.id == key_id).values(last_used_at=now))
            except SQLAlchemyError:
                log.warning("could not update last_used_at of key %s", key_id, exc_info=True)
        return ApiKey(id=row["id"], name=row["name"], scope=row["scope"])

    def revoke_key(self, key_id: str) -> bool:
        """Revoke a key; True if an active key with this id was revoked now."""
        if not isinstance(key_id, str) or not _KEY_ID_RE.fullmatch(key_id):
            return False
        table = ApiKeyRow.__table__
        with self.engine.begin() as conn:
            result = conn.execute(
                update(table)
                .where(table.c.id == key_id, table.c.revoked_at.is_(None))
                .values(revoked_at=_utcnow())
            )
        return result.rowcount > 0

    def list_keys(self) -> list[dict[str, Any]]:
        """All keys, oldest first: id, name, scope, created_at, revoked_at, last_used_at
        (ISO 8601 strings or None). Never the hashes."""
        table = ApiKeyRow.__table__
        columns = [c for c in table.c if c.key != "hash"]
        with self.engine.connect() as conn:
            rows = conn.execute(
                select(*columns).order_by(table.c.created_at, table.c.id)
            ).mappings()
            return [
                {
                    key: (value.isoformat() if isinstance(value, datetime) else value)
                    for key, value in row.items()
                }
                for row in rows
            ]
