"""One training run, start to finish, recorded in MLflow.

scan -> leak-free split -> decode once -> build backbone + head -> fine-tune by
strategy -> (optional SVM / Random Forest on pooled deep features) -> calibrate ->
choose the operating threshold on validation -> evaluate on test, per source and
against the shortcut floor -> (optional leave-one-source-out folds) -> log everything.
"""

from __future__ import annotations

import hashlib
import json
import logging
import pickle
import tempfile
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import keras
import mlflow
import numpy as np
import tensorflow as tf
from sklearn.calibration import CalibratedClassifierCV
from sklearn.ensemble import RandomForestClassifier
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from sklearn.svm import SVC

from thyroid_cad.files import sha256_file
from thyroid_cad.imaging import PREPROCESSING_VERSION, ROI_MARGIN
from training import descriptors as desc
from training import evaluate, loso, models, optim, pipeline, roi, sources, tracking, tta
from training.audit import inspect_all
from training.choices import (
    BACKBONES,
    CLASS_WEIGHTINGS,
    CLASSIFIERS,
    HEAD_CLASSIFIERS,
    STAGES,
    STRATEGIES,
    TTA_MODES,
)
from training.data import Dataset, scan
from training.fitting import MlflowEpochLogger, log_weights, subsample
from training.splits import grouped_split

log = logging.getLogger(__name__)

# Tag of an ensemble parent run (train_members): its member runs, comma-separated.
MEMBERS_TAG = "member_runs"

POSITIVE_CLASS = "malignant"
# Temperatures outside this range are clipped (see where it is fitted).
TEMPERATURE_RANGE = (0.25, 10.0)


