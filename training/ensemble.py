"""Robust inference in one ONNX graph: test-time augmentation (TTA) and ensembles.

`thyroid-cad export RUN_ID [RUN_ID ...] --tta MODE` (or `--ensemble folds`) exports
ONE graph with the same input and outputs as a plain export (training.export), so the
ONNX file stays the whole contract and the service needs nothing new:

* views (TTA): the graph makes every view of the uint8 image itself (training.tta:
  flips, shifts, zooms), runs each member on every view and averages.
* members (ensemble): several runs of one split with their classifier in the head
  (softmax, or a logistic-regression probe folded into it), e.g. the leave-one-source-out
  fold models of a run (training.loso) or runs of different backbones; their weights
  (default equal) are normalised to sum to 1.
* probabilities, descriptor heads and `ood_score`: the weighted mean over members of
  each member's mean over views. The OOD score is each member's own Mahalanobis
  distance (training.ood, fitted on that member's training images), averaged; its
  threshold is the 95th percentile of that average on validation, as for one model.
* heatmap: each member's Grad-CAM averaged over the un-augmented view and the flipped
  view mapped back (flipped again); shifted and zoomed views do not enter it (at the
  map's few cells a shift cannot be mapped back faithfully). With several members,
  each member's map is first divided by its maximum per image and class (Grad-CAM
  scales differ between networks) and resized to the first member's grid, then
  averaged with the member weights.

Members are temperature-scaled one by one; the average is not recalibrated. The
operating threshold and every metric of the card are measured again on the combined
graph, by onnxruntime, on the split the members share: threshold on its validation
images at the first member's target sensitivity, metrics on its test images (frame
and case level, per source, against the shortcut floor), logged to a new MLflow run
(`ensemble-...`) that the card names as its source run, so registry and gate read it
like any other export. The test images of that split are outside every member's
training, LOSO folds included (training.loso).
"""

from __future__ import annotations

import json
import logging
import tempfile
from dataclasses import dataclass
from pathlib import Path

import keras
import mlflow
import numpy as np
import onnx
import onnxruntime as ort
from keras import layers, ops

from thyroid_cad import tirads
from training import data as data_mod
from training import evaluate, export, models, ood, roi, sources, tracking
from training.audit import inspect_all
from training.choices import HEAD_CLASSIFIERS, TTA_MODES
from training.train import MEMBERS_TAG
from training.tta import HEATMAP_VIEWS, VIEWS, View

log = logging.getLogger(__name__)

ENSEMBLE_FOLDS = "folds"


class _WeightedSum(layers.Layer):
    """sum_i w_i x_i of same-shaped tensors (the w_i are constants of the graph)."""

    def __init__(self, weights: list[float], **kwargs):
        kwargs.setdefault("dtype", "float32")
        super().__init__(**kwargs)
        self.mix = [float(w) for w in weights]

    def call(self, xs):
        total = ops.cast(xs[0], "float32") * self.mix[0]
        for w, x in zip(self.mix[1:], xs[1:], strict=True):
            total = total + ops.cast(x, "float32") * w
        return total


class _Unflip(layers.Layer):
    """A heatmap of the flipped view, mapped back onto the image (flipped again)."""

    def call(self, x):
        return ops.flip(x, axis=2)


class _PerMapMax(layers.Layer):
    """N x h x w x K maps divided by their maximum per image and class (0 stays 0)."""

    def call(self, x):
        return x / (ops.max(x, axis=(1, 2), keepdims=True) + 1e-12)


class _ResizeMap(layers.Layer):
    def __init__(self, shape: tuple[int, int], **kwargs):
        super().__init__(**kwargs)
        self.shape = tuple(shape)

    def call(self, x):
        return ops.image.resize(x, self.shape, interpolation="bilinear", antialias=False)


@dataclass
class Member:
    """One model of the graph: its run, Keras model, info.json and OOD reference."""

    run_id: str
    model: keras.Model
    info: dict
    params: dict
    split_path: str
    reference: ood.Reference | None = None
    val_images: np.ndarray | None = None


