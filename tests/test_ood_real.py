"""The OOD score on real shifts (docs/results.md, "Out-of-distribution checks").

A tiny model is trained on thyroid-seed with one source (scanner geometry) left out,
exported with its OOD reference, and its `ood_score` compared between the in-source
test images it never saw and: the held-out source, chest radiographs (chest-xray) and
breast ultrasound (breast-us). Sized for CPU (64 px, a few epochs).

`OOD_REPORT=path.json pytest -m "shared_data and slow" tests/test_ood_real.py` also
writes every number to that file.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
from conftest import SHARED_DATA, _isolate

from thyroid_cad import imaging, metrics, modality

pytestmark = [pytest.mark.slow, pytest.mark.shared_data]

SIZE = 64
PER_SHIFT = 150
FOLDS = ("560x360", "300x225", "other")


def _shared(name: str) -> Path:
    path = SHARED_DATA / name
    if not path.is_dir():
        pytest.skip(f"real data not available: {path} is absent (only on dev and CI machines)")
    return path


def _sample(paths: list[Path], n: int, seed: int = 0) -> list[Path]:
    paths = sorted(paths)
    if len(paths) <= n:
        return paths
    rng = np.random.default_rng(seed)
    return [paths[i] for i in sorted(rng.choice(len(paths), n, replace=False))]


def _images(folder: Path) -> list[Path]:
    return [p for p in folder.rglob("*") if p.suffix.lower() in imaging.IMAGE_EXTENSIONS]


def _score(export: Path, paths: list[Path]) -> tuple[np.ndarray, np.ndarray]:
    """(ood_score, modality flag) of every image, prepared as the service prepares it."""
    sess = ort.InferenceSession(str(export / "model.onnx"), providers=["CPUExecutionProvider"])
    frames = [imaging.load_prepared(p, SIZE) for p in paths]
    scores = np.concatenate(
        [
            sess.run(["ood_score"], {"image": np.stack(frames[i : i + 64])})[0]
            for i in range(0, len(frames), 64)
        ]
    )
    not_us = np.array([not modality.check(f).ultrasound_like for f in frames])
    return scores, not_us


def _summary(ref: np.ndarray, shifted, threshold: float) -> dict:
    scores, not_us = shifted
    y = np.r_[np.zeros(len(ref)), np.ones(len(scores))]
    return {
        "n": int(len(scores)),
        "auroc": round(metrics.roc_auc(y, np.r_[ref, scores]), 3),
        "flagged_by_score": round(float(np.mean(scores > threshold)), 3),
        "flagged_with_modality": round(float(np.mean((scores > threshold) | not_us)), 3),
        "median_score": round(float(np.median(scores)), 2),
    }


@pytest.fixture(scope="module")
def report():
    out: dict = {}
    yield out
    if os.environ.get("OOD_REPORT"):
        Path(os.environ["OOD_REPORT"]).write_text(json.dumps(out, indent=1))


@pytest.mark.parametrize("held_out", FOLDS)
def test_held_out_source_radiographs_and_breast_us(held_out, report, tmp_path_factory):
    seed_root = _shared("thyroid-seed")
    chest = _sample(_images(_shared("chest-xray") / "test"), PER_SHIFT)
    breast = _sample(_images(_shared("breast-us") / "images"), PER_SHIFT)
    from training import export, loso, sources, tracking
    from training.audit import inspect_all
    from training.data import scan
    from training.train import TrainConfig, train

    home = tmp_path_factory.mktemp("ood-real")
    with pytest.MonkeyPatch.context() as mp:
        _isolate(mp, home)
        run_id = train(
            TrainConfig(
                data=str(seed_root),
                backbone="tiny",
                epochs=10,
                image_size=SIZE,
                batch_size=32,
                holdout_source=held_out,
                experiment="ood-real",
            )
        )
        tracking.setup_uri()
        out = home / "export"
        card = export.export_run(run_id, out)
        import mlflow

        split = json.loads(
            Path(
                mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path="split.json")
            ).read_text()
        )["assignment"]
        fold = json.loads(
            Path(
                mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path="holdout.json")
            ).read_text()
        )
    dataset = scan(seed_root)
    src = dict(
        zip(
            (r.rel for r in dataset.records),
            sources.assign_sources(dataset, inspect_all(dataset)),
            strict=True,
        )
    )
    in_rels, held_rels = loso.shift_sets(split, fold["test"], src, held_out)
    in_source = [seed_root / r for r in in_rels]
    held = [seed_root / r for r in held_rels]
    threshold = card["ood"]["threshold"]
    ref, ref_not_us = _score(out, in_source)
    result = {
        "threshold": round(threshold, 2),
        "validation": card["ood"]["validation"],
        "in_source_test": {
            "n": len(in_source),
            "flagged_by_score": round(float(np.mean(ref > threshold)), 3),
            "flagged_with_modality": round(float(np.mean((ref > threshold) | ref_not_us)), 3),
            "median_score": round(float(np.median(ref)), 2),
        },
        f"held_out_{held_out}": _summary(ref, _score(out, held), threshold),
        "chest_xray": _summary(ref, _score(out, chest), threshold),
        "breast_us": _summary(ref, _score(out, breast), threshold),
        "test_auc": card["metrics"]["test"].get("auc"),
    }
    report[f"fold_{held_out}"] = result
    # The reference itself: roughly the designed 5 % of validation-like images flagged.
    assert result["in_source_test"]["flagged_by_score"] <= 0.25, result
    # Radiographs are a different modality altogether: the score must separate them.
    assert result["chest_xray"]["auroc"] > 0.9, result
    # Held-out source and breast ultrasound: measured and reported (docs/results.md),
    # not asserted beyond being measured: a tiny model's features do not separate them.
    assert np.isfinite(result[f"held_out_{held_out}"]["auroc"])
    assert np.isfinite(result["breast_us"]["auroc"])
