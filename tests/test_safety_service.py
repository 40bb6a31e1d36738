"""The safety net over HTTP: the ood block, the refuse policy, outcomes, live performance
(FastAPI TestClient, real onnxruntime, real SQLite, real MLflow sqlite store)."""

from __future__ import annotations

import base64
import io
import json
import shutil
import sqlite3
import uuid
from datetime import UTC, date, datetime, timedelta

import numpy as np
import pytest
import shifts
from conftest import make_served
from fastapi.testclient import TestClient
from PIL import Image
from typer.testing import CliRunner

from service.api.app import create_app
from thyroid_cad import metrics, modality
from training import phantom


def _png(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, "PNG")
    return buf.getvalue()


def _phantom_png(seed=0, label="malignant") -> bytes:
    return _png(phantom.make_image(label, np.random.default_rng(seed)))


def _auth(key):
    return {"Authorization": f"Bearer {key}"}


def _feedback_key(served) -> str:
    from service.store.audit import AuditStore
    from service.store.keys import KeyStore

    audit = AuditStore(served.settings.audit_url(), served.settings.audit_spool())
    try:
        return KeyStore(audit.db).create_key("feedback", "pathology-lab")[1]
    finally:
        audit.close()


def _rows(served, where="1=1"):
    with sqlite3.connect(served.db_path) as db:
        db.row_factory = sqlite3.Row
        return [dict(r) for r in db.execute(f"SELECT * FROM requests WHERE {where}")]


def _predict(client, served, data: bytes):
    return client.post(
        "/v1/predict",
        files={"file": ("x.png", data, "image/png")},
        headers=_auth(served.predict_key),
        params={"heatmap": "none"},
    )


@pytest.fixture
def client(served):
    with TestClient(create_app(served.settings)) as c:
        yield c


# --------------------------------------------------------------------------- modality


def test_modality_check_passes_ultrasound_and_catches_photos_documents_blank():
    rng = np.random.default_rng(0)
    assert all(modality.check(phantom.make_image("benign", rng)).ultrasound_like for _ in range(5))
    photo = modality.check(shifts.colour_photo(rng))
    assert not photo.ultrasound_like and "coloured" in photo.reason
    doc = modality.check(shifts.document(rng))
    assert not doc.ultrasound_like and "white" in doc.reason
    assert "flat" in modality.check(shifts.flat(rng)).reason
    assert "black" in modality.check(np.zeros((50, 60, 3), np.uint8)).reason


def _measures_by_definition(frame: np.ndarray) -> tuple[float, float, float]:
    """colour, bright and grey std as modality's docstring defines them, pixel by pixel
    (what the vectorised check must reproduce)."""
    px = frame.reshape(-1, frame.shape[2] if frame.ndim == 3 else 1).astype(float)
    grey = px.mean(axis=1)
    content = grey > modality.BACKGROUND_LEVEL
    px, grey = px[content], grey[content]
    spread = px.max(axis=1) - px.min(axis=1)
    colour = float(np.mean(spread > modality.COLOUR_SPREAD))
    return colour, float(np.mean(grey > modality.BRIGHT_LEVEL)), float(grey.std())


@pytest.mark.parametrize("kind", ["ultrasound", "photo", "document", "grey 2-d", "noise"])
def test_modality_measures_follow_their_definition(kind):
    rng = np.random.default_rng(1)
    frame = {
        "ultrasound": lambda: phantom.make_image("malignant", rng),
        "photo": lambda: shifts.colour_photo(rng),
        "document": lambda: shifts.document(rng),
        "grey 2-d": lambda: phantom.make_image("benign", rng)[:, :, 0],
        "noise": lambda: rng.integers(0, 256, (300, 400, 3), dtype=np.uint8),
    }[kind]()
    assert frame.shape[0] * frame.shape[1] <= modality._MAX_PIXELS  # no subsampling here
    verdict = modality.check(frame)
    colour, bright, std = _measures_by_definition(frame)
    assert verdict.colour_fraction == colour and verdict.bright_fraction == bright
    assert verdict.grey_std == pytest.approx(std, rel=1e-9, abs=1e-9)


# --------------------------------------------------------------------------- ood block