def serving_model(members: list[Member], weights: list[float], tta: str) -> keras.Model:
    """uint8 image in; probabilities, heatmap (and ood_score, descriptor_<name> where every
    member has them) out: the weighted mean over members of the mean over views."""
    if tta not in TTA_MODES:
        raise ValueError(f"unknown TTA mode {tta!r}; choose from {TTA_MODES}")
    size = int(members[0].info["image_size"])
    image = keras.Input((size, size, 3), dtype="uint8", name=export.INPUT_NAME)
    x = export._ToFloat(name="to_float")(image)
    views = {v: View(v, name=f"view_{v}")(x) for v in VIEWS[tta]}
    with_ood = all(m.reference is not None for m in members)
    heads = set.intersection(*(set(models.descriptor_outputs(m.model)) for m in members))
    per_member: list[dict] = []
    for i, m in enumerate(members):
        inner = (
            ood.with_heatmaps_and_score(m.model, m.reference)
            if with_ood
            else models.with_heatmaps(m.model)
        )
        outs = {v: inner(t) for v, t in views.items()}
        each = 1.0 / len(outs)
        avg = {
            k: _WeightedSum([each] * len(outs), name=f"member{i}_{k}")(
                [o[k] for o in outs.values()]
            )
            for k in ("probabilities", *sorted(heads), *((ood.OUTPUT_NAME,) if with_ood else ()))
        }
        maps = []
        for v in HEATMAP_VIEWS:
            if v in outs:
                cam = export._GradCam(name=f"member{i}_gradcam_{v}")(outs[v]["cam"])
                maps.append(_Unflip(name=f"member{i}_unflip")(cam) if v == "flip" else cam)
        avg["heatmap"] = (
            _WeightedSum([1 / len(maps)] * len(maps), name=f"member{i}_heatmap")(maps)
            if len(maps) > 1
            else maps[0]
        )
        per_member.append(avg)
    outputs = {}
    for k in per_member[0]:
        xs = [o[k] for o in per_member]
        if k == "heatmap" and len(xs) > 1:
            grid = tuple(xs[0].shape[1:3])
            xs = [
                _ResizeMap(grid, name=f"member{i}_heatmap_grid")(h)
                if tuple(h.shape[1:3]) != grid
                else h
                for i, h in enumerate(xs)
            ]
            xs = [_PerMapMax(name=f"member{i}_heatmap_norm")(h) for i, h in enumerate(xs)]
        outputs[k] = (
            _WeightedSum(weights, name=k)(xs) if len(xs) > 1 else layers.Identity(name=k)(xs[0])
        )
    return keras.Model(image, outputs, name="serving_robust")


# --------------------------------------------------------------------------- members


def fold_map(run_id: str) -> dict[str, str]:
    """{held-out source: fold run} of a run trained with --loso (its `loso_run_<source>`
    tags; on a progressive or sweep parent, those of the run it leads to). {} if none."""
    tags = mlflow.get_run(run_id).data.tags
    folds = {k.removeprefix("loso_run_"): v for k, v in tags.items() if k.startswith("loso_run_")}
    if folds:
        return folds
    for key in ("thyroid_run", "best_run"):
        if key in tags:
            return fold_map(tags[key])
    return {}


def fold_runs(run_id: str) -> list[str]:
    """The leave-one-source-out fold runs of a run, by source."""
    folds = fold_map(run_id)
    if not folds:
        raise ValueError(
            f"run {export.model_run(run_id)} has no leave-one-source-out folds: train it with "
            "--loso (and at least two sources)"
        )
    return [folds[s] for s in sorted(folds)]


def member_runs(run_ids: list[str]) -> list[str]:
    """run_ids with every ensemble parent (training.train.train_members) replaced by its
    member runs."""
    out = []
    for run_id in run_ids:
        try:
            tag = mlflow.get_run(run_id).data.tags.get(MEMBERS_TAG)
        except Exception:  # MlflowException: no such run; load_member says so clearly
            tag = None
        out += tag.split(",") if tag else [run_id]
    return out


