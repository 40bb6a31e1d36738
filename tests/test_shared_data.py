"""On the thesis's real thyroid set (../shared/data/thyroid-seed): skipped where absent."""

import json
from collections import defaultdict

import mlflow
import pytest

from thyroid_cad import settings
from training import audit, data
from training.train import TrainConfig, train

pytestmark = pytest.mark.shared_data


def test_audit_finds_byte_identical_duplicates_across_train_and_test(thyroid_seed):
    report = audit.audit(data.scan(thyroid_seed))
    assert report["images"] == 795
    assert report["classes"] == {"benign": 269, "malignant": 526}
    exact_leaks = [g for g in report["cross_split_groups"] if g["kind"] == "exact"]
    assert len(exact_leaks) >= 5
    assert ["test/malin/maling.31.jpg", "train/malin/maling.37.jpg"] in [
        g["paths"] for g in exact_leaks
    ]
    assert report["cases"] > 200  # cases.csv was picked up
    assert any(g["kind"] == "case" for g in report["cross_split_groups"])


def test_quick_training_is_leak_free_and_above_chance(home, thyroid_seed):
    run_id = train(
        TrainConfig(
            data=str(thyroid_seed),
            backbone="tiny",
            strategy="full",
            classifier="rf",
            epochs=8,
            image_size=64,
            experiment="tests-seed",
        )
    )
    run = mlflow.get_run(run_id)
    split = json.load(
        open(
            mlflow.artifacts.download_artifacts(
                run_id=run_id, artifact_path="split.json", tracking_uri=settings.tracking_uri()
            )
        )
    )
    ds = data.scan(thyroid_seed)
    sides = defaultdict(set)  # content hash and case -> splits they landed in
    for record, digest in zip(ds.records, ds.sha256(), strict=True):
        side = split["assignment"][record.rel]
        if side != "dropped":
            sides[digest].add(side)
            if record.case_id:
                sides[f"case:{record.case_id}"].add(side)
    assert all(len(s) == 1 for s in sides.values()), "an image or case sits in two splits"
    assert int(run.data.params["n_dropped_duplicates"]) >= 40
    assert run.data.metrics["test_auc_ci_low"] > 0.5, run.data.metrics
    # The three sources are measured one by one, beside what image source and size alone get.
    from training import sources

    m = run.data.metrics
    assert set(sources.per_source(m, "test_auc_source_")) == {"560x360", "300x225", "other"}
    assert run.data.params["sources"] == "300x225,560x360,other"
    assert m["test_shortcut_auc_ci_low"] > 0.55, "the scanner shortcut vanished from the split?"
    assert "robust_score" in m and m["robust_score"] <= m["test_auc_source_560x360"]


def test_thyroid_seed_has_three_confounded_sources(thyroid_seed):
    from training import sources

    report = audit.audit(data.scan(thyroid_seed))
    table = report["sources"]
    assert set(table) == {"560x360", "300x225", sources.OTHER}
    totals = {s: sum(c.values()) for s, c in table.items()}
    assert totals == {"560x360": 315, "300x225": 303, "other": 177}
    share = {s: c["malignant"] / totals[s] for s, c in table.items()}
    assert share["560x360"] > 0.8 and share["other"] < 0.5  # the source predicts the label