def test_every_answer_carries_the_ood_block_and_the_audit_records_it(client, served):
    r = _predict(client, served, _phantom_png(1))
    assert r.status_code == 200, r.text
    ood = r.json()["ood"]
    card = json.loads((served.export / "model_card.json").read_text())
    assert ood["threshold"] == pytest.approx(card["ood"]["threshold"], abs=1e-3)
    assert ood["score"] > 0 and ood["in_distribution"] is (ood["score"] <= ood["threshold"])
    (row,) = _rows(served, f"request_id = '{r.json()['request_id']}'")
    assert row["ood_score"] == pytest.approx(ood["score"], abs=1e-3)
    assert row["in_distribution"] == int(ood["in_distribution"])
    assert row["roi_source"] is None  # a whole-frame model: no ROI


def test_a_photograph_is_flagged_counted_and_still_answered_under_flag(client, served):
    r = _predict(client, served, _png(shifts.colour_photo(np.random.default_rng(3))))
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["ood"]["in_distribution"] is False and "coloured" in body["ood"]["reason"]
    assert body["prediction"]["probabilities"]  # flag policy: answered, with the flag
    text = client.get("/metrics").text
    line = f'thyroid_cad_ood_flagged_total{{model_version="{served.version}",status="200"}} 1.0'
    assert line in text


def test_refuse_policy_gives_422_without_probabilities_and_audits(served):
    settings = served.settings.model_copy(update={"ood_policy": "refuse"})
    with TestClient(create_app(settings)) as client:
        r = _predict(client, served, _png(shifts.radiograph(np.random.default_rng(4))))
        ok = _predict(client, served, _phantom_png(2))
    assert r.status_code == 422, r.text
    assert r.json()["error"]["code"] == "out_of_distribution"
    assert "probabilities" not in r.text and "prediction" not in r.json()
    refused = _rows(served, "status_code = 422")
    assert len(refused) == 1 + (ok.status_code == 422)
    for row in refused:
        assert row["error_code"] == "out_of_distribution" and row["in_distribution"] == 0
        assert row["label"] is None and row["probabilities"] in (None, "null")
        assert row["ood_score"] > 0
    # An ordinary image still gets its answer (unless it is one of the ~5 % flagged).
    assert ok.status_code == 200 or ok.json()["error"]["code"] == "out_of_distribution"


def test_v2_infer_returns_ood_score_tensor_and_parameters(client, served):
    data = base64.b64encode(_phantom_png(5)).decode()
    photo = base64.b64encode(_png(shifts.colour_photo(np.random.default_rng(5)))).decode()
    r = client.post(
        f"/v2/models/{served.name}/infer",
        json={
            "inputs": [{"name": "image", "datatype": "BYTES", "shape": [2], "data": [data, photo]}]
        },
        headers=_auth(served.predict_key),
    )
    assert r.status_code == 200, r.text
    body = r.json()
    outputs = {o["name"]: o for o in body["outputs"]}
    assert outputs["ood_score"]["shape"] == [2]
    verdicts = json.loads(body["parameters"]["ood"])
    assert verdicts[1]["in_distribution"] is False
    assert body["parameters"]["in_distribution"].endswith(";false")
    meta = client.get(f"/v2/models/{served.name}").json()
    assert {"name": "ood_score", "datatype": "FP32", "shape": [-1]} in meta["outputs"]


def test_a_model_without_ood_reference_answers_null_score(home, tiny_export, tmp_path):
    old = tmp_path / "old-export"
    shutil.copytree(tiny_export, old)
    card = json.loads((old / "model_card.json").read_text())
    del card["ood"]
    (old / "model_card.json").write_text(json.dumps(card))
    served = make_served(old, tmp_path, "no-ood")
    with TestClient(create_app(served.settings)) as client:
        r = _predict(client, served, _phantom_png(6))
    assert r.status_code == 200, r.text
    assert r.json()["ood"] == {
        "score": None,
        "threshold": None,
        "in_distribution": True,
        "reason": "model has no OOD reference",
    }


# --------------------------------------------------------------------------- outcomes