def load_member(run_id: str, tmp: str, with_ood: bool = True) -> Member:
    """A whole-frame run's model (softmax or logreg head), with its OOD reference where
    its data is here (and with_ood)."""
    try:
        source = export.model_run(run_id)
        run = mlflow.get_run(source)
        local = Path(
            mlflow.artifacts.download_artifacts(run_id=source, artifact_path="model", dst_path=tmp)
        )
        split_path = mlflow.artifacts.download_artifacts(
            run_id=source, artifact_path="split.json", dst_path=f"{tmp}/{source}"
        )
    except Exception as e:  # MlflowException / OSError: no such run or no model in it
        raise ValueError(f"run {run_id} has no trained model to export: {e}") from e
    info = json.loads((local / "info.json").read_text())
    if (local / "classifier.pkl").is_file() or info.get("roi"):
        raise ValueError(
            f"run {source}: only whole-frame models with their classifier in the network's "
            "head (softmax, logreg) can be combined (TTA / ensemble); "
            f"this one is {info.get('classifier')} with roi={bool(info.get('roi'))}"
        )
    model = models.load(local / "model.keras")
    holdout = export._artifact(source, "holdout.json", f"{tmp}/{source}")
    fitted = (
        ood.reference_for_run(model, info, run.data.params, split_path, holdout, None)
        if with_ood
        else None
    )
    reference, val_images = fitted if fitted else (None, None)
    return Member(source, model, info, run.data.params, split_path, reference, val_images)


def _check_compatible(members: list[Member]) -> None:
    first = members[0].info
    for m in members[1:]:
        for key in ("class_names", "image_size", "split_id", "preprocessing_version"):
            if m.info.get(key) != first.get(key):
                raise ValueError(
                    f"runs {members[0].run_id} and {m.run_id} differ in {key} "
                    f"({first.get(key)!r} vs {m.info.get(key)!r}): an ensemble needs members "
                    "of one task, input size and split (its test images must be unseen by all)"
                )


def _normalised(weights: list[float] | None, n: int) -> list[float]:
    w = [1.0] * n if not weights else [float(v) for v in weights]
    if len(w) != n or any(not np.isfinite(v) or v < 0 for v in w) or sum(w) <= 0:
        raise ValueError(f"need {n} non-negative member weights, not all zero; got {weights}")
    return [v / sum(w) for v in w]


# --------------------------------------------------------------------------- checks


def _run_graph(session: ort.InferenceSession, images: np.ndarray) -> dict[str, np.ndarray]:
    names = [o.name for o in session.get_outputs()]
    parts = [
        session.run(None, {export.INPUT_NAME: images[i : i + 32]})
        for i in range(0, len(images), 32)
    ]
    return {n: np.concatenate([p[j] for p in parts]) for j, n in enumerate(names)}


def _parity(session, wrapper: keras.Model, images: np.ndarray, size: int) -> dict:
    """onnxruntime vs the Keras serving graph over the same views and members."""
    got = _run_graph(session, images)
    ref = {k: np.asarray(v) for k, v in wrapper(images).items()}
    prob = float(np.max(np.abs(got["probabilities"] - ref["probabilities"])))
    corr = export.heatmap_correlations(got["heatmap"], ref["heatmap"], size)
    parity = {
        "images": int(len(images)),
        "reference": "the Keras serving graph on the same images (same views and members)",
        "probabilities_max_abs_diff": prob,
        "probabilities_tolerance": export.PROBABILITY_TOLERANCE,
        "heatmap_min_pearson": float(min(corr)),
        "heatmap_mean_pearson": float(np.mean(corr)),
        "heatmap_min_pearson_required": export.HEATMAP_MIN_PEARSON,
    }
    passed = prob < export.PROBABILITY_TOLERANCE and min(corr) >= export.HEATMAP_MIN_PEARSON
    descriptors = {
        k: float(np.max(np.abs(got[k] - ref[k]))) for k in got if k.startswith(tirads.OUTPUT_PREFIX)
    }
    if descriptors:
        parity["descriptors_max_abs_diff"] = descriptors
        passed = passed and max(descriptors.values()) < export.PROBABILITY_TOLERANCE
    if ood.OUTPUT_NAME in got:
        rel = np.abs(got[ood.OUTPUT_NAME] - ref[ood.OUTPUT_NAME]) / np.maximum(
            np.abs(ref[ood.OUTPUT_NAME]), 1.0
        )
        parity["ood_score_max_rel_diff"] = float(rel.max())
        parity["ood_score_tolerance"] = ood.SCORE_TOLERANCE
        passed = passed and float(rel.max()) < ood.SCORE_TOLERANCE
    parity["passed"] = bool(passed)
    return parity


