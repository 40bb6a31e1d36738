"""The benchmark scripts run end to end in their quick modes and write well-formed results.

Timings are never asserted (they belong in docs/benchmarks.md); what is checked is that
every system and route was measured without errors and that the result files hold
what the docs are built from.
"""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "benchmarks"
sys.path.insert(0, str(BENCH))

import harness  # noqa: E402


def _run(args: list[str], tmp_path: Path, timeout: int = 300, **env) -> subprocess.CompletedProcess:
    full_env = {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "THYROID_CAD_HOME": str(tmp_path / "home"),
        **env,
    }
    full_env.pop("MLFLOW_TRACKING_URI", None)
    out = subprocess.run(
        args, cwd=ROOT, env=full_env, capture_output=True, text=True, timeout=timeout
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return out


def _ordered(summary: dict) -> bool:
    p = [summary[k]["median"] for k in ("p50_ms", "p95_ms", "p99_ms")]
    return 0 < p[0] <= p[1] <= p[2]


def test_serve_quick_measures_every_route_and_writes_table_chart_and_json(tiny_export, tmp_path):
    out = tmp_path / "out"
    args = [sys.executable, str(BENCH / "serve.py"), "--quick", "--export", str(tiny_export)]
    args += ["--work", str(tmp_path / "work"), "--out", str(out)]
    args += ["--concurrency", "1,2", "--raw-batches", "1,2", "--seconds", "0.5", "--profile"]
    _run(args, tmp_path)

    result = json.loads((out / "benchmarks-serve.json").read_text())
    assert result["kind"] == "thyroid-cad serving benchmark" and result["quick"] is True
    machine = result["machine"]
    assert machine["logical_cores"] >= 1 and machine["onnxruntime"]
    (model,) = result["models"].values()
    assert model["providers"][0] == "CPUExecutionProvider"
    rows = {(r["system"], r["route"], r["concurrency"]): r for r in model["rows"]}
    expected = {("raw onnxruntime", f"batch {b}", None) for b in (1, 2)}
    # The raw pipeline: decode + prepare + onnxruntime in threads, no HTTP (issue 17).
    expected |= {("raw pipeline", "decode+prepare+run", c) for c in (1, 2)}
    expected |= {("service", route, c) for route in harness_routes() for c in (1, 2)}
    assert set(rows) == expected
    for key, row in rows.items():
        s = row["summary"]
        assert row["errors"] == 0, key
        assert s["images_per_s"]["median"] > 0 and _ordered(s), key
        assert s["cpu_s_per_image"]["median"] > 0 and s["peak_rss_mb"]["median"] > 0, key
        assert len(row["repeats"]) == 1
    whats = {t["what"] for t in model["targets"]}
    assert any(w.startswith("throughput v1 none") for w in whats)
    assert any(w.startswith("p50 overhead v1 none") for w in whats)
    assert {"v1 none c=2 / raw pipeline", "p50 overhead v1 none c=1 - raw pipeline (ms)"} <= whats
    assert all(t["value"] is not None for t in model["targets"])
    for route in ("v1 none", "v1 png"):  # the sampled instance of the service
        profile = model["profile"][route]
        assert profile["samples"] > 0 and profile["service_inclusive_pct"], route
    assert (out / "benchmarks-serve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    text = (out / "benchmarks-serve.md").read_text()
    assert "| system | route | conc. | images/s |" in text and "| service | v2 bytes | 2 |" in text


def harness_routes():
    import serve

    return serve.SERVICE_ROUTES


def test_soak_quick_reports_windows_errors_and_memory(tiny_export, tmp_path):
    out = tmp_path / "soak"
    args = [sys.executable, str(BENCH / "soak.py"), "--quick", "--export", str(tiny_export)]
    args += ["--seconds", "3", "--window", "1", "--work", str(tmp_path / "work"), "--out", str(out)]
    _run(args, tmp_path)
    result = json.loads((out / "soak.json").read_text())
    assert result["errors_total"] == 0 and result["requests"] > 0
    assert len(result["windows"]) >= 3
    assert sum(w["requests"] for w in result["windows"]) == result["requests"]
    memory = result["memory"]
    assert 0 < memory["start_mb"] <= memory["peak_mb"] and memory["end_mb"] <= memory["peak_mb"]
    assert "| window start s |" in (out / "soak.md").read_text()


def test_prepare_quick_matches_the_baseline_pixels(tiny_export, tmp_path):
    out = tmp_path / "prepare.json"
    args = [sys.executable, str(BENCH / "prepare.py"), "--quick", "--export", str(tiny_export)]
    args += ["--work", str(tmp_path / "work"), "--out", str(out)]
    _run(args, tmp_path)
    result = json.loads(out.read_text())
    assert result["identical_to_baseline"] is True and result["max_abs_diff_vs_baseline"] == 0
    assert result["inference_b1_p50_ms"] > 0
    for name in ("decode", "content box", "letterbox", "decode + prepare"):
        assert result["stages"][name]["after_ms"] > 0 and result["stages"][name]["before_ms"] > 0


@pytest.mark.skipif(
    shutil.which("nvidia-smi") is not None, reason="a GPU host runs the real check (minutes)"
)
def test_gpu_script_on_a_host_without_gpu_passes_with_a_no_gpu_result(tmp_path):
    out = tmp_path / "gpu"
    _run(
        ["bash", str(BENCH / "gpu.sh")],
        tmp_path,
        timeout=120,
        OUT=str(out),
        PYTHON=sys.executable,
        QUICK="1",
    )
    result = json.loads((out / "gpu-result.json").read_text())
    assert result["status"] == "no-gpu" and result["gpu"] is False
    assert "no GPU" in (out / "gpu-result.md").read_text()
    # the sessions' own providers, not the available list, show where CUDA requests ran
    cuda = result["providers"]["cuda"]
    assert cuda["active"] == ["CPUExecutionProvider"] and cuda["runs_on_it"] is False


def test_write_section_replaces_one_section_and_keeps_the_others(tmp_path):
    doc = tmp_path / "b.md"
    doc.write_text("# Benchmarks\n\n## A\n\nold a\n\n## B\n\nkeep b\n")
    harness.write_section(doc, "A", "new a")
    harness.write_section(doc, "C", "new c")
    text = doc.read_text()
    assert "old a" not in text and "new a" in text and "keep b" in text
    assert text.index("## A") < text.index("## B") < text.index("## C")
