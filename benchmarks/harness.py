"""Shared parts of the serving benchmarks: models, servers, load, measurements.

Imported by serve.py, prepare.py and soak.py (run as scripts, so this folder is on
sys.path). Everything runs on one machine over loopback; every server is a child
process in its own session, stopped by the harness, and every load is bounded in
count and time.

Also a small command line for the pieces that run in their own process:

    python benchmarks/harness.py export --backbone efficientnetb0 --size 224 --out DIR
    python benchmarks/harness.py raw --onnx FILE --batch 8 --seconds 3
    python benchmarks/harness.py load SPEC.json
    python benchmarks/harness.py providers --out F.json  # where CUDA sessions really run
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import io
import json
import os
import platform
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

ROOT = Path(__file__).resolve().parents[1]
SEED_DATA = ROOT.parent / "shared" / "data" / "thyroid-seed"
PYTHON = sys.executable
CLASS_NAMES = ["benign", "malignant"]
QUIET_ORT = 3  # onnxruntime log severity: no CUDA-fallback warning on CPU hosts


# -- machine --------------------------------------------------------------------------
def machine() -> dict:
    """What the numbers were measured on."""
    import onnxruntime as ort
    import psutil

    return {
        "cpu": _cpu_model(),
        "logical_cores": os.cpu_count(),
        "physical_cores": psutil.cpu_count(logical=False),
        "memory_gb": round(psutil.virtual_memory().total / 2**30, 1),
        "python": platform.python_version(),
        "onnxruntime": ort.__version__,
        "onnxruntime_available_providers": ort.get_available_providers(),
        "load_average_at_start": [round(x, 2) for x in os.getloadavg()],
        "platform": platform.platform(),
    }


def _cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def provider_check() -> dict:
    """Which providers onnxruntime sessions really run on, for CUDA and TensorRT requests.

    Uses a one-node graph made here (no model file needed); a session asked for CUDA on
    a host without one silently falls back to CPU, which is what this makes visible.
    """
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["y"])],
        "check",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, 4])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    blob = model.SerializeToString()
    onnx.checker.check_model(model)
    out = {"onnxruntime": ort.__version__, "available": ort.get_available_providers()}
    for label, wanted in (
        ("cuda", ["CUDAExecutionProvider", "CPUExecutionProvider"]),
        (
            "tensorrt",
            ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"],
        ),
    ):
        options = ort.SessionOptions()
        options.log_severity_level = QUIET_ORT
        try:
            session = ort.InferenceSession(blob, options, providers=wanted)
            y = session.run(None, {"x": np.array([[-1.0, 0.0, 1.0, 2.0]], np.float32)})[0]
            active = session.get_providers()
            out[label] = {
                "requested": wanted,
                "active": active,
                "runs_on_it": active[0] == wanted[0],
                "result_ok": bool(np.array_equal(y, [[0.0, 0.0, 1.0, 2.0]])),
            }
        except Exception as e:  # noqa: BLE001 - report whatever the provider says
            out[label] = {"requested": wanted, "error": f"{type(e).__name__}: {e}"[:500]}
    return out


def session_providers(onnx_path: Path, providers: list[str]) -> list[str]:
    """The providers a session really runs on (not what get_available_providers claims)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = QUIET_ORT
    return ort.InferenceSession(str(onnx_path), options, providers=providers).get_providers()


# -- test image -----------------------------------------------------------------------
def sample_jpeg(width: int = 560, height: int = 360) -> tuple[bytes, str]:
    """(JPEG bytes, where it came from): a real 560x360 thyroid frame when ../shared/data
    is here, else a phantom frame on a black scanner frame of that size."""
    from PIL import Image

    if SEED_DATA.is_dir():
        for path in sorted(SEED_DATA.glob("*/*/*.jpg")):
            with Image.open(path) as im:
                if im.size == (width, height) and im.mode == "RGB":
                    return path.read_bytes(), f"thyroid-seed {path.relative_to(SEED_DATA)}"
    from training import phantom

    side = min(width, height)
    frame = np.zeros((height, width, 3), np.uint8)
    top, left = (height - side) // 2, (width - side) // 2
    frame[top : top + side, left : left + side] = phantom.make_image(
        "malignant", np.random.default_rng(0), size=side
    )
    buf = io.BytesIO()
    Image.fromarray(frame).save(buf, "JPEG", quality=90)
    return buf.getvalue(), f"synthetic phantom frame {width}x{height} (JPEG q90)"