def _labelled(params: dict) -> tuple[Path, data_mod.Dataset]:
    """The members' dataset (root, scan), or a clear error where it is not here."""
    root = Path(params.get("data", ""))
    if not root.is_dir():
        raise ValueError(
            f"the members' data is not at {root}: the combined graph must be measured on "
            "its split's validation and test images before it can be registered"
        )
    manifest = params.get("manifest")
    return root, data_mod.scan(root, manifest if manifest not in (None, "", "None") else None)


def _loso(
    folds: list[dict[str, str]],
    mix: list[float],
    tta: str,
    tmp: str,
    data: tuple[Path, data_mod.Dataset],
) -> dict:
    """Leave-one-source-out metrics of the combination (training.loso's loso_auc_<s>
    keys): for every source that each member held out in a fold of its own, those fold
    models combined as the members are (same weights and views) and scored on the
    fold's held-out images (its holdout.json), from `data` (_labelled: the members'
    dataset, which their folds share). {} unless all members have the same folds.
    """
    if not folds or not folds[0] or any(set(f) != set(folds[0]) for f in folds):
        return {}
    root, dataset = data
    metrics: dict[str, float] = {}
    for source in sorted(folds[0]):
        runs = [f[source] for f in folds]
        fold_members = [
            load_member(r, f"{tmp}/loso-{source}-{i}", False) for i, r in enumerate(runs)
        ]
        _check_compatible(fold_members)
        holdout = export._artifact(runs[0], "holdout.json", f"{tmp}/loso-{source}")
        held = ood.run_sides(None, holdout).get("test", [])
        info = fold_members[0].info
        names = list(info["class_names"])
        label = {r.rel: names.index(r.label) for r in dataset.records}
        images = ood.load_side(root, held, int(info["image_size"]), roi.read_rois(None))
        graph = serving_model(fold_members, mix, tta)
        probs = np.concatenate(
            [
                np.asarray(graph(images[i : i + 32])["probabilities"])
                for i in range(0, len(held), 32)
            ]
        )
        fold = evaluate.evaluate(
            np.array([label[rel] for rel in held]),
            probs,
            names,
            positive=info.get("positive_class", names[-1]),
            seed=int(fold_members[0].params.get("seed", 0)),
        )
        metrics[f"loso_auc_{source}"] = fold["auc"]
        metrics[f"loso_auc_{source}_ci_low"] = fold["auc_ci_low"]
        metrics[f"loso_auc_{source}_ci_high"] = fold["auc_ci_high"]
        metrics[f"loso_n_{source}"] = float(len(held))
    return metrics


def _evaluate(
    session, first: Member, data: tuple[Path, data_mod.Dataset], loso: dict
) -> tuple[dict, float, np.ndarray | None]:
    """(flat metrics like a training run's, threshold, validation OOD scores) of the
    combined graph on the members' split (`data`, from _labelled): threshold on val,
    metrics on test, and the combination's leave-one-source-out metrics `loso` (from
    _loso) in the robust scores."""
    params, info = first.params, first.info
    root, dataset = data
    sides = ood.run_sides(first.split_path, None)
    if not sides.get("val") or not sides.get("test"):
        raise ValueError(f"the members' split {first.split_path} has no validation or test images")
    where = {r.rel: i for i, r in enumerate(dataset.records)}
    idx = {
        s: [where[rel] for rel in sides.get(s, []) if rel in where]
        for s in ("train", "val", "test")
    }
    names = list(info["class_names"])
    positive = names.index(info.get("positive_class", names[-1]))
    size = int(info["image_size"])
    labels = np.array([names.index(r.label) for r in dataset.records])
    y = {s: labels[v] for s, v in idx.items()}
    out = {
        s: _run_graph(
            session,
            ood.load_side(
                root, [dataset.records[i].rel for i in idx[s]], size, roi.read_rois(None)
            ),
        )
        for s in ("val", "test")
    }
    probs = {s: o["probabilities"] for s, o in out.items()}
    seed = int(params.get("seed", 0))
    val = evaluate.evaluate(
        y["val"],
        probs["val"],
        names,
        target_sensitivity=float(info.get("target_sensitivity") or 0.9),
        positive=names[positive],
        seed=seed,
    )
    test = evaluate.evaluate(
        y["test"],
        probs["test"],
        names,
        threshold=val["threshold"],
        positive=names[positive],
        seed=seed,
    )
    metrics = {
        **{f"val_{k}": v for k, v in val.items()},
        **{f"test_{k}": v for k, v in test.items()},
    }
    for s in ("val", "test"):
        cases = [dataset.records[i].case_id for i in idx[s]]
        if any(cases):
            at_case = evaluate.case_level(
                y[s], probs[s], cases, names, val["threshold"], names[positive], seed
            )
            metrics.update({f"{s}_case_{k}": v for k, v in at_case.items()})
    infos = inspect_all(dataset)
    src = sources.assign_sources(dataset, infos)
    metrics.update(sources.evaluation(infos, src, idx, y, probs, positive, seed))
    metrics.update(loso)
    metrics.update(sources.robust_scores(metrics))
    return metrics, float(val["threshold"]), out["val"].get(ood.OUTPUT_NAME)


