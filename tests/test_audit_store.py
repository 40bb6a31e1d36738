"""service.store.audit.AuditStore and service.store.keys.KeyStore against real databases: a SQLite
file and a fresh PostgreSQL database.

Outages are real, not mocked: a SQLite path whose folder does not exist yet, a PostgreSQL
database that does not exist yet, and (PostgreSQL) a database renamed away under a live store.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from sqlalchemy import inspect, text

from service.store.audit import RECORD_KEYS, AuditStore
from service.store.keys import ApiKey, KeyStore

ROOT = Path(__file__).resolve().parents[1]
PG_HOST = os.environ.get("THYROID_CAD_TEST_PG_HOST", "127.0.0.1")
PG_PORT = int(os.environ.get("THYROID_CAD_TEST_PG_PORT", "5432"))
PG_ADMIN_DSN = f"dbname=test user=postgres host={PG_HOST} port={PG_PORT} connect_timeout=3"
T0 = datetime(2025, 3, 1, 12, 0, tzinfo=UTC)


# --------------------------------------------------------------------------- PostgreSQL


class PgAdmin:
    """Creates and drops this session's throwaway databases through the `test` database."""

    def __init__(self) -> None:
        import psycopg2

        self.conn = psycopg2.connect(PG_ADMIN_DSN)
        self.conn.autocommit = True
        self.created: set[str] = set()

    @staticmethod
    def new_name() -> str:
        return f"thyroid_cad_audit_{uuid.uuid4().hex[:8]}"

    @staticmethod
    def url(name: str) -> str:
        return f"postgresql+psycopg2://postgres@{PG_HOST}:{PG_PORT}/{name}"

    def execute(self, sql: str, params: tuple = ()) -> None:
        with self.conn.cursor() as cur:
            cur.execute(sql, params)

    def create(self, name: str) -> None:
        self.created.add(name)
        self.execute(f'CREATE DATABASE "{name}"')

    def terminate(self, name: str) -> None:
        self.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
            "WHERE datname = %s AND pid <> pg_backend_pid()",
            (name,),
        )

    def rename(self, old: str, new: str) -> None:
        self.terminate(old)
        self.created.add(new)
        self.execute(f'ALTER DATABASE "{old}" RENAME TO "{new}"')

    def drop(self, name: str) -> None:
        self.terminate(name)
        self.execute(f'DROP DATABASE IF EXISTS "{name}"')
        self.created.discard(name)

    def close(self) -> None:
        for name in sorted(self.created):
            self.drop(name)
        self.conn.close()


@pytest.fixture(scope="session")
def pg_admin() -> Iterator[PgAdmin]:
    try:
        admin = PgAdmin()
    except Exception as exc:  # psycopg2.OperationalError, or psycopg2 missing
        pytest.skip(f"PostgreSQL not reachable at {PG_HOST}:{PG_PORT} ({exc})".strip())
    try:
        yield admin
    finally:
        admin.close()


# --------------------------------------------------------------------------- fixtures

