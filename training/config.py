"""YAML configuration files: `thyroid-cad train --config FILE` and sweep files.

A training configuration is a mapping of TrainConfig fields (training.train), plus
the progressive-transfer options of `thyroid-cad train` (``progressive_via``,
``via_epochs``, ``via_max_images``) or ``members``: a list of mappings, one per member
of an ensemble, each holding the TrainConfig fields in which that member differs from
the rest of the file (training.train.train_members). Relative paths (``data``,
``manifest``, ``progressive_via``, a ``weights`` file, in members too) are relative to
the file. Unknown keys and values of the wrong type are errors that name the key.
"""

from __future__ import annotations

from dataclasses import fields
from pathlib import Path

import yaml

from training.train import TrainConfig

TRAIN_EXTRA_KEYS = ("progressive_via", "via_epochs", "via_max_images", "members")
# What every member of an ensemble shares: its split (so the test images are unseen by
# all) and its input size (one graph input).
SHARED_BY_MEMBERS = ("data", "manifest", "seed", "max_images", "image_size", "experiment")
PATH_KEYS = ("data", "manifest", "progressive_via", "annotations")
_TYPES = {"int": (int,), "float": (int, float), "bool": (bool,), "str": (str,)}


def read_yaml(path: str | Path) -> dict:
    """The mapping a YAML file holds.

    Raises:
        ValueError: the file is missing, is not valid YAML or is not a mapping.
    """
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"configuration not found: {path}")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ValueError(f"{path} is not valid YAML: {e}") from e
    if not isinstance(raw, dict):
        raise ValueError(f"{path}: expected a mapping of option: value")
    return raw


def resolve_paths(raw: dict, base: Path) -> dict:
    """Paths in raw made absolute relative to base (a copy; other keys unchanged)."""
    out = dict(raw)
    for key in PATH_KEYS:
        if out.get(key) is not None:
            p = Path(str(out[key])).expanduser()
            out[key] = str(p if p.is_absolute() else (base / p).resolve())
    if out.get("localiser") and (base / str(out["localiser"])).exists():  # else a run id
        out["localiser"] = str((base / str(out["localiser"])).resolve())
    if out.get("weights") not in (None, "none", "imagenet"):
        p = Path(str(out["weights"])).expanduser()
        out["weights"] = str(p if p.is_absolute() else (base / p).resolve())
    return out


def check_types(values: dict, where: str) -> None:
    """Each value has its TrainConfig field's type (ints where floats are allowed).

    Raises:
        ValueError: naming the first key with a value of the wrong type.
    """
    annotations = {f.name: str(f.type) for f in fields(TrainConfig)}
    for key, value in values.items():
        if key not in annotations:
            continue
        kinds = [k.strip() for k in annotations[key].split("|")]
        if value is None and "None" in kinds:
            continue
        allowed = tuple(t for k in kinds for t in _TYPES.get(k, ()))
        wrong_bool = isinstance(value, bool) and bool not in allowed
        if not isinstance(value, allowed) or wrong_bool:
            hint = (
                " (YAML reads off/on/no/yes unquoted as booleans: write 'off')"
                if isinstance(value, bool) and str in allowed
                else ""
            )
            raise ValueError(f"{where}: {key} must be {annotations[key]}, got {value!r}{hint}")


def load_train_config(path: str | Path) -> dict:
    """TrainConfig fields (and progressive options) from a YAML file, paths resolved.

    Raises:
        ValueError: unreadable file, an unknown key (named), a value of the wrong type.
    """
    path = Path(path)
    raw = read_yaml(path)
    allowed = {f.name for f in fields(TrainConfig)} | set(TRAIN_EXTRA_KEYS)
    unknown = sorted(set(raw) - allowed)
    if unknown:
        raise ValueError(
            f"{path}: unknown key {unknown[0]!r}"
            + (f" (and {unknown[1:]})" if unknown[1:] else "")
            + f"; allowed: {sorted(allowed)}"
        )
    check_types(raw, str(path))
    if "members" in raw:
        raw["members"] = _members(raw["members"], path)
    for key in ("via_epochs", "via_max_images"):
        value = raw.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
            raise ValueError(f"{path}: {key} must be an integer, got {value!r}")
    return resolve_paths(raw, path.parent)


def _members(members, path: Path) -> list[dict]:
    """The `members:` list of an ensemble configuration, each member checked like the
    file's own keys and its paths resolved.

    Raises:
        ValueError: not a list of at least two mappings, or a member key that is unknown,
            of the wrong type, or one the members must share (SHARED_BY_MEMBERS).
    """
    if not isinstance(members, list) or len(members) < 2:
        raise ValueError(f"{path}: members must be a list of at least two mappings")
    allowed = {f.name for f in fields(TrainConfig)} - set(SHARED_BY_MEMBERS)
    out = []
    for i, member in enumerate(members):
        where = f"{path}: members[{i}]"
        if not isinstance(member, dict):
            raise ValueError(f"{where}: expected a mapping of option: value, got {member!r}")
        shared = sorted(set(member) & set(SHARED_BY_MEMBERS))
        if shared:
            raise ValueError(f"{where}: {shared[0]!r} is shared by all members; set it once")
        unknown = sorted(set(member) - allowed)
        if unknown:
            raise ValueError(f"{where}: unknown key {unknown[0]!r}; allowed: {sorted(allowed)}")
        check_types(member, where)
        out.append(resolve_paths(member, path.parent))
    return out
