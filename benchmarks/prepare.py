"""Image preparation speed: decode + crop to content + letterbox, before and after.

Times, in one process on the same JPEGs (560x360 thyroid frames from ../shared/data,
else a phantom frame of that size), the preparation the service runs on every upload:
the implementation this project had before (kept below as the baseline, not in the
product), today's (thyroid_cad.imaging + service.inference.decoding), and two alternatives that
were measured and not taken. It checks that today's output is identical to the
baseline's and relates the cost to one onnxruntime inference of the model (batch 1).

    python benchmarks/prepare.py [--backbone efficientnetb0] [--size 224] [--quick]
"""

from __future__ import annotations

import argparse
import io
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps
from scipy import ndimage

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness  # noqa: E402

ROOT = harness.ROOT


# -- the baseline: thyroid_cad/imaging.py and service/inference/decoding.py before this change ---
def old_to_rgb_array(image: Image.Image) -> np.ndarray:
    image = ImageOps.exif_transpose(image)
    return np.asarray(image.convert("RGB"), dtype=np.uint8)


def old_content_box(rgb: np.ndarray) -> tuple[int, int, int, int]:
    h, w = rgb.shape[:2]
    mask = rgb.mean(axis=2) > 12
    mask = ndimage.binary_opening(mask, structure=np.ones((7, 7)))
    labels, n = ndimage.label(mask)
    if n == 0:
        return 0, 0, h, w
    sizes = np.bincount(labels.ravel())[1:]
    biggest = int(np.argmax(sizes)) + 1
    rows = np.flatnonzero((labels == biggest).any(axis=1))
    cols = np.flatnonzero((labels == biggest).any(axis=0))
    top, bottom, left, right = rows[0], rows[-1] + 1, cols[0], cols[-1] + 1
    if (bottom - top) * (right - left) < 0.1 * h * w:
        return 0, 0, h, w
    return int(top), int(left), int(bottom), int(right)


def old_letterbox(rgb: np.ndarray, size: int) -> np.ndarray:
    h, w = rgb.shape[:2]
    scale = size / max(h, w)
    new_h, new_w = max(1, round(h * scale)), max(1, round(w * scale))
    top, left = (size - new_h) // 2, (size - new_w) // 2
    resized = Image.fromarray(rgb).resize(
        (new_w, new_h), Image.Resampling.BILINEAR, reducing_gap=2.0
    )
    out = np.zeros((size, size, 3), dtype=np.uint8)
    out[top : top + new_h, left : left + new_w] = np.asarray(resized)
    return out


def old_decode(data: bytes) -> np.ndarray:
    image = Image.open(io.BytesIO(data))
    image.load()
    return old_to_rgb_array(image)


def old_prepare(rgb: np.ndarray, size: int) -> np.ndarray:
    top, left, bottom, right = old_content_box(rgb)
    return old_letterbox(rgb[top:bottom, left:right], size)


# -- alternatives measured and not taken ----------------------------------------------
def draft_decode(data: bytes, size: int) -> np.ndarray:
    """Pillow's JPEG draft mode: libjpeg scales by 1/2, 1/4 or 1/8 in the DCT while
    decoding, keeping at least `size` pixels on the long side of the frame (the content
    box is smaller still, so this is the most a letterbox to `size` could allow)."""
    image = Image.open(io.BytesIO(data))
    w, h = image.size
    scale = size / max(w, h)
    image.draft("RGB", (int(np.ceil(w * scale)), int(np.ceil(h * scale))))
    image.load()
    return np.asarray(image.convert("RGB"))


# -- timing -----------------------------------------------------------------------------
def per_call_ms(fns: list, items: list, rounds: int) -> list[float]:
    """Median over rounds of the mean time per item (ms), for each function.

    The functions take turns within every round, so a noisy spell on a shared machine
    hits before and after alike instead of whichever ran during it.
    """
    for fn in fns:
        for item in items[:3]:
            fn(item)
    means: list[list[float]] = [[] for _ in fns]
    for _ in range(rounds):
        for i, fn in enumerate(fns):
            t0 = time.perf_counter()
            for item in items:
                fn(item)
            means[i].append((time.perf_counter() - t0) / len(items) * 1e3)
    return [statistics.median(m) for m in means]


def frames(n: int) -> tuple[list[bytes], str]:
    if harness.SEED_DATA.is_dir():
        out = []
        for path in sorted(harness.SEED_DATA.glob("*/*/*.jpg")):
            with Image.open(path) as im:
                if im.size == (560, 360) and im.mode == "RGB":
                    out.append(path.read_bytes())
            if len(out) == n:
                break
        return out, f"{len(out)} real 560x360 thyroid JPEGs (thyroid-seed)"
    jpeg, source = harness.sample_jpeg()
    return [jpeg], source


def inference_ms(onnx: Path, rounds: int) -> float:
    r = harness.measure_raw(onnx, 1, seconds=max(1.0, rounds * 0.2), min_calls=20)
    return r["p50_ms"]