# -- models ---------------------------------------------------------------------------
def export_dir(work: Path, backbone: str, size: int) -> Path:
    return work / "models" / f"{backbone}-{size}"


def ensure_export(work: Path, backbone: str, size: int) -> Path:
    """model.onnx + model_card.json + model.keras for an untrained backbone, made once.

    Exported in a child process (TensorFlow's memory goes back when it ends) by the
    project's own training.export.export_model: the same graph as production, with
    the in-graph Grad-CAM head; only the weights are random.
    """
    out = export_dir(work, backbone, size)
    if not (out / "model_card.json").is_file():
        cmd = [PYTHON, __file__, "export", "--backbone", backbone, "--size", str(size)]
        subprocess.run([*cmd, "--out", str(out)], check=True, env=_env())
    return out


def _export(backbone: str, size: int, out: Path) -> None:
    from thyroid_cad import imaging
    from training import export, models, phantom

    model = models.build_model(backbone, len(CLASS_NAMES), size, weights=None)
    rng = np.random.default_rng(0)
    parity = np.stack(
        [imaging.prepare(phantom.make_image(CLASS_NAMES[i % 2], rng), size) for i in range(4)]
    )
    info = {
        "image_size": size,
        "class_names": CLASS_NAMES,
        "positive_class": "malignant",
        "threshold": 0.5,
        "backbone": backbone,
        "strategy": "full",
        "classifier": "softmax",
        "stage": "benchmark (random weights)",
    }
    out.mkdir(parents=True, exist_ok=True)
    export.export_model(model, info, out, parity, "phantom frames (benchmark, random weights)")
    model.save(out / "model.keras")  # what the seeds' Flask page loads


def register(export: Path, home: Path, name: str) -> tuple[str, int]:
    """Register the export as `name`@champion in a throwaway SQLite MLflow store (forced:
    a benchmark's random weights carry no robustness numbers for the promotion gate)."""
    env = _env(home)
    code = (
        "import sys; from pathlib import Path; from registry import store; "
        "v = store.register(Path(sys.argv[1]), sys.argv[2]); "
        "store.promote(v, 'champion', sys.argv[2], force=True, reason='benchmark'); print(v)"
    )
    out = subprocess.run(
        [PYTHON, "-c", code, str(export), name], env=env, check=True, capture_output=True
    )
    return f"{name}@champion", int(out.stdout.decode().split()[-1])


def _env(home: Path | None = None, extra: dict | None = None) -> dict:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TF_CPP_MIN_LOG_LEVEL": "3"}
    # servers started by console scripts (mlflow runs `uvicorn`) find this environment's
    env["PATH"] = str(Path(PYTHON).parent) + os.pathsep + env.get("PATH", "")
    if home is not None:
        uri = f"sqlite:///{home / 'mlflow.db'}"
        env.update(THYROID_CAD_HOME=str(home), MLFLOW_TRACKING_URI=uri, MLFLOW_REGISTRY_URI=uri)
    env.update(extra or {})
    return env


# -- servers --------------------------------------------------------------------------
def stop_on_sigterm() -> None:
    """SIGTERM ends the run through its finally blocks, so the servers it started stop too
    (they run in sessions of their own and would outlive a plain kill)."""
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get(url: str, timeout: float = 2.0) -> int:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code
    except OSError:
        return 0


@dataclass
class Server:
    """A server under test: a child process (own session) and what it answers on."""

    label: str
    cmd: list[str]
    env: dict
    port: int
    ready_path: str
    log: Path
    proc: subprocess.Popen | None = None
    headers: dict = field(default_factory=dict)
    started_s: float = 0.0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 180.0) -> Server:
        t0 = time.perf_counter()
        self.log.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen(
                self.cmd,
                env=self.env,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=ROOT,
                start_new_session=True,
            )
        while time.perf_counter() - t0 < timeout:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.label} exited ({self.proc.returncode}); see {self.log}")
            if _get(self.url + self.ready_path) == 200:
                self.started_s = time.perf_counter() - t0
                return self
            time.sleep(0.25)
        self.stop()
        raise RuntimeError(f"{self.label} not ready within {timeout:.0f} s; see {self.log}")

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGTERM)  # the session we started, nothing else
        try:
            self.proc.wait(15)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(5)

    def tree(self):
        import psutil

        root = psutil.Process(self.proc.pid)
        return [root, *root.children(recursive=True)]


