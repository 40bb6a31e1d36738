"""Registry on the local SQLite store: register, promote with a gate, roll back, resolve."""

import json
import re
import shutil
import subprocess
import sys
import uuid

import numpy as np
import onnxruntime as ort
import pytest

from registry import store
from thyroid_cad import imaging, settings
from thyroid_cad.files import sha256_file
from training import models, phantom


def _name() -> str:
    return f"test-model-{uuid.uuid4().hex[:8]}"


def _variant(tiny_export, tmp_path, **card_changes):
    """A copy of the export with card fields changed (the ONNX file and hash unchanged)."""
    out = tmp_path / uuid.uuid4().hex[:6]
    shutil.copytree(tiny_export, out)
    card = json.loads((out / "model_card.json").read_text())
    for key, value in card_changes.items():
        target = card
        *path, last = key.split(".")
        for part in path:
            target = target[part]
        target[last] = value
    (out / "model_card.json").write_text(json.dumps(card))
    return out


def _images(n=4, size=64):
    rng = np.random.default_rng(7)
    return np.stack(
        [
            imaging.prepare(phantom.make_image(("benign", "malignant")[i % 2], rng), size)
            for i in range(n)
        ]
    )


def test_round_trip_train_export_register_promote_resolve_rollback(
    home, tiny_run, tiny_export, tmp_path
):
    import mlflow

    name = _name()
    v1 = store.register(tiny_export, name)
    v2 = store.register(tiny_export, name)
    assert (v1, v2) == (1, 2)
    store.promote(v1, "champion", name)
    resolved = store.resolve(f"{name}@champion", tmp_path / "out")
    assert resolved.version == 1 and not resolved.cached
    assert {p.name for p in (tmp_path / "out").iterdir()} == {"model.onnx", "model_card.json"}

    keras_model = models.load(
        mlflow.artifacts.download_artifacts(
            run_id=tiny_run, artifact_path="model/model.keras", tracking_uri=settings.tracking_uri()
        )
    )
    images = _images()
    sess = ort.InferenceSession(
        str(tmp_path / "out" / "model.onnx"), providers=["CPUExecutionProvider"]
    )
    (probs,) = sess.run(["probabilities"], {"image": images})
    np.testing.assert_allclose(
        probs, keras_model.predict(images.astype("float32"), verbose=0), atol=1e-4
    )

    event = store.promote(v2, "champion", name, reason="retrained")
    assert event["previous"] == 1 and event["why"] == "retrained" and event["who"]
    assert store.alias_version(name, "champion") == 2
    back = store.rollback("champion", name, reason="bad night")
    assert back["version"] == 1 and back["previous"] == 2
    assert store.alias_version(name, "champion") == 1
    actions = [(e["action"], e["version"], e["previous"]) for e in store.history(name)]
    assert actions == [("promote", 1, None), ("promote", 2, 1), ("rollback", 1, 2)]
    with pytest.raises(store.RegistryError, match="no previous version"):
        store.rollback("champion", name)

    listed = {v.version: v.to_json() for v in store.list_versions(name)}
    assert listed[1]["aliases"] == ["champion"] and listed[2]["aliases"] == []
    assert listed[1]["parity_passed"] and listed[1]["source_run_id"] == tiny_run
    assert listed[1]["val_auc"] == pytest.approx(
        json.loads((tiny_export / "model_card.json").read_text())["metrics"]["val"]["auc"]
    )


def test_gate_refuses_failed_parity_and_force_needs_a_reason(home, tiny_export, tmp_path):
    name = _name()
    bad = store.register(_variant(tiny_export, tmp_path, **{"parity.passed": False}), name)
    with pytest.raises(store.RegistryError, match="failed its ONNX parity check"):
        store.promote(bad, "champion", name)
    assert store.alias_version(name, "champion") is None
    with pytest.raises(store.RegistryError, match="needs --reason"):
        store.promote(bad, "champion", name, force=True)
    event = store.promote(bad, "champion", name, force=True, reason="vendor asked, audit #12")
    assert event["forced"] and event["why"] == "vendor asked, audit #12"
    assert store.history(name)[-1]["overridden"] == [f"version {bad} failed its ONNX parity check"]


