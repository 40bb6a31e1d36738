"""Out-of-distribution (OOD) score baked into the exported graph: a Mahalanobis distance.

Method (Lee et al. 2018, "A simple unified framework for detecting out-of-distribution
samples and adversarial attacks"): the classifier's pooled features (the vector its
head reads) of the TRAINING images, class-conditional means mu_k and one shared
covariance, here shrunk with Ledoit-Wolf (sklearn.covariance.LedoitWolf) because the
thyroid sets have fewer images than features. The score of an image is

    ood_score = min_k sqrt((f - mu_k)^T Sigma^-1 (f - mu_k))

computed in the ONNX graph from the same forward pass as the probabilities (output
`ood_score`, N), so the ONNX file stays the whole contract. Why this one: it needs no
outlier data to train on, it uses the features the decision is made on, and it is a
closed form of two constants (a whitening matrix and the whitened means) that an ONNX
graph carries without custom operators.

The threshold is the 95th percentile of the score on the run's VALIDATION images,
scored by the exported graph itself: about 5 % of images like the validation set are
flagged by design. Images are prepared exactly as in training (ROI crops included), and
as they will be served: a model trained on annotated boxes that bundles a localiser is
also fitted and thresholded on the localiser's crops of those images, which the service
classifies when a frame comes without a box.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import keras
import numpy as np
from keras import layers, ops

from thyroid_cad import imaging
from training import data as data_mod
from training import models, roi

log = logging.getLogger(__name__)

OUTPUT_NAME = "ood_score"
METHOD = "mahalanobis"
FEATURE_LAYER = "pooled features (GlobalAveragePooling of the cam_head input)"
QUANTILE = 0.95
# At most this many training images are embedded for the reference (CPU time at export).
MAX_FIT_IMAGES = 2000
PERCENTILES = (5, 25, 50, 75, 90, 95, 99)
SCORE_TOLERANCE = 1e-3  # relative, onnxruntime vs the float64 reference


@dataclass(frozen=True)
class Reference:
    """The training images in feature space: whitened class means and the whitener."""

    whitener: np.ndarray  # C x C, lower Cholesky factor of the precision matrix
    centres: np.ndarray  # K x C, class means @ whitener
    train_n: int
    shrinkage: float

    def score(self, features: np.ndarray) -> np.ndarray:
        """The Mahalanobis distance to the nearest class mean (float64), per row."""
        z = np.asarray(features, np.float64) @ self.whitener
        d2 = ((z[:, None, :] - self.centres[None]) ** 2).sum(axis=-1)
        return np.sqrt(np.maximum(d2.min(axis=1), 0.0))


def fit(features: np.ndarray, labels: np.ndarray, num_classes: int) -> Reference:
    """Class means and a shared Ledoit-Wolf covariance of training features.

    Raises:
        ValueError: fewer than two images, or a class without any.
    """
    from sklearn.covariance import LedoitWolf

    f = np.asarray(features, np.float64)
    y = np.asarray(labels)
    if f.ndim != 2 or len(f) < 2 or len(f) != len(y):
        raise ValueError(f"need N x C features with N >= 2 and N labels; got {f.shape}")
    missing = [k for k in range(num_classes) if not np.any(y == k)]
    if missing:
        raise ValueError(f"classes {missing} have no training image to take a mean of")
    means = np.stack([f[y == k].mean(axis=0) for k in range(num_classes)])
    centred = f - means[y]  # within-class scatter: the shared covariance of Lee et al.
    lw = LedoitWolf(assume_centered=True).fit(centred)
    precision = np.linalg.inv(lw.covariance_)
    precision = (precision + precision.T) / 2
    whitener = np.linalg.cholesky(precision)  # precision = L L^T, so d^2 = |(f - mu) L|^2
    return Reference(whitener, means @ whitener, len(f), float(lw.shrinkage_))


class MahalanobisScore(layers.Layer):
    """Pooled features (N x C) -> ood_score (N): the constants of a Reference, in-graph."""

    def __init__(self, reference: Reference, **kwargs):
        kwargs.setdefault("dtype", "float32")
        super().__init__(**kwargs)
        self.reference = reference

    def call(self, features):
        w = ops.convert_to_tensor(self.reference.whitener.astype("float32"))
        centres = ops.convert_to_tensor(self.reference.centres.astype("float32"))
        z = ops.matmul(ops.cast(features, "float32"), w)
        d2 = ops.sum(ops.square(ops.expand_dims(z, 1) - ops.expand_dims(centres, 0)), axis=-1)
        return ops.sqrt(ops.maximum(ops.min(d2, axis=1), 0.0))

    def compute_output_shape(self, input_shape):
        return (input_shape[0],)


def pooled(model: keras.Model):
    """The symbolic pooled features of a trained model (what its head and SVM / RF read)."""
    return layers.GlobalAveragePooling2D(name="ood_pooled")(model.get_layer("cam_head").input)


def with_heatmaps_and_score(model: keras.Model, reference: Reference) -> keras.Model:
    """models.with_heatmaps plus `ood_score`, all from one pass through the backbone."""
    head = model.get_layer("cam_head")
    probabilities, cam = head.output
    score = MahalanobisScore(reference, name="mahalanobis")(pooled(model))
    heads = models.descriptor_outputs(model)
    return keras.Model(
        model.inputs, {"probabilities": probabilities, "cam": cam, **heads, OUTPUT_NAME: score}
    )


def features_and_score(model: keras.Model, reference: Reference) -> keras.Model:
    """models.feature_extractor plus `ood_score` (SVM / RF graphs)."""
    features = pooled(model)
    score = MahalanobisScore(reference, name="mahalanobis")(features)
    return keras.Model(model.inputs, [features, score], name="features_and_score")


# --------------------------------------------------------------------------- images


def run_sides(split_path: str | None, holdout_path: str | None) -> dict[str, list[str]]:
    """{'train', 'val', ...: [rel]} the run really used: its holdout.json for a
    leave-one-source-out fold (its split.json still lists the held-out source), else
    its split.json."""
    if holdout_path and Path(holdout_path).is_file():
        return {k: sorted(v) for k, v in json.loads(Path(holdout_path).read_text()).items()}
    if not split_path:
        return {}
    sides: dict[str, list[str]] = {}
    for rel, side in json.loads(Path(split_path).read_text())["assignment"].items():
        sides.setdefault(side, []).append(rel)
    return {k: sorted(v) for k, v in sides.items()}


def load_side(
    root: Path, rels: list[str], size: int, crop, limit: int | None = None, seed: int = 0
) -> np.ndarray:
    """Images of one side prepared as in training (ROI crops through `crop(rel)`)."""
    if limit is not None and len(rels) > limit:
        rng = np.random.default_rng(seed)
        rels = sorted(rng.choice(rels, size=limit, replace=False).tolist())
    return np.stack([imaging.load_prepared(root / rel, size, *crop(rel)) for rel in rels])


def reference_for_run(
    model: keras.Model,
    info: dict,
    params: dict,
    split_path: str | None,
    holdout_path: str | None,
    rois_path: str | None,
    localiser: roi.Localiser | None = None,
) -> tuple[Reference, np.ndarray] | None:
    """(Reference fitted on the run's training images, its validation images), or None
    when the run's data is no longer where it was trained (old runs, moved data).

    With the localiser a ROI model bundles, images cropped to an annotation count twice,
    on both crops the service may classify (roi.served_crops)."""
    root = Path(params.get("data", ""))
    sides = run_sides(split_path, holdout_path)
    if not root.is_dir() or not sides.get("train") or not sides.get("val"):
        log.warning("OOD reference skipped: the run's training data is not at %s", root)
        return None
    manifest = params.get("manifest")  # MLflow keeps parameters as strings: 'None'
    dataset = data_mod.scan(root, manifest if manifest not in (None, "", "None") else None)
    label_of = {r.rel: r.label for r in dataset.records}
    train = [rel for rel in sides["train"] if rel in label_of]
    val = [rel for rel in sides["val"] if (root / rel).is_file()]
    if not train or not val:
        log.warning("OOD reference skipped: the run's images are no longer under %s", root)
        return None
    if len(train) > MAX_FIT_IMAGES:
        rng = np.random.default_rng(0)
        train = sorted(rng.choice(train, size=MAX_FIT_IMAGES, replace=False).tolist())
    size = int(info["image_size"])
    crop = roi.read_rois(rois_path)
    names = list(info["class_names"])
    served = roi.served_crops(rois_path, localiser, root, train + val)
    proposed_train = [rel for rel in train if rel in served]
    proposed_val = [rel for rel in val if rel in served]
    labels = np.array([names.index(label_of[rel]) for rel in train + proposed_train])
    images = np.concatenate(
        [load_side(root, train, size, crop)]
        + ([load_side(root, proposed_train, size, served.get)] if proposed_train else [])
    )
    features = models.feature_extractor(model).predict(
        images.astype("float32"), batch_size=32, verbose=0
    )
    reference = fit(features, labels, len(names))
    log.info(
        "OOD reference: %d training images (%d also on the localiser's crop), %d features, "
        "Ledoit-Wolf shrinkage %.3f",
        len(train),
        len(proposed_train),
        features.shape[1],
        reference.shrinkage,
    )
    val_images = [load_side(root, val, size, crop)]
    if proposed_val:
        val_images.append(load_side(root, proposed_val, size, served.get))
    return reference, np.concatenate(val_images)


def card_block(reference: Reference, val_scores: np.ndarray) -> dict:
    """The model card's `ood` entry: method, threshold and the validation distribution."""
    s = np.asarray(val_scores, np.float64)
    return {
        "method": f"{METHOD}: min over classes of the Mahalanobis distance of the pooled "
        "features to the class means of the training images, shared covariance with "
        "Ledoit-Wolf shrinkage (Lee et al. 2018)",
        "output": OUTPUT_NAME,
        "feature_layer": FEATURE_LAYER,
        "threshold": float(np.quantile(s, QUANTILE)),
        "quantile": QUANTILE,
        "train_n": reference.train_n,
        "shrinkage": reference.shrinkage,
        "feature_dim": int(reference.whitener.shape[0]),
        "validation": {
            "n": int(len(s)),
            "mean": float(s.mean()),
            **{f"p{q}": float(np.percentile(s, q)) for q in PERCENTILES},
        },
    }
