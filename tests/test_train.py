"""Training end to end on the phantom: it learns, and MLflow holds the whole run."""

import json
import subprocess
import sys

import mlflow
import pytest
from mlflow.tracking import MlflowClient

from thyroid_cad import settings
from training.train import TrainConfig, train, train_progressive

REQUIRED_METRICS = (
    "test_auc",
    "test_auc_ci_low",
    "test_auc_ci_high",
    "test_sensitivity",
    "test_specificity",
    "test_accuracy",
    "test_ece",
    "val_auc",
    "val_threshold",
)


def _cfg(data, **kw) -> TrainConfig:
    base = dict(
        data=str(data),
        backbone="tiny",
        strategy="full",
        epochs=15,
        image_size=64,
        batch_size=16,
        experiment="tests",
        patience=6,
    )
    return TrainConfig(**{**base, **kw})


@pytest.fixture(scope="module")
def softmax_run(tiny_run):
    return tiny_run


def test_tiny_backbone_learns_the_phantom(home, softmax_run):
    run = MlflowClient(settings.tracking_uri()).get_run(softmax_run)
    m = run.data.metrics
    for key in REQUIRED_METRICS:
        assert key in m, key
    assert m["test_auc"] > 0.9
    assert m["test_auc_ci_low"] <= m["test_auc"] <= m["test_auc_ci_high"]
    assert 0 < m["temperature"]


def test_run_logs_params_split_plots_and_model(home, softmax_run, phantom_root):
    client = MlflowClient(settings.tracking_uri())
    run = client.get_run(softmax_run)
    p = run.data.params
    assert p["backbone"] == "tiny" and p["strategy"] == "full" and p["classifier"] == "softmax"
    assert p["image_size"] == "64" and p["seed"] == "0" and p["stage"] == "thyroid"
    assert len(p["dataset_fingerprint"]) == 16 and len(p["split_id"]) == 12
    history = client.get_metric_history(softmax_run, "epoch_val_loss")
    assert len(history) >= 2 and [h.step for h in history] == list(range(len(history)))
    artifacts = {a.path for a in client.list_artifacts(softmax_run)}
    assert {"split.json", "plots", "model", "confusion.json"} <= artifacts
    plots = {a.path for a in client.list_artifacts(softmax_run, "plots")}
    assert {
        "plots/roc.png",
        "plots/pr.png",
        "plots/confusion_matrix.png",
        "plots/reliability.png",
        "plots/learning_curves.png",
    } <= plots
    split = json.load(
        open(
            mlflow.artifacts.download_artifacts(
                run_id=softmax_run, artifact_path="split.json", tracking_uri=settings.tracking_uri()
            )
        )
    )
    assert split["split_id"] == p["split_id"]
    # Grouped: all images of a phantom case sit in one split.
    cases = {}
    for line in (phantom_root / "manifest.csv").read_text().splitlines()[1:]:
        image, case = line.split(",")
        cases.setdefault(case, set()).add(split["assignment"][image])
    assert all(len(s - {"dropped"}) <= 1 for s in cases.values())  # never on two sides
    assert sum(len(s - {"dropped"}) == 1 for s in cases.values()) > 0.8 * len(cases)
    info = json.load(
        open(
            mlflow.artifacts.download_artifacts(
                run_id=softmax_run,
                artifact_path="model/info.json",
                tracking_uri=settings.tracking_uri(),
            )
        )
    )
    assert info["class_names"] == ["benign", "malignant"] and info["image_size"] == 64
    assert 0 < info["threshold"] < 1


@pytest.mark.parametrize("classifier", ["svm", "rf"])
def test_feature_classifiers_on_the_trained_network(home, softmax_run, phantom_root, classifier):
    run_id = train(
        _cfg(
            phantom_root, classifier=classifier, strategy="frozen", init_from=softmax_run, epochs=1
        )
    )
    run = MlflowClient(settings.tracking_uri()).get_run(run_id)
    # The phantom varies its anatomy per case: one epoch over frozen features of a
    # small network scores 0.84-0.9, well above chance (and the floor of 0.5 here).
    assert run.data.metrics["test_auc"] > 0.8
    assert run.data.tags["init_from"] == softmax_run
    names = {a.path for a in MlflowClient(settings.tracking_uri()).list_artifacts(run_id, "model")}
    assert "model/classifier.pkl" in names


def test_two_phase_and_partial_run(home, phantom_root):
    run_id = train(_cfg(phantom_root, strategy="two-phase", epochs=3, max_images=80))
    history = MlflowClient(settings.tracking_uri()).get_metric_history(run_id, "epoch_loss")
    assert [h.step for h in history] == [0, 1, 2]  # both phases on one epoch axis


