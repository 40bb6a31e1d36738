"""Which region of interest (ROI) each training image is cropped to.

`--roi annotations`: the annotated nodule where an annotation file has one (the box of
its largest outline), the localiser's proposal for the other images. `--roi localiser`:
the localiser's proposal everywhere, as the service does for images sent without a
box (and so no source is cropped differently from another). `--roi off`: the whole
frame, as before. Frames where nothing is found keep the whole-frame input.

The localiser is an exported localiser folder (localiser.onnx + localiser_card.json),
either file, or the MLflow run that trained it. Its files are copied into the
classifier's model artifact, and from there into its export, so a registered version
carries the exact localiser it was trained with.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import mlflow
import numpy as np

from thyroid_cad import imaging, nodule
from thyroid_cad.files import sha256_file
from thyroid_cad.settings import cache_dir
from training import pipeline, tracking
from training.annotations import for_dataset
from training.choices import ROI_MODES
from training.data import Dataset, ImageInfo

log = logging.getLogger(__name__)

# An exported localiser: its graph (uint8 image in, OUTPUT_NAME out) and its card.
ONNX_FILE = "localiser.onnx"
CARD_FILE = "localiser_card.json"
OUTPUT_NAME = "mask"
SOURCES = ("annotation", "localiser", "none")
_NO_BOX = (0, 0, 0, 0)


def check_config(cfg) -> None:
    """Refuse ROI settings of a TrainConfig that cannot work, before any training."""
    if cfg.roi not in ROI_MODES:
        raise ValueError(f"unknown roi mode {cfg.roi!r}; choose from {ROI_MODES}")
    if not 0 <= cfg.roi_margin <= 3:
        raise ValueError(f"roi margin must be between 0 and 3, got {cfg.roi_margin}")
    if not 0 <= cfg.roi_jitter <= 0.5:
        raise ValueError(f"roi jitter must be between 0 and 0.5, got {cfg.roi_jitter}")
    if cfg.roi == "localiser" and not cfg.localiser:
        raise ValueError("roi 'localiser' needs a localiser (--localiser RUN_ID or folder)")


@dataclass(frozen=True)
class Localiser:
    """An exported localiser: its folder and card, SHA-256 checked."""

    directory: Path
    card: dict

    @property
    def onnx_path(self) -> Path:
        return self.directory / ONNX_FILE

    def summary(self) -> dict:
        """What a classifier's card records about the localiser it was trained with."""
        return {
            "file": ONNX_FILE,
            "card": CARD_FILE,
            "sha256": self.card["sha256"],
            "source_run_id": self.card.get("source_run_id"),
            "input_size": self.card["input_size"],
            "threshold": self.card.get("threshold", nodule.MASK_THRESHOLD),
            "metrics": self.card.get("metrics", {}).get("test", {}),
        }

    def session(self):
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = 1  # run per image from a thread pool
        return ort.InferenceSession(
            str(self.onnx_path), options, providers=["CPUExecutionProvider"]
        )


def load_localiser(directory: Path) -> Localiser:
    """A localiser folder, checked: both files there and the ONNX file matches its card."""
    onnx_path, card_path = directory / ONNX_FILE, directory / CARD_FILE
    if not onnx_path.is_file() or not card_path.is_file():
        raise ValueError(f"{directory} must hold {ONNX_FILE} and {CARD_FILE}")
    card = json.loads(card_path.read_text())
    if card.get("sha256") != sha256_file(onnx_path):
        raise ValueError(f"{onnx_path} does not match the SHA-256 in {CARD_FILE}")
    return Localiser(directory, card)


def resolve_localiser(spec: str) -> Localiser:
    """A localiser from a folder, one of its files, or an MLflow run id.

    Raises:
        ValueError: nothing usable at `spec`.
    """
    path = Path(spec).expanduser()
    if path.is_dir():
        return load_localiser(path)
    if path.is_file():
        return load_localiser(path.parent)
    tracking.setup_uri()
    target = cache_dir() / "localisers" / spec
    if not (target / ONNX_FILE).is_file():
        target.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
            try:
                local = mlflow.artifacts.download_artifacts(
                    run_id=spec, artifact_path="localiser", dst_path=tmp
                )
            except Exception as e:  # MlflowException / OSError: unknown run, no localiser
                raise ValueError(
                    f"localiser {spec!r} is neither a localiser folder or file nor an MLflow "
                    f"run with a localiser: {e}"
                ) from e
            shutil.rmtree(target, ignore_errors=True)
            Path(local).rename(target)
    return load_localiser(target)


