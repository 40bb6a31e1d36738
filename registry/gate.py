"""The shortcut gate: a model must beat the scanner, and not fall to chance within one.

A model card (training.export) carries ``source_robustness``: the AUC within every
image source of the run's test set with bootstrap 95% CIs, the shortcut floor (a
classifier that sees only the image's source and size, same split) with its CI, and
leave-one-source-out AUCs where they ran. `registry promote` refuses, unless forced
with a reason, a version whose numbers show that

1. its pooled test AUC is not above the upper 95% bound of the shortcut floor: it
   does no better than telling scanners apart could; or
2. with two or more sources in the test set, the AUC within some source has a 95% CI
   lower bound at or below 0.5: on that scanner it may be guessing.

With a single source (the phantom, one scanner), there is nothing to check within or
across sources and the floor is 0.5 [0.5, 0.5]: rule 1 is then "better than chance".
Sources with fewer test images than the card's ``min_images_per_source`` have no AUC
and are not checked. LOSO AUCs are shown, not gated: they measure unseen scanners,
which the issue's target (>= 0.70) is about, not this release check.

No TensorFlow here: this module is imported by the service.
"""

from __future__ import annotations

import json

CHANCE = 0.5
TAG = "source_robustness"
# MLflow caps tag values (8,000 characters in MLflow 3): keep the weakest sources.
_MAX_SOURCES_IN_TAG = 20

LEGACY = (
    "its model card carries no source-robustness numbers (per-source AUCs, shortcut "
    "floor): it was exported before the shortcut gate existed; train and export it again"
)


def tag_value(card: dict) -> str:
    """What register stores as the version tag the gate reads ('' for a legacy card)."""
    block = card.get("source_robustness")
    if not block:
        return ""
    sources = sorted((block.get("sources") or {}).items(), key=lambda kv: kv[1].get("ci_low", 0.0))[
        :_MAX_SOURCES_IN_TAG
    ]
    summary = {
        "pooled_test_auc": (card.get("metrics") or {}).get("test", {}).get("auc"),
        "shortcut_floor": block.get("shortcut_floor"),
        "sources": dict(sources),
        "n_sources": len(block.get("test_images_per_source") or block.get("sources") or {}),
        "loso_auc_min": block.get("loso_auc_min"),
        "robust_score": block.get("robust_score"),
    }
    return json.dumps(summary, sort_keys=True)


def problems(tag: str | None) -> list[str]:
    """Why the gate refuses a version (empty: it passes), from its tag_value()."""
    if not tag:
        return [LEGACY]
    summary = json.loads(tag)
    out = []
    pooled = summary.get("pooled_test_auc")
    floor = summary.get("shortcut_floor") or {}
    high = floor.get("ci_high")
    if pooled is None or high is None:
        out.append("its card lacks the pooled test AUC or the shortcut floor's 95% CI")
    elif not pooled > high:
        out.append(
            f"pooled test AUC {pooled:.3f} is not above the shortcut floor "
            f"{floor['auc']:.3f} [95% CI {floor['ci_low']:.3f}, {high:.3f}] (image source "
            "and size alone, same test images)"
        )
    if summary.get("n_sources", 0) >= 2:
        for name, m in sorted(summary.get("sources", {}).items()):
            low = m.get("ci_low")
            if low is None or low <= CHANCE:
                out.append(
                    f"within source {name} test AUC {m['auc']:.3f} [95% CI "
                    f"{_fmt(low)}, {_fmt(m.get('ci_high'))}] on {int(m.get('n', 0))} images: "
                    f"lower bound not above chance ({CHANCE})"
                )
    return out


def robust_score(tag: str | None) -> float | None:
    """The run's source-robust score (training.sources.robust_scores), if recorded."""
    return json.loads(tag).get("robust_score") if tag else None


def _fmt(value) -> str:
    return "?" if value is None else f"{value:.3f}"
