"""Leave-one-source-out (LOSO): does a model work on a scanner it has never seen?

For every source s (training.sources) a fold trains the same configuration on the
other sources and scores the images of s. Each fold is a nested MLflow child run of
the run it checks (its own split, learning curves, plots and model, tags
``loso_fold_of`` and ``holdout_source``); the run itself gets ``loso_auc_<s>`` with a
bootstrap 95% CI, ``loso_n_<s>`` and ``loso_auc_min``, and a tag ``loso_run_<s>`` per
fold. Child runs rather than metrics alone: a fold is a whole training, worth being
inspectable, and its model is what an SVM / Random Forest run that reuses this
network's features needs for its own folds.

Which images (the run's own leak-free split, so nothing here touches its test set):

* fold training and validation: the split's train and val images of the other sources;
* held out: the split's train and val images of s, less any whose leakage group
  (case, duplicate) reaches the other sources' training images.

The test images of every source stay out of LOSO, so that a sweep may rank by it
(``val_robust_score``) and still report test numbers that were not selected on.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace
from pathlib import Path

import mlflow
import numpy as np

from training.sources import MIN_SOURCE_IMAGES

log = logging.getLogger(__name__)


def holdout_indices(
    idx: dict[str, list[int]], sources: Sequence[str], held_out: str, groups: Sequence[int]
) -> dict[str, list[int]]:
    """The fold's train / val / test image indices for holding out one source."""
    train = [i for i in idx["train"] if sources[i] != held_out]
    val = [i for i in idx["val"] if sources[i] != held_out]
    seen = {groups[i] for i in train + val} if groups else set()
    test = sorted(
        i
        for part in ("train", "val")
        for i in idx[part]
        if sources[i] == held_out and (not groups or groups[i] not in seen)
    )
    return {"train": train, "val": val, "test": test}


def shift_sets(
    split: Mapping[str, str], fold_test: Sequence[str], source_of: Mapping[str, str], held_out: str
) -> tuple[list[str], list[str]]:
    """(in-source, held-out) images for judging a fold on the shift to its held-out source.

    In-source: the split's test images of the sources the fold trained on (never seen).
    Held-out: the fold's own test side (the held-out source's train / val images, from
    its holdout.json) and the split's test images of that source. `split` maps an image
    to its side (split.json's assignment), `source_of` an image to its source.
    """
    tested = [rel for rel, side in split.items() if side == "test"]
    in_source = [rel for rel in tested if source_of[rel] != held_out]
    held = list(fold_test) + [rel for rel in tested if source_of[rel] == held_out]
    return in_source, held


def candidates(
    idx: dict[str, list[int]], sources: Sequence[str], labels: Sequence[int], groups: Sequence[int]
) -> list[str]:
    """Sources a fold can hold out: both classes held out and left to train on.

    None with a single source; a source is skipped if fewer than MIN_SOURCE_IMAGES of
    its images can be held out.
    """
    names = sorted({sources[i] for part in idx.values() for i in part})
    if len(names) < 2:
        return []
    out = []
    for name in names:
        fold = holdout_indices(idx, sources, name, groups)
        held = {labels[i] for i in fold["test"]}
        rest = {labels[i] for i in fold["train"]}
        if len(fold["test"]) >= MIN_SOURCE_IMAGES and len(held) > 1 and len(rest) > 1:
            out.append(name)
        else:
            log.info("LOSO: source %s cannot be held out (too few images or one class)", name)
    return out


def _fold_start(init_from: str | None, data: str, source: str) -> tuple[bool, str | None]:
    """(usable, init_from for the fold): never start a fold from a network that saw s.

    A start on other data (radiographs, ImageNet) is shared by every fold. A network
    trained on this data (an SVM / RF run reusing a softmax run's features) has LOSO
    folds of its own: each fold starts from the matching one. Without them, the fold
    cannot be done honestly.
    """
    if init_from is None:
        return True, None
    start = mlflow.get_run(init_from).data
    fold = start.tags.get(f"loso_run_{source}")
    if fold:
        return True, fold
    same_data = Path(start.params.get("data", "")).resolve() == Path(data).resolve()
    return (not same_data), (None if same_data else init_from)


def run(
    cfg,
    run_id: str,
    names: list[str],
    train_fn: Callable[..., str],
) -> dict[str, float]:
    """Train one fold per source in names under run_id; returns the loso_* metrics."""
    metrics: dict[str, float] = {}
    base_name = cfg.run_name or f"{cfg.stage}-{cfg.backbone}-{cfg.strategy}-{cfg.classifier}"
    for source in names:
        usable, start = _fold_start(cfg.init_from, cfg.data, source)
        if not usable:
            reason = f"its starting network {cfg.init_from} saw this source and has no LOSO folds"
            log.warning("LOSO fold %s skipped: %s", source, reason)
            mlflow.set_tag(f"loso_skipped_{source}", reason)
            continue
        fold_cfg = replace(
            cfg,
            holdout_source=source,
            loso=False,
            init_from=start,
            run_name=f"{base_name}/loso-{source}",
        )
        log.info("LOSO fold: holding out source %s", source)
        fold_id = train_fn(
            fold_cfg, parent_run_id=run_id, tags={"loso_fold_of": run_id, "holdout_source": source}
        )
        fold = mlflow.get_run(fold_id).data.metrics
        mlflow.set_tag(f"loso_run_{source}", fold_id)
        if np.isfinite(fold.get("test_auc", np.nan)):
            metrics[f"loso_auc_{source}"] = fold["test_auc"]
            metrics[f"loso_auc_{source}_ci_low"] = fold["test_auc_ci_low"]
            metrics[f"loso_auc_{source}_ci_high"] = fold["test_auc_ci_high"]
        metrics[f"loso_n_{source}"] = float(fold.get(f"test_n_source_{source}", np.nan))
    return metrics