# --------------------------------------------------------------------------- export


def export_runs(
    run_ids: list[str],
    out_dir: Path,
    tta: str | None = None,
    weights: list[float] | None = None,
    ensemble: str | None = None,
) -> dict:
    """What `thyroid-cad export` runs: a plain export (training.export.export_run) for one
    run without TTA, else export_combined (an ensemble parent stands for its members).
    tta None: the TTA the run was trained and evaluated with (its `tta` parameter), else
    none."""
    run_ids = member_runs(run_ids)
    if tta is None:
        tta = _trained_tta(run_ids[0])
    if tta == "none" and len(run_ids) == 1 and ensemble is None and weights is None:
        return export.export_run(run_ids[0], out_dir)
    return export_combined(run_ids, out_dir, tta, weights, ensemble)


def _trained_tta(run_id: str) -> str:
    try:
        params = mlflow.get_run(export.model_run(run_id)).data.params
    except Exception:  # MlflowException: no such run; export_run says so clearly
        return "none"
    # svm / rf runs ignore --tta (their tag tta_note says so)
    return params.get("tta", "none") if params.get("classifier") in HEAD_CLASSIFIERS else "none"


def export_combined(
    run_ids: list[str],
    out_dir: Path,
    tta: str = "none",
    weights: list[float] | None = None,
    ensemble: str | None = None,
) -> dict:
    """Export runs (or a run's LOSO folds, ensemble='folds') with TTA as ONE graph.

    Writes out_dir/model.onnx and model_card.json, logs an MLflow run `ensemble-...`
    (parameters members, weights, tta; the graph's metrics) and returns the card.
    """
    if tta not in TTA_MODES:
        raise ValueError(f"unknown TTA mode {tta!r}; choose from {TTA_MODES}")
    if ensemble not in (None, ENSEMBLE_FOLDS):
        raise ValueError(f"unknown ensemble {ensemble!r}; the one choice is {ENSEMBLE_FOLDS!r}")
    if ensemble == ENSEMBLE_FOLDS:
        if len(run_ids) != 1:
            raise ValueError("--ensemble folds takes one run (the one trained with --loso)")
        run_ids = fold_runs(run_ids[0])
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:  # the members' split files live here
        members = [load_member(r, f"{tmp}/{i}") for i, r in enumerate(run_ids)]
        folds = [] if ensemble == ENSEMBLE_FOLDS else [fold_map(r) for r in run_ids]
        return _export_members(members, out_dir, tta, weights, ensemble, folds, tmp)