def test_outcomes_are_idempotent_keep_history_and_check_input(client, served):
    rid = _predict(client, served, _phantom_png(7)).json()["request_id"]
    key = _feedback_key(served)
    url = f"/v1/requests/{rid}/outcome"
    body = {"kind": "bethesda", "pathology": "VI", "date": "2026-01-15"}
    first = client.post(url, json=body, headers=_auth(key))
    assert first.status_code == 201, first.text
    assert first.json()["revision"] == 1 and first.json()["truth"] == "malignant"
    assert first.json()["entered_by"] == key.split("_")[1]  # the key id, never a name
    again = client.post(url, json=body, headers=_auth(key))
    assert again.status_code == 200 and again.json()["revision"] == 1
    fixed = {"kind": "histology", "pathology": "benign", "date": "2026-02-01"}
    second = client.post(url, json=fixed, headers=_auth(served.admin_key))
    assert second.status_code == 201 and second.json()["revision"] == 2
    history = client.get(url, headers=_auth(key)).json()["revisions"]
    assert [h["truth"] for h in history] == ["malignant", "benign"]
    assert client.post(url, json=body).status_code == 401
    forbidden = client.post(url, json=body, headers=_auth(served.predict_key))
    assert forbidden.status_code == 403 and forbidden.json()["error"]["code"] == "forbidden"
    missing = client.post(f"/v1/requests/{uuid.uuid4().hex}/outcome", json=body, headers=_auth(key))
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "request_not_found"
    tomorrow = (datetime.now(UTC).date() + timedelta(days=2)).isoformat()
    for bad in (
        {**body, "pathology": "VII"},
        {**body, "kind": "histology", "pathology": "II"},
        {**body, "date": tomorrow},
        {**body, "date": "15/01/2026"},
        {**body, "note": "patient John Smith"},  # no free text
    ):
        r = client.post(url, json=bad, headers=_auth(key))
        assert r.status_code == 422 and r.json()["error"]["code"] == "invalid_request", bad
    # a feedback key cannot predict
    r = client.post("/v1/predict", files={"file": ("x.png", _phantom_png(8), "image/png")},
                    headers=_auth(key))  # fmt: skip
    assert r.status_code == 403


def _known_requests(served, n=40, seed=0):
    """Audited answers with known probabilities, half of them flagged, and outcomes."""
    from service.store.audit import AuditStore
    from service.store.outcomes import OutcomeIn, OutcomeStore

    rng = np.random.default_rng(seed)
    audit = AuditStore(served.settings.audit_url(), served.settings.audit_spool())
    store = OutcomeStore(audit.db)
    truth, probs, inside = [], [], []
    categories = ["II", "V", "VI", "III", "IV", "I"]
    for i in range(n):
        rid = f"known{i:03d}"
        p = float(rng.uniform())
        flagged = i % 2 == 1
        audit.record(
            {
                "request_id": rid,
                "route": "/v1/predict",
                "model_name": served.name,
                "model_version": served.version,
                "status_code": 200,
                "label": "malignant" if p > 0.5 else "benign",
                "probabilities": {"benign": 1 - p, "malignant": p},
                "ood_score": 1.0,
                "in_distribution": not flagged,
            }
        )
        if i % 3 == 0:
            kind, pathology = "histology", ("malignant" if rng.uniform() < p else "benign")
        else:
            kind, pathology = "bethesda", categories[int(rng.integers(0, 6))]
        outcome = OutcomeIn(kind=kind, pathology=pathology, date=date(2026, 1, 1))
        store.record(rid, outcome, "test")
        if outcome.truth != "indeterminate":
            truth.append(outcome.truth == "malignant")
            probs.append(p)
            inside.append(not flagged)
    audit.close()
    return np.array(truth), np.array(probs), np.array(inside)


def test_performance_endpoint_equals_the_training_metric_functions(client, served):
    y, p, inside = _known_requests(served)
    key = _feedback_key(served)
    r = client.get("/v1/performance", headers=_auth(key))
    assert r.status_code == 200, r.text
    body = r.json()
    card = json.loads((served.export / "model_card.json").read_text())
    threshold = card["threshold"]
    auc, low, high = metrics.bootstrap_auc_ci(y, p, n_boot=1000, seed=0)
    bm = metrics.binary_metrics(y, p, threshold)
    assert body["overall"]["n"] == len(y) and body["indeterminate"] == 40 - 0 - len(y)
    assert body["overall"]["auc"]["value"] == pytest.approx(auc, abs=1e-6)
    assert body["overall"]["auc"]["ci_low"] == pytest.approx(low, abs=1e-6)
    assert body["overall"]["sensitivity"]["value"] == pytest.approx(bm["sensitivity"], abs=1e-6)
    assert body["overall"]["specificity"]["ci_high"] == pytest.approx(
        bm["specificity_ci_high"], abs=1e-6
    )
    ece = metrics.expected_calibration_error(y.astype(int), p)
    assert body["overall"]["ece"] == pytest.approx(ece, abs=1e-6)
    assert body["in_distribution"]["n"] == int(inside.sum())
    assert body["out_of_distribution"]["n"] == int((~inside).sum())
    auc_in = metrics.roc_auc(y[inside], p[inside])
    assert body["in_distribution"]["auc"]["value"] == pytest.approx(auc_in, abs=1e-6)
    sens_high = bm["sensitivity_ci_high"]
    assert body["drift_warning"]["active"] is (sens_high < card["target_sensitivity"])
    text = client.get("/metrics").text
    assert f'thyroid_cad_live_n{{distribution="all",model_version="{served.version}"}}' in text
    # since= in the future: nothing to measure
    later = client.get("/v1/performance", params={"since": "2999-01-01"}, headers=_auth(key))
    assert later.json()["overall"]["n"] == 0 and later.json()["overall"]["auc"]["value"] is None
    assert client.get("/v1/performance", headers=_auth(served.predict_key)).status_code == 403


