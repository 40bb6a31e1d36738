"""/openapi.json says what the server does (issue 17, item 6): the fuzzer's disagreements.

Each case was found by schemathesis: a request the schema allowed that the server refused,
a status the schema did not list, a header that left out a method. Checked here against
the schema itself (jsonschema) and against the live app.
"""

from __future__ import annotations

import jsonschema
import pytest
from fastapi.testclient import TestClient

from service.api.app import create_app


def _auth(key: str) -> dict:
    return {"Authorization": f"Bearer {key}"}


@pytest.fixture(scope="module")
def app(served_module):
    from service.store.audit import AuditStore
    from service.store.keys import KeyStore

    audit = AuditStore(served_module.settings.audit_url(), served_module.settings.audit_spool())
    feedback = KeyStore(audit.db).create_key("feedback", "lab")[1]
    audit.close()
    with TestClient(create_app(served_module.settings)) as client:
        yield client, served_module, feedback


def _valid(spec: dict, schema: dict, value) -> bool:
    """Whether `value` meets `schema` (its #/components/... references resolved in `spec`),
    formats included."""
    root = {**schema, "components": spec["components"]}
    checker = jsonschema.FormatChecker()
    return jsonschema.Draft202012Validator(root, format_checker=checker).is_valid(value)


def test_the_outcome_body_is_a_union_on_kind(app):
    client, served, _ = app
    spec = client.get("/openapi.json").json()
    body = spec["paths"]["/v1/requests/{request_id}/outcome"]["post"]["requestBody"]
    schema = body["content"]["application/json"]["schema"]
    ok = {"kind": "bethesda", "pathology": "VI", "date": "2026-01-02"}
    assert _valid(spec, schema, ok)
    assert _valid(spec, schema, {**ok, "kind": "histology", "pathology": "benign"})
    # Before: one flat schema allowed histology "VI", which the server refuses (422).
    assert not _valid(spec, schema, {**ok, "kind": "histology"})
    assert not _valid(spec, schema, {**ok, "pathology": "malignant"})


@pytest.mark.parametrize(
    ("value", "valid"),
    [
        ("2026-01-01", True),
        ("2026-01-01T08:30:00Z", True),
        ("2026-01-01T08:30:00.25+02:00", True),
        ("0000-00-00", False),  # the fuzzer's: the old pattern allowed it, the server not
        ("2026-02-30", False),
        ("2026-01-01T08:30", False),
    ],
)
def test_query_dates_are_rfc_3339_in_the_schema_and_the_server(app, value, valid):
    client, served, _ = app
    spec = client.get("/openapi.json").json()
    (end,) = [p for p in spec["paths"]["/v1/requests"]["get"]["parameters"] if p["name"] == "end"]
    assert _valid(spec, end["schema"], value) is valid
    r = client.get("/v1/requests", params={"end": value}, headers=_auth(served.admin_key))
    assert (r.status_code == 200) is valid, r.text


def test_a_feedback_key_on_v2_infer_is_a_documented_403(app):
    client, served, feedback = app
    spec = client.get("/openapi.json").json()
    for path in ("/v2/models/{name}/infer", "/v2/models/{name}/versions/{version}/infer"):
        assert "403" in spec["paths"][path]["post"]["responses"], path
    r = client.post(f"/v2/models/{served.name}/infer", json={"inputs": []}, headers=_auth(feedback))
    assert r.status_code == 403 and r.json()["error"].startswith("forbidden:")


def test_allow_lists_every_method_of_the_path(app):
    client, served, _ = app
    r = client.options("/v1/requests/abc/outcome", headers=_auth(served.admin_key))
    assert r.status_code == 405
    # Before: "POST" only, though GET is served at the same path by another route.
    assert r.headers["allow"] == "GET, POST"
    assert client.delete("/v1/predict").headers["allow"] == "POST"
