"""TI-RADS descriptor heads (`--descriptors`): targets, masks and their evaluation.

DDTI's label is its TI-RADS category, made from composition, echogenicity, margin and
echogenic foci, which its annotation file records per case (thyroid_cad.tirads maps the
spellings to the ACR lexicon). With `descriptors` on, the softmax model gets one
softmax head per descriptor on the pooled features (training.models.build_model) and
trains them with the classifier. Most frames have no descriptor (the non-DDTI sources,
and about 127 DDTI frames lack composition and echogenicity): their one-hot target is
all zeros and their per-output sample weight 0, so the loss is masked where the
descriptor is missing. The classifier's own sample weights (class or within-source
weights) are unchanged.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from thyroid_cad import tirads
from thyroid_cad.metrics import wilson
from training.annotations import find_annotations, for_dataset
from training.data import Dataset

log = logging.getLogger(__name__)

# Each descriptor's loss weighs this much beside the classifier's 1.0: the four
# together count as much as the classification.
LOSS_WEIGHT = 0.25
MISSING = -1


def head_sizes() -> dict[str, int]:
    """Descriptor -> number of ACR categories (the width of its softmax head)."""
    return {d: len(tirads.categories(d)) for d in tirads.DESCRIPTORS}


def labels() -> dict[str, list[str]]:
    """Descriptor -> its category labels in head order (what the model card lists)."""
    return {d: tirads.categories(d) for d in tirads.DESCRIPTORS}


def codes(dataset: Dataset, annotations: str | Path | None = None) -> dict[str, np.ndarray]:
    """Every record's category index per descriptor (MISSING where not annotated).

    Raises:
        ValueError: no annotation file (given, or found in the dataset root), or it
            holds no descriptor for any of the dataset's images.
    """
    path = Path(annotations) if annotations else find_annotations(dataset.root)
    if path is None:
        raise ValueError(
            f"--descriptors needs TI-RADS descriptors: no annotation file in {dataset.root} "
            "(ddti-annotations.csv / annotations.csv with composition, echogenicity, margins, "
            "calcifications columns); give --annotations FILE"
        )
    found = for_dataset(dataset, path)
    out = {d: np.full(len(found), MISSING, dtype=np.int64) for d in tirads.DESCRIPTORS}
    for i, ann in enumerate(found):
        if ann is None:
            continue
        for d, category in tirads.from_row(ann.row).items():
            if category is not None:
                out[d][i] = tirads.categories(d).index(category)
    known = {d: int((c != MISSING).sum()) for d, c in out.items()}
    if not any(known.values()):
        raise ValueError(
            f"{path} holds no TI-RADS descriptor (composition, echogenicity, margins, "
            "calcifications) for the images of this dataset"
        )
    log.info("descriptor annotations from %s: %s of %d images", path, known, len(found))
    return out


def one_hot(codes_: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """{output name: N x categories float32}; a missing descriptor is an all-zero row
    (training.pipeline.make_dataset makes its sample weight 0 from that)."""
    sizes = head_sizes()
    out = {}
    for d, c in codes_.items():
        m = np.zeros((len(c), sizes[d]), dtype=np.float32)
        known = c != MISSING
        m[np.flatnonzero(known), c[known]] = 1.0
        out[tirads.output_name(d)] = m
    return out


def evaluate(
    train_codes: dict[str, np.ndarray], test_codes: dict[str, np.ndarray], test_probs: dict
) -> dict[str, float]:
    """Per-descriptor test accuracy (Wilson 95 % CI) and the majority-class floor.

    The floor predicts, for every test image, the category most frequent among the
    training images that have one. Only test images with the descriptor count.

    Returns:
        test_descriptor_<name>_{accuracy, accuracy_ci_low, accuracy_ci_high, majority, n}
        for every descriptor with at least one known test image.
    """
    out: dict[str, float] = {}
    for d, truth in test_codes.items():
        known = truth != MISSING
        n = int(known.sum())
        if n == 0:
            continue
        predicted = np.argmax(np.asarray(test_probs[tirads.output_name(d)]), axis=1)
        correct = int((predicted[known] == truth[known]).sum())
        low, high = wilson(correct, n)
        train = train_codes[d][train_codes[d] != MISSING]
        majority = int(np.bincount(train).argmax()) if len(train) else -2
        key = f"test_{tirads.output_name(d)}"
        out.update(
            {
                f"{key}_accuracy": correct / n,
                f"{key}_accuracy_ci_low": low,
                f"{key}_accuracy_ci_high": high,
                f"{key}_majority": float(np.mean(truth[known] == majority)),
                f"{key}_n": float(n),
            }
        )
    return out


def table(metrics: dict[str, float], train_codes: dict[str, np.ndarray]) -> dict:
    """The descriptors.json artifact: categories, training counts and test results."""
    out = {}
    for d, names in labels().items():
        c = train_codes[d]
        key = f"test_{tirads.output_name(d)}"
        out[d] = {
            "categories": names,
            "train_counts": {n: int((c == i).sum()) for i, n in enumerate(names)},
            "train_missing": int((c == MISSING).sum()),
            "test": {k[len(key) + 1 :]: v for k, v in metrics.items() if k.startswith(key + "_")},
        }
    return out