def _export_members(
    members: list[Member],
    out_dir: Path,
    tta: str,
    weights: list[float] | None,
    ensemble,
    folds: list[dict[str, str]],
    tmp: str,
) -> dict:
    _check_compatible(members)
    mix = _normalised(weights, len(members))
    first = members[0]
    size = int(first.info["image_size"])
    wrapper = serving_model(members, mix, tta)
    proto = export._convert(wrapper, size)
    names = {o.name for o in proto.graph.output}
    if not {"probabilities", "heatmap"} <= names:
        raise ValueError(f"combined graph outputs {sorted(names)}, expected probabilities, heatmap")
    kinds = ",".join(sorted({str(m.info.get("backbone")) for m in members}))
    proto.doc_string = (
        f"thyroid-cad ensemble of {len(members)} ({kinds}), TTA {tta}: {export.DISCLAIMER}"
    )
    onnx.checker.check_model(proto)
    path = out_dir / "model.onnx"
    onnx.save_model(proto, path)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    parity_images, where = export._parity_images(
        {**first.params, "_split_path": first.split_path}, size
    )
    parity = _parity(session, wrapper, parity_images, size)
    parity["image_source"] = where
    data = _labelled(first.params)
    loso = _loso(folds, mix, tta, tmp, data)
    metrics, threshold, val_scores = _evaluate(session, first, data, loso)

    block = {
        "tta": tta,
        "views": list(VIEWS[tta]),
        "members": [
            {
                "run_id": m.run_id,
                "backbone": m.info.get("backbone"),
                "strategy": m.info.get("strategy"),
                "holdout_source": m.params.get("holdout_source"),
                "weight": w,
                "temperature": m.info.get("temperature"),
            }
            for m, w in zip(members, mix, strict=True)
        ],
        "aggregation": "weighted mean over members of each member's mean over views "
        "(probabilities, descriptors, ood_score); heatmap: "
        + (
            "each member's map from the un-augmented and the flipped-back view, divided by "
            "its maximum per image and class, weighted mean over members"
            if len(members) > 1
            else "mean of the un-augmented view's map and the flipped view's map flipped back"
            if "flip" in VIEWS[tta]
            else "the un-augmented view's map"
        ),
        "threshold_note": "operating threshold chosen again on validation for this graph",
    }
    ood_card = None
    if val_scores is not None:
        ood_card = {
            **ood.card_block(first.reference, val_scores),
            "method": "mean over members and views of each member's own Mahalanobis score "
            f"({ood.METHOD}, training.ood); threshold from this graph on validation",
            "members": len(members),
        }
    tracking.setup_uri()
    mlflow.set_experiment(experiment_id=mlflow.get_run(first.run_id).info.experiment_id)
    with mlflow.start_run(run_name=f"ensemble-{len(members)}-{kinds}-tta-{tta}") as run:
        mlflow.log_params(
            {
                "members": ",".join(m.run_id for m in members),
                "member_weights": ",".join(f"{w:.4g}" for w in mix),
                "tta": tta,
                "tta_views": ",".join(VIEWS[tta]),
                "ensemble": ensemble or ("runs" if len(members) > 1 else "none"),
                "data": first.params.get("data"),
                "split_id": first.info.get("split_id"),
            }
        )
        mlflow.set_tags({"kind": "ensemble", "backbone": kinds})
        mlflow.log_metrics({k: float(v) for k, v in metrics.items() if np.isfinite(v)})
        run_id = run.info.run_id
    info = {
        **first.info,
        "backbone": kinds if len(members) > 1 else first.info.get("backbone"),
        "threshold": threshold,
        "temperature": None,
    }
    extra = {
        "source_run_id": run_id,
        "metrics": export._metrics_with_cis(metrics),
        "source_robustness": sources.card_block(metrics),
        "shortcut_auc": metrics.get("test_shortcut_auc"),
        "ensemble": block,
        "calibration": {
            "method": "each member temperature-scaled on validation; the average is not "
            "recalibrated",
            "temperature": None,
        },
    }
    heads = {
        k: v
        for k, v in (first.info.get("descriptors") or {}).items()
        if tirads.output_name(k) in names
    }
    shape = session.get_outputs()[[o.name for o in session.get_outputs()].index("heatmap")].shape
    card = export.model_card(info, path, parity, shape, heads, extra, ood_card)
    card["outputs"]["heatmap"] += f"; {block['aggregation'].split('heatmap: ')[1]}"
    (out_dir / "model_card.json").write_text(json.dumps(card, indent=1))
    log.info(
        "exported %s: %d members, TTA %s, parity %s", path, len(members), tta, parity["passed"]
    )
    return card