@dataclass
class TrainConfig:
    """Everything that defines a run; every field is logged as an MLflow parameter."""

    data: str
    backbone: str = "tiny"
    strategy: str = "full"
    classifier: str = "softmax"
    epochs: int = 10
    image_size: int = 224
    weights: str = "none"
    init_from: str | None = None
    manifest: str | None = None
    batch_size: int = 32
    seed: int = 0
    val_fraction: float = 0.15
    test_fraction: float = 0.15
    unfreeze_blocks: int = 1
    learning_rate: float | None = None
    backbone_lr_factor: float | None = None
    warmup_epochs: int | None = None
    classifier_c: float = 1.0
    patience: int = 5
    target_sensitivity: float = 0.90
    augment: bool = True
    scanner_augment: bool = False
    class_weights: str = "global"
    loso: bool = False
    holdout_source: str | None = None
    max_images: int | None = None
    stage: str = "thyroid"
    roi: str = "off"
    roi_margin: float = ROI_MARGIN
    roi_jitter: float = 0.0
    annotations: str | None = None
    localiser: str | None = None
    descriptors: bool = False
    tta: str = "none"
    experiment: str = "thyroid-cad"
    run_name: str | None = None

    def validate(self) -> None:
        if self.backbone not in BACKBONES:
            raise ValueError(f"unknown backbone {self.backbone!r}; choose from {BACKBONES}")
        if self.strategy not in STRATEGIES:
            raise ValueError(f"unknown strategy {self.strategy!r}; choose from {STRATEGIES}")
        if self.classifier not in CLASSIFIERS:
            raise ValueError(f"unknown classifier {self.classifier!r}; choose from {CLASSIFIERS}")
        if self.stage not in STAGES:
            raise ValueError(f"unknown stage {self.stage!r}; choose from {STAGES}")
        if self.class_weights not in CLASS_WEIGHTINGS:
            raise ValueError(
                f"unknown class weighting {self.class_weights!r}; choose from {CLASS_WEIGHTINGS}"
            )
        if self.epochs < 1 and not (self.strategy == "frozen" and self.classifier != "softmax"):
            raise ValueError("epochs must be at least 1")
        if self.image_size < 32:
            raise ValueError(f"image size must be at least 32 pixels, got {self.image_size}")
        if not 0 < self.target_sensitivity < 1:
            raise ValueError("target sensitivity must be between 0 and 1")
        if self.strategy == "two-phase" and self.epochs < 2:
            raise ValueError("two-phase fine-tuning needs at least 2 epochs")
        if self.tta not in TTA_MODES:
            raise ValueError(f"unknown TTA mode {self.tta!r}; choose from {TTA_MODES}")
        if self.tta != "none" and self.roi != "off":
            raise ValueError("--tta is for whole-frame models (--roi off)")
        if self.strategy == "two-phase" and not 1 <= self.warmup_epochs_ < self.epochs:
            raise ValueError("warm-up epochs must be at least 1 and fewer than epochs")
        if self.backbone_lr_factor is not None and not 0 < self.backbone_lr_factor <= 1:
            raise ValueError("the backbone's learning-rate factor must be in (0, 1]")
        if self.classifier_c <= 0:
            raise ValueError("classifier C (inverse regularisation) must be positive")
        roi.check_config(self)
        models.resolve_weights(self.weights)

    @property
    def pretrained(self) -> bool:
        return self.init_from is not None or models.resolve_weights(self.weights) is not None

    @property
    def head_lr(self) -> float:
        return self.learning_rate or 1e-3

    @property
    def backbone_lr(self) -> float:
        """The head's rate x the factor: by default 1/10 from learned weights, whose
        features small steps keep; the same rate from scratch."""
        factor = self.backbone_lr_factor
        return self.head_lr * (factor if factor is not None else 0.1 if self.pretrained else 1.0)

    @property
    def warmup_epochs_(self) -> int:
        """Two-phase: epochs that train the head alone before the top blocks open."""
        return self.warmup_epochs or max(1, self.epochs // 3)


def _compile(model: keras.Model, head_lr: float, backbone_lr: float) -> None:
    metrics = [keras.metrics.AUC(name="auc"), keras.metrics.CategoricalAccuracy(name="accuracy")]
    optimizer = optim.TwoRateAdam(
        head_lr, backbone_lr / head_lr, model.get_layer("backbone").trainable_weights
    )
    if isinstance(model.output, dict):  # descriptor heads: one masked loss per output
        heads = [name for name in model.output if name != "probabilities"]
        model.compile(
            optimizer=optimizer,
            loss={name: keras.losses.CategoricalCrossentropy() for name in model.output},
            loss_weights={"probabilities": 1.0, **dict.fromkeys(heads, desc.LOSS_WEIGHT)},
            metrics={"probabilities": metrics},
        )
        return
    model.compile(
        optimizer=optimizer,
        loss=keras.losses.CategoricalCrossentropy(),
        metrics=metrics,
    )


def _fit(model, cfg: TrainConfig, train_ds, val_ds, history) -> None:
    """Fine-tune by strategy; two-phase warms the head up frozen, then opens the top.

    The head learns at cfg.head_lr, the backbone's open blocks at cfg.backbone_lr.
    Class (or within-source class) weights come with train_ds as sample weights.
    """
    phases = (
        [
            ("frozen", cfg.warmup_epochs_),
            ("partial", cfg.epochs - cfg.warmup_epochs_),
        ]
        if cfg.strategy == "two-phase"
        else [(cfg.strategy, cfg.epochs)]
    )
    mlflow.log_params({"lr_head": cfg.head_lr, "lr_backbone": cfg.backbone_lr})
    done = 0
    for strategy, epochs in phases:
        opened = models.set_trainable(model, cfg.backbone, strategy, cfg.unfreeze_blocks)
        log.info(
            "phase %s: %d epochs at lr %g (backbone %g), trainable blocks %s",
            *(strategy, epochs, cfg.head_lr, cfg.backbone_lr, opened),
        )
        _compile(model, cfg.head_lr, cfg.backbone_lr)
        model.fit(
            train_ds,
            validation_data=val_ds,
            epochs=epochs,
            verbose=2,
            callbacks=[
                MlflowEpochLogger(history, offset=done),
                keras.callbacks.EarlyStopping(
                    monitor="val_loss", patience=cfg.patience, restore_best_weights=True
                ),
            ],
        )
        done += epochs


def _sklearn_classifier(kind: str, seed: int, c: float = 1.0):
    """SVM, logistic regression (C: inverse regularisation) or Random Forest."""
    if kind == "svm":
        # Platt scaling fitted on cross-validated decisions, one SVC refitted on all data.
        svc = SVC(kernel="rbf", C=c, class_weight="balanced", random_state=seed)
        return make_pipeline(
            StandardScaler(), CalibratedClassifierCV(svc, method="sigmoid", ensemble=False)
        )
    if kind == "logreg":  # the linear probe of transfer learning: its own probabilities
        return make_pipeline(
            StandardScaler(),
            LogisticRegression(C=c, class_weight="balanced", max_iter=5000, random_state=seed),
        )
    return RandomForestClassifier(
        n_estimators=500, class_weight="balanced", min_samples_leaf=2, random_state=seed, n_jobs=-1
    )


def _fit_sklearn(clf, features: np.ndarray, y: np.ndarray, weights: np.ndarray | None):
    """Fit with per-image weights; a pipeline routes them to its last step."""
    if weights is None:
        return clf.fit(features, y)
    key = f"{clf.steps[-1][0]}__sample_weight" if hasattr(clf, "steps") else "sample_weight"
    return clf.fit(features, y, **{key: weights})


def _case_evaluation(dataset: Dataset, idx, y, probs, threshold: float, seed: int) -> dict:
    """val_case_* / test_case_* (evaluate.case_level) where the data has case ids
    (DDTI cases hold several frames of one nodule); {} otherwise."""
    metrics: dict[str, float] = {}
    for s in ("val", "test"):
        cases = [dataset.records[i].case_id for i in idx[s]]
        if not any(cases):
            continue
        names = dataset.class_names
        positive = POSITIVE_CLASS if POSITIVE_CLASS in names else names[-1]
        at_case = evaluate.case_level(y[s], probs[s], cases, names, threshold, positive, seed)
        metrics.update({f"{s}_case_{m}": v for m, v in at_case.items()})
    if metrics:
        mlflow.set_tag("case_aggregation", evaluate.CASE_AGGREGATION)
    return metrics


def train(cfg: TrainConfig, parent_run_id: str | None = None, tags: dict | None = None) -> str:
    """Run one training job and return its MLflow run id.

    Raises:
        ValueError (DataError included): the configuration or the data cannot be used.
    """
    cfg.validate()
    keras.utils.set_random_seed(cfg.seed)
    if tf.config.list_physical_devices("GPU"):
        keras.mixed_precision.set_global_policy("mixed_float16")

    dataset = subsample(scan(cfg.data, cfg.manifest), cfg.max_images, cfg.seed)
    infos = inspect_all(dataset)
    src = sources.assign_sources(dataset, infos)
    split = grouped_split(dataset, cfg.val_fraction, cfg.test_fraction, cfg.seed, infos)
    idx = {name: split.indices(name) for name in ("train", "val", "test")}
    used = sorted(i for v in idx.values() for i in v)  # all of them: one image cache
    if cfg.holdout_source:  # a leave-one-source-out fold (training.loso)
        idx = loso.holdout_indices(idx, src, cfg.holdout_source, split.groups)
    if any(len(v) == 0 for v in idx.values()):
        raise ValueError(f"split left an empty part: { {k: len(v) for k, v in idx.items()} }")
    class_names = dataset.class_names
    k = len(class_names)
    positive = class_names.index(POSITIVE_CLASS) if POSITIVE_CLASS in class_names else k - 1
    labels = np.asarray(dataset.labels)
    descriptor_codes = None
    if cfg.descriptors and cfg.classifier == "softmax":
        descriptor_codes = desc.codes(dataset, cfg.annotations)
    elif cfg.descriptors:
        log.warning("descriptors ignored: only the softmax classifier has descriptor heads")
    rois = roi.plan(cfg, dataset, used, idx["train"], infos)
    images = pipeline.load_images(
        [dataset.records[i].path for i in used],
        [dataset.sha256()[i] for i in used],
        cfg.image_size,
        rois=rois.boxes_for(used) if rois else None,
        margin=cfg.roi_margin,
    )
    row = {i: r for r, i in enumerate(used)}
    x = {s: images[[row[i] for i in v]] for s, v in idx.items()}
    y = {s: labels[v] for s, v in idx.items()}

    tracking.setup(cfg.experiment)
    run_name = cfg.run_name or f"{cfg.stage}-{cfg.backbone}-{cfg.strategy}-{cfg.classifier}"
    with mlflow.start_run(
        run_name=run_name, parent_run_id=parent_run_id, nested=parent_run_id is not None, tags=tags
    ) as run:
        mlflow.log_params(
            {
                **{f: v for f, v in asdict(cfg).items() if f not in ("experiment", "run_name")},
                "class_names": ",".join(class_names),
                "positive_class": class_names[positive],
                "dataset_fingerprint": dataset.fingerprint(),
                "split_id": split.split_id,
                "preprocessing_version": PREPROCESSING_VERSION,
                "n_train": len(idx["train"]),
                "n_val": len(idx["val"]),
                "n_test": len(idx["test"]),
                "n_dropped_duplicates": len(split.dropped),
                "sources": ",".join(sorted({src[i] for i in used})),
            }
        )
        mlflow.set_tags({"stage": cfg.stage, "backbone": cfg.backbone, **(tags or {})})
        with tempfile.TemporaryDirectory() as tmp:
            split_path = Path(tmp) / "split.json"
            split.save(split_path)
            mlflow.log_artifact(str(split_path))
            mlflow.log_dict(
                {
                    s: sources.source_table([src[i] for i in v], labels[v], class_names)
                    for s, v in idx.items()
                },
                "sources.json",
            )
            if cfg.holdout_source:
                mlflow.log_dict(
                    {s: [dataset.records[i].rel for i in v] for s, v in idx.items()},
                    "holdout.json",
                )
        if rois:
            rois.log(dataset)
        if cfg.descriptors and descriptor_codes is None:
            mlflow.set_tag("descriptors_note", "ignored: only the softmax classifier has heads")
        if cfg.tta != "none" and cfg.classifier not in HEAD_CLASSIFIERS:
            mlflow.set_tag("tta_note", "ignored: SVM and RF have no in-graph TTA")

        model = models.build_model(
            cfg.backbone,
            k,
            cfg.image_size,
            cfg.weights,
            bn_frozen=cfg.pretrained,
            descriptors=desc.head_sizes() if descriptor_codes else None,
        )
        pretrained = log_weights(cfg.backbone, cfg.weights, x["train"])
        if cfg.init_from:
            source = _load_run_model(cfg.init_from)
            models.copy_backbone(source, model)
            mlflow.set_tag("init_from", cfg.init_from)

        history: dict[str, list[float]] = {}
        train_sources = [src[i] for i in idx["train"]]
        weights = sources.sample_weights(y["train"], train_sources, k, cfg.class_weights)
        ds = {
            s: pipeline.make_dataset(
                x[s],
                y[s],
                k,
                cfg.batch_size,
                training=(s == "train"),
                augment=cfg.augment,
                seed=cfg.seed,
                weights=weights if s == "train" else None,
                scanner_augment=cfg.scanner_augment,
                extra_targets=desc.one_hot({d: c[idx[s]] for d, c in descriptor_codes.items()})
                if descriptor_codes
                else None,
            )
            for s in x
        }
        trains_network = not (cfg.classifier != "softmax" and cfg.strategy == "frozen")
        if trains_network:
            _fit(model, cfg, ds["train"], ds["val"], history)

        extra: dict = {}
        clf = None
        if cfg.classifier != "softmax":
            feats = _pooled_features(
                model, cfg, images, {s: [row[i] for i in v] for s, v in idx.items()}
            )
            # class_weight='balanced' is in the estimator; 'source' adds the source part.
            source_part = (
                sources.source_weights(y["train"], train_sources)
                if cfg.class_weights == "source"
                else None
            )
            clf = _fit_sklearn(
                _sklearn_classifier(cfg.classifier, cfg.seed, cfg.classifier_c),
                feats["train"],
                y["train"],
                source_part,
            )
            if cfg.classifier in HEAD_CLASSIFIERS:  # the probe becomes the network's head
                models.fold_linear_probe(model, clf)
                clf = None
        if clf is None:
            probs = {
                s: model.predict(pipeline.make_dataset(x[s], None, k, cfg.batch_size), verbose=0)
                for s in ("val", "test")
            }
            if descriptor_codes:  # {'probabilities', 'descriptor_<name>', ...}
                metrics_desc = desc.evaluate(
                    {d: c[idx["train"]] for d, c in descriptor_codes.items()},
                    {d: c[idx["test"]] for d, c in descriptor_codes.items()},
                    probs["test"],
                )
                probs = {s: p["probabilities"] for s, p in probs.items()}
                extra["descriptors"] = desc.labels()
            raw_ece = evaluate.expected_calibration_error(y["val"], probs["val"])
            separated = evaluate.confusion(y["val"], probs["val"]).trace() == len(y["val"])
            if separated:
                # Every validation image already right: the NLL optimum is T -> 0, which
                # would only make the probabilities overconfident. Leave them as they are.
                fitted = temperature = 1.0
            else:
                fitted = evaluate.fit_temperature(np.log(np.clip(probs["val"], 1e-12, 1)), y["val"])
                temperature = float(np.clip(fitted, *TEMPERATURE_RANGE))
            mlflow.log_metric("temperature_fitted", fitted)
            model.get_layer("cam_head").temperature.assign(temperature)
            probs = {s: evaluate.apply_temperature(p, temperature) for s, p in probs.items()}
            mlflow.log_metrics({"temperature": temperature, "val_ece_uncalibrated": raw_ece})
            extra["temperature"] = temperature
            if cfg.tta != "none":  # evaluated as the exported graph will answer
                probs = {s: tta.predict_views(model, x[s], cfg.tta) for s in probs}
                extra["tta"] = cfg.tta
        else:
            probs = {s: clf.predict_proba(feats[s]) for s in ("val", "test")}

        val = evaluate.evaluate(
            y["val"],
            probs["val"],
            class_names,
            target_sensitivity=cfg.target_sensitivity,
            positive=class_names[positive],
            seed=cfg.seed,
        )
        test = evaluate.evaluate(
            y["test"],
            probs["test"],
            class_names,
            threshold=val["threshold"],
            positive=class_names[positive],
            seed=cfg.seed,
        )
        metrics = {
            **{f"val_{m}": v for m, v in val.items()},
            **{f"test_{m}": v for m, v in test.items()},
        }
        metrics.update(_case_evaluation(dataset, idx, y, probs, val["threshold"], cfg.seed))

        # Results per source, and how far the source and image size alone get.
        metrics.update(sources.evaluation(infos, src, idx, y, probs, positive, cfg.seed))
        if descriptor_codes:
            metrics.update(metrics_desc)
            train_codes = {d: c[idx["train"]] for d, c in descriptor_codes.items()}
            mlflow.log_dict(desc.table(metrics_desc, train_codes), "descriptors.json")
        mlflow.log_metrics({m: float(v) for m, v in metrics.items() if np.isfinite(v)})

        with tempfile.TemporaryDirectory() as tmp:
            tmp_path = Path(tmp)
            plots = evaluate.save_plots(
                tmp_path / "plots",
                y["test"],
                probs["test"],
                class_names,
                val["threshold"],
                history=history or None,
                positive=class_names[positive],
            )
            mlflow.log_artifacts(str(tmp_path / "plots"), "plots")
            confusion = {s: evaluate.confusion(y[s], probs[s]).tolist() for s in ("val", "test")}
            (tmp_path / "confusion.json").write_text(
                json.dumps({"class_names": list(class_names), **confusion}, indent=1)
            )
            mlflow.log_artifact(str(tmp_path / "confusion.json"))

            model_dir = tmp_path / "model"
            model_dir.mkdir()
            model.save(model_dir / "model.keras")
            if clf is not None:
                with open(model_dir / "classifier.pkl", "wb") as f:
                    pickle.dump(clf, f)
            info = {
                "backbone": cfg.backbone,
                "strategy": cfg.strategy,
                "classifier": cfg.classifier,
                "stage": cfg.stage,
                "class_names": list(class_names),
                "positive_class": class_names[positive],
                "image_size": cfg.image_size,
                "preprocessing_version": PREPROCESSING_VERSION,
                "threshold": val["threshold"],
                "target_sensitivity": cfg.target_sensitivity,
                "dataset_fingerprint": dataset.fingerprint(),
                "split_id": split.split_id,
                **({"pretrained": pretrained} if pretrained else {}),
                **extra,
            }
            if rois:
                info["roi"] = rois.bundle(model_dir)
            (model_dir / "info.json").write_text(json.dumps(info, indent=1))
            mlflow.log_artifacts(str(model_dir), "model")
            log.info("logged %d plots and the model to run %s", len(plots), run.info.run_id)
        if cfg.loso and cfg.stage == "thyroid" and not cfg.holdout_source:
            folds = loso.candidates(idx, src, labels, split.groups)
            mlflow.set_tag("loso_sources", ",".join(folds) or "none")
            metrics.update(loso.run(cfg, run.info.run_id, folds, train))
        robust = sources.robust_scores(metrics)
        mlflow.log_metrics(
            {m: float(v) for m, v in metrics.items() if m.startswith("loso_") and np.isfinite(v)}
            | robust
        )
        return run.info.run_id


def _pooled_features(model, cfg: TrainConfig, images: np.ndarray, rows: dict) -> dict:
    """Pooled features of every split. Straight from the initial backbone (frozen, no
    --init-from) they depend only on the backbone, its weights and the images: cached
    on disk, so classifier sweeps and leave-one-source-out folds compute them once."""
    features = models.feature_extractor(model)

    def compute(batch: np.ndarray) -> np.ndarray:
        return features.predict(pipeline.make_dataset(batch, None, 2, cfg.batch_size), verbose=0)

    if cfg.strategy == "frozen" and not cfg.init_from:
        weights = models.resolve_weights(cfg.weights)
        origin = sha256_file(weights) if weights not in (None, "imagenet") else str(weights)
        digest = hashlib.sha256(images.tobytes()).hexdigest()
        key = f"{cfg.backbone}|{origin}|{cfg.seed}|{images.shape}|{digest}"
        every = pipeline.cached("features", key, lambda: compute(images))
    else:
        every = compute(images)
    return {s: every[r] for s, r in rows.items()}


def _load_run_model(run_id: str) -> keras.Model:
    """The Keras model a previous run logged (progressive transfer starts from it)."""
    try:
        path = mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path="model/model.keras")
    except Exception as e:  # MlflowException / OSError: unknown run or no model logged
        raise ValueError(f"cannot load a model from run {run_id}: {e}") from e
    return models.load(path)


