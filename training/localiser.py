"""The nodule localiser: a compact U-Net that outlines the nodule on a whole frame.

It proposes the region of interest (ROI) for frames nobody annotated: the classifier's
training images from sources without outlines, and images sent to the service without
a box. Trained on per-pixel truth from annotation files (thyroid-seed's DDTI outlines,
breast-us lesion masks, the phantom's outlines; see training/annotations.py), on the
same input the classifier gets without an ROI (thyroid_cad.imaging.prepare_input: crop
to content, letterbox), logged to MLflow, and exported to ONNX (uint8 image in, mask
probability out) with a card, parity-checked like the classifier.

From the mask, thyroid_cad.nodule.propose keeps the largest component on the frame and
boxes it; the held-out metrics are Dice and IoU of the mask and IoU of that box.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path

import keras
import mlflow
import numpy as np
import onnx
import onnxruntime as ort
import tensorflow as tf
import tf2onnx
from keras import layers, ops
from PIL import Image, ImageDraw

from thyroid_cad import imaging, nodule
from thyroid_cad.files import sha256_file
from training import export, models, pipeline, tracking
from training.annotations import Annotation, read_annotations
from training.audit import inspect_all
from training.data import DataError, Dataset, Record
from training.fitting import WEIGHT_PARITY_IMAGES, MlflowEpochLogger, log_weights, subsample
from training.roi import CARD_FILE, ONNX_FILE, OUTPUT_NAME
from training.splits import grouped_split
from training.unet import build_encoder_unet, build_unet

log = logging.getLogger(__name__)

ENCODERS = ("unet", "mobilenetv2")

PARITY_TOLERANCE = 1e-4  # max abs difference of mask probabilities, onnxruntime vs Keras
# Augmentation: crop side as a fraction of the frame (above 1 zooms out, padding black),
# brightness (0-255 levels) and contrast factor.
CROP_RANGE = (0.8, 1.15)
BRIGHTNESS = 20.0
CONTRAST = 0.2
INTENDED_USE = (
    "Proposes the region of interest (the largest nodule) on a thyroid ultrasound frame, "
    "for the classifier it is bundled with; the clinician reviews and may redraw it. "
    "Not a medical device; not for diagnostic use."
)


@dataclass
class LocaliserConfig:
    """Everything that defines a localiser run; every field is logged to MLflow."""

    annotations: list[str]
    image_size: int = 128
    filters: tuple[int, ...] = (8, 16, 32, 64, 128)
    # The down path: "unet" (this file's, from scratch) or "mobilenetv2" (the pretrained
    # network, frozen, from `weights`: a local file or "imagenet"; filters then give the
    # up path's widths at strides 1..16).
    encoder: str = "unet"
    weights: str | None = None
    epochs: int = 30
    batch_size: int = 16
    learning_rate: float = 2e-3
    patience: int = 6
    seed: int = 0
    val_fraction: float = 0.15
    test_fraction: float = 0.15
    augment: bool = True
    max_images: int | None = None
    threshold: float = nodule.MASK_THRESHOLD
    experiment: str = "thyroid-cad-localiser"
    run_name: str | None = None

    def validate(self) -> None:
        if not self.annotations:
            raise ValueError("the localiser needs at least one annotation file (--annotations)")
        if self.encoder not in ENCODERS:
            raise ValueError(f"unknown encoder {self.encoder!r}; choose one of {ENCODERS}")
        if self.encoder == "unet" and self.weights is not None:
            raise ValueError("the unet encoder trains from scratch; weights go with mobilenetv2")
        if self.encoder == "mobilenetv2" and len(self.filters) != len(models.MOBILENETV2_TAPS):
            raise ValueError(
                f"the mobilenetv2 encoder needs {len(models.MOBILENETV2_TAPS)} up-path widths "
                f"(strides 1..16), got {len(self.filters)}"
            )
        stride = self.stride
        if self.image_size < 32 or self.image_size % stride:
            raise ValueError(
                f"image size must be >= 32 and divisible by {stride} "
                f"(the {self.encoder} encoder's deepest stride), got {self.image_size}"
            )
        if len(self.filters) < 2 or any(f < 1 for f in self.filters):
            raise ValueError(f"filters must be at least two positive counts, got {self.filters}")
        if self.epochs < 1:
            raise ValueError("epochs must be at least 1")
        if not 0 < self.threshold < 1:
            raise ValueError("threshold must be between 0 and 1")

    @property
    def stride(self) -> int:
        """How far the encoder's deepest map is downsampled."""
        return 32 if self.encoder == "mobilenetv2" else 2 ** (len(self.filters) - 1)