def propose_all(
    paths: list[Path], sha256: list[str], localiser: Localiser
) -> list[imaging.Box | None]:
    """The localiser's ROI for every image (None: no nodule found), cached per content."""
    size = int(localiser.card["input_size"])
    threshold = float(localiser.card.get("threshold", nodule.MASK_THRESHOLD))

    def compute() -> np.ndarray:
        session = localiser.session()

        def one(p: Path) -> imaging.Box:
            rgb = imaging.to_rgb_array(imaging.open_image(p))
            square, geometry = imaging.prepare_input(rgb, size)
            (prob,) = session.run([OUTPUT_NAME], {"image": square[None]})
            return nodule.propose(prob[0], geometry, threshold).box or _NO_BOX

        with ThreadPoolExecutor(max_workers=max(1, os.cpu_count() or 1)) as pool:
            return np.array(list(pool.map(one, paths)), dtype=np.int64).reshape(-1, 4)

    key = f"{localiser.card['sha256']}|{imaging.PREPROCESSING_VERSION}|{'|'.join(sha256)}"
    boxes = pipeline.cached("rois", key, compute)
    return [tuple(int(v) for v in b) if b[2] > 0 else None for b in boxes]


def jitter(box: imaging.Box, amount: float, frame: tuple[int, int], rng) -> imaging.Box:
    """Shift the centre by up to `amount` of the box's sides and scale the sides by up to
    1 +- amount, kept inside the frame (width, height): annotations are not all drawn
    alike, and the localiser's boxes are not exact either."""
    x, y, w, h = box
    width, height = frame
    cx = x + w / 2 + rng.uniform(-amount, amount) * w
    cy = y + h / 2 + rng.uniform(-amount, amount) * h
    w2 = int(np.clip(round(w * rng.uniform(1 - amount, 1 + amount)), 1, width))
    h2 = int(np.clip(round(h * rng.uniform(1 - amount, 1 + amount)), 1, height))
    x2 = int(np.clip(round(cx - w2 / 2), 0, width - w2))
    y2 = int(np.clip(round(cy - h2 / 2), 0, height - h2))
    return x2, y2, w2, h2


@dataclass
class RoiPlan:
    """The box (or None) and where it came from, per dataset index."""

    mode: str
    margin: float
    jitter: float
    boxes: dict[int, imaging.Box | None]
    sources: dict[int, str]
    localiser: Localiser | None

    def boxes_for(self, indices: list[int]) -> list[imaging.Box | None]:
        return [self.boxes[i] for i in indices]

    def counts(self) -> dict[str, int]:
        counts = Counter(self.sources.values())
        return {s: counts.get(s, 0) for s in SOURCES}

    def log(self, dataset: Dataset) -> None:
        """ROI counts as metrics and every box as the artifact rois.json."""
        mlflow.log_metrics({f"roi_from_{s}": float(n) for s, n in self.counts().items()})
        if self.localiser is not None:
            mlflow.set_tag("localiser_sha256", self.localiser.card["sha256"])
        table = {
            dataset.records[i].rel: {"box": list(b) if b else None, "source": self.sources[i]}
            for i, b in sorted(self.boxes.items())
        }
        mlflow.log_dict({"margin": self.margin, "mode": self.mode, "rois": table}, "rois.json")

    def bundle(self, model_dir: Path) -> dict:
        """Copy the localiser beside the model; the 'roi' entry of the model's info."""
        if self.localiser is not None:
            for name in (ONNX_FILE, CARD_FILE):
                shutil.copy(self.localiser.directory / name, model_dir / name)
        return {
            "mode": self.mode,
            "margin": self.margin,
            "jitter": self.jitter,
            "preprocessing_version": imaging.ROI_PREPROCESSING_VERSION,
            "counts": self.counts(),
            "localiser": self.localiser.summary() if self.localiser else None,
        }