def run(backbone: str, size: int, n: int, rounds: int, work: Path, export: Path | None) -> dict:
    from service.inference import decoding
    from thyroid_cad import imaging

    data, source = frames(n)
    limit = 40_000_000
    decoded = [decoding.decode(d, limit).rgb for d in data]
    ours_out = [imaging.prepare(rgb, size) for rgb in decoded]
    old_out = [old_prepare(old_decode(d), size) for d in data]
    identical = all(np.array_equal(a, b) for a, b in zip(ours_out, old_out, strict=True))
    max_diff = max(
        int(np.abs(a.astype(int) - b).max()) for a, b in zip(ours_out, old_out, strict=True)
    )
    draft_out = [imaging.prepare(draft_decode(d, size), size) for d in data]
    draft_diff = [
        np.abs(a.astype(int) - b).astype(float) for a, b in zip(draft_out, ours_out, strict=True)
    ]

    boxes = [old_content_box(rgb) for rgb in decoded]
    crops = [rgb[t:b, left:r] for rgb, (t, left, b, r) in zip(decoded, boxes, strict=True)]
    stages = {
        "decode": (
            lambda d: old_decode(d),
            lambda d: decoding.decode(d, limit),
            data,
        ),
        "decode (Pillow path of today's code)": (
            None,
            lambda d: imaging.to_rgb_array(imaging.open_image(d)),
            data,
        ),
        "content box": (old_content_box, imaging.content_box, decoded),
        "letterbox": (
            lambda c: old_letterbox(c, size),
            lambda c: imaging.letterbox(c, size),
            crops,
        ),
        "prepare (box + letterbox)": (
            lambda rgb: old_prepare(rgb, size),
            lambda rgb: imaging.prepare_with_geometry(rgb, size),
            decoded,
        ),
        "decode + prepare": (
            lambda d: old_prepare(old_decode(d), size),
            lambda d: imaging.prepare_with_geometry(decoding.decode(d, limit).rgb, size),
            data,
        ),
    }
    rows = {}
    for name, (before, after, items) in stages.items():
        if before is None:
            rows[name] = {"before_ms": None, "after_ms": per_call_ms([after], items, rounds)[0]}
        else:
            b, a = per_call_ms([before, after], items, rounds)
            rows[name] = {"before_ms": b, "after_ms": a}
    draft = per_call_ms([lambda d: imaging.prepare(draft_decode(d, size), size)], data, rounds)
    rows["draft decode + prepare (not taken)"] = {"before_ms": None, "after_ms": draft[0]}
    export = export or harness.ensure_export(work, backbone, size)
    infer = inference_ms(export / "model.onnx", rounds)
    return {
        "images": source,
        "size": size,
        "backbone": backbone,
        "inference_b1_p50_ms": infer,
        "identical_to_baseline": identical,
        "max_abs_diff_vs_baseline": max_diff,
        "draft_mode_diff": {
            "max": float(max(d.max() for d in draft_diff)),
            "mean": float(np.mean([d.mean() for d in draft_diff])),
        },
        "stages": rows,
    }


def markdown(r: dict) -> str:
    infer = r["inference_b1_p50_ms"]
    lines = [
        f"Written by `benchmarks/prepare.py`: {r['images']}, prepared for {r['backbone']} at "
        f"{r['size']} px, all in one process; per-image time is the median over rounds of the "
        f"mean over the images. The baseline is the code before this change, kept in the "
        f"benchmark file. Today's output is "
        f"{'identical to' if r['identical_to_baseline'] else 'NOT identical to'} the "
        f"baseline's (max difference {r['max_abs_diff_vs_baseline']} grey levels). "
        f"Inference of the same model in the same run (onnxruntime, batch 1, p50): "
        f"{infer:.2f} ms. Before and after take turns within every round; the letterbox "
        f"code did not change, so its before/after ratio shows the run's noise.",
        "",
        "| stage | before ms | after ms | speed-up | after / inference |",
        "|---|---|---|---|---|",
    ]
    for name, s in r["stages"].items():
        b, a = s["before_ms"], s["after_ms"]
        speed = f"{b / a:.1f}x" if b else "-"
        lines.append(
            f"| {name} | {'-' if b is None else f'{b:.2f}'} | {a:.2f} | {speed} | {a / infer:.0%} |"
        )
    d = r["draft_mode_diff"]
    lines += [
        "",
        f"Draft mode (libjpeg's DCT scaling while decoding) changes the model's input by up to "
        f"{d['max']:.0f} grey levels (mean {d['mean']:.2f}) against the full decode, so a "
        f"model trained on full decodes would be served different pixels; it is not used.",
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbone", default="efficientnetb0")
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--images", type=int, default=40)
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--quick", action="store_true", help="tiny model, few images")
    parser.add_argument("--export", type=Path, default=None, help="export folder to time")
    parser.add_argument("--work", type=Path, default=ROOT / ".thyroid-cad" / "bench")
    parser.add_argument("--out", type=Path, default=None, help="JSON result file")
    parser.add_argument("--doc", type=Path, default=None, help="markdown file to update")
    args = parser.parse_args()
    if args.quick:
        args.backbone, args.size, args.images, args.rounds = "tiny", 64, 4, 3
    elif args.doc is None:
        args.doc = ROOT / "docs" / "benchmarks.md"
    if args.export:
        card = json.loads((args.export / "model_card.json").read_text())
        args.backbone, args.size = str(card.get("backbone")), int(card["input_size"])
    r = run(args.backbone, args.size, args.images, args.rounds, args.work, args.export)
    if args.out:
        args.out.write_text(json.dumps(r, indent=1))
    text = markdown(r)
    if args.doc:
        harness.write_section(args.doc, "Image preparation (per upload)", text)
    print(text)


if __name__ == "__main__":
    main()