def build_localiser(cfg: LocaliserConfig) -> keras.Model:
    """The network cfg describes: the compact U-Net, or the U-Net on a frozen ImageNet
    MobileNetV2 (its batch-norm statistics kept; only the up path learns)."""
    if cfg.encoder == "unet":
        return build_unet(cfg.image_size, tuple(cfg.filters))
    encoder = models.mobilenetv2_layers(cfg.image_size, cfg.weights, models.MOBILENETV2_TAPS)
    encoder.trainable = False
    return build_encoder_unet(encoder, cfg.image_size, tuple(cfg.filters))


# --------------------------------------------------------------------------- #
# Model
# --------------------------------------------------------------------------- #
def dice_bce_loss(y_true, y_pred):
    """Binary cross-entropy plus (1 - soft Dice) per image: Dice copes with nodules
    covering a few percent of the frame; an empty truth and an empty answer score 1."""
    y_true = ops.cast(y_true, "float32")
    eps = 1e-6
    y_pred_c = ops.clip(y_pred, eps, 1 - eps)
    bce = -ops.mean(y_true * ops.log(y_pred_c) + (1 - y_true) * ops.log(1 - y_pred_c), (1, 2))
    inter = ops.sum(y_true * y_pred, axis=(1, 2))
    denom = ops.sum(y_true, axis=(1, 2)) + ops.sum(y_pred, axis=(1, 2))
    dice = (2 * inter + 1.0) / (denom + 1.0)
    return bce + 1.0 - dice


# --------------------------------------------------------------------------- #
# Data
# --------------------------------------------------------------------------- #
def collect(annotation_files: list[str]) -> tuple[Dataset, list[Annotation]]:
    """Images with per-pixel truth from annotation files, as one dataset.

    Each file is a source (named after its folder: thyroid-seed, breast-us, ...); the
    source is the record's label so a split keeps every source's share, and cases are
    kept per source.

    Raises:
        DataError: a file is missing or malformed, or no image has an outline.
    """
    records: list[Record] = []
    anns: list[Annotation] = []
    seen: set[Path] = set()
    for file in annotation_files:
        source = Path(file).resolve().parent.name
        for ann in read_annotations(file).values():
            if not ann.has_outline or ann.image in seen:
                continue
            if not ann.image.is_file():
                raise DataError(f"{file}: image {ann.rel} not found at {ann.image}")
            seen.add(ann.image)
            case = f"{source}:{ann.case_id}" if ann.case_id else None
            records.append(Record(ann.image, f"{source}/{ann.rel}", source, None, case))
            anns.append(ann)
    if not records:
        raise DataError(f"no image with an outline or mask in {annotation_files}")
    root = Path(annotation_files[0]).resolve().parent
    names = tuple(sorted({r.label for r in records}))
    return Dataset(root=root, records=records, class_names=names), anns


def _prepare_one(ann: Annotation, size: int) -> tuple[np.ndarray, imaging.Geometry, np.ndarray]:
    """(square uint8 S x S x 3, geometry, frame mask) of one annotated image."""
    rgb = imaging.to_rgb_array(imaging.open_image(ann.image))
    mask = ann.mask(*rgb.shape[:2])
    square, geometry = imaging.prepare_input(rgb, size)
    return square, geometry, mask


def load_arrays(dataset: Dataset, anns: list[Annotation], size: int) -> np.ndarray:
    """uint8 N x S x S x 4: the prepared frame (RGB) and its nodule mask (0/1), cached."""

    def compute() -> np.ndarray:
        out = np.empty((len(anns), size, size, 4), dtype=np.uint8)

        def work(i: int) -> None:
            square, geometry, mask = _prepare_one(anns[i], size)
            out[i, ..., :3] = square
            out[i, ..., 3] = imaging.to_square(mask.astype(np.float32), geometry) >= 0.5

        with ThreadPoolExecutor(max_workers=min(8, (os.cpu_count() or 1) * 2)) as pool:
            list(pool.map(work, range(len(anns))))
        return out

    outlines = json.dumps([[a.polygons, [str(m) for m in a.mask_files]] for a in anns])
    key = f"{imaging.PREPROCESSING_VERSION}|{size}|{'|'.join(dataset.sha256())}|{outlines}"
    return pipeline.cached("localiser", key, compute)


