"""Export a trained run to one ONNX graph plus its model card, with parity checks.

The graph takes `image`: uint8 N x S x S x 3, raw 0-255 RGB already prepared by
thyroid_cad.imaging (crop to content + letterbox), dynamic batch. It returns
`probabilities` (N x K, calibrated) and, for softmax heads, `heatmap`: Grad-CAM of
every class at the last convolutional resolution (N x h x w x K), exact for the
GAP -> Dense head (see training.models.CamHead) and computed in the same forward pass.
Models trained with TI-RADS descriptor heads (`--descriptors`) also return
`descriptor_<name>` (N x categories, probabilities), one per descriptor; the card's
`descriptors` lists each one's category labels in output order.
A logistic-regression probe lives in the network's head (models.fold_linear_probe) and
exports like a softmax run, heatmap included. SVM and Random Forest models are the
feature graph and the scikit-learn classifier (skl2onnx) merged into one graph; they
have no heatmap, and the card says so.
"""

from __future__ import annotations

import json
import logging
import pickle
import tempfile
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
from PIL import Image

from thyroid_cad import imaging, tirads
from thyroid_cad.files import sha256_file
from training import models, ood, roi, sources

log = logging.getLogger(__name__)

OPSET = 17
ML_OPSET = 3
INPUT_NAME = "image"
PROBABILITY_TOLERANCE = 1e-4  # max abs difference, onnxruntime vs Keras
HEATMAP_MIN_PEARSON = 0.99  # per image, after upsampling to the input size
PARITY_IMAGES = 32
# How a classifier on pooled features comes by its probabilities (the card says).
_FEATURE_CALIBRATION = {
    "svm": "Platt (SVM)",
    "rf": "none (forest votes)",
    # runs from before the probe was folded into the head (they saved classifier.pkl)
    "logreg": "logistic regression (its own probabilities)",
}
DISCLAIMER = "Research software: not for diagnostic use."
INTENDED_USE = (
    "Decision support research on thyroid nodule ultrasound images: an estimated "
    "probability of malignancy and a heatmap of the regions that drove it, for review by "
    "a qualified clinician. Not a medical device; not for diagnostic use."
)


class _ToFloat(layers.Layer):
    def call(self, x):
        return ops.cast(x, "float32")


class _GradCam(layers.Layer):
    """ReLU(cam) / (h * w): Grad-CAM's map for a GlobalAveragePooling -> Dense head."""

    def call(self, cam):
        h, w = cam.shape[1], cam.shape[2]
        return ops.relu(cam) / float(h * w)


def serving_model(
    model: keras.Model, with_heatmap: bool, reference: ood.Reference | None = None
) -> keras.Model:
    """uint8 image in; {'probabilities', 'heatmap'} or pooled 'features' out, plus
    'ood_score' (training.ood) when given an OOD reference."""
    size = model.input_shape[1]
    image = keras.Input((size, size, 3), dtype="uint8", name=INPUT_NAME)
    x = _ToFloat(name="to_float")(image)
    if with_heatmap:
        inner = (
            models.with_heatmaps(model)
            if reference is None
            else ood.with_heatmaps_and_score(model, reference)
        )
        out = inner(x)
        probabilities = layers.Identity(name="probabilities")(out["probabilities"])
        heatmap = _GradCam(name="heatmap")(out["cam"])
        extra = {
            k: layers.Identity(name=k)(v)
            for k, v in out.items()
            if k.startswith(tirads.OUTPUT_PREFIX) or k == ood.OUTPUT_NAME
        }
        if extra:  # a dict of outputs: tf2onnx names the graph's outputs by its keys
            outputs = {"probabilities": probabilities, "heatmap": heatmap, **extra}
            return keras.Model(image, outputs, name="serving")
        return keras.Model(image, [probabilities, heatmap], name="serving")
    if reference is not None:
        pooled, score = ood.features_and_score(model, reference)(x)
        features = layers.Identity(name="features")(pooled)
        score = layers.Identity(name=ood.OUTPUT_NAME)(score)
        return keras.Model(image, [features, score], name="serving_features")
    features = layers.Identity(name="features")(models.feature_extractor(model)(x))
    return keras.Model(image, features, name="serving_features")


def _convert(model: keras.Model, size: int) -> onnx.ModelProto:
    spec = (tf.TensorSpec((None, size, size, 3), tf.uint8, name=INPUT_NAME),)
    proto, _ = tf2onnx.convert.from_keras(model, input_signature=spec, opset=OPSET)
    return proto


