"""Progressive transfer via breast ultrasound (`--progressive-via ../shared/data/breast-us`):
the images/ layout is read as a 3-class dataset and trained as the intermediate stage."""

from __future__ import annotations

import csv
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from mlflow.tracking import MlflowClient
from PIL import Image

from thyroid_cad import settings
from training import phantom
from training.data import scan
from training.train import TrainConfig, train_progressive


def _breast_us_like(root: Path, per_class: int = 8) -> Path:
    """breast-us's layout: images/<class>/*, masks/<class>/*_mask.png, annotations.csv."""
    phantom.generate(root / "images", per_class=per_class, classes=3, seed=5, size=64)
    for extra in ("README.txt", "manifest.csv", phantom.ANNOTATIONS):
        (root / "images" / extra).unlink()
    rows = []
    for image in sorted((root / "images").rglob("*.png")):
        label = image.parent.name
        mask = root / "masks" / label / f"{image.stem}_mask.png"
        mask.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.zeros((64, 64), np.uint8)).save(mask)
        rel = image.relative_to(root).as_posix()
        rows.append([rel, label, 64, 64, mask.relative_to(root).as_posix()])
    with open(root / "annotations.csv", "w", newline="") as f:
        csv.writer(f).writerows([["image", "label", "width", "height", "masks"], *rows])
    return root


def test_images_folder_is_a_three_class_dataset(tmp_path):
    root = _breast_us_like(tmp_path / "bus")
    dataset = scan(root)
    assert dataset.class_names == ("normal", "benign", "malignant")  # not images / masks
    assert dataset.class_counts() == {"normal": 8, "benign": 8, "malignant": 8}
    assert all(r.rel.startswith("images/") for r in dataset.records)  # as annotations.csv


def test_progressive_via_breast_us_layout(home, tmp_path):
    via = _breast_us_like(tmp_path / "bus", per_class=10)
    thyroid = tmp_path / "thyroid"
    phantom.generate(thyroid, per_class=12, classes=2, seed=6, size=64)
    cfg = TrainConfig(
        data=str(thyroid),
        image_size=32,
        epochs=1,
        batch_size=16,
        experiment="tests-breast-us",
        descriptors=True,  # the intermediate stage has none: it must not ask for them
    )
    parent = train_progressive(cfg, str(via), via_epochs=1)
    client = MlflowClient(settings.tracking_uri())
    tags = client.get_run(parent).data.tags
    stage1 = client.get_run(tags["radiograph_run"]).data
    assert stage1.params["class_names"] == "normal,benign,malignant"
    assert stage1.params["descriptors"] == "False"
    assert float(stage1.metrics["test_auc"]) >= 0  # evaluated on its own 3-class split
    stage2 = client.get_run(tags["thyroid_run"]).data
    assert stage2.tags["init_from"] == tags["radiograph_run"]
    assert "test_descriptor_margin_accuracy" in stage2.metrics


@pytest.mark.slow
@pytest.mark.shared_data
def test_cli_progressive_via_real_breast_us(thyroid_seed, session_home):
    breast_us = thyroid_seed.parent / "breast-us"
    if not breast_us.is_dir():
        pytest.skip(f"real data not available: {breast_us} is absent")
    env = {
        "THYROID_CAD_HOME": str(session_home),
        "PATH": "/usr/bin:/bin",
        "TF_CPP_MIN_LOG_LEVEL": "3",
    }
    args = [
        *("--data", str(thyroid_seed), "--progressive-via", str(breast_us)),
        *("--image-size", "64", "--epochs", "1", "--via-epochs", "1"),
        *("--max-images", "80", "--via-max-images", "90", "--experiment", "tests-breast-us"),
    ]
    done = subprocess.run(
        [sys.executable, "-m", "cli", "train", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=900,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    parent = done.stdout.strip().splitlines()[-1]
    client = MlflowClient(f"sqlite:///{session_home / 'mlflow.db'}")
    tags = client.get_run(parent).data.tags
    stage1 = client.get_run(tags["radiograph_run"]).data.params
    assert stage1["class_names"] == "normal,benign,malignant"
    assert stage1["data"] == str(breast_us)
