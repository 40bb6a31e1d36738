"""Serving throughput and latency: this service against raw onnxruntime and its peers.

One run, one machine, one exported model per backbone (the project's own export, with
the in-graph Grad-CAM head; random weights: speed does not depend on them), registered
in a throwaway SQLite MLflow store and served by:

- raw onnxruntime `InferenceSession.run` in a process of its own (the limit), batch
  1 and batched, on the frame the service would prepare;
- the raw pipeline: the service's own decode + prepare + onnxruntime on the JPEG, in 1
  and 8 threads of a process of its own, no HTTP (the limit the routes can approach);
- this service (`thyroid-cad serve`, uvicorn, 1 worker, audit and keys on):
  `/v1/predict` with heatmap none / png / overlay, `/v2` infer with a UINT8 tensor
  and with the encoded JPEG as BYTES (binary tensor extension), at each concurrency;
- `mlflow models serve` of the same registered version (pyfunc, `--env-manager
  local`), sent the prepared tensor as JSON, as its API requires;
- the seeds' approach: a Flask page calling Keras `model.predict` per upload.

Load comes from a separate process (aiohttp, closed loop, bounded count and time,
loopback only). Each cell reports images/s, p50/p95/p99 latency, CPU seconds per image
of the server's process tree and its peak RSS. The whole matrix is repeated; claims are
ratios within one repeat, reported as the median and range over repeats.

    python benchmarks/serve.py                      # full run, writes docs/benchmarks.md
    python benchmarks/serve.py --quick --out DIR    # seconds: tiny model, smoke test
    python benchmarks/serve.py --variant batched:THYROID_CAD_MAX_BATCH_SIZE=8

--variant NAME:K=V,K=V runs the service once more per variant with those environment
settings (e.g. the dynamic batcher), so settings are compared within the same run.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import struct
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness  # noqa: E402

ROOT = harness.ROOT
SERVICE_ROUTES = ("v1 none", "v1 png", "v1 overlay", "v2 uint8", "v2 bytes")
TARGETS = {
    "throughput": 0.9,  # service / raw images/s at concurrency 8
    "overhead_ms": 3.0,  # service - raw p50 at concurrency 1, no heatmap
    "png_extra": 0.05,  # png heatmap over none, p50 at concurrency 1
    # Issue 17: against the raw pipeline (the same decode + prepare + onnxruntime, no HTTP).
    "vs_pipeline": 0.85,  # service / raw pipeline images/s at concurrency 8
    "pipeline_overhead_ms": 3.0,  # service - raw pipeline p50 at concurrency 1
    "vs_flask": 5.0,
    "vs_mlflow": 2.0,
}


def _payloads(work: Path, size: int, jpeg: bytes) -> tuple[dict, Path]:
    """Request bodies for every route, and the prepared frame (.npy) for raw runs."""
    from service.inference import decoding
    from thyroid_cad import imaging

    d = work / "payloads" / str(size)
    d.mkdir(parents=True, exist_ok=True)
    frame = imaging.prepare(decoding.decode(jpeg, 40_000_000).rgb, size)
    np.save(d / "frame.npy", frame)
    (d / "frame.jpg").write_bytes(jpeg)
    file = {"field": "file", "filename": "frame.jpg", "content_type": "image/jpeg"}

    def v2(datatype: str, shape: list[int], blob: bytes, name: str) -> harness.Request:
        """An OIP request with the binary tensor extension, as Triton's clients send it."""
        spec = {"name": "image", "datatype": datatype, "shape": shape}
        header = json.dumps({"inputs": [{**spec, "parameters": {"binary_data_size": len(blob)}}]})
        (d / name).write_bytes(header.encode() + blob)
        headers = {
            "Inference-Header-Content-Length": str(len(header.encode())),
            "Content-Type": "application/octet-stream",
        }
        return harness.Request("/v2/models/{name}/infer", d / name, headers)

    (d / "mlflow.json").write_text(json.dumps({"inputs": {"image": frame[None].tolist()}}))
    R = harness.Request
    requests = {
        "v1 none": R("/v1/predict?heatmap=none", d / "frame.jpg", multipart=file),
        "v1 png": R("/v1/predict?heatmap=png", d / "frame.jpg", multipart=file),
        "v1 overlay": R("/v1/predict?heatmap=overlay", d / "frame.jpg", multipart=file),
        "v2 uint8": v2("UINT8", [1, size, size, 3], frame.tobytes(), "v2-uint8.bin"),
        "v2 bytes": v2("BYTES", [1], struct.pack("<I", len(jpeg)) + jpeg, "v2-bytes.bin"),
        "mlflow": R("/invocations", d / "mlflow.json", {"Content-Type": "application/json"}),
        "flask": R("/predict", d / "frame.jpg", multipart=file),
    }
    return requests, d / "frame.npy"


