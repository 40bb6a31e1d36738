"""The ACR TI-RADS lexicon for the descriptors DDTI records, its points and levels.

ACR TI-RADS (Tessler et al., J Am Coll Radiol 2017;14:587-595) scores a nodule in five
categories: composition, echogenicity, shape, margin and echogenic foci; the sum of the
points gives the level TR1-TR5. DDTI's annotations (thyroid-seed's
``ddti-annotations.csv``) carry four of them as free text with spelling variants
(``microcalcification`` / ``microcalcifications``, ``ill defined`` / ``ill- defined``);
`normalise` maps each to its ACR category. Shape (taller-than-wide) is not annotated
there: it comes from the nodule outline (thyroid_cad.nodule.shape).

Mapping choices, where DDTI's words and the ACR lexicon differ:

* composition: ``predominantly solid`` and ``predominantly cystic`` are ACR's "mixed
  cystic and solid"; DDTI's ``dense`` (a homogeneous solid nodule in the lexicon DDTI
  used) is taken as solid.
* margins: ``well defined`` and ``well defined smooth`` are smooth; ``spiculated``,
  ``microlobulated`` and ``macrolobulated`` are ACR's "lobulated or irregular".
* calcifications: ``microcalcification(s)`` are punctate echogenic foci, ``non`` is none.

No TensorFlow here: the service computes points and levels from a model's descriptor
probabilities with this module, and training normalises the annotations with it.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

# Descriptor -> ((ACR category, points), ...), in the order a model's head outputs them.
LEXICON: dict[str, tuple[tuple[str, int], ...]] = {
    "composition": (
        ("cystic or almost completely cystic", 0),
        ("spongiform", 0),
        ("mixed cystic and solid", 1),
        ("solid or almost completely solid", 2),
    ),
    "echogenicity": (
        ("anechoic", 0),
        ("hyperechoic", 1),
        ("isoechoic", 1),
        ("hypoechoic", 2),
        ("very hypoechoic", 3),
    ),
    "margin": (
        ("smooth", 0),
        ("ill-defined", 0),
        ("lobulated or irregular", 2),
        ("extra-thyroidal extension", 3),
    ),
    "echogenic_foci": (
        ("none or large comet-tail artifacts", 0),
        ("macrocalcifications", 1),
        ("peripheral (rim) calcifications", 2),
        ("punctate echogenic foci", 3),
    ),
}
# The descriptors a model can learn (shape comes from the outline, not from a head).
DESCRIPTORS = tuple(LEXICON)
# A model's graph output for a descriptor (probabilities over categories(descriptor)):
# the name export writes and the service reads.
OUTPUT_PREFIX = "descriptor_"
# The annotation column that holds each descriptor in DDTI's CSV.
COLUMNS = {
    "composition": "composition",
    "echogenicity": "echogenicity",
    "margin": "margins",
    "echogenic_foci": "calcifications",
}
TALLER_THAN_WIDE_POINTS = 3
NOTE = "model estimate, not a radiologist's reading"

# Raw spellings (normalised by _key) -> ACR category. The ACR category names map to
# themselves too (see _ALIASES below).
_RAW: dict[str, dict[str, str]] = {
    "composition": {
        "cystic": "cystic or almost completely cystic",
        "almost completely cystic": "cystic or almost completely cystic",
        "spongiform": "spongiform",
        "predominantly cystic": "mixed cystic and solid",
        "predominantly solid": "mixed cystic and solid",
        "mixed": "mixed cystic and solid",
        "solid": "solid or almost completely solid",
        "almost completely solid": "solid or almost completely solid",
        "dense": "solid or almost completely solid",
    },
    "echogenicity": {
        "anechoic": "anechoic",
        "anechogenicity": "anechoic",
        "hyperechogenicity": "hyperechoic",
        "hyperechoic": "hyperechoic",
        "isoechogenicity": "isoechoic",
        "isoechoic": "isoechoic",
        "hypoechogenicity": "hypoechoic",
        "hypoechoic": "hypoechoic",
        "marked hypoechogenicity": "very hypoechoic",
        "markedly hypoechoic": "very hypoechoic",
        "very hypoechoic": "very hypoechoic",
    },
    "margin": {
        "well defined": "smooth",
        "well defined smooth": "smooth",
        "smooth": "smooth",
        "ill defined": "ill-defined",
        "spiculated": "lobulated or irregular",
        "irregular": "lobulated or irregular",
        "microlobulated": "lobulated or irregular",
        "macrolobulated": "lobulated or irregular",
        "lobulated": "lobulated or irregular",
        "extrathyroidal extension": "extra-thyroidal extension",
        "extra thyroidal extension": "extra-thyroidal extension",
    },
    "echogenic_foci": {
        "non": "none or large comet-tail artifacts",
        "none": "none or large comet-tail artifacts",
        "microcalcification": "punctate echogenic foci",
        "punctate echogenic foci": "punctate echogenic foci",
        "macrocalcification": "macrocalcifications",
        "peripheral calcification": "peripheral (rim) calcifications",
        "rim calcification": "peripheral (rim) calcifications",
    },
}


def output_name(descriptor: str) -> str:
    """The graph output that holds `descriptor`'s class probabilities."""
    return f"{OUTPUT_PREFIX}{descriptor}"


