"""The service's SQL database: engine, tables and migrations (SQLAlchemy 2, Alembic).

SQLite or PostgreSQL. Tables: ``requests`` (the audit trail, see service/store/audit.py),
``api_keys`` (see service/store/keys.py), ``outcomes`` (see service/store/outcomes.py), and the
PACS gateway's ledger ``pacs_instances`` and ``pacs_cursors`` (see service/hospital/ledger.py).
Nothing is created at import time: no engine, no settings.
"""

from __future__ import annotations

import contextlib
import logging
import pathlib
from collections.abc import Iterator
from datetime import UTC, date, datetime
from typing import Any

from sqlalchemy import (
    JSON,
    Boolean,
    Date,
    DateTime,
    Dialect,
    Engine,
    Float,
    Integer,
    String,
    UniqueConstraint,
    create_engine,
    event,
    text,
)
from sqlalchemy.engine import make_url
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column
from sqlalchemy.pool import StaticPool
from sqlalchemy.types import TypeDecorator

log = logging.getLogger(__name__)

MIGRATIONS_DIR = pathlib.Path(__file__).resolve().parent / "migrations"

# pg_advisory_xact_lock key serialising concurrent `migrate()` calls on one PostgreSQL database.
_PG_MIGRATE_LOCK = 0x7443_4144_6D69_67  # "tCADmig"
PG_CONNECT_TIMEOUT_S = 3
PG_STATEMENT_TIMEOUT_MS = 15_000
SQLITE_BUSY_TIMEOUT_S = 10
POOL_TIMEOUT_S = 5


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
    # The out-of-distribution verdict and the ROI classified (migration 0003).
    ood_score: Mapped[float | None] = mapped_column(Float)
    in_distribution: Mapped[bool | None] = mapped_column(Boolean)
    roi_x: Mapped[int | None] = mapped_column(Integer)
    roi_y: Mapped[int | None] = mapped_column(Integer)
    roi_w: Mapped[int | None] = mapped_column(Integer)
    roi_h: Mapped[int | None] = mapped_column(Integer)
    roi_source: Mapped[str | None] = mapped_column(String(16))


class Outcome(Base):
    """The reference result (cytology or histology) of an earlier request, one row per
    revision: corrections append, the latest revision counts. No free text, no names:
    `entered_by` is the API key id (or the import that wrote it)."""

    __tablename__ = "outcomes"
    __table_args__ = (UniqueConstraint("request_id", "revision"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    request_id: Mapped[str] = mapped_column(String(64), index=True)
    revision: Mapped[int] = mapped_column(Integer)
    kind: Mapped[str] = mapped_column(String(16))  # bethesda | histology
    pathology: Mapped[str] = mapped_column(String(16))  # I..VI | benign | malignant
    truth: Mapped[str] = mapped_column(String(16))  # benign | malignant | indeterminate
    outcome_date: Mapped[date] = mapped_column(Date)
    entered_by: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime())


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


class PacsInstance(Base):
    """What the PACS gateway did with one instance for one model version.

    The instance is known by the SHA-256 of its SOP Instance UID only: no patient data,
    no UID in clear. The SR's own UID is ours (generated), so it is kept as is.
    """

    __tablename__ = "pacs_instances"

    instance_hash: Mapped[str] = mapped_column(String(64), primary_key=True)
    model_name: Mapped[str] = mapped_column(String(200), primary_key=True)
    model_version: Mapped[int] = mapped_column(Integer, primary_key=True)
    status: Mapped[str] = mapped_column(String(16), index=True)  # scored, skipped, failed
    reason: Mapped[str | None] = mapped_column(String(200))
    sr_sop_instance_uid: Mapped[str | None] = mapped_column(String(64))
    label: Mapped[str | None] = mapped_column(String(100))
    probabilities: Mapped[dict[str, float] | None] = mapped_column(JSON)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime())


class PacsCursor(Base):
    """How far the gateway has read a PACS's change feed, per source and model version."""

    __tablename__ = "pacs_cursors"

    key: Mapped[str] = mapped_column(String(200), primary_key=True)
    position: Mapped[str] = mapped_column(String(64))
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime())


def _utcnow() -> datetime:
    return datetime.now(UTC)


def _as_utc(value: datetime) -> datetime:
    if value.tzinfo is None:
        return value.replace(tzinfo=UTC)
    return value.astimezone(UTC)


class Database:
    """One engine on one database URL, and the migrations that shape it."""

    def __init__(self, database_url: str):
        self.database_url = database_url
        self.engine: Engine = self._make_engine(database_url)

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

    def dispose(self) -> None:
        self.engine.dispose()