def service_server(
    home: Path, model: str, work: Path, label: str = "service", env: dict | None = None
) -> Server:
    """`thyroid-cad serve` (uvicorn, 1 worker) on the registered model, with a predict key.

    The audit database, key check and metrics are on, as in production; the registry
    poll is slowed so it does not land inside a measurement.
    """
    settings = {
        "THYROID_CAD_MODEL": model,
        "THYROID_CAD_EXTRA_ALIASES": "[]",
        "THYROID_CAD_POLL_INTERVAL_S": "3600",
        "THYROID_CAD_PROVIDERS": '["CPUExecutionProvider"]',
        **(env or {}),
    }
    full_env = _env(home, settings)
    key = (
        subprocess.run(
            [PYTHON, "-m", "cli", "keys", "create", "--scope", "predict", "--name", "bench"],
            env=full_env,
            check=True,
            capture_output=True,
            cwd=ROOT,
        )
        .stdout.decode()
        .split()[-1]
    )
    port = free_port()
    cmd = [PYTHON, "-m", "cli", "serve", "--port", str(port)]
    server = Server(label, cmd, full_env, port, "/readyz", work / "logs" / f"{label}.log")
    server.headers = {"Authorization": f"Bearer {key}"}
    return server


def mlflow_server(home: Path, model: str, work: Path) -> Server:
    """`mlflow models serve` of the same registered version (pyfunc, local env, 1 worker)."""
    port = free_port()
    mlflow = str(Path(PYTHON).with_name("mlflow"))
    cmd = [mlflow, "models", "serve", "-m", f"models:/{model}", "--env-manager", "local"]
    cmd += ["-h", "127.0.0.1", "-p", str(port), "-w", "1"]
    return Server("mlflow", cmd, _env(home), port, "/ping", work / "logs" / "mlflow.log")


def flask_server(export: Path, work: Path) -> Server:
    """The seeds' approach: a Flask page calling Keras model.predict per upload."""
    port = free_port()
    cmd = [PYTHON, str(ROOT / "benchmarks" / "seed_flask.py"), str(export / "model.keras")]
    cmd += ["--port", str(port)]
    return Server("flask-keras", cmd, _env(), port, "/", work / "logs" / "flask.log")


# -- measuring a server ---------------------------------------------------------------
class Sampler:
    """Resident memory of a process tree, sampled in a thread: the peak and the series."""

    def __init__(self, tree_fn, interval: float = 0.1):
        self.tree_fn, self.interval, self.peak = tree_fn, interval, 0
        self.series: list[tuple[float, int]] = []  # (seconds since start, bytes)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        t0 = time.perf_counter()
        while not self._stop.is_set():
            rss = tree_rss(self.tree_fn())
            self.peak = max(self.peak, rss)
            self.series.append((time.perf_counter() - t0, rss))
            self._stop.wait(self.interval)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def tree_rss(procs) -> int:
    total = 0
    for p in procs:
        with contextlib.suppress(Exception):
            total += p.memory_info().rss
    return total


def tree_cpu(procs) -> float:
    total = 0.0
    for p in procs:
        with contextlib.suppress(Exception):
            t = p.cpu_times()
            total += t.user + t.system
    return total


@dataclass
class Request:
    """One HTTP request the load generator repeats: method, path, headers, body file."""

    path: str
    body: Path | None = None
    headers: dict = field(default_factory=dict)
    multipart: dict | None = None  # {"field", "filename", "content_type"}: body is the file
    images: int = 1  # images per request


