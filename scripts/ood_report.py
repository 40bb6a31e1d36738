"""The OOD score of a model's leave-one-source-out folds on real shifts (docs/results.md).

    python scripts/ood_report.py RUN_ID --data ../shared/data/thyroid-seed \
        --chest ../shared/data/chest-xray --breast ../shared/data/breast-us

RUN_ID is a training run trained with `loso: true`: its tags name one fold run per
held-out source. Each fold is exported (with its OOD reference, computed on the fold's
own training images) and scored through the service's path (`score_bytes`: decoding,
the bundled localiser's crop for ROI models, onnxruntime, `service.inference.safety`), on the
in-source test images the fold never saw (the reference), the held-out source, chest
radiographs and breast ultrasound. tests/test_ood_real.py asserts the same on a tiny
whole-frame model; this script measures any configuration, ROI models included.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import mlflow
import numpy as np

from registry import store
from service.inference import models as serving
from service.inference import pipeline as inference
from thyroid_cad import imaging, metrics
from training import export, loso, sources, tracking
from training.audit import inspect_all
from training.data import scan

PER_SHIFT = 150


def _sample(folder: Path, n: int = PER_SHIFT) -> list[Path]:
    paths = sorted(p for p in folder.rglob("*") if p.suffix.lower() in imaging.IMAGE_EXTENSIONS)
    if len(paths) <= n:
        return paths
    rng = np.random.default_rng(0)
    return [paths[i] for i in sorted(rng.choice(len(paths), n, replace=False))]


def _artifact(run_id: str, path: str) -> dict:
    local = mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=path)
    return json.loads(Path(local).read_text())


def _scores(model, paths: list[Path]) -> np.ndarray:
    """(ood score, flagged) per image, as /v1/predict computes them."""
    out = []
    for p in paths:
        ood = inference.score_bytes(model, p.read_bytes(), 50_000_000).ood
        out.append((ood.score, not ood.in_distribution))
    return np.array(out, dtype=float)


def _summary(ref: np.ndarray, shifted: np.ndarray) -> dict:
    y = np.r_[np.zeros(len(ref)), np.ones(len(shifted))]
    return {
        "n": len(shifted),
        "auroc": round(metrics.roc_auc(y, np.r_[ref[:, 0], shifted[:, 0]]), 3),
        "flagged": round(float(shifted[:, 1].mean()), 3),
    }


def fold_report(fold_run: str, held_out: str, root: Path, src: dict, shifts: dict, tmp: Path):
    card = export.export_run(fold_run, tmp / held_out)
    resolved = store.Resolved(held_out, 0, None, tmp / held_out / "model.onnx", card, False)
    model = serving.load(resolved, serving.Runtime(providers=("CPUExecutionProvider",)))
    split = _artifact(fold_run, "split.json")["assignment"]
    fold = _artifact(fold_run, "holdout.json")
    in_rels, held_rels = loso.shift_sets(split, fold["test"], src, held_out)
    in_source, held = [root / r for r in in_rels], [root / r for r in held_rels]
    try:
        ref = _scores(model, in_source)
        result = {
            "threshold": round(card["ood"]["threshold"], 2),
            "in_source_test": {"n": len(ref), "flagged": round(float(ref[:, 1].mean()), 3)},
            "held_out_source": _summary(ref, _scores(model, held)),
            **{name: _summary(ref, _scores(model, paths)) for name, paths in shifts.items()},
        }
    finally:
        model.close()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_id")
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--chest", type=Path, required=True)
    parser.add_argument("--breast", type=Path, required=True)
    parser.add_argument("--out", type=Path, help="JSON file for every number")
    args = parser.parse_args()
    tracking.setup_uri()
    root = args.data.resolve()
    dataset = scan(root)
    src = dict(
        zip(
            (r.rel for r in dataset.records),
            sources.assign_sources(dataset, inspect_all(dataset)),
            strict=True,
        )
    )
    shifts = {
        "chest_xray": _sample(args.chest / "test"),
        "breast_us": _sample(args.breast / "images"),
    }
    tags = mlflow.get_run(args.run_id).data.tags
    folds = {k[len("loso_run_") :]: v for k, v in tags.items() if k.startswith("loso_run_")}
    if not folds:
        raise SystemExit(f"run {args.run_id} has no leave-one-source-out folds (loso_run_* tags)")
    report = {}
    with tempfile.TemporaryDirectory() as tmp:
        for held_out, fold_run in sorted(folds.items()):
            report[held_out] = fold_report(fold_run, held_out, root, src, shifts, Path(tmp))
    text = json.dumps(report, indent=1)
    if args.out:
        args.out.write_text(text + "\n")
    print(text)  # noqa: T201 - a script's result


if __name__ == "__main__":
    main()