def _rename_outputs(proto: onnx.ModelProto, names: dict[int, str]) -> None:
    """Give graph outputs stable names, chosen by tensor rank (Keras names vary)."""
    names = {1: ood.OUTPUT_NAME, **names}  # ood_score is the only rank-1 output
    for output in proto.graph.output:
        rank = len(output.type.tensor_type.shape.dim)
        new = names[rank]
        old = output.name
        if old == new:
            continue
        for node in proto.graph.node:
            node.output[:] = [new if o == old else o for o in node.output]
            node.input[:] = [new if i == old else i for i in node.input]
        output.name = new


def _sklearn_graph(clf, n_features: int) -> onnx.ModelProto:
    from skl2onnx import to_onnx
    from skl2onnx.common.data_types import FloatTensorType

    proto = to_onnx(
        clf,
        initial_types=[("features", FloatTensorType([None, n_features]))],
        options={"zipmap": False},
        target_opset={"": OPSET, "ai.onnx.ml": ML_OPSET},
    )
    return proto


def _merge(features: onnx.ModelProto, classifier: onnx.ModelProto) -> onnx.ModelProto:
    """features graph -> classifier graph, one model whose only output is probabilities."""
    features = onnx.compose.add_prefix(features, "cnn_", rename_inputs=False, rename_outputs=False)
    classifier = onnx.compose.add_prefix(classifier, "clf_", rename_inputs=False)
    ir = min(features.ir_version, classifier.ir_version)
    features.ir_version = classifier.ir_version = ir
    # Both graphs must import the same opset versions; newer ones keep the older ops.
    versions: dict[str, int] = {}
    for proto in (features, classifier):
        for imp in proto.opset_import:
            versions[imp.domain] = max(versions.get(imp.domain, 0), imp.version)
    for proto in (features, classifier):
        del proto.opset_import[:]
        proto.opset_import.extend(onnx.helper.make_opsetid(d, v) for d, v in versions.items())
    prob_name = next(o.name for o in classifier.graph.output if "probab" in o.name)
    kept = [o.name for o in features.graph.output if o.name == ood.OUTPUT_NAME]
    merged = onnx.compose.merge_models(
        features, classifier, io_map=[("features", "features")], outputs=[prob_name, *kept]
    )
    _rename_outputs(merged, {2: "probabilities"})
    return merged


def keras_gradcam(model: keras.Model, images: np.ndarray) -> np.ndarray:
    """Grad-CAM (Selvaraju et al. 2017) with tf.GradientTape: N x h x w x K.

    The class score is the head's pre-softmax logit; alpha is the spatial mean of its
    gradient with respect to the last convolutional feature map.
    """
    head = model.get_layer("cam_head")
    features_model = keras.Model(model.inputs, head.input)
    x = tf.convert_to_tensor(images.astype("float32"))
    maps = []
    for k in range(head.num_classes):
        with tf.GradientTape() as tape:
            features = tf.cast(features_model(x, training=False), tf.float32)
            tape.watch(features)
            logits = tf.reduce_mean(features, axis=(1, 2)) @ head.kernel + head.bias
            score = logits[:, k]
        grads = tape.gradient(score, features)
        alpha = tf.reduce_mean(grads, axis=(1, 2), keepdims=True)
        maps.append(tf.nn.relu(tf.reduce_sum(alpha * features, axis=-1)).numpy())
    return np.stack(maps, axis=-1)


def _upsample(heatmap: np.ndarray, size: int) -> np.ndarray:
    return np.asarray(
        Image.fromarray(heatmap.astype(np.float32), mode="F").resize(
            (size, size), Image.Resampling.BILINEAR
        )
    )


def _pearson(a: np.ndarray, b: np.ndarray) -> float:
    """Pearson correlation; two flat maps (e.g. a 1x1 map, or all cut by ReLU) agree."""
    a, b = a.ravel().astype(np.float64), b.ravel().astype(np.float64)
    flat_a = a.std() <= 1e-6 * (np.abs(a).max() + 1e-12)
    flat_b = b.std() <= 1e-6 * (np.abs(b).max() + 1e-12)
    if flat_a or flat_b:
        return 1.0 if flat_a and flat_b else 0.0
    return float(np.corrcoef(a, b)[0, 1])


def heatmap_correlations(onnx_maps: np.ndarray, reference: np.ndarray, size: int) -> list[float]:
    """Lowest Pearson correlation over classes, per image, after upsampling to `size`."""
    out = []
    for i in range(onnx_maps.shape[0]):
        out.append(
            min(
                _pearson(
                    _upsample(onnx_maps[i, ..., k], size), _upsample(reference[i, ..., k], size)
                )
                for k in range(onnx_maps.shape[-1])
            )
        )
    return out