def _variants(specs: list[str]) -> list[tuple[str, dict]]:
    out = [("service", {})] if not any(s.split(":")[0] == "service" for s in specs) else []
    for spec in specs:
        name, _, settings = spec.partition(":")
        env = dict(kv.split("=", 1) for kv in settings.split(",") if kv)
        out.append((name, env))
    return out


def _summary(values: list[float | None]) -> dict | None:
    vals = [v for v in values if v is not None]
    if not vals:
        return None
    return {"median": statistics.median(vals), "min": min(vals), "max": max(vals)}


def run_model(export: Path, args, work: Path, jpeg: bytes, log) -> dict:
    card = json.loads((export / "model_card.json").read_text())
    backbone, size = str(card.get("backbone")), int(card["input_size"])
    home = Path(tempfile.mkdtemp(prefix="bench-home-", dir=work))
    name = f"bench-{backbone}"
    model, version = harness.register(export, home, name)
    requests, frame = _payloads(work, size, jpeg)
    for key in ("v2 uint8", "v2 bytes"):
        requests[key].path = requests[key].path.format(name=name)
    servers: dict[str, harness.Server] = {}
    for variant, env in _variants(args.variant) if args.routes else []:
        env = {"THYROID_CAD_PROVIDERS": json.dumps(args.providers), **env}
        servers[variant] = harness.service_server(home, model, work, variant, env)
    if "mlflow" in args.peers:
        servers["mlflow"] = harness.mlflow_server(home, model, work)
    if "flask" in args.peers and (export / "model.keras").is_file():
        servers["flask-keras"] = harness.flask_server(export, work)
    providers = harness.session_providers(export / "model.onnx", args.providers)
    cells: dict[tuple, list[dict]] = {}
    startup: dict[str, float] = {}
    interrupted, profile = False, None
    try:
        for label, server in servers.items():
            log(f"[{backbone}] starting {label}")
            startup[label] = round(server.start().started_s, 2)
        for rep in range(args.repeats):
            for batch in args.raw_batches:
                log(f"[{backbone}] repeat {rep + 1}: raw onnxruntime batch {batch}")
                r = harness.measure_raw(
                    export / "model.onnx",
                    batch,
                    args.seconds,
                    max(3, args.min_requests // batch),  # images, not calls, as for servers
                    providers=args.providers,
                    frame=frame,
                )
                cells.setdefault(("raw onnxruntime", f"batch {batch}", None, batch), []).append(r)
            for c in args.concurrency:
                log(f"[{backbone}] repeat {rep + 1}: raw pipeline threads {c}")
                r = harness.measure_pipeline(
                    export / "model.onnx",
                    requests["v1 none"].body,
                    c,
                    args.seconds,
                    max(args.min_requests, 2 * c),
                )
                cells.setdefault(("raw pipeline", "decode+prepare+run", c, 1), []).append(r)
            for label, server in servers.items():
                routes = {"mlflow": ["mlflow"], "flask-keras": ["flask"]}.get(label, args.routes)
                for route in routes:
                    for c in args.concurrency:
                        log(f"[{backbone}] repeat {rep + 1}: {label} {route} c={c}")
                        r = harness.measure_load(
                            server,
                            requests[route],
                            c,
                            args.seconds,
                            min_requests=max(args.min_requests, 2 * c),
                            max_seconds=args.max_seconds,
                            warmup=min(c, 8),
                        )
                        cells.setdefault((label, route, c, 1), []).append(r)
        profile = _profile(servers, requests, args, work, backbone) if args.profile else None
    except (KeyboardInterrupt, SystemExit):
        interrupted = True  # keep what was measured: main writes it, then exits non-zero
    finally:
        for server in servers.values():
            server.stop()
        shutil.rmtree(home, ignore_errors=True)
    rows = []
    for (system, route, c, batch), reps in cells.items():
        rows.append(
            {
                "system": system,
                "route": route,
                "concurrency": c,
                "batch": batch,
                "repeats": reps,
                "summary": {
                    k: _summary([r.get(k) for r in reps])
                    for k in (
                        "images_per_s",
                        "p50_ms",
                        "p95_ms",
                        "p99_ms",
                        "cpu_s_per_image",
                        "peak_rss_mb",
                    )
                },
                "errors": sum(sum(r["errors"].values()) for r in reps),
            }
        )
    return {
        "backbone": backbone,
        "interrupted": interrupted,
        "input_size": size,
        "onnx_mb": round((export / "model.onnx").stat().st_size / 2**20, 1),
        "heatmap_shape": card.get("heatmap_shape"),
        "providers": providers,
        "registered": f"{name} v{version}",
        "startup_s": startup,
        "rows": rows,
        "targets": targets(rows, args.repeats, [v for v, _ in _variants(args.variant)]),
        "profile": profile,
    }


def _profile(servers, requests, args, work: Path, backbone: str) -> dict | None:
    """Where the service's time goes under /v1 (heatmap none and png) at concurrency 8.

    A separate instance of the service, run by sampled_serve.py (a stack sampler in the
    process), with the same settings as the measured one; its numbers are not reported.
    """
    measured = servers.get("service")
    if measured is None:
        return None
    out = {}
    for route in ("v1 none", "v1 png"):
        stacks = work / f"profile-{backbone}-{route.replace(' ', '-')}.txt"
        stacks.unlink(missing_ok=True)
        port = harness.free_port()
        script = str(Path(__file__).with_name("sampled_serve.py"))
        cmd = [sys.executable, script, str(stacks), "--port", str(port)]
        log = work / "logs" / "profiled.log"
        server = harness.Server("profiled", cmd, measured.env, port, "/readyz", log)
        server.headers = measured.headers
        try:
            server.start()
            os.kill(server.proc.pid, signal.SIGUSR1)  # count from here, not the imports
            harness.measure_load(server, requests[route], 8, args.seconds, 16, args.max_seconds, 8)
        finally:
            server.stop()
        if not stacks.is_file() or not stacks.stat().st_size:
            out[route] = {"error": f"no stacks written; see {log}"}
            continue
        out[route] = harness.profile_summary(stacks)
    return out


def _paired(rows: list[dict], a: tuple, b: tuple, metric: str, op) -> dict | None:
    """op(a, b) per repeat (a and b measured in the same repeat), summarised."""
    ra = next((r for r in rows if (r["system"], r["route"], r["concurrency"]) == a), None)
    rb = next((r for r in rows if (r["system"], r["route"], r["concurrency"]) == b), None)
    if ra is None or rb is None:
        return None
    vals = []
    for x, y in zip(ra["repeats"], rb["repeats"], strict=False):
        if x.get(metric) is not None and y.get(metric) is not None:
            vals.append(op(x[metric], y[metric]))
    return _summary(vals)


def _raw_best(rows: list[dict], repeats: int) -> list[float]:
    raw = [r for r in rows if r["system"] == "raw onnxruntime"]
    done = min((len(r["repeats"]) for r in raw), default=0)  # fewer if interrupted
    return [max(r["repeats"][i]["images_per_s"] for r in raw) for i in range(min(repeats, done))]


def targets(rows: list[dict], repeats: int, variants: list[str]) -> list[dict]:
    """The issue's five targets, per service variant, as paired ratios within repeats."""
    div = lambda x, y: x / y  # noqa: E731
    sub = lambda x, y: x - y  # noqa: E731
    out = []
    best = _raw_best(rows, repeats)
    c8 = max((c for r in rows if (c := r["concurrency"]) is not None and c <= 8), default=1)
    raw1 = ("raw onnxruntime", "batch 1", None)
    for v in variants:
        for route in ("v1 none", "v2 uint8"):
            row = next(
                (r for r in rows if (r["system"], r["route"], r["concurrency"]) == (v, route, c8)),
                None,
            )
            if row is not None:
                ratio = [x["images_per_s"] / b for x, b in zip(row["repeats"], best, strict=False)]
                out.append(
                    _target(
                        v,
                        f"throughput {route} c={c8} / best raw batch",
                        _summary(ratio),
                        TARGETS["throughput"],
                        ">=",
                    )
                )
        for route in ("v1 none", "v2 uint8"):
            s = _paired(rows, (v, route, 1), raw1, "p50_ms", sub)
            out.append(
                _target(
                    v,
                    f"p50 overhead {route} c=1 - raw batch 1 (ms)",
                    s,
                    TARGETS["overhead_ms"],
                    "<=",
                )
            )
        pipe = "raw pipeline", "decode+prepare+run"
        s = _paired(rows, (v, "v1 none", c8), (*pipe, c8), "images_per_s", div)
        out.append(_target(v, f"v1 none c={c8} / raw pipeline", s, TARGETS["vs_pipeline"], ">="))
        s = _paired(rows, (v, "v1 none", 1), (*pipe, 1), "p50_ms", sub)
        out.append(
            _target(
                v,
                "p50 overhead v1 none c=1 - raw pipeline (ms)",
                s,
                TARGETS["pipeline_overhead_ms"],
                "<=",
            )
        )
        s = _paired(rows, (v, "v1 png", 1), (v, "v1 none", 1), "p50_ms", lambda x, y: x / y - 1)
        out.append(_target(v, "png heatmap extra p50, c=1", s, TARGETS["png_extra"], "<="))
        s = _paired(
            rows, (v, "v1 png", c8), (v, "v1 none", c8), "cpu_s_per_image", lambda x, y: x / y - 1
        )
        out.append(
            _target(v, f"png heatmap extra CPU/image, c={c8}", s, TARGETS["png_extra"], "<=")
        )
        for peer, key, peer_route in (
            ("flask-keras", "vs_flask", "flask"),
            ("mlflow", "vs_mlflow", "mlflow"),
        ):
            for route in ("v1 none", "v1 png"):
                s = _paired(rows, (v, route, c8), (peer, peer_route, c8), "images_per_s", div)
                if s is not None:
                    out.append(
                        _target(v, f"{route} c={c8} / {peer} images/s", s, TARGETS[key], ">=")
                    )
    return out


def _target(variant: str, what: str, s: dict | None, goal: float, op: str) -> dict:
    met = None
    if s is not None:
        met = s["median"] >= goal if op == ">=" else s["median"] <= goal
    return {"variant": variant, "what": what, "goal": f"{op} {goal:g}", "value": s, "met": met}


# -- report ---------------------------------------------------------------------------
def _fmt(s: dict | None, digits: int = 1) -> str:
    if s is None:
        return "-"
    m, lo, hi = s["median"], s["min"], s["max"]
    if lo == hi:
        return f"{m:.{digits}f}"
    return f"{m:.{digits}f} ({lo:.{digits}f}-{hi:.{digits}f})"


def markdown(result: dict, chart: str | None) -> str:
    m = result["machine"]
    cfg = result["config"]
    lines = [
        f"Written by `benchmarks/serve.py` on {result['started'][:10]} in "
        f"{result['duration_s'] / 60:.1f} min: {m['logical_cores']} logical / "
        f"{m['physical_cores']} physical cores, {m['memory_gb']} GB, Python {m['python']}, "
        f"onnxruntime {m['onnxruntime']} (sessions ran on "
        f"{', '.join(sorted({p for x in result['models'].values() for p in x['providers']}))}), "
        f"load average at start {m['load_average_at_start']}. {cfg['repeats']} repeats of "
        f"the whole matrix, each cell at least {cfg['seconds']:g} s; numbers are the median "
        f"over repeats with the (min-max) range. Input: {result['image']}. "
        "Raw data: `docs/benchmarks-serve.json`.",
        "",
    ]
    for run in result.get("runs", [])[1:] if len(result.get("runs", [])) > 1 else []:
        lines[0] += (
            f" {', '.join(run['models'])}: its own run, started {run['started'][11:16]} UTC, "
            f"{run['config']['repeats']} repeat(s), variants {run['config']['variant'] or 'none'}, "
            f"load average {run['load_average_at_start']}."
        )
    if chart:
        lines += [f"![serving benchmark]({chart})", ""]
    for model in result["models"].values():
        lines += [
            f"### {model['backbone']} at {model['input_size']} px "
            f"({model['onnx_mb']} MB ONNX, heatmap {model['heatmap_shape']})",
            "",
            "| system | route | conc. | images/s | p50 ms | p95 ms | p99 ms | CPU s/image "
            "| peak RSS MB | errors |",
            "|---|---|---|---|---|---|---|---|---|---|",
        ]
        for r in model["rows"]:
            s = r["summary"]
            conc = "-" if r["concurrency"] is None else str(r["concurrency"])
            lines.append(
                f"| {r['system']} | {r['route']} | {conc} | {_fmt(s['images_per_s'])} "
                f"| {_fmt(s['p50_ms'])} | {_fmt(s['p95_ms'])} | {_fmt(s['p99_ms'])} "
                f"| {_fmt(s['cpu_s_per_image'], 4)} | {_fmt(s['peak_rss_mb'], 0)} | {r['errors']} |"
            )
        lines += ["", "| variant | target | goal | value | met |", "|---|---|---|---|---|"]
        for t in model["targets"]:
            met = {True: "yes", False: "**no**", None: "-"}[t["met"]]
            lines.append(
                f"| {t['variant']} | {t['what']} | {t['goal']} | {_fmt(t['value'], 2)} | {met} |"
            )
        for route, prof in (model.get("profile") or {}).items():
            if "error" in prof:
                lines += ["", f"Profile, service `{route}`: {prof['error']}"]
                continue
            top = ", ".join(f"`{f}` {pct:.0f} %" for f, pct in prof["service_inclusive_pct"][:14])
            lines += [
                "",
                f"Profile, service `{route}` at concurrency 8 ({prof['samples']} busy samples; "
                f"share of samples inside each function): {top}.",
            ]
        startup = ", ".join(f"{k} {v:.1f} s" for k, v in model["startup_s"].items())
        lines += ["", f"Time to ready: {startup}.", ""]
    return "\n".join(lines)


def chart(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = list(result["models"].values())
    fig, axes = plt.subplots(2, len(models), figsize=(7 * len(models), 9), squeeze=False)
    metrics = (
        ("images_per_s", "images/s", "#4477aa"),
        ("cpu_s_per_image", "CPU s per image (server process tree)", "#cc6677"),
    )
    for col, model in enumerate(models):
        c8 = max(
            (r["concurrency"] for r in model["rows"] if (r["concurrency"] or 99) <= 8), default=1
        )
        rows = [r for r in model["rows"] if r["concurrency"] in (None, c8)]
        labels = [
            (r["system"] if r["system"] == r["route"] else f"{r['system']} {r['route']}").replace(
                "raw onnxruntime", "raw ORT"
            )
            for r in rows
        ]
        y = np.arange(len(labels))
        for row, (key, name, colour) in enumerate(metrics):
            ax = axes[row][col]
            s = [r["summary"][key] for r in rows]
            med = [x["median"] for x in s]
            err = [[x["median"] - x["min"] for x in s], [x["max"] - x["median"] for x in s]]
            ax.barh(y, med, xerr=err, color=colour)
            ax.set_yticks(y, labels, fontsize=8)
            ax.invert_yaxis()
            ax.set_xlabel(f"{name} (servers at c={c8}; bars: min-max)")
            ax.set_title(f"{model['backbone']} {model['input_size']} px")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbones", default="efficientnetb0,resnet50,mobilenetv2")
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=3.0, help="least time per cell")
    parser.add_argument("--max-seconds", type=float, default=40.0, help="most time per cell")
    parser.add_argument("--min-requests", type=int, default=20)
    parser.add_argument("--concurrency", default="1,8,32")
    parser.add_argument("--raw-batches", default="1,8,32")
    parser.add_argument("--peers", default="mlflow,flask", help="comma list, or 'none'")
    parser.add_argument("--variant", action="append", default=[], metavar="NAME:K=V,...")
    parser.add_argument(
        "--routes", default=",".join(SERVICE_ROUTES), help="service routes, or 'none'"
    )
    parser.add_argument("--providers", default="CPUExecutionProvider", help="onnxruntime, in order")
    parser.add_argument("--profile", action="store_true", help="profile the service at c=8")
    parser.add_argument(
        "--export",
        type=Path,
        action="append",
        default=[],
        help="use this export folder (model.onnx + model_card.json) instead",
    )
    parser.add_argument("--quick", action="store_true", help="tiny model, 1 repeat, no peers")
    parser.add_argument("--gpu", action="store_true", help="batch 1..64 and the service on CUDA")
    parser.add_argument("--work", type=Path, default=ROOT / ".thyroid-cad" / "bench")
    parser.add_argument("--out", type=Path, default=None, help="folder for JSON, chart, md")
    parser.add_argument("--doc", type=Path, default=None, help="markdown file to update")
    parser.add_argument(
        "--render",
        type=Path,
        nargs="+",
        default=None,
        metavar="JSON",
        help="measure nothing: merge these result files (one model each) and write the "
        "table, chart and doc section from them",
    )
    args = parser.parse_args()
    harness.stop_on_sigterm()
    if args.render:
        return render(args.render, args.out or ROOT / "docs", args.doc)
    given = set(sys.argv)
    if args.quick:
        args.backbones, args.size, args.repeats = "tiny", 64, 1
        args.seconds, args.min_requests = min(args.seconds, 1.0), 4
        args.concurrency = "1,4" if "--concurrency" not in given else args.concurrency
        args.raw_batches = "1,4" if "--raw-batches" not in given else args.raw_batches
        args.peers = "none" if "--peers" not in given else args.peers
    if args.gpu:
        args.repeats, args.peers = 1, "none"
        args.raw_batches = "1,2,4,8,16,32,64" if "--raw-batches" not in given else args.raw_batches
        args.concurrency = "1,8,32,64" if "--concurrency" not in given else args.concurrency
        if "--providers" not in given:
            args.providers = "CUDAExecutionProvider,CPUExecutionProvider"
        if "--routes" not in given:
            args.routes = "v1 none,v1 png,v2 uint8"
    args.concurrency = [int(c) for c in args.concurrency.split(",")]
    args.raw_batches = [int(b) for b in args.raw_batches.split(",")]
    args.peers = [] if args.peers == "none" else args.peers.split(",")
    args.routes = [] if args.routes == "none" else args.routes.split(",")
    args.providers = args.providers.split(",")
    if args.out is None and args.doc is None and not (args.quick or args.gpu):
        args.out, args.doc = ROOT / "docs", ROOT / "docs" / "benchmarks.md"
    out = args.out or Path(tempfile.mkdtemp(prefix="bench-out-"))
    out.mkdir(parents=True, exist_ok=True)
    args.work.mkdir(parents=True, exist_ok=True)

    t0 = time.perf_counter()
    log = lambda msg: print(f"{time.perf_counter() - t0:7.1f}s {msg}", flush=True)  # noqa: E731
    jpeg, source = harness.sample_jpeg()
    result = {
        "kind": "thyroid-cad serving benchmark",
        "format": 1,
        "quick": args.quick,
        "started": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": harness.machine(),
        "image": source,
        "config": {
            k: getattr(args, k)
            for k in (
                "repeats",
                "seconds",
                "max_seconds",
                "min_requests",
                "concurrency",
                "raw_batches",
                "peers",
                "variant",
                "routes",
                "providers",
            )
        },
        "models": {},
    }
    exports = args.export or [
        harness.ensure_export(args.work, backbone, args.size)
        for backbone in args.backbones.split(",")
    ]
    for export in exports:
        model = run_model(export, args, args.work, jpeg, log)
        result["models"][model["backbone"]] = model
        result["duration_s"] = time.perf_counter() - t0
        # written after every model, so a run cut short still leaves what it measured
        (out / "benchmarks-serve.json").write_text(json.dumps(result, indent=1))
        if model["interrupted"]:
            break
    report(result, out, args.doc)
    if any(m["interrupted"] for m in result["models"].values()):
        sys.exit("interrupted: the report holds what was measured before")


def report(result: dict, out: Path, doc: Path | None) -> None:
    chart(result, out / "benchmarks-serve.png")
    text = markdown(result, "benchmarks-serve.png")
    (out / "benchmarks-serve.md").write_text(text)
    if doc:
        harness.write_section(doc, "Serving: this service against raw onnxruntime and peers", text)
    print(text)


def render(files: list[Path], out: Path, doc: Path | None) -> None:
    """One report from several runs (e.g. one per backbone), each model keeping its run."""
    runs = [json.loads(f.read_text()) for f in files]
    merged = {**runs[0], "models": {}, "runs": []}
    for run in runs:
        merged["runs"].append({k: run.get(k) for k in ("started", "duration_s", "config")})
        merged["runs"][-1]["load_average_at_start"] = run["machine"]["load_average_at_start"]
        merged["runs"][-1]["models"] = list(run["models"])
        merged["models"].update(run["models"])
    merged["duration_s"] = sum(r.get("duration_s") or 0 for r in runs)
    (out / "benchmarks-serve.json").write_text(json.dumps(merged, indent=1))
    report(merged, out, doc)


if __name__ == "__main__":
    main()
