"""Leak-free splits: de-duplicated, grouped by case and near-duplicate, stratified.

Every image belongs to a leakage group (same case, same bytes or a near-duplicate
link, transitively; see training.audit). Whole groups are dealt to splits so that
each split gets its share of every class; exact duplicates are kept once, and
duplicates that disagree on the label are dropped. A split is deterministic given
the dataset and the seed, and is saved as a JSON artifact with every run.
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter, defaultdict
from dataclasses import dataclass, field

import numpy as np

from training.audit import Leakage, inspect_all, leakage_groups
from training.data import Dataset, ImageInfo

SPLITS = ("train", "val", "test")


def assign_groups(
    labels: list[int], groups: list[int], fractions: list[float], seed: int
) -> list[int]:
    """Deal whole groups to len(fractions) parts, keeping each class near its share.

    Groups are visited largest first (random order among equal sizes, by seed) and each
    goes to the part whose quota of the group's majority class is least filled.

    Returns:
        The part index of every item; items of one group always share a part.
    """
    if len(labels) != len(groups):
        raise ValueError("labels and groups differ in length")
    if not fractions or any(f < 0 for f in fractions) or sum(fractions) <= 0:
        raise ValueError(f"invalid fractions {fractions}")
    fractions_arr = np.asarray(fractions, dtype=float) / sum(fractions)
    members: dict[int, list[int]] = defaultdict(list)
    for i, g in enumerate(groups):
        members[g].append(i)
    rng = np.random.default_rng(seed)
    keys = sorted(members)
    order = rng.permutation(len(keys))
    visit = sorted((keys[k] for k in order), key=lambda g: -len(members[g]))

    totals = Counter(labels)
    quota = {c: fractions_arr * n for c, n in totals.items()}
    filled = {c: np.zeros(len(fractions)) for c in totals}
    part_of = [0] * len(labels)
    for g in visit:
        items = members[g]
        label = Counter(labels[i] for i in items).most_common(1)[0][0]
        room = (quota[label] - filled[label]) / np.maximum(quota[label], 1e-9)
        room[fractions_arr == 0] = -np.inf
        part = int(np.argmax(room))
        for i in items:
            part_of[i] = part
            filled[labels[i]][part] += 1
    return part_of


@dataclass
class Split:
    """Which split every image of a dataset is in ('dropped' with a reason if none)."""

    rel_paths: list[str]
    assignment: list[str]
    seed: int
    fractions: dict[str, float]
    dropped: dict[str, str] = field(default_factory=dict)
    groups: list[int] = field(default_factory=list)

    def indices(self, name: str) -> list[int]:
        return [i for i, s in enumerate(self.assignment) if s == name]

    @property
    def split_id(self) -> str:
        h = hashlib.sha256()
        for rel, s in sorted(zip(self.rel_paths, self.assignment, strict=True)):
            h.update(f"{rel}\t{s}\n".encode())
        return h.hexdigest()[:12]

    def to_json(self) -> dict:
        return {
            "split_id": self.split_id,
            "seed": self.seed,
            "fractions": self.fractions,
            "counts": dict(Counter(self.assignment)),
            "assignment": dict(zip(self.rel_paths, self.assignment, strict=True)),
            "group": dict(zip(self.rel_paths, self.groups, strict=True)),
            "dropped": self.dropped,
        }

    def save(self, path) -> None:
        with open(path, "w") as f:
            json.dump(self.to_json(), f, indent=1, sort_keys=True)


def duplicates_to_drop(dataset: Dataset, leakage: Leakage) -> dict[int, str]:
    """Index -> reason for images left out: extra exact copies, label conflicts."""
    records = dataset.records
    drop: dict[int, str] = {}
    for group in leakage.label_conflicts([r.label for r in records]):
        for i in group:
            drop[i] = "duplicates disagree on the label"
    for group in leakage.exact:
        keep = min(group, key=lambda i: records[i].rel)
        for i in group:
            if i != keep and i not in drop:
                drop[i] = f"exact duplicate of {records[keep].rel}"
    return drop


def _usable(dataset: Dataset, infos: list[ImageInfo] | None) -> tuple[list[int], list[int], dict]:
    """(kept indices, group id per image, dropped index -> reason)."""
    infos = infos if infos is not None else inspect_all(dataset)
    leakage = leakage_groups(dataset, infos)
    drop = duplicates_to_drop(dataset, leakage)
    drop.update({i: f"unreadable: {info.error}" for i, info in enumerate(infos) if info.error})
    keep = [i for i in range(len(dataset.records)) if i not in drop]
    return keep, leakage.group, drop


def grouped_split(
    dataset: Dataset,
    val: float = 0.15,
    test: float = 0.15,
    seed: int = 0,
    infos: list[ImageInfo] | None = None,
) -> Split:
    """Stratified train/val/test split that keeps each leakage group on one side."""
    if not (0 <= val < 1 and 0 < test < 1 and val + test < 1):
        raise ValueError(f"need 0 <= val, 0 < test and val + test < 1; got val={val} test={test}")
    keep, groups, drop = _usable(dataset, infos)
    labels = dataset.labels
    parts = assign_groups(
        [labels[i] for i in keep], [groups[i] for i in keep], [1 - val - test, val, test], seed
    )
    assignment = ["dropped"] * len(dataset.records)
    for i, part in zip(keep, parts, strict=True):
        assignment[i] = SPLITS[part]
    return Split(
        rel_paths=[r.rel for r in dataset.records],
        assignment=assignment,
        seed=seed,
        fractions={"train": 1 - val - test, "val": val, "test": test},
        dropped={dataset.records[i].rel: why for i, why in sorted(drop.items())},
        groups=groups,
    )


def grouped_kfold(
    dataset: Dataset, k: int = 5, seed: int = 0, infos: list[ImageInfo] | None = None
) -> list[int]:
    """Fold (0..k-1) of every image, -1 for images dropped as duplicates or unreadable."""
    if k < 2:
        raise ValueError(f"k-fold needs k >= 2, got {k}")
    keep, groups, _ = _usable(dataset, infos)
    labels = dataset.labels
    parts = assign_groups([labels[i] for i in keep], [groups[i] for i in keep], [1.0] * k, seed)
    folds = [-1] * len(dataset.records)
    for i, part in zip(keep, parts, strict=True):
        folds[i] = part
    return folds
