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
        ("data: x\nmembers: [{backbone: tiny}]\n", "members must be a list of at least two"),
        ("data: x\nmembers: [{backbone: tiny}, 3]\n", "members[1]: expected a mapping"),
        ("data: x\nmembers: [{backbone: tiny}, {seed: 1}]\n", "members[1]: 'seed' is shared"),
        ("data: x\nmembers: [{backbone: tiny}, {epoch: 1}]\n", "members[1]: unknown key 'epoch'"),
        ("data: x\nmembers: [{epochs: x}, {epochs: 1}]\n", "members[0]: epochs must be int"),
    ],
)
def test_bad_files_are_refused_naming_the_key(tmp_path, text, message):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ValueError, match=re.escape(message)):
        load_train_config(path)


def test_an_ensemble_file_resolves_each_members_paths(tmp_path):
    path = tmp_path / "conf" / "e.yaml"
    path.parent.mkdir()
    path.write_text(
        "data: ../data\nloso: true\nmembers:\n"
        "  - {backbone: mobilenetv2, weights: w/m.tflite, classifier_c: 0.001}\n"
        "  - {backbone: tiny, weights: none}\n"
    )
    got = load_train_config(path)
    assert got["members"] == [
        {
            "backbone": "mobilenetv2",
            "weights": str((path.parent / "w" / "m.tflite").resolve()),
            "classifier_c": 0.001,
        },
        {"backbone": "tiny", "weights": "none"},
    ]


@pytest.mark.shared_data
def test_the_shipped_best_configuration_is_valid():
    values = load_train_config(ROOT / "configs" / "best.yaml")
    members = values.pop("members")
    for member in members:
        if not Path(member["weights"]).is_file():
            pytest.skip(f"pretrained weights not available: {member['weights']} is absent")
        TrainConfig(**{**values, **member}).validate()
    assert [m["backbone"] for m in members] == ["mobilenetv2", "squeezenet"]
    assert values["loso"] is True and values["classifier"] == "logreg"
    assert members[0]["weights"].endswith(".tflite")