BACKENDS = ["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)]


@pytest.fixture(params=BACKENDS)
def backend(request) -> str:
    return request.param


@pytest.fixture
def new_url(backend, request, tmp_path) -> Callable[[], str]:
    """Factory of URLs of fresh, empty databases on this test's backend."""
    counter = iter(range(1000))

    def make() -> str:
        if backend == "sqlite":
            folder = tmp_path / f"db{next(counter)}"
            folder.mkdir()
            return f"sqlite:///{folder}/audit.db"
        admin: PgAdmin = request.getfixturevalue("pg_admin")
        name = admin.new_name()
        admin.create(name)
        request.addfinalizer(lambda: admin.drop(name))
        return admin.url(name)

    return make


@pytest.fixture
def db_url(new_url) -> str:
    return new_url()


@pytest.fixture
def make_store(tmp_path) -> Iterator[Callable[..., AuditStore]]:
    stores: list[AuditStore] = []

    def make(url: str, spool: Path | None = None, migrate: bool = True) -> AuditStore:
        store = AuditStore(url, spool or tmp_path / "spool")
        stores.append(store)
        if migrate:
            store.migrate()
        return store

    yield make
    for store in stores:
        store.close()


@pytest.fixture
def store(db_url, make_store) -> AuditStore:
    return make_store(db_url)


def rec(i: int = 0, **overrides) -> dict:
    base = {
        "request_id": uuid.uuid4().hex,
        "created_at": T0 + timedelta(minutes=i),
        "api_key_id": "0123456789ab",
        "route": "/v1/predict",
        "model_name": "thyroid-cad",
        "model_version": 1 + i % 3,
        "input_sha256": f"{i:064x}",
        "content_type": "image/png",
        "image_width": 224 + i,
        "image_height": 200,
        "label": "malignant" if i % 2 else "benign",
        "probabilities": {"benign": 0.25 + i / 1000, "malignant": 0.75 - i / 1000},
        "timings": {"decode_ms": 1.5, "infer_ms": 12.25 + i},
        "status_code": 200,
        "error_code": None,
    }
    base.update(overrides)
    return base


def expected(r: dict) -> dict:
    """What `query` returns for a record `rec` wrote."""
    return {**{k: r.get(k) for k in RECORD_KEYS}, "created_at": r["created_at"].isoformat()}


def all_ids(store: AuditStore) -> list[str]:
    with store.engine.connect() as conn:
        return list(conn.scalars(text("SELECT request_id FROM requests ORDER BY request_id")))


# --------------------------------------------------------------------------- schema


def test_migrate_creates_tables_indexes_and_is_idempotent(db_url, make_store):
    store = make_store(db_url, migrate=False)
    assert store.healthy()
    assert "requests" not in inspect(store.engine).get_table_names()
    store.migrate()

    insp = inspect(store.engine)
    assert {"requests", "api_keys", "alembic_version"} <= set(insp.get_table_names())
    assert {c["name"] for c in insp.get_columns("requests")} == set(RECORD_KEYS)
    assert insp.get_pk_constraint("requests")["constrained_columns"] == ["request_id"]
    indexed = {tuple(ix["column_names"]) for ix in insp.get_indexes("requests")}
    assert {("created_at",), ("model_version",), ("label",)} <= indexed
    key_columns = {c["name"] for c in insp.get_columns("api_keys")}
    assert {"id", "name", "scope", "hash", "created_at", "revoked_at"} <= key_columns

    r = rec()
    assert store.record(r)
    with store.engine.connect() as conn:
        version = conn.scalar(text("SELECT version_num FROM alembic_version"))
    store.migrate()  # again, same store: a no-op
    make_store(db_url).migrate()  # and from a second store
    with store.engine.connect() as conn:
        assert list(conn.scalars(text("SELECT version_num FROM alembic_version"))) == [version]
    assert all_ids(store) == [r["request_id"]]


def test_migration_matches_the_models(store):
    """The hand-written revision and the ORM models describe the same schema."""
    from alembic.autogenerate import compare_metadata
    from alembic.migration import MigrationContext

    from service.store.db import Base

    with store.engine.connect() as conn:
        diff = compare_metadata(MigrationContext.configure(conn), Base.metadata)
    assert diff == []


def test_concurrent_migrate_from_two_processes(db_url, tmp_path):
    script = (
        "import sys, time\n"
        "from service.store.audit import AuditStore\n"
        "s = AuditStore(sys.argv[1], sys.argv[2])\n"
        "time.sleep(max(0.0, float(sys.argv[3]) - time.time()))\n"
        "s.migrate()\n"
        "s.close()\n"
    )
    go = str(time.time() + 3.0)  # both processes start migrating at the same instant
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", script, db_url, str(tmp_path / f"spool{i}"), go],
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for i in range(2)
    ]
    outputs = [p.communicate(timeout=120)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs
    store = AuditStore(db_url, tmp_path / "spool")
    try:
        store.migrate()
        assert store.record(rec())
        assert store.query()[1] == 1
    finally:
        store.close()


# --------------------------------------------------------------------------- records


def test_record_query_round_trip_filters_and_pagination(store):
    records = [rec(i) for i in range(12)]
    for r in records:
        assert store.record(r) is True

    page, total = store.query()
    assert total == 12
    assert page == [expected(r) for r in reversed(records)]  # newest first, all columns
    got = page[0]
    assert datetime.fromisoformat(got["created_at"]) == records[-1]["created_at"]
    assert datetime.fromisoformat(got["created_at"]).utcoffset() == timedelta(0)
    assert isinstance(got["probabilities"], dict) and isinstance(got["timings"], dict)

    # Time range: start inclusive, end exclusive; aware or naive (= UTC).
    page, total = store.query(start=T0 + timedelta(minutes=3), end=T0 + timedelta(minutes=7))
    assert total == 4
    assert [p["request_id"] for p in page] == [r["request_id"] for r in records[6:2:-1]]
    naive = store.query(start=datetime(2025, 3, 1, 12, 3), end=datetime(2025, 3, 1, 12, 7))
    assert naive == (page, total)
    other_tz = datetime(2025, 3, 1, 13, 3, tzinfo=UTC).astimezone()  # local zone, same instant
    assert store.query(start=other_tz - timedelta(hours=1))[1] == 9

    page, total = store.query(model_version=2)
    assert total == 4 and {p["model_version"] for p in page} == {2}
    page, total = store.query(label="malignant", model_version=2)
    assert total == 2 and {p["label"] for p in page} == {"malignant"}
    assert store.query(label="no-such-label") == ([], 0)

    # Pagination: pages of 5 cover everything once, and the total is the full count.
    seen = []
    for offset in range(0, 15, 5):
        page, total = store.query(limit=5, offset=offset)
        assert total == 12
        seen += [p["request_id"] for p in page]
    assert seen == [r["request_id"] for r in reversed(records)]
    assert store.query(limit=0) == ([], 12)
    with pytest.raises(ValueError):
        store.query(limit=-1)
    with pytest.raises(ValueError):
        store.query(offset=-1)


def test_unknown_keys_never_reach_the_database(store, tmp_path):
    secret_name = "DOE^JANE"
    r = rec(1, dicom_patient_name=secret_name, PatientID="P-424242", pixels=[1, 2, 3])
    assert store.record(r)

    columns = {c["name"] for c in inspect(store.engine).get_columns("requests")}
    assert not {"dicom_patient_name", "PatientID", "pixels"} & columns
    with store.engine.connect() as conn:
        row = conn.execute(text("SELECT * FROM requests")).mappings().one()
    assert set(row.keys()) == set(RECORD_KEYS)
    assert secret_name not in repr(dict(row)) and "P-424242" not in repr(dict(row))
    page, _ = store.query()
    assert page == [expected(r)]

    # Nor the spool: a record spooled during an outage is already stripped.
    down = AuditStore(f"sqlite:///{tmp_path}/missing-dir/audit.db", tmp_path / "spool2")
    try:
        assert down.record(rec(2, dicom_patient_name=secret_name)) is False
        [spooled] = list((tmp_path / "spool2").glob("*.json"))
        assert secret_name not in spooled.read_text()
        assert "dicom_patient_name" not in json.loads(spooled.read_text())
    finally:
        down.close()


def test_record_coerces_and_never_raises(store):
    weird = rec(
        0,
        model_version="7",
        content_type="x" * 5000,  # client-controlled header: cut to the column length
        probabilities={"benign": float("nan"), "malignant": 1},
        timings="not a map",
        created_at="2025-03-01T13:00:00+01:00",
    )
    assert store.record(weird) is True
    [got], _ = store.query()
    assert got["model_version"] == 7
    assert len(got["content_type"]) == 100
    assert got["probabilities"] == {"benign": None, "malignant": 1.0}
    assert got["timings"] is None
    assert got["created_at"] == "2025-03-01T12:00:00+00:00"

    # No request_id / created_at: generated rather than lost; a repeated id is not an error.
    assert store.record({"route": "/v1/predict", "status_code": 500}) is True
    assert store.record(weird) is True
    assert store.query()[1] == 2


def test_records_survive_closing_and_reopening(db_url, make_store, tmp_path):
    first = make_store(db_url)
    records = [rec(i) for i in range(5)]
    assert all(first.record(r) for r in records)
    first.close()

    second = make_store(db_url)
    page, total = second.query()
    assert total == 5
    assert page == [expected(r) for r in reversed(records)]


def test_concurrent_record_from_threads(store):
    threads_n, per_thread = 8, 25
    results: list[bool] = []
    lock = threading.Lock()
    barrier = threading.Barrier(threads_n)

    def worker(t: int) -> None:
        barrier.wait()
        for j in range(per_thread):
            ok = store.record(rec(t * per_thread + j))
            with lock:
                results.append(ok)

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(threads_n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert len(results) == threads_n * per_thread and all(results)
    assert store.spooled() == 0
    assert store.query(limit=0)[1] == threads_n * per_thread
    assert len(set(all_ids(store))) == threads_n * per_thread


# --------------------------------------------------------------------------- outage and spool


@pytest.fixture
def unavailable_db(backend, request, tmp_path) -> tuple[str, Callable[[], None]]:
    """(URL of a database that cannot be reached yet, function that brings it into being)."""
    if backend == "sqlite":
        folder = tmp_path / "not-yet"
        return f"sqlite:///{folder}/audit.db", folder.mkdir
    admin: PgAdmin = request.getfixturevalue("pg_admin")
    name = admin.new_name()
    request.addfinalizer(lambda: admin.drop(name))
    return admin.url(name), lambda: admin.create(name)


def test_outage_spools_then_replay_loses_nothing_and_duplicates_nothing(
    unavailable_db, make_store, tmp_path
):
    url, bring_up = unavailable_db
    spool = tmp_path / "spool"
    store = make_store(url, spool=spool, migrate=False)
    assert not store.healthy()
    with pytest.raises(Exception):  # noqa: B017 - whatever the driver raises
        store.migrate()

    records = [rec(i) for i in range(6)]
    started = time.monotonic()
    assert [store.record(r) for r in records] == [False] * 6
    assert time.monotonic() - started < 30  # fails fast, no long connect timeouts
    assert store.spooled() == 6
    names = sorted(p.name for p in spool.iterdir())
    assert all(n.endswith(".json") and not n.startswith(".") for n in names)  # no temp leftovers
    assert names == [
        f"{r['created_at'].strftime('%Y%m%dT%H%M%S%fZ')}-{r['request_id']}.json" for r in records
    ]
    assert store.replay_spool() == 0  # still down: no exception, nothing lost
    assert store.spooled() == 6

    bring_up()
    store.migrate()
    assert store.healthy()
    # One record reaches the database directly as well as through the spool.
    assert store.record(records[2]) is True

    assert store.replay_spool() == 5
    assert store.spooled() == 0
    assert store.replay_spool() == 0  # twice: still no duplicates
    page, total = store.query()
    assert total == 6
    assert page == [expected(r) for r in reversed(records)]
    assert sorted(all_ids(store)) == sorted(r["request_id"] for r in records)


def test_replay_is_idempotent_when_a_spooled_file_reappears(store, tmp_path):
    """A crash between commit and unlink leaves a file whose record is already stored."""
    spool = tmp_path / "spool"
    r = rec(3)
    down = AuditStore(f"sqlite:///{tmp_path}/missing/audit.db", spool)
    try:
        assert down.record(r) is False
    finally:
        down.close()
    [path] = list(spool.glob("*.json"))
    copy = path.read_bytes()

    assert store.replay_spool() == 1
    path.write_bytes(copy)  # the file "survived" the commit
    assert store.spooled() == 1
    assert store.replay_spool() == 0
    assert store.spooled() == 0
    assert all_ids(store) == [r["request_id"]]


def test_spool_ignores_temp_files_and_sets_aside_poison(store, tmp_path):
    spool = tmp_path / "spool"
    spool.mkdir()
    (spool / ".abc123.tmp").write_text('{"request_id": "half a rec')  # a crash mid-write
    (spool / "00000000T000000000000Z-garbage.json").write_text("not json")
    assert store.spooled() == 1
    assert store.replay_spool() == 0
    assert store.spooled() == 0
    assert (spool / "rejected" / "00000000T000000000000Z-garbage.json").exists()


@pytest.mark.postgres
def test_postgres_outage_under_a_live_store(pg_admin, make_store, tmp_path):
    """The database disappears while the store has pooled connections, then comes back."""
    name = pg_admin.new_name()
    pg_admin.create(name)
    store = make_store(pg_admin.url(name))
    before = [rec(i) for i in range(3)]
    assert all(store.record(r) for r in before)

    away = f"{name}_away"
    pg_admin.rename(name, away)
    try:
        during = [rec(10 + i) for i in range(4)]
        assert [store.record(r) for r in during] == [False] * 4
        assert not store.healthy()
        assert store.spooled() == 4
        assert store.replay_spool() == 0
    finally:
        pg_admin.rename(away, name)
    pg_admin.created.discard(away)

    assert store.replay_spool() == 4
    assert store.spooled() == 0
    assert store.query()[1] == 7


def test_replayer_thread_drains_the_spool_once_the_db_is_back(unavailable_db, make_store):
    url, bring_up = unavailable_db
    store = make_store(url, migrate=False)
    records = [rec(i) for i in range(3)]
    assert not any(store.record(r) for r in records)
    store.start_replayer(interval_s=0.1)
    store.start_replayer(interval_s=0.1)  # idempotent
    time.sleep(0.3)
    assert store.spooled() == 3  # still down: the thread keeps them

    bring_up()
    store.migrate()
    deadline = time.monotonic() + 30
    while store.spooled() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert store.spooled() == 0
    assert store.query()[1] == 3
    store.close()
    assert store._replayer is None


# --------------------------------------------------------------------------- API keys


def test_api_keys_create_verify_revoke(store):
    keys = KeyStore(store.db)
    key_id, token = keys.create_key("predict", name="scanner-1")
    admin_id, admin_token = keys.create_key("admin")
    assert token.startswith(f"tcad_{key_id}_") and len(key_id) == 12
    assert keys.verify_key(token) == ApiKey(id=key_id, name="scanner-1", scope="predict")
    assert keys.verify_key(admin_token) == ApiKey(id=admin_id, name=None, scope="admin")
    assert keys.verify_key(token) is not None  # repeatable

    with pytest.raises(ValueError):
        keys.create_key("root")

    listed = {k["id"]: k for k in keys.list_keys()}
    assert set(listed) == {key_id, admin_id}
    assert listed[key_id]["scope"] == "predict" and listed[key_id]["name"] == "scanner-1"
    assert listed[key_id]["revoked_at"] is None and listed[key_id]["last_used_at"] is not None
    assert datetime.fromisoformat(listed[key_id]["created_at"]).tzinfo is not None
    assert all("hash" not in k for k in listed.values())

    assert keys.revoke_key(key_id) is True
    assert keys.verify_key(token) is None
    assert keys.verify_key(admin_token) is not None
    assert keys.revoke_key(key_id) is False  # already revoked
    assert keys.revoke_key("ffffffffffff") is False
    assert keys.revoke_key("not-an-id") is False
    assert {k["id"]: k for k in keys.list_keys()}[key_id]["revoked_at"] is not None


def test_api_keys_reject_wrong_and_malformed_tokens(store):
    keys = KeyStore(store.db)
    key_id, token = keys.create_key("predict")
    secret = token.split("_", 2)[2]
    other_id, _ = keys.create_key("predict")
    bad = [
        f"tcad_{key_id}_{'A' * len(secret)}",  # wrong secret
        token[:-1] + ("A" if token[-1] != "A" else "B"),  # one character off
        f"tcad_{other_id}_{secret}",  # right secret, wrong key
        f"tcad_ffffffffffff_{secret}",  # unknown id
        token + "x",
        token[:-5],
        token.upper(),
        " " + token,
        token + "\n",
        f"tcad_{key_id}",
        f"{key_id}_{secret}",
        f"Bearer {token}",
        "tcad__",
        "",
        "tcad_' OR 1=1 --_" + secret,
        None,
        42,
        token.encode(),
    ]
    for candidate in bad:
        assert keys.verify_key(candidate) is None, candidate  # type: ignore[arg-type]
    assert keys.verify_key(token) is not None


def test_api_key_secrets_are_not_stored_in_plaintext(store):
    keys = KeyStore(store.db)
    tokens = [keys.create_key("predict", name=f"k{i}")[1] for i in range(3)]
    with store.engine.connect() as conn:
        rows = conn.execute(text("SELECT * FROM api_keys")).all()
    dump = repr(rows)
    for token in tokens:
        secret = token.split("_", 2)[2]
        assert token not in dump and secret not in dump
        assert secret[:16] not in dump
    # The stored hash is the SHA-256 of the secret.
    key_id, secret = tokens[0].split("_", 2)[1:]
    with store.engine.connect() as conn:
        stored = conn.scalar(text("SELECT hash FROM api_keys WHERE id = :id"), {"id": key_id})
    assert stored == hashlib.sha256(secret.encode()).hexdigest()


def test_import_creates_no_engine_and_no_tensorflow():
    code = (
        "import sys, service.store.db, service.store.audit, service.store.keys\n"
        "bad = [m for m in sys.modules if m.split('.')[0] in ('tensorflow', 'keras', 'training')]\n"
        "assert not bad, bad\n"
        "import gc, sqlalchemy\n"
        "assert not [o for o in gc.get_objects() if isinstance(o, sqlalchemy.engine.Engine)]\n"
    )
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True, timeout=60)


def test_sqlite_uses_wal(tmp_path, make_store):
    store = make_store(f"sqlite:///{tmp_path}/wal.db")
    with store.engine.connect() as conn:
        assert conn.scalar(text("PRAGMA journal_mode")) == "wal"
