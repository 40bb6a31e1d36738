"""Soak: the service under steady load for minutes: errors, latency over time, RSS growth.

Starts `thyroid-cad serve` on an exported model (as benchmarks/serve.py does: registered
in a throwaway SQLite MLflow store, audit and keys on), drives one route at a fixed
concurrency from a separate process over loopback, bounded in time, and reports per
time window the requests, errors, images/s and p50/p95/p99 latency, and the server's
resident memory over the run (start, peak, end, and the slope over the second half,
after warm-up allocations).

    python benchmarks/soak.py                       # 10 minutes at concurrency 16
    python benchmarks/soak.py --seconds 60 --concurrency 4 --route "v2 uint8"
    python benchmarks/soak.py --quick --out DIR     # seconds, tiny model (the test's run)
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness  # noqa: E402
import serve  # noqa: E402

ROOT = harness.ROOT


def windows(records: list, width: float, images: int, elapsed: float) -> list[dict]:
    """Per-window counts and latency percentiles from (t_end, latency_ms, status) records."""
    if not records:
        return []
    n = max(1, int(np.ceil(max(t for t, _, _ in records) / width)))
    by_window: list[list] = [[] for _ in range(n)]
    for t, lat, s in records:
        by_window[min(int(t // width), n - 1)].append((lat, s))
    out = []
    for i, rows in enumerate(by_window):
        lo = i * width
        span = min(width, elapsed - lo) if i == n - 1 else width
        ok = [lat for lat, s in rows if s == 200]
        errors: dict[str, int] = {}
        for _, s in rows:
            if s != 200:
                errors[str(s)] = errors.get(str(s), 0) + 1
        out.append(
            {
                "start_s": lo,
                "requests": len(rows),
                "errors": errors,
                "images_per_s": len(ok) * images / span if span > 0 else 0.0,
                **harness.percentiles(ok),
            }
        )
    return out


def memory(series: list) -> dict:
    if not series:
        return {}
    t = np.array([x for x, _ in series])
    mb = np.array([y for _, y in series])
    half = t >= t[-1] / 2
    slope = float(np.polyfit(t[half], mb[half], 1)[0] * 60) if half.sum() >= 3 else None
    return {
        "start_mb": float(mb[0]),
        "peak_mb": float(mb.max()),
        "end_mb": float(mb[-1]),
        "growth_mb": float(mb[-1] - mb[0]),
        "second_half_slope_mb_per_min": slope,
    }


def markdown(r: dict) -> str:
    m = r["memory"]
    slope = m.get("second_half_slope_mb_per_min")
    lines = [
        f"Written by `benchmarks/soak.py` on {r['started'][:10]}: {r['backbone']} at "
        f"{r['input_size']} px, `{r['route']}` at concurrency {r['concurrency']} for "
        f"{r['elapsed_s']:.0f} s ({r['requests']} requests, {r['errors_total']} errors"
        f"{': ' + json.dumps(r['errors']) if r['errors'] else ''}). Server RSS: "
        f"{m['start_mb']:.0f} MB after warm-up, peak {m['peak_mb']:.0f} MB, end "
        f"{m['end_mb']:.0f} MB (growth {m['growth_mb']:+.0f} MB; second-half slope "
        f"{'-' if slope is None else f'{slope:+.2f}'} MB/min).",
        "",
        "| window start s | requests | errors | images/s | p50 ms | p95 ms | p99 ms |",
        "|---|---|---|---|---|---|---|",
    ]
    for w in r["windows"]:
        p = [w[k] for k in ("p50_ms", "p95_ms", "p99_ms")]
        cells = " | ".join("-" if v is None else f"{v:.0f}" for v in p)
        errs = sum(w["errors"].values())
        lines.append(
            f"| {w['start_s']:.0f} | {w['requests']} | {errs} | {w['images_per_s']:.1f} | {cells} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=600.0)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--window", type=float, default=30.0, help="seconds per report row")
    parser.add_argument("--route", default="v1 png", choices=serve.SERVICE_ROUTES)
    parser.add_argument("--backbone", default="efficientnetb0")
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--export", type=Path, default=None, help="export folder to serve")
    parser.add_argument("--variant", default="", metavar="K=V,...", help="service settings")
    parser.add_argument("--quick", action="store_true", help="tiny model, a few seconds")
    parser.add_argument("--work", type=Path, default=ROOT / ".thyroid-cad" / "bench")
    parser.add_argument("--out", type=Path, default=None, help="folder for soak.json / soak.md")
    parser.add_argument("--doc", type=Path, default=None, help="markdown file to update")
    args = parser.parse_args()
    if args.quick:
        args.backbone, args.size = "tiny", 64
        args.seconds = min(args.seconds, 4.0)
        args.concurrency = min(args.concurrency, 4)
        args.window = min(args.window, 1.0)
    args.work.mkdir(parents=True, exist_ok=True)
    export = args.export or harness.ensure_export(args.work, args.backbone, args.size)
    card = json.loads((export / "model_card.json").read_text())
    size = int(card["input_size"])
    home = Path(tempfile.mkdtemp(prefix="soak-home-", dir=args.work))
    env = dict(kv.split("=", 1) for kv in args.variant.split(",") if kv)
    started = datetime.now(UTC).isoformat(timespec="seconds")
    try:
        model, _ = harness.register(export, home, "soak")
        jpeg, source = harness.sample_jpeg()
        requests, _ = serve._payloads(args.work, size, jpeg)
        request = requests[args.route]
        request.path = request.path.format(name="soak")
        server = harness.service_server(home, model, args.work, "soak", env).start()
        try:
            r = harness.measure_load(
                server,
                request,
                args.concurrency,
                args.seconds,
                min_requests=1,
                max_seconds=args.seconds + 60,
                warmup=args.concurrency,
                windows_s=args.window,
            )
        finally:
            server.stop()
    finally:
        shutil.rmtree(home, ignore_errors=True)
    result = {
        "kind": "thyroid-cad soak",
        "started": started,
        "machine": harness.machine(),
        "image": source,
        "backbone": card.get("backbone"),
        "input_size": size,
        "route": args.route,
        "concurrency": args.concurrency,
        "settings": env,
        "elapsed_s": r["elapsed_s"],
        "requests": r["requests"],
        "errors": r["errors"],
        "errors_total": sum(r["errors"].values()),
        "overall": {k: r[k] for k in ("images_per_s", "p50_ms", "p95_ms", "p99_ms")},
        "windows": windows(r["records"], args.window, request.images, r["elapsed_s"]),
        "memory": memory(r["rss_mb_series"]),
        "rss_mb_series": r["rss_mb_series"],
    }
    text = markdown(result)
    out = args.out or Path(tempfile.mkdtemp(prefix="soak-"))
    out.mkdir(parents=True, exist_ok=True)
    (out / "soak.json").write_text(json.dumps(result, indent=1))
    (out / "soak.md").write_text(text)
    if args.doc:
        harness.write_section(args.doc, "Soak", text)
    print(text)
    print(f"results in {out}", file=sys.stderr)


if __name__ == "__main__":
    main()