def _key(text: str) -> str:
    """Lower case, hyphens and repeated spaces as one space, a plural 's' dropped."""
    text = re.sub(r"[\s\-_]+", " ", text.strip().lower()).strip()
    return text[:-1] if text.endswith("calcifications") else text


_ALIASES = {
    d: {**{_key(k): v for k, v in raw.items()}, **{_key(c): c for c, _ in LEXICON[d]}}
    for d, raw in _RAW.items()
}


def categories(descriptor: str) -> list[str]:
    """The ACR categories of a descriptor, in head order.

    Raises:
        ValueError: an unknown descriptor.
    """
    if descriptor not in LEXICON:
        raise ValueError(f"unknown descriptor {descriptor!r}; choose from {DESCRIPTORS}")
    return [c for c, _ in LEXICON[descriptor]]


def normalise(descriptor: str, raw: str | None) -> str | None:
    """A raw annotation (any DDTI spelling) -> its ACR category; None when empty or unknown."""
    categories(descriptor)  # checks the name
    if raw is None or not str(raw).strip():
        return None
    return _ALIASES[descriptor].get(_key(str(raw)))


def from_row(row: Mapping[str, str]) -> dict[str, str | None]:
    """Every descriptor's ACR category from one annotation row (DDTI's columns)."""
    return {d: normalise(d, row.get(COLUMNS[d])) for d in DESCRIPTORS}


def points_of(descriptor: str, category: str) -> int:
    """ACR points of one category.

    Raises:
        ValueError: the category is not in the descriptor's lexicon.
    """
    table = dict(LEXICON.get(descriptor, ()))
    if category not in table:
        raise ValueError(
            f"{category!r} is not an ACR {descriptor} category: {categories(descriptor)}"
        )
    return table[category]


def level(points: int) -> str:
    """ACR TI-RADS level of a point total: TR1 (0-1), TR2 (2), TR3 (3), TR4 (4-6), TR5 (7+).

    The ACR chart lists 0 points for TR1 and 2 for TR2; a total of 1 (possible only
    from a cystic, anechoic nodule with macrocalcifications, or from estimates) is
    TR1 here: both levels carry the same advice (no FNA).
    """
    if points < 0:
        raise ValueError(f"points cannot be negative, got {points}")
    if points <= 1:
        return "TR1"
    if points <= 3:
        return f"TR{points}"
    return "TR4" if points <= 6 else "TR5"


def score(values: Mapping[str, str | None], taller_than_wide: bool | None = None) -> dict:
    """Points and level from ACR categories (None: not known, counted as 0 points).

    Spongiform nodules get no points for the other categories (ACR's rule).

    Returns:
        {points, level, complete (every category and the shape known), shape_points}.
    """
    total = 0
    for descriptor in DESCRIPTORS:
        category = values.get(descriptor)
        if category is not None:
            total += points_of(descriptor, category)
    shape_points = (
        None if taller_than_wide is None else (TALLER_THAN_WIDE_POINTS if taller_than_wide else 0)
    )
    total += shape_points or 0
    if values.get("composition") == "spongiform":
        total = 0
    complete = shape_points is not None and all(values.get(d) is not None for d in DESCRIPTORS)
    return {
        "points": total,
        "level": level(total),
        "complete": complete,
        "shape_points": shape_points,
    }


def describe(
    probabilities: Mapping[str, object], taller_than_wide: bool | None = None
) -> tuple[list[dict], dict]:
    """A model's descriptor probabilities -> (descriptors, tirads), as the API returns them.

    Args:
        probabilities: descriptor name -> probabilities over `categories(name)` (a
            sequence of floats; descriptors a model has no head for are left out).
        taller_than_wide: from the nodule's outline (thyroid_cad.nodule.shape), None
            when there is none.

    Returns:
        descriptors: [{descriptor, value (the most probable category), probability,
        points}], and tirads: {points, level, complete, shape_points, estimate: True,
        note}, both model estimates.
    """
    out, values = [], {}
    for descriptor, probs in probabilities.items():
        probs = [float(p) for p in probs]  # type: ignore[attr-defined]
        names = categories(descriptor)
        if len(probs) != len(names):
            raise ValueError(
                f"{descriptor}: {len(probs)} probabilities for {len(names)} categories"
            )
        best = max(range(len(probs)), key=probs.__getitem__)
        values[descriptor] = names[best]
        out.append(
            {
                "descriptor": descriptor,
                "value": names[best],
                "probability": round(probs[best], 6),
                "points": points_of(descriptor, names[best]),
            }
        )
    tirads = score(values, taller_than_wide) | {"estimate": True, "note": NOTE}
    return out, tirads
