"""Robust inference in one graph: test-time augmentation and ensembles (training.ensemble)."""

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from registry import gate, store
from thyroid_cad import settings
from training import ensemble, export, models, tta


def _session(path) -> ort.InferenceSession:
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def _run_model(run_id):
    import mlflow

    return models.load(
        mlflow.artifacts.download_artifacts(
            run_id=run_id, artifact_path="model/model.keras", tracking_uri=settings.tracking_uri()
        )
    )


def _images(n: int = 4, size: int = 64) -> np.ndarray:
    from thyroid_cad import imaging
    from training import phantom

    rng = np.random.default_rng(3)
    labels = [phantom.CLASS_NAMES_2[i % 2] for i in range(n)]
    return np.stack([imaging.prepare(phantom.make_image(lab, rng), size) for lab in labels])


@pytest.fixture(scope="module")
def store_env(session_home, tiny_run):
    """The session's MLflow store for the whole module (its exports are shared)."""
    from conftest import _isolate

    with pytest.MonkeyPatch.context() as mp:
        _isolate(mp, session_home)
        yield session_home


def test_views_move_the_image_as_documented():
    x = np.random.default_rng(0).uniform(0, 255, (2, 40, 40, 3)).astype("float32")
    d = round(tta.SHIFT * 40)
    view = {v: np.asarray(tta.View(v)(x)) for v in tta.VIEWS["full"]}
    np.testing.assert_array_equal(view["identity"], x)
    np.testing.assert_array_equal(view["flip"], x[:, :, ::-1])
    np.testing.assert_array_equal(view["shift_right"][:, :, d:], x[:, :, :-d])
    assert not view["shift_right"][:, :, :d].any()  # the strip left behind is black
    np.testing.assert_array_equal(view["shift_up"][:, :-d], x[:, d:])
    assert all(v.shape == x.shape for v in view.values())
    assert not view["zoom_out"][:, :1].any() and view["zoom_out"][:, 20].any()
    with pytest.raises(ValueError, match="unknown view"):
        tta.View("vertical_flip")


@pytest.fixture(scope="module")
def flips_export(store_env, tiny_run, tmp_path_factory):
    out = tmp_path_factory.mktemp("tta") / "flips"
    card = ensemble.export_combined([tiny_run], out, tta="flips")
    return out, card


def test_flip_tta_is_the_mean_of_both_views_in_one_graph(store_env, tiny_run, flips_export):
    out, card = flips_export
    assert card["parity"]["passed"], card["parity"]
    assert card["ensemble"]["views"] == ["identity", "flip"]
    assert [m["run_id"] for m in card["ensemble"]["members"]] == [tiny_run]
    images = _images()
    sess = _session(out / "model.onnx")
    assert sorted(o.name for o in sess.get_outputs()) == ["heatmap", "ood_score", "probabilities"]
    probs, heat = sess.run(["probabilities", "heatmap"], {"image": images})
    # An independent reference: the plain Keras model on numpy-flipped images.
    net = models.with_heatmaps(_run_model(tiny_run))
    plain, flipped = net(images.astype("float32")), net(images[:, :, ::-1].astype("float32"))
    expected = (np.asarray(plain["probabilities"]) + np.asarray(flipped["probabilities"])) / 2
    np.testing.assert_allclose(probs, expected, atol=1e-4)
    h, w = heat.shape[1:3]
    maps = (
        np.maximum(np.asarray(plain["cam"]), 0)
        + np.maximum(np.asarray(flipped["cam"]), 0)[:, :, ::-1]
    )
    np.testing.assert_allclose(heat, maps / 2 / (h * w), rtol=1e-3, atol=1e-5)


