"""Image sources (scanners, sites): one definition, weights within them, metrics across them.

When the source of an image predicts its label (thyroid-seed: 560x360 frames are 87%
malignant, the 'other sizes' 46%), a network can score the scanner instead of the
nodule. This module says what a source is, and everything that looks at sources uses
it: the within-source class weights, the per-source AUCs, the shortcut floor, the
leave-one-source-out folds (training.loso) and the source-robust score.

Source of an image (:func:`assign_sources`):

* the ``source`` column of the dataset's manifest, where it names one;
* else the raw file's geometry ``WxH`` (as the audit reads it) when at least
  ``MIN_SOURCE_IMAGES`` images and ``MIN_SOURCE_FRACTION`` of the dataset share it;
* else ``other``: the pool of rare geometries.

thyroid-seed has no source column and three sources: ``560x360`` (315 images),
``300x225`` (303) and ``other`` (177 images in ~170 sizes). The phantom has one
(``256x256``): nothing there to weight, hold out or check within.

Metric names (MLflow, and what :func:`per_source` reads back):
``{val,test}_auc_source_<s>`` with ``_ci_low`` / ``_ci_high`` and ``{val,test}_n_source_<s>``;
``test_shortcut_auc`` with its CI; ``loso_auc_<s>`` with its CI and ``loso_n_<s>``,
``loso_auc_min``; ``robust_score`` and ``val_robust_score`` (see :func:`robust_scores`).
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Mapping, Sequence

import numpy as np

from training import evaluate
from training.choices import CLASS_WEIGHTINGS
from training.data import Dataset, ImageInfo

MIN_SOURCE_IMAGES = 20
MIN_SOURCE_FRACTION = 0.05
OTHER = "other"
_UNSAFE = re.compile(r"[^A-Za-z0-9_.-]+")
_RESERVED = {"min"}  # loso_auc_min is the minimum, not a source


def source_name(text: str) -> str:
    """A source name usable in MLflow metric keys: letters, digits, '_', '.', '-'."""
    name = _UNSAFE.sub("_", str(text).strip()).strip("_") or "unknown"
    return f"{name}_" if name in _RESERVED else name


def geometry(size: tuple[int, int] | None) -> str | None:
    return f"{size[0]}x{size[1]}" if size else None


def assign_sources(dataset: Dataset, infos: Sequence[ImageInfo]) -> list[str]:
    """The source of every image of the dataset (see the module docstring)."""
    geometries = [geometry(info.size) for info in infos]
    counts = Counter(g for g in geometries if g)
    floor = max(MIN_SOURCE_IMAGES, MIN_SOURCE_FRACTION * len(geometries))
    common = {g for g, n in counts.items() if n >= floor}
    return [
        source_name(record.source)
        if (record.source or "").strip()
        else (g if g in common else OTHER)
        for record, g in zip(dataset.records, geometries, strict=True)
    ]


def source_table(sources: Sequence[str], labels: Sequence[int], class_names: Sequence[str]):
    """{source: {class: count}}: how source and label are confounded."""
    table: dict[str, dict[str, int]] = {}
    for s, y in zip(sources, labels, strict=True):
        row = table.setdefault(s, dict.fromkeys(class_names, 0))
        row[class_names[y]] += 1
    return dict(sorted(table.items()))


def class_balance(labels: np.ndarray, num_classes: int) -> np.ndarray:
    """n / (k * n_c) per image: every class carries the same total weight."""
    labels = np.asarray(labels)
    counts = np.bincount(labels, minlength=num_classes).astype(float)
    return len(labels) / (num_classes * counts[labels])


def source_weights(labels: np.ndarray, sources: Sequence[str]) -> np.ndarray:
    """n_c / (S * n_{s,c}) per image, mean 1 where every source has every class.

    Under these weights every source carries the same total weight and, within each
    source, the classes keep their overall proportions: the source no longer says
    anything about the label, and class prevalence is unchanged.
    """
    labels = np.asarray(labels)
    sources = np.asarray(sources)
    n_class = Counter(labels.tolist())
    cells = Counter(zip(sources.tolist(), labels.tolist(), strict=True))
    n_sources = len(set(sources.tolist()))
    return np.array(
        [n_class[c] / (n_sources * cells[(s, c)]) for s, c in zip(sources, labels, strict=True)]
    )


def sample_weights(
    labels: np.ndarray, sources: Sequence[str], num_classes: int, mode: str = "global"
) -> np.ndarray:
    """Training weight per image.

    'global': :func:`class_balance` (what Keras' class_weight did before).
    'source': class_balance x :func:`source_weights` = n / (S * k * n_{s,c}): within each
    source, benign and malignant contribute equally, and every source equally.
    """
    if mode not in CLASS_WEIGHTINGS:
        raise ValueError(f"unknown class weighting {mode!r}; choose from {CLASS_WEIGHTINGS}")
    weights = class_balance(labels, num_classes)
    if mode == "source":
        weights = weights * source_weights(labels, sources)
    return weights.astype(np.float32)


def source_metrics(
    prefix: str, y_positive: np.ndarray, scores: np.ndarray, sources: Sequence[str], seed: int = 0
) -> dict[str, float]:
    """Image count and, from MIN_SOURCE_IMAGES images on, AUC with bootstrap 95% CI
    within every source of one split (fewer images say too little to report)."""
    out: dict[str, float] = {}
    for s, (auc, low, high, n) in evaluate.auc_by_group(
        y_positive, scores, sources, seed=seed
    ).items():
        out[f"{prefix}_n_source_{s}"] = float(n)
        if n >= MIN_SOURCE_IMAGES:
            out[f"{prefix}_auc_source_{s}"] = auc
            out[f"{prefix}_auc_source_{s}_ci_low"] = low
            out[f"{prefix}_auc_source_{s}_ci_high"] = high
    return out


def shortcut_floor(
    train_features: tuple[Sequence, Sequence[str], np.ndarray],
    test_features: tuple[Sequence, Sequence[str], np.ndarray],
    positive: int,
    seed: int = 0,
) -> tuple[float, float, float]:
    """(AUC, CI low, CI high) of a classifier that sees only the source and raw size.

    Each argument is (sizes as (width, height), sources, labels) of one split. A Random
    Forest on width, height and the one-hot source, fitted on train, scored on test:
    how far the scanner alone gets on these images. One source of one size gives
    constant scores, AUC 0.5 [0.5, 0.5].
    """
    from sklearn.ensemble import RandomForestClassifier

    names = sorted(set(train_features[1]) | set(test_features[1]))

    def features(sizes, sources):
        dims = np.asarray(sizes, dtype=float).reshape(len(sources), 2)
        onehot = np.array([[s == name for name in names] for s in sources], dtype=float)
        return np.hstack([dims, onehot.reshape(len(sources), len(names))])

    (train_sizes, train_sources, y_train), (test_sizes, test_sources, y_test) = (
        train_features,
        test_features,
    )
    clf = RandomForestClassifier(n_estimators=200, min_samples_leaf=3, random_state=0)
    clf.fit(features(train_sizes, train_sources), y_train)
    if positive not in clf.classes_:
        return math.nan, math.nan, math.nan
    col = list(clf.classes_).index(positive)
    scores = clf.predict_proba(features(test_sizes, test_sources))[:, col]
    return evaluate.bootstrap_auc_ci(np.asarray(y_test) == positive, scores, seed=seed)


def evaluation(infos, src, idx, y, probs, positive: int, seed: int) -> dict:
    """Per-source val / test AUCs and the shortcut floor on the same test images.

    idx, y, probs: {'train', 'val', 'test': image indices / labels / class probabilities}
    (probs for val and test only); infos and src: every image's audit info and source.
    """
    metrics = {}
    for s in ("val", "test"):
        metrics.update(
            source_metrics(
                s, y[s] == positive, probs[s][:, positive], [src[i] for i in idx[s]], seed
            )
        )
    floor = shortcut_floor(
        *(
            ([infos[i].size for i in idx[s]], [src[i] for i in idx[s]], y[s])
            for s in ("train", "test")
        ),
        positive=positive,
        seed=seed,
    )
    keys = ("test_shortcut_auc", "test_shortcut_auc_ci_low", "test_shortcut_auc_ci_high")
    metrics.update(dict(zip(keys, floor, strict=True)))
    return metrics


def per_source(metrics: Mapping[str, float], prefix: str) -> dict[str, dict[str, float]]:
    """Read back {source: {'auc', 'ci_low', 'ci_high', 'n'}} from flat metric names.

    prefix is 'test_auc_source_', 'val_auc_source_' or 'loso_auc_'; the counts are
    under the matching '..._n_source_' / 'loso_n_' names.
    """
    count_prefix = prefix.replace("_auc_", "_n_")
    out: dict[str, dict[str, float]] = {}
    for key, value in metrics.items():
        if not key.startswith(prefix) or key == "loso_auc_min":
            continue
        name, field = key[len(prefix) :], "auc"
        for suffix in ("_ci_low", "_ci_high"):
            if name.endswith(suffix):
                name, field = name[: -len(suffix)], suffix[1:]
        out.setdefault(name, {})[field] = float(value)
    for name, entry in out.items():
        if f"{count_prefix}{name}" in metrics:
            entry["n"] = float(metrics[f"{count_prefix}{name}"])
    return {k: v for k, v in sorted(out.items()) if math.isfinite(v.get("auc", math.nan))}


def robust_scores(metrics: Mapping[str, float]) -> dict[str, float]:
    """The source-robust scores of a run, from its flat metrics.

    robust_score = min(min_s test_auc_source_s, min_s loso_auc_s): the worst of the
    within-source test AUCs and the leave-one-source-out AUCs (only the former where
    LOSO did not run; with one source, the test AUC). val_robust_score is the same with
    validation AUCs: it touches no test image, so sweeps rank by it.
    """
    loso = [v["auc"] for v in per_source(metrics, "loso_auc_").values()]
    out = {}
    for split, key in (("test", "robust_score"), ("val", "val_robust_score")):
        within = [v["auc"] for v in per_source(metrics, f"{split}_auc_source_").values()]
        if within:
            out[key] = float(min(within + loso))
    if loso:
        out["loso_auc_min"] = float(min(loso))
    return out


def card_block(metrics: Mapping[str, float]) -> dict:
    """What a model card says about sources (read by the registry's shortcut gate)."""

    def interval(prefix: str) -> dict | None:
        if prefix not in metrics:
            return None
        return {
            "auc": metrics[prefix],
            "ci_low": metrics.get(f"{prefix}_ci_low"),
            "ci_high": metrics.get(f"{prefix}_ci_high"),
        }

    counts = {
        k.removeprefix("test_n_source_"): int(v)
        for k, v in sorted(metrics.items())
        if k.startswith("test_n_source_")
    }
    return {
        "min_images_per_source": MIN_SOURCE_IMAGES,
        "test_images_per_source": counts,
        "sources": per_source(metrics, "test_auc_source_"),
        "val_sources": per_source(metrics, "val_auc_source_"),
        "shortcut_floor": interval("test_shortcut_auc"),
        "loso": per_source(metrics, "loso_auc_") or None,
        **{
            k: metrics.get(k)
            for k in ("loso_auc_min", "robust_score", "val_robust_score")
            if k in metrics
        },
    }