def train_progressive(
    cfg: TrainConfig,
    via: str,
    via_epochs: int | None = None,
    via_manifest: str | None = None,
    via_max_images: int | None = None,
) -> str:
    """ImageNet (or none) -> radiographs -> thyroid: a parent run with one child per stage.

    The radiograph stage fine-tunes the whole network on the intermediate dataset; the
    thyroid stage starts from its backbone and uses the configured strategy and
    classifier. Returns the parent run id (the thyroid child carries the model).
    """
    cfg.validate()
    tracking.setup(cfg.experiment)
    name = cfg.run_name or f"progressive-{cfg.backbone}-{cfg.strategy}-{cfg.classifier}"
    with mlflow.start_run(run_name=name, tags={"stage": "progressive"}) as parent:
        mlflow.log_params(
            {"backbone": cfg.backbone, "via": via, "data": cfg.data, "weights": cfg.weights}
        )
        stage1 = replace(
            cfg,
            data=via,
            manifest=via_manifest,
            stage="radiograph",
            roi="off",
            descriptors=False,
            strategy="full",
            classifier="softmax",
            epochs=via_epochs or cfg.epochs,
            max_images=via_max_images,
            run_name=f"radiograph-{cfg.backbone}",
        )
        stage1_id = train(stage1, parent_run_id=parent.info.run_id)
        stage2 = replace(cfg, init_from=stage1_id, run_name=None)
        stage2_id = train(stage2, parent_run_id=parent.info.run_id)
        mlflow.set_tags({"radiograph_run": stage1_id, "thyroid_run": stage2_id})
        final = mlflow.get_run(stage2_id).data.metrics
        summary = ("val_", "test_", "loso_", "robust_score")
        mlflow.log_metrics({m: v for m, v in final.items() if m.startswith(summary)})
        return parent.info.run_id