def test_gate_refuses_a_lower_validation_auc(home, tiny_export, tmp_path):
    name = _name()
    good = store.register(tiny_export, name)
    store.promote(good, "champion", name)
    worse = store.register(_variant(tiny_export, tmp_path, **{"metrics.val.auc": 0.51}), name)
    with pytest.raises(store.RegistryError, match="below champion"):
        store.promote(worse, "champion", name)
    store.promote(worse, "challenger", name)  # another alias has no holder to beat
    assert store.alias_version(name, "champion") == good
    assert store.alias_version(name, "challenger") == worse


def test_resolve_caches_by_version_and_hash_and_repairs_tampering(home, tiny_export, tmp_path):
    name = _name()
    version = store.register(tiny_export, name)
    store.promote(version, "champion", name)
    first = store.resolve(f"{name}/{version}")
    mtime = first.onnx_path.stat().st_mtime_ns
    assert store.resolve(f"{name}/{version}").onnx_path.stat().st_mtime_ns == mtime  # cache hit
    first.onnx_path.write_bytes(b"tampered")
    repaired = store.resolve(f"{name}@champion")
    assert sha256_file(repaired.onnx_path) == repaired.card["sha256"]
    offline = store.cached(f"{name}@champion")
    assert offline is not None and offline.cached and offline.version == version


@pytest.mark.parametrize(
    "uri,message",
    [
        ("no-such-model@champion", "not found"),
        ("bad uri with spaces", "NAME@ALIAS or NAME/VERSION"),
        ("model/notanumber", "NAME@ALIAS or NAME/VERSION"),
    ],
)
def test_resolve_errors_are_clear(home, uri, message):
    with pytest.raises(store.RegistryError, match=message):
        store.resolve(uri)


def test_register_refuses_a_mismatched_or_incomplete_export(home, tiny_export, tmp_path):
    broken = _variant(tiny_export, tmp_path, sha256="0" * 64)
    with pytest.raises(store.RegistryError, match="does not match"):
        store.register(broken, _name())
    (broken / "model.onnx").unlink()
    with pytest.raises(store.RegistryError, match="must hold model.onnx"):
        store.register(broken, _name())


def test_registered_model_scores_through_mlflow_pyfunc(home, tiny_export):
    import mlflow

    name = _name()
    version = store.register(tiny_export, name)
    mlflow.set_tracking_uri(settings.tracking_uri())
    mlflow.set_registry_uri(settings.tracking_uri())
    model = mlflow.pyfunc.load_model(f"models:/{name}/{version}")
    images = _images(3)
    out = model.predict(images)
    probs = out["probabilities"] if isinstance(out, dict) else np.asarray(out)
    sess = ort.InferenceSession(str(tiny_export / "model.onnx"), providers=["CPUExecutionProvider"])
    np.testing.assert_allclose(probs, sess.run(["probabilities"], {"image": images})[0], atol=1e-6)
    assert (
        model.metadata.metadata["model_card"]["sha256"]
        == json.loads((tiny_export / "model_card.json").read_text())["sha256"]
    )


