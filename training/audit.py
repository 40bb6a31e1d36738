"""Dataset audit: counts, sizes, unreadable files, duplicates and leaks across splits.

Exact duplicates are files with the same SHA-256. Near duplicates are images whose
perceptual hash (pHash of the cropped ultrasound content, 64 bits) differs in at
most ``NEAR_DUPLICATE_BITS`` bits: re-saved, re-scaled or re-annotated copies of one
frame. Both, and the cases of a manifest, must stay on one side of any split.
"""

from __future__ import annotations

import os
from collections import Counter, defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import imagehash
import numpy as np
from PIL import Image

from thyroid_cad import imaging
from training import sources
from training.data import Dataset, ImageInfo

# Hamming distance (of 64 bits) up to which two images count as near duplicates.
# Checked by eye on thyroid-seed: pairs at <= 8 bits were one frame re-saved or two
# adjacent frames of one nodule; pairs at 10 bits and more were different scans.
NEAR_DUPLICATE_BITS = 8


def inspect_image(path) -> ImageInfo:
    try:
        image = imaging.open_image(path)
        rgb = imaging.crop_to_content(imaging.to_rgb_array(image))
        digest = imagehash.phash(Image.fromarray(rgb))
        return ImageInfo(size=image.size, phash=int(str(digest), 16))
    except (OSError, ValueError, SyntaxError) as e:  # PIL raises all three on bad files
        return ImageInfo(size=None, phash=None, error=f"{type(e).__name__}: {e}")


def inspect_all(dataset: Dataset) -> list[ImageInfo]:
    with ThreadPoolExecutor(max_workers=min(8, (os.cpu_count() or 1) * 2)) as pool:
        return list(pool.map(inspect_image, (r.path for r in dataset.records)))


class UnionFind:
    def __init__(self, n: int):
        self.parent = list(range(n))

    def find(self, i: int) -> int:
        while self.parent[i] != i:
            self.parent[i] = self.parent[self.parent[i]]
            i = self.parent[i]
        return i

    def union(self, i: int, j: int) -> None:
        ri, rj = self.find(i), self.find(j)
        if ri != rj:
            self.parent[max(ri, rj)] = min(ri, rj)

    def groups(self) -> list[list[int]]:
        out: dict[int, list[int]] = defaultdict(list)
        for i in range(len(self.parent)):
            out[self.find(i)].append(i)
        return list(out.values())


def exact_duplicate_groups(sha256: list[str]) -> list[list[int]]:
    by_hash: dict[str, list[int]] = defaultdict(list)
    for i, digest in enumerate(sha256):
        by_hash[digest].append(i)
    return [g for g in by_hash.values() if len(g) > 1]


def near_duplicate_pairs(phashes: list[int | None], max_bits: int = NEAR_DUPLICATE_BITS):
    """Pairs (i, j), i < j, of readable images within max_bits of each other."""
    idx = np.array([i for i, h in enumerate(phashes) if h is not None], dtype=np.int64)
    if len(idx) < 2:
        return []
    hashes = np.array([phashes[i] for i in idx], dtype=np.uint64)
    pairs = []
    for a in range(len(hashes) - 1):
        x = np.bitwise_xor(hashes[a + 1 :], hashes[a])
        dist = np.bitwise_count(x)
        for b in np.flatnonzero(dist <= max_bits):
            pairs.append((int(idx[a]), int(idx[a + 1 + b])))
    return pairs


@dataclass
class Leakage:
    """How images are tied together: what must stay on one side of a split."""

    exact: list[list[int]]  # byte-identical groups
    near: list[list[int]]  # near-duplicate groups (transitive), more than one exact group
    near_pairs: list[tuple[int, int]]  # the direct near-duplicate links
    cases: dict[str, list[int]]  # manifest case id -> its images
    group: list[int]  # leakage group id per image: case, exact and near links, transitively

    def label_conflicts(self, labels: list[str]) -> list[list[int]]:
        """Exact groups and direct near pairs whose images disagree on the label.

        Only direct links count: a transitive near-duplicate chain can join frames that
        are not alike at all, and one odd link must not condemn the whole chain.
        """
        linked = self.exact + [list(p) for p in self.near_pairs]
        return [g for g in linked if len({labels[i] for i in g}) > 1]


def leakage_groups(
    dataset: Dataset, infos: list[ImageInfo], max_bits: int = NEAR_DUPLICATE_BITS
) -> Leakage:
    """Find exact and near duplicates and join them with the manifest's cases."""
    n = len(dataset.records)
    uf = UnionFind(n)
    exact = exact_duplicate_groups(dataset.sha256())
    for group in exact:
        for j in group[1:]:
            uf.union(group[0], j)
    near_uf = UnionFind(n)
    pairs = near_duplicate_pairs([info.phash for info in infos], max_bits)
    for i, j in pairs:
        uf.union(i, j)
        near_uf.union(i, j)
    by_case: dict[str, list[int]] = defaultdict(list)
    for i, record in enumerate(dataset.records):
        if record.case_id:
            by_case[record.case_id].append(i)
    for members in by_case.values():
        for j in members[1:]:
            uf.union(members[0], j)
    shas = dataset.sha256()
    near = [g for g in near_uf.groups() if len(g) > 1 and len({shas[i] for i in g}) > 1]
    return Leakage(exact, near, pairs, dict(by_case), [uf.find(i) for i in range(n)])


