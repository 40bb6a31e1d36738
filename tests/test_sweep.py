"""Sweeps: grid -> nested runs -> leaderboard, and resuming after an interruption."""

import json

import pytest
from mlflow.tracking import MlflowClient

from thyroid_cad import settings
from training import sweep


def _config(tmp_path, phantom_root, extra=""):
    path = tmp_path / "sweep.yaml"
    path.write_text(f"""
experiment: tests-sweep
data: {phantom_root}
image_size: 32
epochs: 2
batch_size: 32
max_images: 80
grid:
  backbone: [tiny]
  strategy: [full]
  classifier: [softmax, rf]
{extra}
""")
    return path


def test_sweep_runs_grid_nested_with_leaderboard_and_resumes(home, tmp_path, phantom_root):
    spec = sweep.load_config(_config(tmp_path, phantom_root))
    parent_id, table = sweep.run_sweep(spec)
    client = MlflowClient(settings.tracking_uri())
    children = client.search_runs(
        [client.get_run(parent_id).info.experiment_id],
        filter_string=f"tags.mlflow.parentRunId = '{parent_id}'",
    )
    combos = {c.data.tags["combo"]: c for c in children}
    assert set(combos) == {"tiny/full/softmax/direct", "tiny/full/rf/direct"}
    rf = combos["tiny/full/rf/direct"]
    assert rf.data.tags["features_from"] == combos["tiny/full/softmax/direct"].info.run_id
    assert table.count("| tiny | full |") == 2 and "val AUC" in table
    parent = client.get_run(parent_id)
    assert parent.data.tags["best_run"] in {c.info.run_id for c in children}
    names = {a.path for a in client.list_artifacts(parent_id)}
    assert {"leaderboard.md", "leaderboard.json"} <= names

    # Interrupt: the parent did not finish and one child is gone. Resuming reuses the
    # parent and finished children, and runs only what is missing.
    client.set_terminated(parent_id, "KILLED")
    client.delete_run(rf.info.run_id)
    again, _ = sweep.run_sweep(spec)
    assert again == parent_id
    children = client.search_runs(
        [parent.info.experiment_id], filter_string=f"tags.mlflow.parentRunId = '{parent_id}'"
    )
    softmax_runs = [c for c in children if c.data.tags["combo"] == "tiny/full/softmax/direct"]
    assert len(softmax_runs) == 1  # not trained again
    assert len(children) == 2

    # A finished sweep is not resumed: the same configuration starts a new parent.
    third, _ = sweep.run_sweep(spec)
    assert third != parent_id


@pytest.mark.parametrize(
    "extra,message",
    [
        ("  stage: [progressive]", "progressive.data"),
        ("  stage: [sideways]", "grid.stage"),
        ("learning_rat: 0.1", "unknown keys"),
        ("  colour: [red]", "grid keys must be TrainConfig fields"),
        ("  holdout_source: [a]", "grid keys must be TrainConfig fields"),
        ("  max_images: [40, 80]", "given both at the top level and as grid axes"),
        ("  class_weights: [global, sourced]", "unknown class weighting 'sourced'"),
        ("  scanner_augment: [yes please]", "scanner_augment must be bool"),
    ],
)
def test_bad_sweep_configs_are_refused(tmp_path, phantom_root, extra, message):
    with pytest.raises(ValueError, match=message):
        sweep.load_config(_config(tmp_path, phantom_root, extra))


def test_unknown_backbone_in_grid_is_refused_before_anything_runs(tmp_path, phantom_root):
    path = _config(tmp_path, phantom_root)
    path.write_text(path.read_text().replace("[tiny]", "[tiny, alexnet]"))
    with pytest.raises(ValueError, match="alexnet"):
        sweep.load_config(path)


def test_any_trainconfig_field_is_an_axis_and_the_leaderboard_ranks_by_robust_score(
    home, tmp_path, phantom_root
):
    axes = "  class_weights: [global, source]\n  scanner_augment: [true]"
    path = _config(tmp_path, phantom_root, axes + "\ntest_fraction: 0.3")  # 24 test images
    path.write_text(path.read_text().replace("[softmax, rf]", "[softmax]"))
    spec = sweep.load_config(path)
    assert spec.base.loso is True  # on by default in sweeps
    assert spec.axes == [*sweep.GRID_KEYS, "class_weights", "scanner_augment"]
    keys = [sweep._combo_key(c) for c in spec.combos()]
    assert keys == [
        "tiny/full/softmax/direct/class_weights=global/scanner_augment=True",
        "tiny/full/softmax/direct/class_weights=source/scanner_augment=True",
    ]
    parent_id, table = sweep.run_sweep(spec)
    client = MlflowClient(settings.tracking_uri())
    children = client.search_runs(
        [client.get_run(parent_id).info.experiment_id],
        filter_string=f"tags.mlflow.parentRunId = '{parent_id}'",
    )
    weights = {c.data.tags["combo"]: c.data.params["class_weights"] for c in children}
    assert weights == {keys[0]: "global", keys[1]: "source"}
    header = table.splitlines()[0]
    for column in ("class_weights", "val robust", "test robust", "floor [95% CI]", "AUC 256x256"):
        assert column in header
    rows = [r for r in json.loads(_leaderboard_json(client, parent_id)) if r.get("run_id")]
    scores = [r["val_robust_score"] for r in rows]
    assert scores == sorted(scores, reverse=True) and len(rows) == 2
    assert client.get_run(parent_id).data.tags["best_run"] == rows[0]["run_id"]
    assert all(r["test_shortcut_auc"] == 0.5 for r in rows)  # one source: the floor is chance


def _leaderboard_json(client, run_id) -> str:
    import mlflow

    return open(
        mlflow.artifacts.download_artifacts(
            run_id=run_id, artifact_path="leaderboard.json", tracking_uri=settings.tracking_uri()
        )
    ).read()