def _augment(batch: tf.Tensor, seed: tf.Tensor, size: int) -> tuple[tf.Tensor, tf.Tensor]:
    """One random crop-and-resize per image (zoom in or out, left-right flip) applied to
    frame and mask together, then brightness and contrast on the frame only.

    Every draw is a function of the batch's own `seed` (training.pipeline.batch_seeds)."""
    n = tf.shape(batch)[0]

    def uniform(lo, hi, offset):
        return pipeline.draw(seed, offset, [n], lo, hi)

    side = uniform(*CROP_RANGE, 1)
    top, left = uniform(0.0, 1.0, 2) * (1 - side), uniform(0.0, 1.0, 3) * (1 - side)
    flip = uniform(0.0, 1.0, 4) < 0.5
    x1, x2 = tf.where(flip, left + side, left), tf.where(flip, left, left + side)
    boxes = tf.stack([top, x1, top + side, x2], axis=1)
    out = tf.image.crop_and_resize(batch, boxes, tf.range(n), [size, size])
    image, mask = out[..., :3], out[..., 3]
    mean = tf.reduce_mean(image, axis=[1, 2, 3], keepdims=True)
    contrast = tf.reshape(uniform(1 - CONTRAST, 1 + CONTRAST, 5), [-1, 1, 1, 1])
    brightness = tf.reshape(uniform(-BRIGHTNESS, BRIGHTNESS, 6), [-1, 1, 1, 1])
    image = tf.clip_by_value((image - mean) * contrast + mean + brightness, 0.0, 255.0)
    return image, tf.cast(mask > 0.5, tf.float32)


def make_dataset(
    arrays: np.ndarray, batch_size: int, training: bool, augment: bool, seed: int
) -> tf.data.Dataset:
    """Batches of (float32 0-255 frames, 0/1 masks), prefetched. Shuffling and
    augmentation follow `seed` alone (new draws each epoch, the same ones every run)."""
    size = arrays.shape[1]
    ds = tf.data.Dataset.from_tensor_slices(arrays)
    if training:
        ds = ds.shuffle(len(arrays), seed=seed, reshuffle_each_iteration=True)
    ds = ds.batch(batch_size).map(lambda b: tf.cast(b, tf.float32))
    if training and augment:
        ds = pipeline.batch_seeds(ds, seed).map(
            lambda b, s: _augment(b, s, size), num_parallel_calls=tf.data.AUTOTUNE
        )
    else:
        ds = ds.map(lambda b: (b[..., :3], b[..., 3]))
    return ds.prefetch(tf.data.AUTOTUNE)


# --------------------------------------------------------------------------- #
# Evaluation
# --------------------------------------------------------------------------- #
def _overlap(a: np.ndarray, b: np.ndarray) -> tuple[float, float]:
    """(Dice, IoU) of two boolean masks."""
    inter, total = float((a & b).sum()), float(a.sum() + b.sum())
    union = total - inter
    return (2 * inter / total, inter / union) if union else (1.0, 1.0)


def box_iou(a: imaging.Box | None, b: imaging.Box | None) -> float:
    """IoU of two (x, y, w, h) boxes; 0 when either is missing."""
    if a is None or b is None:
        return 0.0
    ix = max(0, min(a[0] + a[2], b[0] + b[2]) - max(a[0], b[0]))
    iy = max(0, min(a[1] + a[3], b[1] + b[3]) - max(a[1], b[1]))
    inter = ix * iy
    return inter / float(a[2] * a[3] + b[2] * b[3] - inter)


