"""thyroid_cad.tirads: DDTI's spellings -> the ACR lexicon, points, levels, estimates."""

from __future__ import annotations

import csv

import pytest

from thyroid_cad import tirads

# Every spelling thyroid-seed's ddti-annotations.csv holds, and its ACR category.
DDTI = {
    "composition": {
        "solid": "solid or almost completely solid",
        "predominantly solid": "mixed cystic and solid",
        "spongiform": "spongiform",
        "predominantly cystic": "mixed cystic and solid",
        "dense": "solid or almost completely solid",
        "cystic": "cystic or almost completely cystic",
        "": None,
    },
    "echogenicity": {
        "isoechogenicity": "isoechoic",
        "hypoechogenicity": "hypoechoic",
        "hyperechogenicity": "hyperechoic",
        "marked hypoechogenicity": "very hypoechoic",
        "": None,
    },
    "margin": {
        "well defined": "smooth",
        "well defined smooth": "smooth",
        "ill- defined": "ill-defined",
        "ill defined": "ill-defined",
        "spiculated": "lobulated or irregular",
        "microlobulated": "lobulated or irregular",
        "macrolobulated": "lobulated or irregular",
        "": None,
    },
    "echogenic_foci": {
        "microcalcifications": "punctate echogenic foci",
        "microcalcification": "punctate echogenic foci",
        "non": "none or large comet-tail artifacts",
        "macrocalcifications": "macrocalcifications",
        "macrocalcification": "macrocalcifications",
        "": None,
    },
}


@pytest.mark.parametrize(
    ("descriptor", "raw", "expected"),
    [(d, raw, acr) for d, table in DDTI.items() for raw, acr in table.items()],
)
def test_every_ddti_spelling_maps_to_its_acr_category(descriptor, raw, expected):
    assert tirads.normalise(descriptor, raw) == expected
    # Case, surrounding space and hyphen spacing do not matter.
    assert tirads.normalise(descriptor, f"  {raw.upper()} ") == expected


def test_acr_names_map_to_themselves_and_unknown_words_to_none():
    for descriptor in tirads.DESCRIPTORS:
        for category in tirads.categories(descriptor):
            assert tirads.normalise(descriptor, category) == category
    assert tirads.normalise("margin", "wavy") is None
    assert tirads.normalise("composition", None) is None
    with pytest.raises(ValueError, match="unknown descriptor"):
        tirads.normalise("colour", "red")


@pytest.mark.shared_data
def test_every_value_in_the_ddti_csv_is_covered(thyroid_seed):
    with open(thyroid_seed / "ddti-annotations.csv", newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 314
    for descriptor, column in tirads.COLUMNS.items():
        seen = {r[column].strip() for r in rows}
        assert seen <= set(DDTI[descriptor]), f"{column}: unmapped {seen - set(DDTI[descriptor])}"
        for raw in seen - {""}:
            assert tirads.normalise(descriptor, raw) is not None
    missing = sum(tirads.from_row(r)["composition"] is None for r in rows)
    assert missing == 127  # as ../shared/data/README.md says


@pytest.mark.parametrize(
    ("points", "expected"),
    [
        (0, "TR1"),
        (1, "TR1"),
        (2, "TR2"),
        (3, "TR3"),
        (4, "TR4"),
        (6, "TR4"),
        (7, "TR5"),
        (14, "TR5"),
    ],
)
def test_points_to_level(points, expected):
    assert tirads.level(points) == expected


def test_level_refuses_negative_points():
    with pytest.raises(ValueError, match="negative"):
        tirads.level(-1)


def test_score_sums_the_chart_and_adds_shape():
    values = {
        "composition": "solid or almost completely solid",  # 2
        "echogenicity": "very hypoechoic",  # 3
        "margin": "lobulated or irregular",  # 2
        "echogenic_foci": "punctate echogenic foci",  # 3
    }
    assert tirads.score(values) == {
        "points": 10, "level": "TR5", "complete": False, "shape_points": None
    }  # fmt: skip
    assert tirads.score(values, taller_than_wide=True)["points"] == 13
    wide = tirads.score(values, taller_than_wide=False)
    assert wide["points"] == 10 and wide["complete"] and wide["shape_points"] == 0
    benign = {
        "composition": "mixed cystic and solid",  # 1
        "echogenicity": "isoechoic",  # 1
        "margin": "smooth",
        "echogenic_foci": "none or large comet-tail artifacts",
    }
    assert tirads.score(benign, False)["level"] == "TR2"
    # Unknown categories count nothing; spongiform nodules get no other points.
    assert tirads.score({"echogenicity": "hypoechoic"})["points"] == 2
    assert tirads.score({**values, "composition": "spongiform"}, True)["points"] == 0


def test_describe_takes_the_most_probable_category():
    probs = {
        "composition": [0.05, 0.05, 0.1, 0.8],
        "echogenicity": [0.0, 0.1, 0.2, 0.3, 0.4],
    }
    descriptors, estimate = tirads.describe(probs, taller_than_wide=True)
    assert descriptors == [
        {"descriptor": "composition", "value": "solid or almost completely solid",
         "probability": 0.8, "points": 2},
        {"descriptor": "echogenicity", "value": "very hypoechoic", "probability": 0.4,
         "points": 3},
    ]  # fmt: skip
    assert estimate["points"] == 2 + 3 + 3 and estimate["level"] == "TR5"
    assert estimate["estimate"] is True and "not a radiologist" in estimate["note"]
    with pytest.raises(ValueError, match="categories"):
        tirads.describe({"margin": [0.5, 0.5]})
