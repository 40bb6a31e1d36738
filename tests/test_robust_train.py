"""Source-robust training on the phantom: within-source weights, LOSO folds, robust score.

The phantom has one source; a manifest with a `source` column splits its cases into
three confounded sources (a: mostly malignant, b and c: mostly benign).
"""

from __future__ import annotations

import csv
import json
import zlib

import mlflow
import pytest
from mlflow.tracking import MlflowClient

from thyroid_cad import settings
from training import sources
from training.train import TrainConfig, train


def _source_of_case(case_id: str, malignant: bool) -> str:
    h = zlib.crc32(case_id.encode()) % 10
    if malignant:
        return "a" if h < 6 else ("b" if h < 8 else "c")
    return "a" if h < 2 else ("b" if h < 6 else "c")


@pytest.fixture(scope="module")
def multi_source_manifest(phantom_root, tmp_path_factory):
    rows = list(csv.DictReader(open(phantom_root / "manifest.csv")))
    path = tmp_path_factory.mktemp("sources") / "manifest.csv"
    with open(path, "w", newline="") as f:
        out = csv.writer(f)
        out.writerow(["image", "case_id", "source"])
        for r in rows:
            src = _source_of_case(r["case_id"], r["image"].startswith("malignant"))
            out.writerow([r["image"], r["case_id"], src])
    return path


def _cfg(phantom_root, manifest, **kw) -> TrainConfig:
    base = dict(
        data=str(phantom_root),
        manifest=str(manifest),
        image_size=32,
        epochs=2,
        batch_size=32,
        test_fraction=0.3,  # ~40 test images per source: enough for per-source AUCs
        experiment="tests-robust",
        loso=True,
    )
    return TrainConfig(**{**base, **kw})


def _artifact(run_id: str, path: str) -> dict:
    local = mlflow.artifacts.download_artifacts(
        run_id=run_id, artifact_path=path, tracking_uri=settings.tracking_uri()
    )
    return json.loads(open(local).read())


@pytest.fixture(scope="module")
def loso_run(session_home, phantom_root, multi_source_manifest):
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("THYROID_CAD_HOME", str(session_home))
        mp.delenv("MLFLOW_TRACKING_URI", raising=False)
        return train(
            _cfg(phantom_root, multi_source_manifest, class_weights="source", scanner_augment=True)
        )


def test_run_with_loso_logs_sources_folds_and_the_robust_score(home, loso_run):
    client = MlflowClient(settings.tracking_uri())
    run = client.get_run(loso_run)
    p, m, tags = run.data.params, run.data.metrics, run.data.tags
    assert (p["class_weights"], p["scanner_augment"], p["loso"]) == ("source", "True", "True")
    assert p["sources"] == "a,b,c"
    table = _artifact(loso_run, "sources.json")
    share = {s: c["malignant"] / (c["malignant"] + c["benign"]) for s, c in table["train"].items()}
    assert share["a"] > max(share["b"], share["c"]) + 0.2  # source and label confounded

    within = sources.per_source(m, "test_auc_source_")
    assert set(within) == {"a", "b", "c"}
    assert all(v["n"] >= sources.MIN_SOURCE_IMAGES for v in within.values())
    lo, hi = m["test_shortcut_auc_ci_low"], m["test_shortcut_auc_ci_high"]
    assert lo <= m["test_shortcut_auc"] <= hi and m["test_shortcut_auc"] > 0.6  # sees the confound

    held = tags["loso_sources"].split(",")
    assert held and set(held) <= {"a", "b", "c"}
    loso = sources.per_source(m, "loso_auc_")
    assert set(loso) == set(held)
    assert m["loso_auc_min"] == min(v["auc"] for v in loso.values())
    expected = min([v["auc"] for v in within.values()] + [v["auc"] for v in loso.values()])
    assert m["robust_score"] == pytest.approx(expected)
    val_within = [v["auc"] for v in sources.per_source(m, "val_auc_source_").values()]
    assert m["val_robust_score"] == pytest.approx(min(val_within + [m["loso_auc_min"]]))

    main_split = _artifact(loso_run, "split.json")["assignment"]
    for source in held:
        fold = client.get_run(tags[f"loso_run_{source}"])
        assert fold.data.tags["mlflow.parentRunId"] == loso_run
        assert fold.data.tags["holdout_source"] == source
        assert fold.data.params["loso"] == "False"
        parts = _artifact(fold.info.run_id, "holdout.json")
        assert len(parts["test"]) == m[f"loso_n_{source}"] >= sources.MIN_SOURCE_IMAGES
        assert {main_split[rel] for rel in parts["test"]} <= {"train", "val"}  # no test image
        fold_sources = _artifact(fold.info.run_id, "sources.json")
        assert set(fold_sources["test"]) == {source}
        assert source not in set(fold_sources["train"]) | set(fold_sources["val"])
        assert fold.data.metrics["test_auc"] == m[f"loso_auc_{source}"]


def test_feature_classifier_folds_start_from_the_networks_folds(
    home, loso_run, phantom_root, multi_source_manifest
):
    client = MlflowClient(settings.tracking_uri())
    rf = train(
        _cfg(
            phantom_root,
            multi_source_manifest,
            classifier="rf",
            strategy="frozen",
            init_from=loso_run,
            class_weights="source",
        )
    )
    tags = client.get_run(rf).data.tags
    network = client.get_run(loso_run).data.tags
    held = network["loso_sources"].split(",")
    assert tags["loso_sources"].split(",") == held
    for source in held:
        fold = client.get_run(tags[f"loso_run_{source}"])
        assert fold.data.tags["init_from"] == network[f"loso_run_{source}"]
    assert "loso_auc_min" in client.get_run(rf).data.metrics


def test_loso_is_skipped_when_the_start_saw_every_source(
    home, tiny_run, phantom_root, multi_source_manifest
):
    # tiny_run trained on these very images without LOSO folds: a fold starting from it
    # would have seen the source it holds out.
    run_id = train(
        _cfg(
            phantom_root,
            multi_source_manifest,
            classifier="rf",
            strategy="frozen",
            init_from=tiny_run,
        )
    )
    run = MlflowClient(settings.tracking_uri()).get_run(run_id)
    skipped = [k for k in run.data.tags if k.startswith("loso_skipped_")]
    assert skipped and "saw this source" in run.data.tags[skipped[0]]
    assert not any(k.startswith("loso_auc") for k in run.data.metrics)
    assert "robust_score" in run.data.metrics  # within-source AUCs alone


def test_single_source_run_has_a_chance_floor_and_robust_score_equal_to_its_auc(home, tiny_run):
    m = MlflowClient(settings.tracking_uri()).get_run(tiny_run).data.metrics
    assert m["test_shortcut_auc"] == m["test_shortcut_auc_ci_low"] == 0.5
    assert m["test_shortcut_auc_ci_high"] == 0.5
    assert m["robust_score"] == m["test_auc_source_256x256"] == m["test_auc"]
    assert not any(k.startswith("loso_") for k in m)
