"""Figures for docs/results.md: ROC per image source and Grad-CAM on test images.

    python scripts/results_figures.py RUN_ID --data ../shared/data/thyroid-seed --out docs/figures

Exports the run's model to ONNX (an ensemble parent: its members as one graph, as
`thyroid-cad export` does) and scores its own test split (split.json of the run)
through the service's scoring path (`service.inference.pipeline.score_bytes`: decoding, the
bundled localiser's ROI for ROI models, onnxruntime), exactly as `/v1/predict` does
for an image sent without a box. Writes `roc_by_source.png`, `heatmaps.png` and
`scores.json` (per-source AUC with bootstrap 95% CI, from training.evaluate).
"""

from __future__ import annotations

import argparse
import json
import tempfile
from collections import Counter
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from sklearn.metrics import roc_curve

from registry import store
from service.inference import models as serving
from service.inference import pipeline as inference
from training import ensemble, evaluate, export, sources, tracking
from training.audit import inspect_all
from training.data import scan


def _score_test_split(run_id: str, root: Path, tmp: Path):
    import mlflow

    card = ensemble.export_runs([run_id], tmp / "export")
    source = export.model_run(ensemble.member_runs([run_id])[0])  # members share the split
    split = json.loads(
        Path(
            mlflow.artifacts.download_artifacts(run_id=source, artifact_path="split.json")
        ).read_text()
    )["assignment"]
    resolved = store.Resolved("figures", 0, None, tmp / "export" / "model.onnx", card, False)
    model = serving.load(resolved, serving.Runtime(providers=("CPUExecutionProvider",)))
    dataset = scan(root)
    src = sources.assign_sources(dataset, inspect_all(dataset))
    positive = card["class_names"].index(card.get("positive_class", "malignant"))
    rows = []
    for i, record in enumerate(dataset.records):
        rel = record.path.relative_to(root).as_posix()
        if split.get(rel) != "test":
            continue
        scored = inference.score_bytes(model, record.path.read_bytes(), 50_000_000)
        rows.append(
            {
                "image": rel,
                "source": src[i],
                "label": int(dataset.labels[i] == positive),
                "score": float(scored.probabilities[positive]),
                "scored": scored,
            }
        )
    model.close()
    return card, rows


def _roc_figure(rows: list[dict], title: str, out: Path) -> dict:
    fig = Figure(figsize=(5.2, 5))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    ax.plot([0, 1], [0, 1], ls=":", c="grey")
    summary = {}
    groups = {"pooled": rows} | {
        s: [r for r in rows if r["source"] == s] for s in sorted({r["source"] for r in rows})
    }
    for name, part in groups.items():
        y = np.array([r["label"] for r in part])
        s = np.array([r["score"] for r in part])
        if len(set(y)) < 2:
            continue
        auc, low, high = evaluate.bootstrap_auc_ci(y, s, seed=0)
        summary[name] = {"n": len(part), "auc": auc, "ci_low": low, "ci_high": high}
        fpr, tpr, _ = roc_curve(y, s)
        ax.plot(
            fpr,
            tpr,
            lw=2.2 if name == "pooled" else 1.4,
            label=f"{name} (n={len(part)}): {auc:.2f} [{low:.2f}, {high:.2f}]",
        )
    ax.set(xlabel="1 - specificity", ylabel="sensitivity", title=title)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    return summary


def _heatmap_figure(rows: list[dict], positive: int, out: Path, n: int = 8) -> None:
    rng = np.random.default_rng(0)
    picked = []
    for label in (1, 0):  # malignant first; round-robin over the sources in name order
        pool = [r for r in rows if r["label"] == label]
        rng.shuffle(pool)
        turn: Counter[str] = Counter()
        keyed = []
        for r in reversed(pool):
            keyed.append(((turn[r["source"]], r["source"]), r))
            turn[r["source"]] += 1
        picked += [r for _, r in sorted(keyed, key=lambda kr: kr[0])[: n // 2]]
    fig = Figure(figsize=(2.4 * len(picked) // 2, 5.8))
    FigureCanvasAgg(fig)
    for k, r in enumerate(picked):
        ax = fig.add_subplot(2, (len(picked) + 1) // 2, k + 1)
        scored = r["scored"]
        square = scored.prepared.square
        ax.imshow(square)
        if scored.heatmap is not None:
            ax.imshow(
                scored.heatmap[..., positive],
                cmap="jet",
                interpolation="bilinear",
                alpha=0.4,
                extent=(0, square.shape[1], square.shape[0], 0),
            )
        truth = "malignant" if r["label"] else "benign"
        ax.set_title(f"{r['source']} · {truth}\np(malignant)={r['score']:.2f}", fontsize=7)
        ax.axis("off")
    has_map = any(r["scored"].heatmap is not None for r in picked)
    fig.suptitle(
        "Model input (the nodule crop for ROI models)"
        + (" with Grad-CAM for 'malignant'" if has_map else "; this model has no heatmap output"),
        fontsize=9,
    )
    fig.tight_layout()
    fig.savefig(out, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_id")
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--out", type=Path, default=Path("docs/figures"))
    parser.add_argument("--prefix", default="", help="file name prefix, e.g. 'best-'")
    args = parser.parse_args()
    tracking.setup_uri()
    args.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        card, rows = _score_test_split(args.run_id, args.data.resolve(), Path(tmp))
        positive = card["class_names"].index(card.get("positive_class", "malignant"))
        title = f"Test split, run {args.run_id[:8]}"
        summary = _roc_figure(rows, title, args.out / f"{args.prefix}roc_by_source.png")
        _heatmap_figure(rows, positive, args.out / f"{args.prefix}heatmaps.png")
    (args.out / f"{args.prefix}scores.json").write_text(json.dumps(summary, indent=1) + "\n")
    print(json.dumps(summary, indent=1))  # noqa: T201 - a script's result


if __name__ == "__main__":
    main()