def test_a_tta_export_registers_with_its_own_measured_numbers(store_env, flips_export, tiny_run):
    out, card = flips_export
    # measured again on the split: threshold on validation, metrics on test, case level too
    assert 0 < card["threshold"] < 1 and card["source_run_id"] != tiny_run
    assert card["metrics"]["test"]["auc_ci_low"] <= card["metrics"]["test"]["auc"]
    assert card["source_robustness"]["shortcut_floor"]["auc"] == 0.5
    assert card["ood"]["threshold"] > 0 and "members" in card["ood"]
    assert "not for diagnostic use" in card["disclaimer"]
    import mlflow

    run = mlflow.get_run(card["source_run_id"])
    assert run.data.params["tta"] == "flips" and run.data.params["members"] == tiny_run
    assert "test_case_auc" in run.data.metrics and run.data.metrics["test_case_n_cases"] > 0
    assert card["metrics"]["test_case"]["n_cases"] == run.data.metrics["test_case_n_cases"]
    name = f"tta-{card['sha256'][:8]}"
    version = store.register(out, name)
    tag = store.client().get_model_version(name, version).tags[gate.TAG]
    assert json.loads(tag)["pooled_test_auc"] == card["metrics"]["test"]["auc"]
    assert gate.problems(tag) == []  # the phantom is easy: the gate passes it unforced
    store.promote(version, "champion", name)
    assert store.resolve(f"{name}@champion").card["sha256"] == card["sha256"]


def test_full_tta_with_shifts_and_zooms_keeps_parity(store_env, tiny_run, tmp_path):
    card = ensemble.export_combined([tiny_run], tmp_path, tta="full")
    assert card["parity"]["passed"], card["parity"]
    assert len(card["ensemble"]["views"]) == 8


@pytest.fixture(scope="module")
def second_run(phantom_root, store_env):
    """Another tiny run on the same split (same seed), trained less, evaluated with
    flip TTA (--tta flips)."""
    from training.train import TrainConfig, train

    cfg = TrainConfig(
        data=str(phantom_root),
        epochs=3,
        image_size=64,
        batch_size=16,
        experiment="tests",
        tta="flips",
    )
    return train(cfg)


def test_an_ensemble_of_two_runs_is_one_graph_listing_its_members(
    home, tiny_run, second_run, tmp_path
):
    card = ensemble.export_combined([tiny_run, second_run], tmp_path, weights=[3, 1])
    assert card["parity"]["passed"], card["parity"]
    members = card["ensemble"]["members"]
    assert [m["run_id"] for m in members] == [tiny_run, second_run]
    assert [m["weight"] for m in members] == [0.75, 0.25]
    images = _images()
    probs, heat = _session(tmp_path / "model.onnx").run(
        ["probabilities", "heatmap"], {"image": images}
    )
    each = [
        np.asarray(models.with_heatmaps(_run_model(r))(images.astype("float32"))["probabilities"])
        for r in (tiny_run, second_run)
    ]
    np.testing.assert_allclose(probs, 0.75 * each[0] + 0.25 * each[1], atol=1e-4)
    assert heat.max() <= 1.0 + 1e-5  # normalised maps, averaged
    assert store.read_export(tmp_path)[1]["sha256"] == card["sha256"]


def test_members_of_different_splits_or_no_folds_are_refused(store_env, tiny_run, tmp_path):
    with pytest.raises(ValueError, match="no leave-one-source-out folds"):
        ensemble.export_combined([tiny_run], tmp_path, ensemble="folds")
    with pytest.raises(ValueError, match="unknown TTA mode"):
        ensemble.export_combined([tiny_run], tmp_path, tta="rotate")
    with pytest.raises(ValueError, match="member weights"):
        ensemble.export_combined([tiny_run, tiny_run], tmp_path, weights=[1])
    from training.train import TrainConfig

    with pytest.raises(ValueError, match="unknown TTA mode"):
        TrainConfig(data=str(tmp_path), tta="rotate").validate()
    with pytest.raises(ValueError, match="whole-frame"):
        TrainConfig(data=str(tmp_path), tta="flips", roi="annotations").validate()


def test_the_fold_models_of_a_run_export_as_one_ensemble(store_env, tiny_run, second_run, tmp_path):
    """--ensemble folds reads the run's loso_run_<source> tags (a phantom has one source
    and no real folds, so a stand-in run carries the tags of two trained runs)."""
    import mlflow

    mlflow.set_experiment("tests")
    with mlflow.start_run(run_name="loso-stand-in") as run:
        mlflow.set_tags({"loso_run_a": tiny_run, "loso_run_b": second_run})
    assert ensemble.fold_runs(run.info.run_id) == [tiny_run, second_run]
    card = ensemble.export_combined([run.info.run_id], tmp_path, tta="flips", ensemble="folds")
    assert card["parity"]["passed"], card["parity"]
    assert [m["run_id"] for m in card["ensemble"]["members"]] == [tiny_run, second_run]
    assert mlflow.get_run(card["source_run_id"]).data.params["ensemble"] == "folds"