def measure_load(
    server: Server,
    request: Request,
    concurrency: int,
    seconds: float,
    min_requests: int,
    max_seconds: float,
    warmup: int,
    windows_s: float = 0.0,
) -> dict:
    """Closed-loop load at `concurrency` from a separate process; server CPU and RSS."""
    spec = {
        "url": server.url + request.path,
        "headers": {**server.headers, **request.headers},
        "body": str(request.body) if request.body else None,
        "multipart": request.multipart,
        "concurrency": concurrency,
        "seconds": seconds,
        "min_requests": min_requests,
        "max_seconds": max_seconds,
        "warmup": warmup,
        "keep_records": windows_s > 0,
    }
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump(spec, f)
    proc = subprocess.Popen(
        [PYTHON, __file__, "load", f.name], stdout=subprocess.PIPE, text=True, env=_env()
    )
    try:
        assert proc.stdout is not None
        if proc.stdout.readline().strip() != "START":  # warm-up done
            proc.wait()
            raise RuntimeError(f"load generator failed on {spec['url']}")
        cpu0 = tree_cpu(server.tree())
        with Sampler(server.tree, 1.0 if windows_s else 0.1) as mem:
            line = proc.stdout.readline().strip()
            cpu1 = tree_cpu(server.tree())
        result = json.loads(proc.stdout.read())
        proc.wait(30)
    finally:
        if proc.poll() is None:
            proc.kill()
        os.unlink(f.name)
    assert line == "END", line
    images = result["ok"] * request.images
    result.update(
        images=images,
        images_per_s=images / result["elapsed_s"] if result["elapsed_s"] else 0.0,
        server_cpu_s=cpu1 - cpu0,
        cpu_s_per_image=(cpu1 - cpu0) / images if images else None,
        peak_rss_mb=mem.peak / 2**20,
    )
    if windows_s:
        result["rss_mb_series"] = [(round(t, 1), round(b / 2**20, 1)) for t, b in mem.series]
    return result


# -- the load generator (its own process) -------------------------------------------
async def _load(spec: dict) -> dict:
    import aiohttp

    body = Path(spec["body"]).read_bytes() if spec["body"] else None
    multipart = spec["multipart"]
    timeout = aiohttp.ClientTimeout(total=120)
    connector = aiohttp.TCPConnector(limit=spec["concurrency"], force_close=False)
    records: list[tuple[float, float, int]] = []
    errors: dict[str, int] = {}

    def payload():
        if multipart is None:
            return body
        form = aiohttp.FormData()
        form.add_field(
            multipart["field"],
            body,
            filename=multipart["filename"],
            content_type=multipart["content_type"],
        )
        return form

    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:

        async def one() -> tuple[float, int]:
            t0 = time.perf_counter()
            try:
                async with session.post(spec["url"], data=payload(), headers=spec["headers"]) as r:
                    await r.read()
                    status = r.status
            except (aiohttp.ClientError, TimeoutError) as e:
                status = 0
                errors[type(e).__name__] = errors.get(type(e).__name__, 0) + 1
            return time.perf_counter() - t0, status

        warm = [one() for _ in range(spec["warmup"])]
        for _latency, status in await asyncio.gather(*warm):
            if status != 200:
                raise RuntimeError(f"warm-up request answered {status}")
        print("START", flush=True)
        start = time.perf_counter()
        stop = False

        async def worker():
            nonlocal stop
            while not stop:
                t = time.perf_counter() - start
                if t >= spec["max_seconds"] or (
                    t >= spec["seconds"] and len(records) >= spec["min_requests"]
                ):
                    stop = True
                    return
                latency, status = await one()
                records.append((time.perf_counter() - start, latency, status))

        await asyncio.gather(*(worker() for _ in range(spec["concurrency"])))
        elapsed = time.perf_counter() - start
    print("END", flush=True)
    ok = [lat for _, lat, status in records if status == 200]
    for _, _, status in records:
        if status != 200:
            errors[str(status)] = errors.get(str(status), 0) + 1
    out = {
        "requests": len(records),
        "ok": len(ok),
        "errors": errors,
        "elapsed_s": elapsed,
        **percentiles([x * 1e3 for x in ok]),
    }
    if spec.get("keep_records"):
        out["records"] = [(round(t, 4), round(lat * 1e3, 3), s) for t, lat, s in records]
    return out


def percentiles(ms: list[float]) -> dict:
    if not ms:
        return {"p50_ms": None, "p95_ms": None, "p99_ms": None, "mean_ms": None}
    p50, p95, p99 = np.percentile(ms, [50, 95, 99])
    return {
        "p50_ms": float(p50),
        "p95_ms": float(p95),
        "p99_ms": float(p99),
        "mean_ms": float(statistics.fmean(ms)),
    }