def plan(
    cfg, dataset: Dataset, used: list[int], train: list[int], infos: list[ImageInfo]
) -> RoiPlan | None:
    """The ROI of every used image for a TrainConfig (None when cfg.roi is 'off').

    Raises:
        ValueError: no annotation file for 'annotations', or images that need a
            localiser proposal and no localiser.
    """
    if cfg.roi == "off":
        return None
    boxes: dict[int, imaging.Box | None] = {}
    sources: dict[int, str] = {}
    if cfg.roi == "annotations":
        anns = for_dataset(dataset, cfg.annotations)
        for i in used:
            size = infos[i].size
            ann = anns[i]
            box = ann.roi(size[1], size[0]) if ann and size else None
            box = imaging.clip_roi(box, size[1], size[0]) if box else None
            if box is not None:
                boxes[i], sources[i] = box, "annotation"
    missing = [i for i in used if i not in boxes]
    localiser = resolve_localiser(cfg.localiser) if cfg.localiser else None
    if missing and localiser is None:
        raise ValueError(
            f"{len(missing)} of {len(used)} images have no annotated nodule box; give a "
            "localiser (--localiser RUN_ID or folder) to propose their ROI"
        )
    if missing:
        proposed = propose_all(
            [dataset.records[i].path for i in missing],
            [dataset.sha256()[i] for i in missing],
            localiser,
        )
        for i, box in zip(missing, proposed, strict=True):
            boxes[i], sources[i] = box, "localiser" if box else "none"
    if cfg.roi_jitter > 0:
        rng = np.random.default_rng([cfg.seed, 7])
        for i in sorted(set(train) & set(boxes)):
            if boxes[i] is not None and infos[i].size:
                boxes[i] = jitter(boxes[i], cfg.roi_jitter, infos[i].size, rng)
    result = RoiPlan(cfg.roi, cfg.roi_margin, cfg.roi_jitter, boxes, sources, localiser)
    log.info("ROI per image: %s", result.counts())
    return result


def download_rois(run_id: str, dst: str) -> str | None:
    """The run's rois.json (None for runs trained without an ROI)."""
    try:
        return mlflow.artifacts.download_artifacts(
            run_id=run_id, artifact_path="rois.json", dst_path=dst
        )
    except Exception:  # MlflowException / OSError: no such artifact
        return None


def read_rois(path: str | None):
    """rel -> (box or None, margin) of a run's rois.json; (None, margin) for unknown images."""
    if not path:
        return lambda rel: (None, imaging.ROI_MARGIN)
    table = json.loads(Path(path).read_text())
    margin = float(table["margin"])

    def crop(rel: str) -> tuple[imaging.Box | None, float]:
        box = (table["rois"].get(rel) or {}).get("box")
        return (tuple(box) if box else None), margin

    return crop


def served_crops(rois_path: str | None, localiser: Localiser | None, root: Path, rels: list[str]):
    """rel -> (box, margin) of the localiser's proposal, for the images among `rels` that
    training cropped to an annotated box: what the service classifies when such an image
    comes without a box. Empty without a localiser or annotated crops.

    The OOD reference and its threshold take these crops beside the annotated ones, or
    a model trained on annotations flags most of its own images served without a box
    (28 of 40 demo frames: a localiser's box is not an annotator's).
    """
    if localiser is None or not rois_path:
        return {}
    table = json.loads(Path(rois_path).read_text())
    annotated = [r for r in rels if (table["rois"].get(r) or {}).get("source") == "annotation"]
    paths = [root / r for r in annotated]
    boxes = propose_all(paths, [sha256_file(p) for p in paths], localiser)
    margin = float(table["margin"])
    return {r: (box, margin) for r, box in zip(annotated, boxes, strict=True)}


def export_bundle(roi_info: dict, model_dir: Path, out_dir: Path) -> dict:
    """Copy the localiser a run bundled into an export folder; the card's ROI fields.

    Returns:
        {'roi': ..., 'bundle': {file: sha256}, 'preprocessing': ...} for the model card.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    bundle = {}
    if roi_info.get("localiser"):
        for name in (ONNX_FILE, CARD_FILE):
            shutil.copy(model_dir / name, out_dir / name)
            bundle[name] = sha256_file(out_dir / name)
        if bundle[ONNX_FILE] != roi_info["localiser"]["sha256"]:
            raise ValueError("the bundled localiser does not match the one the run recorded")
    return {
        "roi": roi_info,
        "bundle": bundle,
        "preprocessing": (
            "thyroid_cad.imaging.prepare_input with an ROI box (x, y, w, h in the image's "
            f"pixels): a square of side max(w, h) * (1 + 2 * {roi_info['margin']}) centred on "
            "the box, kept inside the ultrasound content (black beyond it), resized to "
            "input_size; with no box, the bundled localiser proposes it (roi.localiser); "
            "normalization is in the graph"
        ),
    }