def _cli(*args, home_dir):
    env = {"THYROID_CAD_HOME": str(home_dir), "PATH": "/usr/bin:/bin", "TF_CPP_MIN_LOG_LEVEL": "3"}
    return subprocess.run(
        [sys.executable, "-m", "cli", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )


def test_cli_registry_flow(session_home, tiny_export, tmp_path):
    name = _name()
    reg = _cli("registry", "register", str(tiny_export), "--name", name, home_dir=session_home)
    assert reg.returncode == 0, reg.stderr[-2000:]
    assert reg.stdout.strip().splitlines()[-1] == "1"
    promote = _cli(
        "registry", "promote", "1", "--alias", "champion", "--name", name, home_dir=session_home
    )
    assert promote.returncode == 0 and json.loads(promote.stdout)["version"] == 1
    listed = json.loads(
        _cli("registry", "list", "--json", "--name", name, home_dir=session_home).stdout
    )
    assert listed[0]["aliases"] == ["champion"]
    shown = json.loads(
        _cli("registry", "show", "1", "--json", "--name", name, home_dir=session_home).stdout
    )
    assert shown["version"] == 1 and shown["parity_passed"] is True
    res = _cli(
        "registry",
        "resolve",
        f"{name}@champion",
        "--out",
        str(tmp_path / "m"),
        home_dir=session_home,
    )
    assert res.returncode == 0 and (tmp_path / "m" / "model.onnx").is_file()
    for args, message in [
        (("registry", "show", "99", "--name", name), "no version 99"),
        (("registry", "promote", "1", "--force", "--name", name), "needs --reason"),
        (("registry", "register", str(tmp_path)), "must hold model.onnx"),
        (("export", "f" * 32, "--out", str(tmp_path / "x")), "no MLflow run"),
    ]:
        result = _cli(*args, home_dir=session_home)
        assert result.returncode == 2 and message in result.stderr, (args, result.stderr[-500:])
        assert "Traceback" not in result.stderr


def _two_sources(weak_low: float) -> dict:
    return {
        "a": {"auc": 0.9, "ci_low": 0.8, "ci_high": 0.97, "n": 40},
        "b": {"auc": 0.6, "ci_low": weak_low, "ci_high": 0.78, "n": 38},
    }


def test_the_phantom_model_passes_the_shortcut_gate_honestly(tiny_export):
    from registry import gate

    card = json.loads((tiny_export / "model_card.json").read_text())
    block = card["source_robustness"]
    # One source, one image size: the floor is chance and there is nothing within to check.
    assert block["shortcut_floor"] == {"auc": 0.5, "ci_low": 0.5, "ci_high": 0.5}
    assert list(block["test_images_per_source"]) == ["256x256"] and block["loso"] is None
    assert card["metrics"]["test"]["auc"] > 0.5
    assert gate.problems(gate.tag_value(card)) == []
    card["metrics"]["test"]["auc"] = 0.5  # at chance: not above the floor
    assert "not above the shortcut floor" in gate.problems(gate.tag_value(card))[0]


@pytest.mark.parametrize(
    "changes,message",
    [
        (
            {"source_robustness.shortcut_floor": {"auc": 0.97, "ci_low": 0.9, "ci_high": 1.0}},
            "is not above the shortcut floor 0.970 [95% CI 0.900, 1.000]",
        ),
        (
            {
                "source_robustness.sources": _two_sources(0.45),
                "source_robustness.test_images_per_source": {"a": 40, "b": 38},
            },
            "within source b test AUC 0.600 [95% CI 0.450, 0.780] on 38 images",
        ),
        ({"source_robustness": None}, "exported before the shortcut gate"),
    ],
)
def test_shortcut_gate_names_the_number_that_failed(home, tiny_export, tmp_path, changes, message):
    name = _name()
    version = store.register(_variant(tiny_export, tmp_path, **changes), name)
    with pytest.raises(store.RegistryError, match=re.escape(message)) as refused:
        store.promote(version, "champion", name)
    assert "--force --reason" in str(refused.value)
    assert store.alias_version(name, "champion") is None
    event = store.promote(version, "champion", name, force=True, reason="known limitation, #9")
    assert event["forced"] and any(message in p for p in event["overridden"])


def test_shortcut_gate_passes_sources_that_are_all_above_chance(home, tiny_export, tmp_path):
    name = _name()
    fine = _variant(
        tiny_export,
        tmp_path,
        **{
            "source_robustness.sources": _two_sources(0.55),
            "source_robustness.test_images_per_source": {"a": 40, "b": 38, "c": 12},
        },
    )
    version = store.register(fine, name)
    assert store.promote(version, "champion", name)["forced"] is False
    assert store.show(version, name).to_json()["robust_score"] is not None


def test_cli_promote_refusal_is_one_line_naming_the_number(home, tiny_export, tmp_path):
    name = _name()
    floor = {"auc": 0.97, "ci_low": 0.9, "ci_high": 1.0}
    version = store.register(
        _variant(tiny_export, tmp_path, **{"source_robustness.shortcut_floor": floor}), name
    )
    result = _cli("registry", "promote", str(version), "--name", name, home_dir=home)
    assert result.returncode == 2, result.stderr[-2000:]
    assert "shortcut floor 0.970 [95% CI 0.900, 1.000]" in result.stderr
    assert "Traceback" not in result.stderr