# -- raw onnxruntime (its own process) ------------------------------------------------
def measure_raw(
    onnx_path: Path,
    batch: int,
    seconds: float,
    min_calls: int,
    providers: list[str] | None = None,
    frame: Path | None = None,
) -> dict:
    """InferenceSession.run in a fresh process: the limit the service is measured against."""
    cmd = [PYTHON, __file__, "raw", "--onnx", str(onnx_path), "--batch", str(batch)]
    cmd += ["--seconds", str(seconds), "--min-calls", str(min_calls)]
    if providers:
        cmd += ["--providers", ",".join(providers)]
    if frame:
        cmd += ["--frame", str(frame)]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, env=_env())
    return json.loads(out.stdout.strip().splitlines()[-1])


def _raw(args) -> dict:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = QUIET_ORT
    providers = args.providers.split(",") if args.providers else ["CPUExecutionProvider"]
    session = ort.InferenceSession(args.onnx, options, providers=providers)
    shape = session.get_inputs()[0].shape
    size = int(shape[1])
    if args.frame:
        frame = np.load(args.frame)
    else:
        frame = np.random.default_rng(0).integers(0, 256, (size, size, 3), dtype=np.uint8)
    x = np.ascontiguousarray(np.broadcast_to(frame, (args.batch, size, size, 3)))
    names = [o.name for o in session.get_outputs()]
    for _ in range(3):
        session.run(names, {"image": x})
    cpu0 = time.process_time()  # all threads of this process
    latencies, start = [], time.perf_counter()
    while True:
        t = time.perf_counter() - start
        if t >= args.seconds and len(latencies) >= args.min_calls:
            break
        t0 = time.perf_counter()
        session.run(names, {"image": x})
        latencies.append((time.perf_counter() - t0) * 1e3)
    elapsed = time.perf_counter() - start
    images = len(latencies) * args.batch
    return {
        "providers": session.get_providers(),
        "calls": len(latencies),
        "images": images,
        "elapsed_s": elapsed,
        "images_per_s": images / elapsed,
        "cpu_s_per_image": (time.process_time() - cpu0) / images,
        "peak_rss_mb": _peak_rss_mb(),
        "errors": {},
        **percentiles(latencies),
    }


def measure_pipeline(
    onnx_path: Path, encoded: Path, threads: int, seconds: float, min_images: int
) -> dict:
    """The service's own decode + prepare + onnxruntime, in `threads` threads of a fresh
    process, without HTTP: the limit the service's routes can approach. Its session has
    the service's options and runs one call at a time, as the service's batcher does on
    CPU (concurrent calls would only oversubscribe the cores)."""
    cmd = [PYTHON, __file__, "pipeline", "--onnx", str(onnx_path), "--image", str(encoded)]
    cmd += ["--threads", str(threads), "--seconds", str(seconds), "--min-calls", str(min_images)]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, env=_env())
    return json.loads(out.stdout.strip().splitlines()[-1])