def test_drift_warning_when_live_sensitivity_collapses(client, served):
    from service.store.audit import AuditStore
    from service.store.outcomes import OutcomeIn, OutcomeStore

    audit = AuditStore(served.settings.audit_url(), served.settings.audit_spool())
    store = OutcomeStore(audit.db)
    for i in range(30):  # malignant nodules all scored benign: sensitivity 0
        rid = f"missed{i}"
        audit.record({"request_id": rid, "route": "/v1/predict", "model_name": served.name,
                      "model_version": served.version, "status_code": 200,
                      "probabilities": {"benign": 0.99, "malignant": 0.01}})  # fmt: skip
        truth = "malignant" if i % 2 else "benign"
        store.record(rid, OutcomeIn(kind="histology", pathology=truth, date=date(2026, 1, 2)), "t")
    audit.close()
    body = client.get("/v1/performance", headers=_auth(served.admin_key)).json()
    assert body["overall"]["sensitivity"]["value"] == 0.0
    assert (
        body["drift_warning"]["active"] is True
        and "below the target" in body["drift_warning"]["message"]
    )


# --------------------------------------------------------------------------- CLI


def test_outcomes_import_validates_first_and_writes_all_or_nothing(
    home, served, tmp_path, monkeypatch
):
    from cli import app
    from service.config import get_settings

    _known_requests(served, n=3)
    monkeypatch.setenv("THYROID_CAD_DATABASE_URL", served.settings.audit_url())
    get_settings.cache_clear()
    bad = tmp_path / "bad.csv"
    bad.write_text(
        "request_id,kind,pathology,date\n"
        "known000,bethesda,II,2026-01-03\n"
        "known001,bethesda,IX,2026-01-03\n"
        "nosuchrequest,histology,benign,2026-01-03\n"
    )
    runner = CliRunner()
    r = runner.invoke(app, ["outcomes", "import", str(bad)])
    assert r.exit_code == 1
    assert "line 3" in r.output and "ERROR" in r.output and "nothing was imported" in r.output
    rows = (
        sqlite3.connect(served.db_path)
        .execute("SELECT count(*) FROM outcomes WHERE entered_by = 'csv-import'")
        .fetchone()
    )
    assert rows == (0,)
    good = tmp_path / "good.csv"
    good.write_text(
        "request_id,kind,pathology,date\nknown000,bethesda,V,2026-01-03\nknown001,histology,Benign,2026-01-04\n"
    )
    r = runner.invoke(app, ["outcomes", "import", str(good)])
    assert r.exit_code == 0, r.output
    history = (
        sqlite3.connect(served.db_path)
        .execute("SELECT truth FROM outcomes WHERE request_id = 'known000' ORDER BY revision")
        .fetchall()
    )
    assert history[-1] == ("malignant",) and len(history) == 2
    get_settings.cache_clear()


def test_performance_log_writes_an_mlflow_run_beside_the_version(home, served, monkeypatch):
    import mlflow

    from cli import app
    from registry import store
    from service.config import get_settings

    y, p, _ = _known_requests(served, n=30, seed=2)
    monkeypatch.setenv("THYROID_CAD_DATABASE_URL", served.settings.audit_url())
    monkeypatch.setenv("THYROID_CAD_MODEL", served.settings.model)
    get_settings.cache_clear()
    r = CliRunner().invoke(app, ["performance", "log", "--to-mlflow"])
    get_settings.cache_clear()
    assert r.exit_code == 0, r.output
    report = json.loads(r.stdout[r.stdout.index("{") :])
    run = mlflow.get_run(report["mlflow_run_id"])
    assert run.data.tags["registered_model_name"] == served.name
    assert run.data.tags["registered_model_version"] == str(served.version)
    assert run.data.tags["source_run_id"] == store.show(served.version, served.name).source_run
    assert run.data.metrics["live_n"] == len(y)
    assert run.data.metrics["live_auc"] == pytest.approx(metrics.roc_auc(y, p), abs=1e-6)