def evaluate_masks(
    probs: np.ndarray, anns: list[Annotation], sources: list[str], size: int, threshold: float
) -> tuple[dict[str, float], list[dict]]:
    """Held-out metrics on the frames' own pixels.

    dice / iou: the localiser's mask (largest component, mapped back to the frame)
    against every outlined nodule, over frames with a nodule. box_iou: the proposed ROI
    against the largest outlined nodule's box; box_hit: share with box IoU >= 0.5.
    empty_false_positive: frames without a lesion where something was proposed.
    Returns the metrics (also per source, suffixed) and per-image rows.
    """
    rows = []
    for prob, ann, source in zip(probs, anns, sources, strict=True):
        _, geometry, truth = _prepare_one(ann, size)
        proposal = nodule.propose(prob, geometry, threshold)
        row = {"image": str(ann.image), "source": source, "empty": not truth.any()}
        if truth.any():
            dice, iou = _overlap(proposal.mask, truth)
            truth_box = ann.roi(*truth.shape)
            row.update(dice=dice, iou=iou, box_iou=box_iou(proposal.box, truth_box))
        else:
            row["false_positive"] = proposal.box is not None
        rows.append(row)

    def summarise(subset: list[dict], suffix: str) -> dict[str, float]:
        lesions = [r for r in subset if not r["empty"]]
        empty = [r for r in subset if r["empty"]]
        out = {}
        if lesions:
            for key in ("dice", "iou", "box_iou"):
                out[f"{key}{suffix}"] = float(np.mean([r[key] for r in lesions]))
            out[f"box_hit{suffix}"] = float(np.mean([r["box_iou"] >= 0.5 for r in lesions]))
        if empty:
            out[f"empty_false_positive{suffix}"] = float(
                np.mean([r["false_positive"] for r in empty])
            )
        out[f"n{suffix}"] = float(len(subset))
        return out

    metrics = summarise(rows, "")
    for source in sorted(set(sources)):
        metrics.update(summarise([r for r in rows if r["source"] == source], f"_{source}"))
    return metrics, rows


