"""Service life: hot swap under load, registry down at start, audit DB outages, PostgreSQL."""

import io
import threading
import time
import uuid

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from registry import store
from service.api.app import create_app
from training import phantom


def _png(seed=0) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(phantom.make_image("malignant", np.random.default_rng(seed), 128)).save(
        buf, "PNG"
    )
    return buf.getvalue()


def _predict(client, key, data=None):
    return client.post(
        "/v1/predict?heatmap=none",
        files={"file": ("x.png", data or _png(), "image/png")},
        headers={"Authorization": f"Bearer {key}"},
    )


def _wait(condition, timeout=30.0):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if condition():
            return True
        time.sleep(0.1)
    return False


def test_hot_swap_under_load_loses_no_request(served):
    with TestClient(create_app(served.settings)) as client:
        assert _predict(client, served.predict_key).json()["model"]["version"] == served.version
        seen, failures, stop = [], [], threading.Event()

        def hammer():
            data = _png(1)
            while not stop.is_set():
                r = _predict(client, served.predict_key, data)
                (seen if r.status_code == 200 else failures).append(
                    r.json()["model"]["version"] if r.status_code == 200 else r.text
                )

        threads = [threading.Thread(target=hammer) for _ in range(3)]
        for t in threads:
            t.start()
        new = store.register(served.export, served.name)
        store.promote(new, "champion", served.name, reason="hot swap test")
        swapped = _wait(lambda: seen and seen[-1] == new)
        time.sleep(0.3)
        stop.set()
        for t in threads:
            t.join(timeout=30)
        assert swapped, f"champion v{new} never served; saw {sorted(set(seen))}"
        assert failures == []
        assert set(seen) == {served.version, new}
        first_new = seen.index(new)
        assert all(v == new for v in seen[first_new + 10 :])  # no flapping back
        assert "thyroid_cad_model_swaps_total 1.0" in client.get("/metrics").text


def test_a_version_failing_its_check_is_refused_and_the_old_one_serves(served, tmp_path):
    import json
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(served.export, broken)
    # The card promises three classes; the graph gives two: the warm-up check must catch it.
    card = json.loads((broken / "model_card.json").read_text())
    card["class_names"] = ["normal", "benign", "malignant"]
    (broken / "model_card.json").write_text(json.dumps(card))
    with TestClient(create_app(served.settings)) as client:
        bad = store.register(broken, served.name)
        store.promote(bad, "champion", served.name, force=True, reason="refusal test")
        assert _wait(lambda: 'result="refused"' in client.get("/metrics").text, timeout=20)
        r = _predict(client, served.predict_key)
        assert r.status_code == 200 and r.json()["model"]["version"] == served.version
        models = client.get("/v1/models", headers={"Authorization": f"Bearer {served.predict_key}"})
        assert "malformed" in models.json()["errors"]["champion"]


def test_registry_down_at_start_serves_the_cached_champion(served, monkeypatch):
    with TestClient(create_app(served.settings)) as client:  # resolves once: fills the cache
        assert client.get("/readyz").status_code == 200
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:9")  # nothing listens there
    monkeypatch.setenv("MLFLOW_REGISTRY_URI", "http://127.0.0.1:9")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    with TestClient(create_app(served.settings)) as client:
        ready = client.get("/readyz")
        assert ready.status_code == 200, ready.text
        body = ready.json()
        assert body["serving_from_cache"] is True and body["registry_reachable"] is False
        r = _predict(client, served.predict_key)
        assert r.status_code == 200 and r.json()["model"]["version"] == served.version
        metrics = client.get("/metrics").text
        assert "thyroid_cad_model_from_cache 1.0" in metrics
        assert "thyroid_cad_registry_reachable 0.0" in metrics


def test_registry_down_and_nothing_cached_stays_up_but_not_ready(served, monkeypatch, tmp_path):
    monkeypatch.setenv("THYROID_CAD_HOME", str(tmp_path / "empty-home"))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:9")
    monkeypatch.setenv("MLFLOW_REGISTRY_URI", "http://127.0.0.1:9")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    with TestClient(create_app(served.settings)) as client:
        assert client.get("/healthz").status_code == 200
        ready = client.get("/readyz")
        assert ready.status_code == 503 and ready.json()["ready"] is False
        r = _predict(client, served.predict_key)
        assert r.status_code == 503 and r.json()["error"]["code"] == "model_not_ready"
        assert client.get("/v2/health/ready").status_code == 503


def test_audit_database_outage_spools_and_replays_every_record(served, tmp_path):
    db_dir = tmp_path / "not-yet"  # SQLite cannot create a file in a missing folder
    settings = served.settings.model_copy(
        update={
            "database_url": f"sqlite:///{db_dir / 'requests.db'}",
            "spool_dir": tmp_path / "spool",
            "require_api_key": False,
        }
    )
    with TestClient(create_app(settings)) as client:
        ids = [_predict(client, None).json()["request_id"] for _ in range(5)]
        assert client.get("/readyz").json()["audit_spooled"] == 5
        db_dir.mkdir()  # the database comes back
        assert _wait(lambda: client.get("/readyz").json()["audit_spooled"] == 0, timeout=40)
        rows = client.get("/v1/requests?limit=100").json()
        assert {r["request_id"] for r in rows["requests"]} >= set(ids)
        assert rows["total"] == 5


def test_records_survive_a_graceful_shutdown(served):
    with TestClient(create_app(served.settings)) as client:
        rid = _predict(client, served.predict_key).json()["request_id"]
    with TestClient(create_app(served.settings)) as client:
        rows = client.get("/v1/requests", headers={"Authorization": f"Bearer {served.admin_key}"})
        assert rid in {r["request_id"] for r in rows.json()["requests"]}


@pytest.fixture
def pg_database():
    psycopg2 = pytest.importorskip("psycopg2")
    try:
        admin = psycopg2.connect(
            dbname="test", user="postgres", host="127.0.0.1", connect_timeout=3
        )
    except psycopg2.OperationalError as e:
        pytest.skip(f"PostgreSQL not reachable at 127.0.0.1:5432: {e}")
    admin.autocommit = True
    name = f"thyroid_cad_service_{uuid.uuid4().hex[:8]}"
    with admin.cursor() as cur:
        cur.execute(f'CREATE DATABASE "{name}"')
    yield name
    with admin.cursor() as cur:
        cur.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s", (name,)
        )
        cur.execute(f'DROP DATABASE IF EXISTS "{name}"')
    admin.close()


@pytest.mark.postgres
def test_audit_records_land_in_postgresql(served, pg_database):
    import psycopg2

    url = f"postgresql://postgres@127.0.0.1:5432/{pg_database}"
    settings = served.settings.model_copy(update={"database_url": url, "require_api_key": False})
    with TestClient(create_app(settings)) as client:
        body = _predict(client, None).json()
    conn = psycopg2.connect(dbname=pg_database, user="postgres", host="127.0.0.1")
    with conn.cursor() as cur:
        cur.execute(
            "SELECT model_version, label, status_code FROM requests WHERE request_id = %s",
            (body["request_id"],),
        )
        assert cur.fetchone() == (served.version, body["prediction"]["label"], 200)
    conn.close()