def test_progressive_run_nests_its_stages(home, phantom_root, tmp_path):
    from training import phantom

    radiographs = tmp_path / "xray"
    phantom.generate(radiographs, per_class=20, classes=3, seed=9)
    parent = train_progressive(
        _cfg(phantom_root, epochs=2, max_images=60), str(radiographs), via_epochs=1
    )
    client = MlflowClient(settings.tracking_uri())
    tags = client.get_run(parent).data.tags
    stage1, stage2 = tags["radiograph_run"], tags["thyroid_run"]
    for child in (stage1, stage2):
        assert client.get_run(child).data.tags["mlflow.parentRunId"] == parent
    assert client.get_run(stage1).data.params["stage"] == "radiograph"
    assert client.get_run(stage1).data.params["class_names"] == "normal,benign,malignant"
    assert client.get_run(stage2).data.tags["init_from"] == stage1
    assert "test_auc" in client.get_run(parent).data.metrics


def test_bad_configuration_is_refused_before_training(phantom_root):
    with pytest.raises(ValueError, match="unknown backbone"):
        train(_cfg(phantom_root, backbone="alexnet"))
    with pytest.raises(ValueError, match="at least 2 epochs"):
        train(_cfg(phantom_root, strategy="two-phase", epochs=1))


def _cli(*args, env_home):
    env = {"THYROID_CAD_HOME": str(env_home), "PATH": "/usr/bin:/bin", "TF_CPP_MIN_LOG_LEVEL": "3"}
    return subprocess.run(
        [sys.executable, "-m", "cli", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )


def test_cli_train_prints_run_id_last(phantom_root, session_home):
    result = _cli(
        "train",
        "--data",
        str(phantom_root),
        "--epochs",
        "1",
        "--image-size",
        "32",
        "--max-images",
        "60",
        "--experiment",
        "tests-cli",
        env_home=session_home,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    run_id = result.stdout.strip().splitlines()[-1]
    assert len(run_id) == 32 and int(run_id, 16) >= 0
    client = MlflowClient(f"sqlite:///{session_home / 'mlflow.db'}")
    assert client.get_run(run_id).data.params["max_images"] == "60"


@pytest.mark.parametrize(
    "args,message",
    [
        (["train", "--data", "/nonexistent", "--epochs", "1"], "dataset folder not found"),
        (
            ["train", "--data", "{root}", "--backbone", "tiny", "--weights", "imagenet"],
            "no pretrained",
        ),
        (["train", "--data", "{root}", "--backbone", "alexnet"], "alexnet"),
        (["data", "audit", "/nonexistent"], "not found"),
        (["sweep", "/nonexistent.yaml"], "not found"),
        (["train", "--epochs", "1"], "no dataset: give --data ROOT"),
        (["train", "--config", "/nonexistent.yaml"], "configuration not found"),
    ],
)
def test_cli_bad_input_is_one_clear_line(phantom_root, session_home, args, message):
    args = [a.replace("{root}", str(phantom_root)) for a in args]
    result = _cli(*args, env_home=session_home)
    assert result.returncode == 2
    assert message in result.stderr
    assert "Traceback" not in result.stderr


def test_cli_audit_json(phantom_root, session_home):
    result = _cli("data", "audit", str(phantom_root), "--json", env_home=session_home)
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads(result.stdout)
    assert report["images"] == 400 and report["classes"] == {"benign": 200, "malignant": 200}
    assert report["exact_duplicate_groups"] == [] and report["cross_split_groups"] == []


def test_cli_train_from_a_config_file_with_flags_overriding_it(
    phantom_root, session_home, tmp_path
):
    config = tmp_path / "train.yaml"
    config.write_text(
        f"data: {phantom_root}\nimage_size: 32\nepochs: 1\nmax_images: 60\nseed: 3\n"
        "patience: 1\nclass_weights: source\nexperiment: tests-config\n"
    )
    # --seed 0 is the default value, given explicitly: it still overrides the file.
    result = _cli(
        "train", "--config", str(config), "--max-images", "50", "--seed", "0", env_home=session_home
    )
    assert result.returncode == 0, result.stderr[-2000:]
    run_id = result.stdout.strip().splitlines()[-1]
    params = MlflowClient(f"sqlite:///{session_home / 'mlflow.db'}").get_run(run_id).data.params
    assert params["max_images"] == "50" and params["seed"] == "0"  # command line
    assert params["image_size"] == "32" and params["patience"] == "1"  # file
    assert params["class_weights"] == "source" and params["epochs"] == "1"


def test_cli_config_errors_are_one_clear_line(session_home, tmp_path):
    config = tmp_path / "bad.yaml"
    config.write_text("data: /nowhere\nbackbone: tiny\nlerning_rate: 0.1\n")
    result = _cli("train", "--config", str(config), env_home=session_home)
    assert result.returncode == 2 and "unknown key 'lerning_rate'" in result.stderr
    assert "Traceback" not in result.stderr