def export_model(
    model: keras.Model,
    info: dict,
    out_dir: Path,
    parity_images: np.ndarray,
    parity_source: str,
    classifier=None,
    card_extra: dict | None = None,
    ood_reference: ood.Reference | None = None,
    ood_images: np.ndarray | None = None,
) -> dict:
    """Write out_dir/model.onnx and out_dir/model_card.json; returns the card.

    Args:
        model: the trained Keras model (backbone + CamHead).
        info: the run's model/info.json (class names, image size, threshold, ...).
        parity_images: uint8 N x S x S x 3 images to compare onnxruntime with Keras on.
        parity_source: where those images came from, recorded in the card.
        classifier: the fitted scikit-learn classifier for SVM / RF runs, else None.
        ood_reference: training.ood.Reference: adds the `ood_score` output and the
            card's `ood` block, its threshold set on `ood_images` (validation images).
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    size = int(info["image_size"])
    if parity_images.shape[1:] != (size, size, 3) or parity_images.dtype != np.uint8:
        raise ValueError(f"parity images must be uint8 N x {size} x {size} x 3")
    has_heatmap = classifier is None
    wrapper = serving_model(model, with_heatmap=has_heatmap, reference=ood_reference)
    descriptors = dict(info.get("descriptors") or {}) if has_heatmap else {}
    proto = _convert(wrapper, size)
    if isinstance(wrapper.output, dict):  # already named by the serving model's output keys
        names = {o.name for o in proto.graph.output}
        wanted = {"probabilities", "heatmap", *map(tirads.output_name, descriptors)}
        wanted |= {ood.OUTPUT_NAME} if ood_reference is not None else set()
        if wanted != names:
            raise ValueError(f"exported graph outputs {sorted(names)}, expected {sorted(wanted)}")
    elif has_heatmap:
        _rename_outputs(proto, {2: "probabilities", 4: "heatmap"})
    else:
        _rename_outputs(proto, {2: "features"})
        n_features = wrapper.get_layer("features").output.shape[-1]
        proto = _merge(proto, _sklearn_graph(classifier, n_features))
    proto.doc_string = f"thyroid-cad {info.get('backbone')} {info.get('classifier')}: {DISCLAIMER}"
    onnx.checker.check_model(proto)
    path = out_dir / "model.onnx"
    onnx.save_model(proto, path)

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    outputs = [o.name for o in session.get_outputs()]
    got = dict(zip(outputs, session.run(None, {INPUT_NAME: parity_images}), strict=True))
    if has_heatmap:
        ref = models.with_heatmaps(model)(parity_images.astype("float32"))
        ref_probs = np.asarray(ref["probabilities"])
    else:
        feats = models.feature_extractor(model).predict(parity_images.astype("float32"), verbose=0)
        ref_probs = classifier.predict_proba(feats)
    prob_diff = float(np.max(np.abs(got["probabilities"] - ref_probs)))
    parity: dict = {
        "images": int(len(parity_images)),
        "image_source": parity_source,
        "probabilities_max_abs_diff": prob_diff,
        "probabilities_tolerance": PROBABILITY_TOLERANCE,
    }
    passed = prob_diff < PROBABILITY_TOLERANCE
    if descriptors:
        keys = {d: tirads.output_name(d) for d in descriptors}
        diffs = {d: float(np.max(np.abs(got[k] - np.asarray(ref[k])))) for d, k in keys.items()}
        parity["descriptors_max_abs_diff"] = diffs
        passed = passed and max(diffs.values()) < PROBABILITY_TOLERANCE
    if has_heatmap:
        corr = heatmap_correlations(got["heatmap"], keras_gradcam(model, parity_images), size)
        parity.update(
            heatmap_min_pearson=float(min(corr)),
            heatmap_mean_pearson=float(np.mean(corr)),
            heatmap_min_pearson_required=HEATMAP_MIN_PEARSON,
        )
        passed = passed and min(corr) >= HEATMAP_MIN_PEARSON
    ood_card = None
    if ood_reference is not None:
        ood_parity, ood_card = _ood_check(model, session, ood_reference, parity_images, ood_images)
        parity.update(ood_parity)
        passed = passed and ood_parity["ood_score_max_rel_diff"] < ood.SCORE_TOLERANCE
    parity["passed"] = bool(passed)

    heatmap_shape = session.get_outputs()[outputs.index("heatmap")].shape if has_heatmap else None
    card = model_card(info, path, parity, heatmap_shape, descriptors, card_extra, ood_card)
    (out_dir / "model_card.json").write_text(json.dumps(card, indent=1))
    log.info("exported %s (parity %s: probs diff %.2g)", path, passed, prob_diff)
    return card


def model_card(
    info: dict,
    path: Path,
    parity: dict,
    heatmap_shape,
    descriptors: dict,
    card_extra: dict | None = None,
    ood_card: dict | None = None,
) -> dict:
    """The model card of the graph at `path` (its sha256 included): what registry/, the
    gate and the service read. `heatmap_shape`: the graph's heatmap output shape, or
    None for graphs without one (SVM / RF)."""
    has_heatmap = heatmap_shape is not None
    size = int(info["image_size"])
    card = {
        "format": "thyroid-cad model card v1",
        "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "class_names": list(info["class_names"]),
        "positive_class": info.get("positive_class", info["class_names"][-1]),
        "input_size": size,
        "input": {
            "name": INPUT_NAME,
            "dtype": "uint8",
            "layout": "NHWC",
            "channels": "RGB",
            "range": [0, 255],
            "batch": "dynamic",
        },
        "preprocessing_version": info.get("preprocessing_version", imaging.PREPROCESSING_VERSION),
        "preprocessing": (
            "thyroid_cad.imaging.prepare: decode to RGB uint8, crop to the ultrasound content, "
            "letterbox to input_size keeping the aspect ratio; normalization is in the graph"
        ),
        "outputs": {
            "probabilities": "N x classes, calibrated (temperature scaling)"
            if has_heatmap
            else "N x classes",
            **(
                {
                    "heatmap": "N x h x w x classes, Grad-CAM per class at the last "
                    "convolutional layer (exact for the GAP-Dense head)"
                }
                if has_heatmap
                else {}
            ),
            **{
                tirads.output_name(d): f"N x {len(labels)}, probabilities of the "
                f"ACR TI-RADS {d} categories (card 'descriptors'), a model estimate"
                for d, labels in descriptors.items()
            },
        },
        **({"descriptors": descriptors} if descriptors else {}),
        "heatmap": has_heatmap,
        "heatmap_shape": [d if isinstance(d, int) else None for d in heatmap_shape or []] or None,
        "heatmap_note": None
        if has_heatmap
        else (
            f"no heatmap: a {info.get('classifier')} classifier on pooled features has no "
            "class activation map; the service reports heatmap as unavailable"
        ),
        "backbone": info.get("backbone"),
        "strategy": info.get("strategy"),
        "classifier": info.get("classifier"),
        "stage": info.get("stage"),
        # Where the backbone's weights came from (path, sha256, import parity).
        "pretrained": info.get("pretrained"),
        "training_data_fingerprint": info.get("dataset_fingerprint"),
        "split_id": info.get("split_id"),
        "threshold": float(info["threshold"]),
        "target_sensitivity": info.get("target_sensitivity"),
        "calibration": {
            "method": "temperature scaling on validation"
            if has_heatmap
            else _FEATURE_CALIBRATION.get(info.get("classifier"), "none"),
            "temperature": info.get("temperature"),
        },
        "intended_use": INTENDED_USE,
        "disclaimer": DISCLAIMER,
        "parity": parity,
        "onnx": {"opset": OPSET, "tf2onnx": tf2onnx.__version__, "onnx": onnx.__version__},
        "sha256": sha256_file(path),
        **(card_extra or {}),
        **({"ood": ood_card} if ood_card else {}),
    }
    if ood_card:
        card["outputs"][ood.OUTPUT_NAME] = (
            "N, distance of the image to the training images in feature space (see ood)"
        )
    return card


def _ood_check(model, session, reference, parity_images, val_images) -> tuple[dict, dict]:
    """ood_score of onnxruntime vs the float64 reference on Keras features; the card's
    `ood` block with its threshold from the exported graph's scores on validation."""
    (got,) = session.run([ood.OUTPUT_NAME], {INPUT_NAME: parity_images})
    feats = models.feature_extractor(model).predict(parity_images.astype("float32"), verbose=0)
    ref = reference.score(feats)
    rel = float(np.max(np.abs(got - ref) / np.maximum(np.abs(ref), 1.0)))
    val = val_images if val_images is not None and len(val_images) else parity_images
    scores = np.concatenate(
        [
            session.run([ood.OUTPUT_NAME], {INPUT_NAME: val[i : i + 32]})[0]
            for i in range(0, len(val), 32)
        ]
    )
    parity = {"ood_score_max_rel_diff": rel, "ood_score_tolerance": ood.SCORE_TOLERANCE}
    return parity, ood.card_block(reference, scores)