def _montage(arrays: np.ndarray, probs: np.ndarray, threshold: float, path: Path) -> None:
    """Up to 16 held-out frames: truth outlined in green, the localiser's mask in red."""
    n = min(16, len(arrays))
    size = arrays.shape[1]
    sheet = Image.new("RGB", (4 * size, ((n + 3) // 4) * size))
    for i in range(n):
        frame = Image.fromarray(arrays[i, ..., :3]).convert("RGB")
        red = Image.new("RGB", frame.size, (255, 40, 40))
        found = nodule.largest_component(probs[i] > threshold)
        frame.paste(red, mask=Image.fromarray((found * 90).astype(np.uint8)))
        box = nodule.box_of(arrays[i, ..., 3] > 0)
        if box is not None:
            x, y, w, h = box
            ImageDraw.Draw(frame).rectangle([x, y, x + w - 1, y + h - 1], outline=(40, 255, 40))
        sheet.paste(frame, ((i % 4) * size, (i // 4) * size))
    sheet.save(path)


# --------------------------------------------------------------------------- #
# Export
# --------------------------------------------------------------------------- #
def serving_model(model: keras.Model) -> keras.Model:
    """uint8 image in, 'mask' (N x S x S probability) out: what gets exported."""
    size = model.input_shape[1]
    image = keras.Input((size, size, 3), dtype="uint8", name=export.INPUT_NAME)
    mask = layers.Identity(name=OUTPUT_NAME)(model(export._ToFloat(name="to_float")(image)))
    return keras.Model(image, mask, name="localiser_serving")


def export_localiser(
    model: keras.Model, out_dir: Path, parity_images: np.ndarray, card_extra: dict
) -> dict:
    """Write out_dir/localiser.onnx and out_dir/localiser_card.json; returns the card."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    size = int(model.input_shape[1])
    proto = export._convert(serving_model(model), size)
    export._rename_outputs(proto, {3: OUTPUT_NAME})
    proto.doc_string = f"thyroid-cad nodule localiser: {export.DISCLAIMER}"
    onnx.checker.check_model(proto)
    path = out_dir / ONNX_FILE
    onnx.save_model(proto, path)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (got,) = session.run([OUTPUT_NAME], {export.INPUT_NAME: parity_images})
    ref = np.asarray(model(parity_images.astype("float32"), training=False))
    diff = float(np.max(np.abs(got - ref)))
    card = {
        "format": "thyroid-cad localiser card v1",
        "kind": "localiser",
        "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "input_size": size,
        "input": {
            "name": export.INPUT_NAME,
            "dtype": "uint8",
            "layout": "NHWC",
            "channels": "RGB",
            "range": [0, 255],
            "batch": "dynamic",
        },
        "outputs": {OUTPUT_NAME: "N x S x S, probability that the pixel is nodule"},
        "preprocessing_version": imaging.PREPROCESSING_VERSION,
        "preprocessing": (
            "thyroid_cad.imaging.prepare_input without an ROI: decode to RGB uint8, crop to "
            "the ultrasound content, letterbox to input_size; normalization is in the graph"
        ),
        "postprocessing": (
            "thyroid_cad.nodule.propose: the map back onto the frame (imaging.to_original), "
            "pixels above threshold, largest connected component; its box is the ROI"
        ),
        "parity": {
            "images": int(len(parity_images)),
            "mask_max_abs_diff": diff,
            "mask_tolerance": PARITY_TOLERANCE,
            "passed": bool(diff < PARITY_TOLERANCE),
        },
        "intended_use": INTENDED_USE,
        "disclaimer": export.DISCLAIMER,
        "onnx": {"opset": export.OPSET, "tf2onnx": tf2onnx.__version__, "onnx": onnx.__version__},
        "sha256": sha256_file(path),
        **card_extra,
    }
    (out_dir / CARD_FILE).write_text(json.dumps(card, indent=1))
    log.info("exported %s (parity %s: mask diff %.2g)", path, card["parity"]["passed"], diff)
    return card


# --------------------------------------------------------------------------- #
# Training
# --------------------------------------------------------------------------- #
def train_localiser(cfg: LocaliserConfig) -> str:
    """Train, evaluate on a held-out grouped split, export and log; returns the run id.

    Raises:
        ValueError (DataError included): the configuration or the data cannot be used.
    """
    cfg.validate()
    started = time.monotonic()
    keras.utils.set_random_seed(cfg.seed)
    dataset, anns = collect(cfg.annotations)
    kept = subsample(dataset, cfg.max_images, cfg.seed)
    if kept is not dataset:
        index = {r.path: i for i, r in enumerate(dataset.records)}
        anns = [anns[index[r.path]] for r in kept.records]
        dataset = kept
    infos = inspect_all(dataset)
    split = grouped_split(dataset, cfg.val_fraction, cfg.test_fraction, cfg.seed, infos)
    idx = {s: split.indices(s) for s in ("train", "val", "test")}
    if any(len(v) == 0 for v in idx.values()):
        raise ValueError(f"split left an empty part: { {k: len(v) for k, v in idx.items()} }")
    arrays = load_arrays(dataset, anns, cfg.image_size)
    sources = [r.label for r in dataset.records]
    prepared_s = time.monotonic() - started

    tracking.setup(cfg.experiment)
    with mlflow.start_run(
        run_name=cfg.run_name or f"localiser-{cfg.encoder}{cfg.image_size}"
    ) as run:
        params = {k: v for k, v in asdict(cfg).items() if k not in ("experiment", "run_name")}
        params["annotations"] = ",".join(cfg.annotations)
        params["weights"] = cfg.weights or "none"
        mlflow.log_params(
            {
                **params,
                "filters": ",".join(map(str, cfg.filters)),
                "sources": ",".join(dataset.class_names),
                "dataset_fingerprint": dataset.fingerprint(),
                "split_id": split.split_id,
                "preprocessing_version": imaging.PREPROCESSING_VERSION,
                **{f"n_{s}": len(v) for s, v in idx.items()},
            }
        )
        mlflow.set_tags({"kind": "localiser"})
        model = build_localiser(cfg)
        sample = arrays[idx["train"][:WEIGHT_PARITY_IMAGES], ..., :3]  # copies those alone
        pretrained = log_weights(cfg.encoder, cfg.weights, sample)
        model.compile(optimizer=keras.optimizers.Adam(cfg.learning_rate), loss=dice_bce_loss)
        history: dict[str, list[float]] = {}
        ds = {
            s: make_dataset(arrays[idx[s]], cfg.batch_size, s == "train", cfg.augment, cfg.seed)
            for s in ("train", "val")
        }
        fit_started = time.monotonic()
        model.fit(
            ds["train"],
            validation_data=ds["val"],
            epochs=cfg.epochs,
            verbose=2,
            callbacks=[
                MlflowEpochLogger(history),
                keras.callbacks.EarlyStopping(
                    monitor="val_loss", patience=cfg.patience, restore_best_weights=True
                ),
            ],
        )
        fit_s = time.monotonic() - fit_started

        metrics: dict[str, float] = {}
        probs = {}
        for s in ("val", "test"):
            probs[s] = model.predict(arrays[idx[s], ..., :3].astype("float32"), verbose=0)
            m, _ = evaluate_masks(
                probs[s],
                [anns[i] for i in idx[s]],
                [sources[i] for i in idx[s]],
                cfg.image_size,
                cfg.threshold,
            )
            metrics.update({f"{s}_{k}": v for k, v in m.items()})
        metrics.update(prepare_seconds=prepared_s, fit_seconds=fit_s)
        metrics["epochs_run"] = float(len(history.get("loss", [])))
        mlflow.log_metrics(metrics)

        with tempfile.TemporaryDirectory() as tmp:
            tmp_path = Path(tmp)
            split.save(tmp_path / "split.json")
            mlflow.log_artifact(str(tmp_path / "split.json"))
            (tmp_path / "plots").mkdir()
            _montage(
                arrays[idx["test"]],
                probs["test"],
                cfg.threshold,
                tmp_path / "plots" / "test_predictions.png",
            )
            mlflow.log_artifacts(str(tmp_path / "plots"), "plots")
            model_dir = tmp_path / "model"
            model_dir.mkdir()
            model.save(model_dir / models.UNET_WEIGHTS_FILE)
            mlflow.log_artifacts(str(model_dir), "model")
            card_extra = {
                "architecture": {
                    "name": "U-Net" if cfg.encoder == "unet" else "U-Net, MobileNetV2 encoder",
                    "encoder": cfg.encoder,
                    "filters": list(cfg.filters),
                    "parameters": int(model.count_params()),
                },
                **({"pretrained": pretrained} if pretrained else {}),
                "threshold": cfg.threshold,
                "training_data": {
                    "sources": dict(Counter(sources)),
                    "fingerprint": dataset.fingerprint(),
                    "split_id": split.split_id,
                },
                "metrics": {
                    s: {
                        k.removeprefix(f"{s}_"): v
                        for k, v in metrics.items()
                        if k.startswith(f"{s}_")
                    }
                    for s in ("val", "test")
                },
                "source_run_id": run.info.run_id,
            }
            parity = arrays[idx["test"][: export.PARITY_IMAGES], ..., :3]
            card = export_localiser(model, tmp_path / "localiser", parity, card_extra)
            mlflow.log_artifacts(str(tmp_path / "localiser"), "localiser")
        mlflow.log_metric("total_seconds", time.monotonic() - started)
        if not card["parity"]["passed"]:
            log.warning("localiser parity check failed: %s", card["parity"])
        log.info(
            "localiser run %s: test Dice %.3f, IoU %.3f, box IoU %.3f",
            run.info.run_id,
            metrics.get("test_dice", float("nan")),
            metrics.get("test_iou", float("nan")),
            metrics.get("test_box_iou", float("nan")),
        )
        return run.info.run_id


def export_run(run_id: str, out_dir: Path) -> dict:
    """The ONNX file and card a localiser run logged, copied to out_dir; returns the card."""
    try:
        local = Path(mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path="localiser"))
    except Exception as e:  # MlflowException / OSError: unknown run or not a localiser
        raise ValueError(f"run {run_id} has no exported localiser: {e}") from e
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for name in (ONNX_FILE, CARD_FILE):
        (out_dir / name).write_bytes((local / name).read_bytes())
    try:  # the trained Keras model too: the unet backbone's weights (--weights FOLDER)
        keras_file = mlflow.artifacts.download_artifacts(
            run_id=run_id, artifact_path=f"model/{models.UNET_WEIGHTS_FILE}"
        )
        (out_dir / models.UNET_WEIGHTS_FILE).write_bytes(Path(keras_file).read_bytes())
    except Exception as e:  # MlflowException: a run logged before the model was kept
        log.warning("run %s has no Keras localiser model (%s); ONNX and card only", run_id, e)
    return json.loads((out_dir / CARD_FILE).read_text())
