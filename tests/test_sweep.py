"""Sweeps: grid -> nested runs -> leaderboard, and resuming after an interruption."""

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
