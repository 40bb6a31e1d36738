"""Schemathesis against the real service: generated requests from /openapi.json.

The app runs under uvicorn on a free loopback port with the tiny model and a real admin
key; the schemathesis CLI (a subprocess, as a user would run it) sends schema-valid and
schema-violating requests to every operation. The checks: no 5xx, every status, content
type, header and body documented, schema-violating requests refused with a 4xx, and
schema-valid ones accepted except where the content decides (CONTENT_DECIDES, with why).

The bounded run (a few hundred cases, fixed seed) runs on every CI run; `-m fuzz` runs a
longer one with a fresh seed (printed, to replay a failure with `--seed`).
"""

from __future__ import annotations

import json
import random
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from service.api.app import create_app

pytest.importorskip("schemathesis", reason="schemathesis is in the dev extra")

# positive_data_acceptance (ST202, "schema-valid request rejected") on these operations is
# explained: what is refused is decided by content no schema can describe. Any other
# failure, or ST202 anywhere else, fails the test.
CONTENT_DECIDES = {
    **dict.fromkeys(
        (
            "POST /v1/predict",
            "POST /v1/models/{name}/predict",
            "POST /v1/models/{name}/versions/{version}/predict",
        ),
        "the upload must be an image the decoder reads (PNG, JPEG, BMP, TIFF, DICOM, 16 px or "
        "more, within the pixel limit); to the schema it is only `binary`",
    ),
    **dict.fromkeys(
        ("POST /v2/models/{name}/infer", "POST /v2/models/{name}/versions/{version}/infer"),
        "a BYTES element must be such an image and a UINT8 tensor the model's [N, S, S, 3] "
        "filled by its values; an application/octet-stream body needs its JSON header's "
        "length in Inference-Header-Content-Length",
    ),
    "POST /v1/requests/{request_id}/outcome": "the outcome's date may not lie in the future "
    "(the clock decides, not the schema), and request_id must name an audited request (404)",
}
CHECKS = (
    "not_a_server_error,status_code_conformance,content_type_conformance,"
    "response_schema_conformance,response_headers_conformance,negative_data_rejection,"
    "positive_data_acceptance"
)


@pytest.fixture(scope="module")
def server(served_module, run_server):
    with run_server(create_app(served_module.settings)) as base:
        yield SimpleNamespace(base=base, name=served_module.name, key=served_module.admin_key)


def _schemathesis(server, out: Path, *, max_examples: int, seed: int, phases: str) -> dict:
    """Run `st run` against the server; the run's JSON report, with `responses` (HAR)."""
    config = out / "schemathesis.toml"
    # Path parameter `name`: the served model, so requests reach a model rather than 404.
    config.write_text(f'[parameters]\n"path.name" = "{server.name}"\n')
    command = [
        sys.executable,
        "-m",
        "schemathesis.cli",
        "--config-file",
        str(config),
        "run",
        f"{server.base}/openapi.json",
        "--checks",
        CHECKS,
        "--header",
        f"Authorization: Bearer {server.key}",
        "--max-examples",
        str(max_examples),
        "--seed",
        str(seed),
        "--phases",
        phases,
        "--workers",
        "1",
        "--continue-on-failure",
        "--report",
        "json,har",
        "--report-dir",
        str(out),
        "--no-color",
    ]
    run = subprocess.run(command, capture_output=True, text=True, timeout=1800, cwd=out)
    output = run.stdout + run.stderr
    reports = {p.name.split("-")[0]: p for p in out.glob("*.json") if p != config}
    assert "json" in reports, f"no report (exit {run.returncode}):\n{output[-6000:]}"
    report = json.loads(reports["json"].read_text())
    har = json.loads(reports["har"].read_text())
    report["responses"] = [
        (e["request"]["method"], e["request"]["url"], e["response"]["status"])
        for e in har["log"]["entries"]
    ]
    report["output"] = output
    assert run.returncode == report["exit_code"]
    return report


def _assert_clean(report: dict, at_least: int) -> None:
    output = report["output"][-12000:]
    assert report["complete"] and report["stop_reason"] == "completed", output
    assert report["errors"] == [], output  # schemathesis could not run something
    unexplained = [
        f
        for f in report["failures"]
        if f["code"] != "ST202" or not set(f["operations"]) <= set(CONTENT_DECIDES)
    ]
    assert unexplained == [], output  # a check failed: the output says which
    assert report["exit_code"] == (1 if report["failures"] else 0), output
    ops = report["operations"]
    assert ops["tested"] == ops["selected"] == ops["total"] >= 17, ops
    assert report["test_cases"]["generated"] >= at_least, report["test_cases"]
    server_errors = [r for r in report["responses"] if r[2] >= 500]
    assert server_errors == [], server_errors[:10]
    statuses = {status for _, _, status in report["responses"]}
    assert {200, 400, 404, 422} <= statuses  # it did reach handlers, not just refusals


def test_schemathesis_bounded_run_finds_nothing(server, tmp_path):
    report = _schemathesis(
        server, tmp_path, max_examples=10, seed=20261203, phases="examples,coverage,fuzzing"
    )
    _assert_clean(report, at_least=300)


@pytest.mark.fuzz
def test_schemathesis_long_run_finds_nothing(server, tmp_path):
    seed = random.randrange(2**31)
    print(f"schemathesis seed {seed}")
    report = _schemathesis(
        server, tmp_path, max_examples=500, seed=seed, phases="examples,coverage,fuzzing,stateful"
    )
    _assert_clean(report, at_least=3000)
