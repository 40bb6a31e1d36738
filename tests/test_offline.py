"""Works offline, quietly: /docs without a CDN, and plain CPU-host logs from the service
and from the CLI's TensorFlow commands (no cuInit errors, no red onnxruntime [E] lines)."""

from __future__ import annotations

import io
import os
import re
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import urljoin, urlparse

import httpx
import numpy as np
import pytest
from conftest import free_port, wait_ready
from fastapi.testclient import TestClient
from PIL import Image

from cli.common import has_nvidia_gpu
from registry import store
from service.api.app import create_app
from service.config import Settings
from training import phantom

ROOT = Path(__file__).resolve().parents[1]
cpu_host_only = pytest.mark.skipif(
    has_nvidia_gpu(), reason="checks what a host WITHOUT an NVIDIA GPU prints"
)
# What must never reach stderr on a CPU host: onnxruntime's [E] lines and colour codes,
# TensorFlow's cuInit / CUDA stub lines and absl's pre-init notice, error-level logs.
NOISE = re.compile(
    r"\[E:onnxruntime|\x1b\[|cuInit|cudart_stub|cuda_platform|absl::InitializeLog"
    r"|^E\d{4} |\bERROR\b|Traceback"
)


class _Assets(HTMLParser):
    def __init__(self):
        super().__init__()
        self.urls: list[str] = []

    def handle_starttag(self, tag, attrs):
        for key, value in attrs:
            if key in ("src", "href") and value:
                self.urls.append(value)

    def handle_data(self, data):  # the inline script that boots Swagger UI / ReDoc
        self.urls += re.findall(r"""["'](/[^"'\s]+\.(?:js|css|png))["']""", data)
        self.urls += re.findall(r"""https?://[^"'\s)]+""", data)


@pytest.mark.parametrize("page", ["/docs", "/redoc"])
def test_api_docs_use_only_assets_the_app_serves(page):
    """No CDN: every script, stylesheet and icon of the docs pages comes from this app."""
    client = TestClient(create_app(Settings()))  # no lifespan needed: no model, no database
    r = client.get(page)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    parser = _Assets()
    parser.feed(r.text)
    urls = sorted(set(parser.urls))
    assert any(u.endswith(".js") for u in urls), urls
    external = [u for u in urls if urlparse(u).netloc]
    assert external == [], f"{page} loads from another host: {external}"
    for url in urls:
        asset = client.get(urljoin(page, url))
        assert asset.status_code == 200, url
        assert len(asset.content) > 0
    assert client.get("/openapi.json").status_code == 200


def test_stderr_without_drops_the_noise_and_keeps_the_rest():
    """File descriptor 2 as C++ libraries and Python both write to it, in a fresh process."""
    script = """
import os, sys
from cli.common import stderr_without
with stderr_without(("cuInit",)):
    os.write(2, b"E0000 cuda_platform.cc:52] failed call to cuInit: UNKNOWN ERROR\\n")
    os.write(2, b"\\x1b[m\\n")  # the colour reset a dropped line leaves behind
    os.write(2, b"a real problem\\n")
    print("from python", file=sys.stderr)
print("after", file=sys.stderr)
"""
    run = subprocess.run(
        [sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert run.returncode == 0, run.stderr
    assert run.stderr == "a real problem\nfrom python\nafter\n"


def _png() -> bytes:
    buf = io.BytesIO()
    Image.fromarray(phantom.make_image("benign", np.random.default_rng(0), 96)).save(buf, "PNG")
    return buf.getvalue()


def _serve(env: dict, port: int) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "cli", "serve", "--port", str(port)],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


@cpu_host_only
def test_the_service_on_a_cpu_host_says_cpu_once_and_nothing_red(served):
    s = served.settings
    env = {
        **os.environ,
        "THYROID_CAD_MODEL": s.model,
        "DATABASE_URL": s.database_url,
        "THYROID_CAD_SPOOL_DIR": str(s.spool_dir),
        "THYROID_CAD_PROVIDERS": '["CUDAExecutionProvider","CPUExecutionProvider"]',
    }
    pinned = store.register(served.export, served.name)  # not the champion
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    process = _serve(env, port)
    try:
        wait_ready(f"{base}/readyz", process)
        auth = {"Authorization": f"Bearer {served.predict_key}"}
        # a second session (a pinned version, loaded on demand) must not repeat the line
        url = f"{base}/v1/models/{served.name}/versions/{pinned}/predict?heatmap=none"
        files = {"file": ("x.png", _png(), "image/png")}
        r = httpx.post(url, files=files, headers=auth, timeout=60)
        assert r.status_code == 200, r.text
        assert r.json()["model"]["provider"] == "CPUExecutionProvider"
    finally:
        process.terminate()
        _, err = process.communicate(timeout=60)
    said = [line for line in err.splitlines() if "models run on CPUExecutionProvider" in line]
    assert len(said) == 1, err
    assert "CUDAExecutionProvider not usable on this host" in said[0]
    assert [line for line in err.splitlines() if NOISE.search(line)] == [], err


@cpu_host_only
def test_cli_training_on_a_cpu_host_prints_no_cuda_errors(phantom_root, tmp_path):
    env = {**os.environ, "THYROID_CAD_HOME": str(tmp_path)}
    env.pop("MLFLOW_TRACKING_URI", None)
    env.pop("TF_CPP_MIN_LOG_LEVEL", None)  # as a user's shell would have it
    run = subprocess.run(
        [sys.executable, "-m", "cli", "train", "--data", str(phantom_root), "--backbone",
         "tiny", "--epochs", "1", "--image-size", "32", "--batch-size", "16",
         "--max-images", "40"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    assert re.fullmatch(r"[0-9a-f]{32}", run.stdout.strip().splitlines()[-1]), run.stdout
    said = [line for line in run.stderr.splitlines() if "TensorFlow runs on the CPU" in line]
    assert len(said) == 1 and " INFO " in said[0], run.stderr
    assert [line for line in run.stderr.splitlines() if NOISE.search(line)] == [], run.stderr