def train_members(cfg: TrainConfig, members: list[dict]) -> str:
    """An ensemble's members: a parent run with one child per member, each `cfg` with
    that member's options (e.g. another backbone and its weights) on one split.

    `thyroid-cad export PARENT` exports the members as one graph (training.ensemble)
    and measures the combination there: validation threshold, test metrics and, where
    every member ran with --loso, the combined fold models on each held-out source.
    Returns the parent run id; its tag MEMBERS_TAG lists the members.
    """
    if len(members) < 2:
        raise ValueError(f"members: an ensemble needs at least two members, got {len(members)}")
    configs = [replace(cfg, **m) for m in members]
    for c in configs:
        c.validate()
    tracking.setup(cfg.experiment)
    kinds = "+".join(c.backbone for c in configs)
    with mlflow.start_run(run_name=cfg.run_name or f"members-{kinds}", tags={"kind": "members"}):
        parent = mlflow.active_run().info.run_id
        mlflow.log_params({"data": cfg.data, "seed": cfg.seed, "members": json.dumps(members)})
        ids = []
        for i, c in enumerate(configs):
            log.info("ensemble member %d of %d: %s", i + 1, len(configs), members[i])
            ids.append(train(c, parent_run_id=parent, tags={"member_of": parent}))
        mlflow.set_tag(MEMBERS_TAG, ",".join(ids))
    return parent