def _one_case(case_ids: list[str | None]) -> bool:
    return all(case_ids) and len(set(case_ids)) == 1


def audit(dataset: Dataset, max_bits: int = NEAR_DUPLICATE_BITS) -> dict:
    """Everything a person should know about a dataset before training on it."""
    infos = inspect_all(dataset)
    records = dataset.records
    leakage = leakage_groups(dataset, infos, max_bits)
    exact, near = leakage.exact, leakage.near

    def paths(group: list[int]) -> list[str]:
        return sorted(records[i].rel for i in group)

    splits: dict[str, Counter] = defaultdict(Counter)
    for r in records:
        splits[r.split or "unsplit"][r.label] += 1

    cross = []
    labelled_groups = [("exact", g) for g in exact] + [("near", g) for g in near]
    by_case = leakage.cases
    labelled_groups += [("case", g) for g in by_case.values()]
    for kind, group in labelled_groups:
        group_splits = sorted({records[i].split for i in group if records[i].split})
        if len(group_splits) > 1:
            entry = {"kind": kind, "splits": group_splits, "paths": paths(group)}
            if kind == "case":
                entry["case_id"] = records[group[0]].case_id
            cross.append(entry)

    # Only direct links, as the split drops them (see Leakage.label_conflicts).
    # (an exact copy is also a near pair at 0 bits: list it once)
    conflicts = {tuple(paths(g)) for g in leakage.label_conflicts([r.label for r in records])}
    # Frames of one manifest case are expected to look alike; other groups need a look.
    unexplained = [g for g in near if not _one_case([records[i].case_id for i in g])]
    sizes = Counter(f"{info.size[0]}x{info.size[1]}" for info in infos if info.size)
    return {
        "root": str(dataset.root),
        "fingerprint": dataset.fingerprint(),
        "images": len(records),
        "classes": dataset.class_counts(),
        "splits": {s: dict(c) for s, c in sorted(splits.items())},
        "cases": len(by_case),
        "images_with_case": sum(len(g) for g in by_case.values()),
        "sizes": dict(sizes.most_common()),
        "sources": sources.source_table(
            sources.assign_sources(dataset, infos), dataset.labels, dataset.class_names
        ),
        "unreadable": [
            {"path": r.rel, "error": info.error}
            for r, info in zip(records, infos, strict=True)
            if info.error
        ],
        "exact_duplicate_groups": sorted(paths(g) for g in exact),
        "near_duplicate_groups": sorted(paths(g) for g in near),
        "near_duplicate_groups_across_cases": sorted(paths(g) for g in unexplained),
        "near_duplicate_max_bits": max_bits,
        "cross_split_groups": cross,
        "label_conflicts": [list(g) for g in sorted(conflicts)],
    }


def format_report(report: dict) -> str:
    """The audit as a short human-readable text: each finding says what it is and what to do."""
    exact, near = report["exact_duplicate_groups"], report["near_duplicate_groups"]
    across, bits = report["near_duplicate_groups_across_cases"], report["near_duplicate_max_bits"]
    conflicts, leaks = report["label_conflicts"], report["cross_split_groups"]
    lines = [
        f"dataset {report['root']}  (fingerprint {report['fingerprint']})",
        f"images: {report['images']}  classes: {report['classes']}",
        f"splits: {report['splits']}",
        f"cases in manifest: {report['cases']} ({report['images_with_case']} images)",
        "sizes: " + ", ".join(f"{k} ({v})" for k, v in list(report["sizes"].items())[:6]),
        "sources (image source: images per class): "
        + "; ".join(
            f"{s} " + " / ".join(f"{c} {n}" for c, n in counts.items())
            for s, counts in report["sources"].items()
        ),
        f"unreadable files: {len(report['unreadable'])}",
        f"exact duplicate groups: {len(report['exact_duplicate_groups'])}"
        + ("  (byte-identical files: training keeps one of each)" if exact else ""),
        f"near duplicate groups: {len(near)}  (images whose perceptual hash of the cropped "
        f"frame differs in at most {bits} of 64 bits, linked transitively: re-saved or "
        "re-scaled copies, or adjacent frames of one nodule)",
        f"  within one manifest case: {len(near) - len(across)}  (frames of one nodule: "
        "expected; the split keeps them together)",
        f"  joining different cases or images without a case: {len(across)}"
        + (
            "  (check them below: if they show one nodule, give them one case_id in the "
            "manifest; the split keeps each group on one side either way)"
            if across
            else ""
        ),
        f"groups crossing splits (leaks): {len(report['cross_split_groups'])}"
        + ("  (a duplicate or a case on both sides of a given split)" if leaks else ""),
        f"duplicate groups with conflicting labels: {len(conflicts)}"
        + (
            "  (exact copies or direct near-duplicate pairs whose labels differ: one label is "
            "wrong or the images are not one nodule; training drops them, check the labels)"
            if conflicts
            else ""
        ),
    ]
    for group in across[:20]:
        lines.append(f"  near duplicates across cases: {' | '.join(group)}")
    for group in conflicts[:20]:
        lines.append(f"  conflicting labels: {' | '.join(group)}")
    for entry in leaks[:20]:
        lines.append(f"  leak [{entry['kind']}] {' | '.join(entry['paths'])}")
    for item in report["unreadable"][:20]:
        lines.append(f"  unreadable {item['path']}: {item['error']}")
    return "\n".join(lines)