def test_export_cli_refuses_bad_choices_with_a_message(store_env, tiny_run, tmp_path):
    from typer.testing import CliRunner

    from cli import app

    runner = CliRunner()
    out = ["--out", str(tmp_path)]
    r = runner.invoke(app, ["export", tiny_run, "--ensemble", "folds", *out])
    assert r.exit_code != 0 and "no leave-one-source-out folds" in r.output
    r = runner.invoke(app, ["export", tiny_run, tiny_run, "--weights", "1,x", *out])
    assert r.exit_code != 0 and "--weights must be comma-separated numbers" in r.output
    r = runner.invoke(app, ["export", tiny_run, "--tta", "rotate", *out])
    assert r.exit_code == 2 and "rotate" in r.output
    assert "Traceback" not in r.output


def test_members_of_different_backbones_share_one_heatmap_grid(tmp_path):
    """Untrained members (no MLflow needed): tiny (8 x 8 maps at 64 px) and VGG16 (2 x 2),
    whose maps are normalised and resized onto the first member's grid in the graph."""
    info = {"image_size": 64, "class_names": ["benign", "malignant"]}
    members = [
        ensemble.Member(b, models.build_model(b, 2, 64), info, {}, "") for b in ("tiny", "vgg16")
    ]
    wrapper = ensemble.serving_model(members, [0.5, 0.5], "flips")
    path = tmp_path / "model.onnx"
    onnx.save_model(export._convert(wrapper, 64), path)
    images = _images()
    parity = ensemble._parity(_session(path), wrapper, images, 64)
    assert parity["passed"], parity
    (heat,) = _session(path).run(["heatmap"], {"image": images})
    assert heat.shape == (4, 8, 8, 2) and 0 <= heat.min() and heat.max() <= 1 + 1e-5


def test_a_run_trained_with_tta_exports_the_same_views(store_env, second_run, tmp_path):
    """train --tta flips evaluates as the graph answers; export then builds those views
    in by default, and the graph's own test AUC is the run's."""
    import mlflow

    run = mlflow.get_run(second_run)
    assert run.data.params["tta"] == "flips"
    card = ensemble.export_runs([second_run], tmp_path)
    assert card["ensemble"]["tta"] == "flips" and card["parity"]["passed"]
    assert card["metrics"]["test"]["auc"] == pytest.approx(run.data.metrics["test_auc"], abs=1e-3)
    assert card["threshold"] == pytest.approx(run.data.metrics["val_threshold"], abs=1e-3)


def _stand_in(name: str, tags: dict, holdout: dict | None = None) -> str:
    """An MLflow run that leads to a trained one (tag thyroid_run), as a progressive
    parent does, with other tags and a fold's holdout.json where given."""
    import mlflow

    with mlflow.start_run(run_name=name) as run:
        mlflow.set_tags(tags)
        if holdout is not None:
            mlflow.log_dict(holdout, "holdout.json")
    return run.info.run_id