def _pipeline(args) -> dict:
    import threading

    import onnxruntime as ort

    from service.inference import pipeline
    from service.inference.models import Runtime

    # The service's session options (threads, no spinning), as `thyroid-cad serve` uses.
    options = Runtime().session_options()
    options.log_severity_level = QUIET_ORT
    session = ort.InferenceSession(args.onnx, options, providers=["CPUExecutionProvider"])
    size = int(session.get_inputs()[0].shape[1])
    data = Path(args.image).read_bytes()
    names = [o.name for o in session.get_outputs()]
    one_run = threading.Lock()  # one session call at a time, as the service's batcher does

    def once() -> float:
        t0 = time.perf_counter()
        prepared = pipeline.prepare(data, size, 40_000_000)
        with one_run:
            session.run(names, {"image": prepared.square[None]})
        return (time.perf_counter() - t0) * 1e3

    for _ in range(3):
        once()
    latencies: list[float] = []
    lock = threading.Lock()
    start = time.perf_counter()
    cpu0 = time.process_time()

    def worker() -> None:
        while True:
            with lock:
                if time.perf_counter() - start >= args.seconds and len(latencies) >= args.min_calls:
                    return
            ms = once()
            with lock:
                latencies.append(ms)

    workers = [threading.Thread(target=worker) for _ in range(args.threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    elapsed = time.perf_counter() - start
    return {
        "providers": session.get_providers(),
        "calls": len(latencies),
        "images": len(latencies),
        "elapsed_s": elapsed,
        "images_per_s": len(latencies) / elapsed,
        "cpu_s_per_image": (time.process_time() - cpu0) / len(latencies),
        "peak_rss_mb": _peak_rss_mb(),
        "errors": {},
        **percentiles(latencies),
    }


def _peak_rss_mb() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def profile_summary(raw: Path, top: int = 18) -> dict:
    """Share of busy samples per function, from collapsed stacks (py-spy's raw format,
    as benchmarks/sampled_serve.py writes them).

    Inclusive: samples whose stack contains the function (once per stack); self: samples
    where it is the innermost frame. Waiting threads are not in the samples.
    """
    inclusive: dict[str, int] = {}
    own: dict[str, int] = {}
    total = 0
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        total += n
        frames = [
            f.split(" (")[0] + " (" + f.split(" (")[-1].split(":")[0].split("/")[-1] + ")"
            for f in stack.split(";")
        ]
        for f in set(frames):
            inclusive[f] = inclusive.get(f, 0) + n
        own[frames[-1]] = own.get(frames[-1], 0) + n

    def share(d: dict[str, int]) -> list[tuple[str, float]]:
        best = sorted(d.items(), key=lambda kv: -kv[1])[:top]
        return [(k, round(100 * v / total, 1)) for k, v in best]

    ours = {k: v for k, v in inclusive.items() if k.split(" (")[-1].rstrip(")") in PROFILED_FILES}
    return {
        "samples": total,
        "inclusive_pct": share(inclusive),
        "self_pct": share(own),
        "service_inclusive_pct": share(ours),
    }


# Files whose functions the profile summary lists on their own (the request path).
PROFILED_FILES = {
    "app.py",
    "v1.py",
    "oip.py",
    "inference.py",
    "decoding.py",
    "imaging.py",
    "heatmaps.py",
    "batching.py",
    "audit.py",
    "deps.py",
    "keys.py",
    "db.py",
    "models.py",
    "schemas.py",
    "metrics.py",
    "onnxruntime_inference_collection.py",
    "formparsers.py",
    "multipart.py",
    "routing.py",
    "responses.py",
}


# -- docs -----------------------------------------------------------------------------
def write_section(path: Path, title: str, body: str) -> None:
    """Replace (or append) the `## title` section of a markdown file, keeping the rest."""
    text = path.read_text() if path.is_file() else "# Benchmarks\n"
    head = f"## {title}\n"
    section = f"{head}\n{body.strip()}\n"
    if head in text:
        before, rest = text.split(head, 1)
        nxt = rest.find("\n## ")
        after = rest[nxt + 1 :] if nxt >= 0 else ""
        text = before + section + ("\n" + after if after else "")
    else:
        text = text.rstrip() + "\n\n" + section
    path.write_text(text)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    e = sub.add_parser("export")
    e.add_argument("--backbone", required=True)
    e.add_argument("--size", type=int, required=True)
    e.add_argument("--out", type=Path, required=True)
    r = sub.add_parser("raw")
    r.add_argument("--onnx", required=True)
    r.add_argument("--batch", type=int, default=1)
    r.add_argument("--seconds", type=float, default=3.0)
    r.add_argument("--min-calls", type=int, default=10)
    r.add_argument("--providers", default="")
    r.add_argument("--frame", default="")
    pl = sub.add_parser("pipeline")
    pl.add_argument("--onnx", required=True)
    pl.add_argument("--image", required=True, help="an encoded image file (JPEG, PNG, ...)")
    pl.add_argument("--threads", type=int, default=1)
    pl.add_argument("--seconds", type=float, default=3.0)
    pl.add_argument("--min-calls", type=int, default=10)
    ld = sub.add_parser("load")
    ld.add_argument("spec", type=Path)
    pv = sub.add_parser("providers")
    pv.add_argument("--out", type=Path, required=True, help="JSON file to write")
    args = parser.parse_args()
    if args.cmd == "providers":
        # not stdout: onnxruntime prints its provider fallbacks there
        args.out.write_text(json.dumps(provider_check(), indent=1))
    elif args.cmd == "export":
        _export(args.backbone, args.size, args.out)
    elif args.cmd == "raw":
        print(json.dumps(_raw(args)))
    elif args.cmd == "pipeline":
        print(json.dumps(_pipeline(args)))
    else:
        print(json.dumps(asyncio.run(_load(json.loads(args.spec.read_text())))))


if __name__ == "__main__":
    main()