def _metrics_with_cis(metrics: dict[str, float]) -> dict:
    keys = (
        "auc",
        "auc_ci_low",
        "auc_ci_high",
        "sensitivity",
        "sensitivity_ci_low",
        "sensitivity_ci_high",
        "specificity",
        "specificity_ci_low",
        "specificity_ci_high",
        "accuracy",
        "balanced_accuracy",
        "ppv",
        "npv",
        "f1",
        "ece",
        "brier",
    )
    # val_case / test_case: the same per case (training.evaluate.case_level), where the
    # data has case ids
    splits = {
        split: {k: metrics[f"{split}_{k}"] for k in (*keys, "n_cases") if f"{split}_{k}" in metrics}
        for split in ("val", "test", "val_case", "test_case")
    }
    return {split: m for split, m in splits.items() if m or split in ("val", "test")}


def model_run(run_id: str) -> str:
    """The run that holds the model: follows progressive parents and sweep parents."""
    tags = mlflow.get_run(run_id).data.tags
    for key in ("thyroid_run", "best_run"):
        if key in tags:
            return model_run(tags[key])
    return run_id


def _parity_images(params: dict, size: int, n: int = PARITY_IMAGES) -> tuple[np.ndarray, str]:
    """Validation images of the run's own split, or phantom frames if its data is gone."""
    run_data = Path(params.get("data", ""))
    split_path = params.get("_split_path")
    if run_data.is_dir() and split_path:
        split = json.loads(Path(split_path).read_text())
        val = sorted(rel for rel, side in split["assignment"].items() if side == "val")[:n]
        if val:
            # ROI models: the same crops training made (rois.json), through the same function
            crop = roi.read_rois(params.get("_rois_path"))
            images = np.stack(
                [imaging.load_prepared(run_data / rel, size, *crop(rel)) for rel in val]
            )
            return images, f"{len(val)} validation images of split {split['split_id']}"
    from training import phantom

    rng = np.random.default_rng(0)
    labels = [phantom.CLASS_NAMES_2[i % 2] for i in range(n)]
    images = np.stack([imaging.prepare(phantom.make_image(lab, rng), size) for lab in labels])
    return images, "synthetic phantom frames (the run's training data was not available)"


