"""`thyroid-cad train --config FILE`: YAML of TrainConfig fields, flags override it."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from training.config import load_train_config
from training.train import TrainConfig

ROOT = Path(__file__).resolve().parents[1]


def test_paths_are_relative_to_the_file_and_types_are_checked(tmp_path):
    path = tmp_path / "conf" / "a.yaml"
    path.parent.mkdir()
    path.write_text("data: ../data\nmanifest: m.csv\nepochs: 3\nlearning_rate: 1\nloso: true\n")
    got = load_train_config(path)
    assert got["data"] == str((tmp_path / "data").resolve())
    assert got["manifest"] == str((path.parent / "m.csv").resolve())
    assert (got["epochs"], got["learning_rate"], got["loso"]) == (3, 1, True)
    TrainConfig(**got)  # every key is a field


@pytest.mark.parametrize(
    "text,message",
    [
        ("data: x\nepoch: 3\n", "unknown key 'epoch'"),
        ("data: x\nepochs: three\n", "epochs must be int, got 'three'"),
        ("data: x\nloso: 1\n", "loso must be bool, got 1"),
        ("data: x\nvia_epochs: 1.5\n", "via_epochs must be an integer"),
        ("data: x\nroi: off\n", "roi must be str, got False (YAML reads off"),
        ("- data\n", "expected a mapping"),
        ("data: [\n", "not valid YAML"),
    ],
)
def test_bad_files_are_refused_naming_the_key(tmp_path, text, message):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ValueError, match=re.escape(message)):
        load_train_config(path)


@pytest.mark.shared_data
def test_the_shipped_best_configuration_is_valid():
    values = load_train_config(ROOT / "configs" / "best.yaml")
    if not Path(values["weights"]).is_file():
        pytest.skip(f"pretrained weights not available: {values['weights']} is absent")
    TrainConfig(**values).validate()
    assert values["backbone"] == "mobilenetv2" and values["loso"] is True
    assert values["weights"].endswith(".tflite") and values["classifier"] == "logreg"