def test_an_ensemble_of_runs_with_folds_reports_its_own_loso(
    store_env, tiny_run, second_run, phantom_root, tmp_path
):
    """Members trained with --loso: the export combines each source's fold models as it
    combines the members and scores them on that fold's held-out images. The phantom
    has one source, so stand-in runs lead to the two trained models and carry fold tags
    and holdout files (sources 'a' and 'b', different held-out images)."""
    import mlflow
    from sklearn.metrics import roc_auc_score

    from thyroid_cad import imaging

    mlflow.set_experiment("tests")
    split = json.loads(
        open(
            mlflow.artifacts.download_artifacts(
                run_id=tiny_run, artifact_path="split.json", dst_path=str(tmp_path / "s")
            )
        ).read()
    )
    train = sorted(r for r, side in split["assignment"].items() if side == "train")
    held = {"a": train[0::7][:40], "b": train[3::7][:40]}
    members = []
    for model_run in (tiny_run, second_run):
        folds = {
            f"loso_run_{s}": _stand_in(
                f"fold-{s}", {"thyroid_run": model_run}, {"train": [], "val": [], "test": rels}
            )
            for s, rels in held.items()
        }
        members.append(_stand_in("member", {"thyroid_run": model_run, **folds}))
    card = ensemble.export_combined(members, tmp_path / "e", tta="none")
    loso = card["source_robustness"]["loso"]
    nets = [_run_model(r) for r in (tiny_run, second_run)]
    for s, rels in held.items():
        images = np.stack([imaging.load_prepared(phantom_root / r, 64) for r in rels])
        probs = np.mean([np.asarray(n(images.astype("float32"))[:, 1]) for n in nets], axis=0)
        y = [r.startswith("malignant") for r in rels]
        assert 0 < sum(y) < len(y)  # both classes held out
        assert loso[s]["auc"] == pytest.approx(roc_auc_score(y, probs), abs=1e-6)
        assert loso[s]["ci_low"] <= loso[s]["auc"] <= loso[s]["ci_high"]
        assert loso[s]["n"] == len(rels)
    assert card["source_robustness"]["loso_auc_min"] == min(v["auc"] for v in loso.values())
    # members without the same folds: no LOSO claimed for the combination
    card = ensemble.export_combined([members[0], second_run], tmp_path / "f", tta="none")
    assert card["source_robustness"]["loso"] is None


def test_train_with_members_trains_an_ensemble_that_exports_as_one(
    store_env, phantom_root, tmp_path
):
    """`members:` in a --config file: one parent run with a child per member; export of
    the parent is the ensemble of its members."""
    import mlflow
    from typer.testing import CliRunner

    from cli import app

    config = tmp_path / "members.yaml"
    config.write_text(
        f"data: {phantom_root}\nexperiment: tests\nimage_size: 64\nbatch_size: 16\n"
        "max_images: 120\nmembers:\n  - {backbone: tiny, epochs: 2}\n"
        "  - {backbone: tiny, epochs: 1, classifier: logreg, strategy: frozen}\n"
    )
    runner = CliRunner()
    r = runner.invoke(app, ["train", "--config", str(config)])
    assert r.exit_code == 0, r.output
    parent = r.output.strip().splitlines()[-1]
    run = mlflow.get_run(parent)
    ids = run.data.tags[ensemble.MEMBERS_TAG].split(",")
    assert len(ids) == 2 and json.loads(run.data.params["members"])[1]["classifier"] == "logreg"
    children = [mlflow.get_run(i).data for i in ids]
    assert [c.params["classifier"] for c in children] == ["softmax", "logreg"]
    assert {c.tags["mlflow.parentRunId"] for c in children} == {parent}
    assert len({c.params["max_images"] for c in children}) == 1  # one split for both
    r = runner.invoke(app, ["export", parent, "--out", str(tmp_path / "out")])
    assert r.exit_code == 0, r.output
    card = json.loads((tmp_path / "out" / "model_card.json").read_text())
    assert [m["run_id"] for m in card["ensemble"]["members"]] == ids
    assert card["parity"]["passed"]
    # a flag that a member sets itself is refused, not silently overridden
    r = runner.invoke(app, ["train", "--config", str(config), "--backbone", "vgg16"])
    assert r.exit_code != 0 and "--backbone is set by members[0]" in r.output
    # one member is not an ensemble; a progressive run cannot also have members
    config.write_text(f"data: {phantom_root}\nmembers: [{{epochs: 1}}]\n")
    r = runner.invoke(app, ["train", "--config", str(config)])
    assert r.exit_code != 0 and "at least two mappings" in r.output
    config.write_text(
        f"data: {phantom_root}\nprogressive_via: {phantom_root}\n"
        "members: [{epochs: 1}, {epochs: 2}]\n"
    )
    r = runner.invoke(app, ["train", "--config", str(config)])
    assert r.exit_code != 0 and "cannot be combined" in r.output and "Traceback" not in r.output