def _artifact(run_id: str, path: str, dst: str) -> str | None:
    try:
        return mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=path, dst_path=dst)
    except Exception:  # MlflowException / OSError: the run has no such artifact
        return None


def export_run(run_id: str, out_dir: Path) -> dict:
    """Export the model of an MLflow run (or of a progressive / sweep parent's best)."""
    try:
        source = model_run(run_id)
        run = mlflow.get_run(source)
    except Exception as e:  # MlflowException: no such run
        raise ValueError(f"no MLflow run {run_id} in {mlflow.get_tracking_uri()}: {e}") from e
    with tempfile.TemporaryDirectory() as tmp:
        try:
            local = Path(
                mlflow.artifacts.download_artifacts(
                    run_id=source, artifact_path="model", dst_path=tmp
                )
            )
            split_path = mlflow.artifacts.download_artifacts(
                run_id=source, artifact_path="split.json", dst_path=tmp
            )
        except Exception as e:
            raise ValueError(f"run {source} has no trained model to export: {e}") from e
        rois_path = roi.download_rois(source, tmp)
        holdout_path = _artifact(source, "holdout.json", tmp)
        info = json.loads((local / "info.json").read_text())
        model = models.load(local / "model.keras")
        classifier = None
        if (local / "classifier.pkl").is_file():
            with open(local / "classifier.pkl", "rb") as f:
                classifier = pickle.load(f)  # our own artifact, written by training.train
        images, where = _parity_images(
            {**run.data.params, "_split_path": split_path, "_rois_path": rois_path},
            int(info["image_size"]),
        )
        extra = {
            "source_run_id": source,
            "metrics": _metrics_with_cis(run.data.metrics),
            "source_robustness": sources.card_block(run.data.metrics),
        }
        if info.get("roi"):
            extra.update(roi.export_bundle(info["roi"], local, Path(out_dir)))
        if "test_shortcut_auc" in run.data.metrics:
            extra["shortcut_auc"] = run.data.metrics["test_shortcut_auc"]
        # the localiser the model bundles proposes the crops it is served without a box
        localiser = roi.load_localiser(local) if (info.get("roi") or {}).get("localiser") else None
        fitted = ood.reference_for_run(
            model, info, run.data.params, split_path, holdout_path, rois_path, localiser
        )
        reference, val_images = fitted if fitted else (None, None)
        card = export_model(
            model, info, out_dir, images, where, classifier, extra, reference, val_images
        )
    return card
