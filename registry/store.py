"""A thin layer over the MLflow model registry: versions, aliases, a promotion gate.

register -> versions of one registered model (default `thyroid-nodule-classifier`),
each the exported ONNX file logged with MLflow's ONNX flavor, its model card in the
MLmodel metadata and the facts the gate needs as version tags. Aliases (`champion`,
`challenger`, ...) point at versions; every promotion and rollback is recorded as a
registered-model tag `history.<time>` (who, when, why, previous version). resolve
turns `NAME@ALIAS` or `NAME/VERSION` into a local, SHA-256-checked copy of the ONNX
file and its card, cached by version and hash: the service needs nothing else.

No TensorFlow here: this module is imported by the service.
"""

from __future__ import annotations

import getpass
import json
import logging
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import yaml
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from registry import DEFAULT_NAME, gate
from thyroid_cad import settings
from thyroid_cad.files import sha256_file

log = logging.getLogger(__name__)

ALIASES = ("champion", "challenger")
HISTORY_PREFIX = "history."
_URI = re.compile(r"^(?P<name>[^@/]+)(?:@(?P<alias>[A-Za-z0-9_-]+)|/(?P<version>\d+))$")


class RegistryError(ValueError):
    """A registry request that cannot be done; the message says why."""


class RegistryUnavailable(RegistryError):
    """The registry did not answer (network, server down): a cached model may serve."""


class AliasNotSet(RegistryError):
    """The registry answered: no version holds this alias (yet)."""

    def __init__(self, name: str, alias: str):
        super().__init__(f"{name}@{alias} not found in the registry: the alias is not set")


# Error codes with which a registry that did answer says "no such model / alias".
_ANSWERED = {"RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE", "NOT_FOUND", "BAD_REQUEST"}


def _lookup_error(uri: str, e: MlflowException, name: str, alias: str | None) -> RegistryError:
    if getattr(e, "error_code", "") in _ANSWERED:
        if alias:
            return AliasNotSet(name, alias)
        return RegistryError(f"{uri} not found in the registry: {e.message}")
    return RegistryUnavailable(f"registry unavailable while resolving {uri}: {e.message}")


def client() -> MlflowClient:
    return MlflowClient(tracking_uri=settings.tracking_uri(), registry_uri=settings.tracking_uri())


def read_export(directory: Path) -> tuple[Path, dict]:
    """(model.onnx path, card) of an export folder, checked against each other."""
    directory = Path(directory)
    onnx_path, card_path = directory / "model.onnx", directory / "model_card.json"
    if not onnx_path.is_file() or not card_path.is_file():
        raise RegistryError(
            f"{directory} must hold model.onnx and model_card.json (thyroid-cad export)"
        )
    try:
        card = json.loads(card_path.read_text())
    except json.JSONDecodeError as e:
        raise RegistryError(f"{card_path} is not valid JSON: {e}") from e
    for key in ("class_names", "input_size", "threshold", "sha256", "heatmap", "parity"):
        if key not in card:
            raise RegistryError(f"model card {card_path} lacks '{key}'")
    if sha256_file(onnx_path) != card["sha256"]:
        raise RegistryError(f"{onnx_path} does not match the SHA-256 in its model card")
    _check_bundle(directory, card)
    return onnx_path, card


def _check_bundle(directory: Path, card: dict) -> None:
    """Files the card bundles beside model.onnx (e.g. the ROI localiser): present, intact."""
    for name, sha in (card.get("bundle") or {}).items():
        path = directory / name
        if Path(name).name != name or name in ("model.onnx", "model_card.json"):
            raise RegistryError(f"model card bundles an invalid file name {name!r}")
        if not path.is_file():
            raise RegistryError(f"{directory} lacks {name}, which its model card bundles")
        if sha256_file(path) != sha:
            raise RegistryError(f"{path} does not match the SHA-256 its model card gives")


def _signature(card: dict, heatmap_shape):
    import numpy as np
    from mlflow.models import ModelSignature
    from mlflow.types import Schema, TensorSpec

    s, k = int(card["input_size"]), len(card["class_names"])
    outputs = [TensorSpec(np.dtype(np.float32), (-1, k), "probabilities")]
    if card["heatmap"] and heatmap_shape:
        h, w = heatmap_shape[1], heatmap_shape[2]
        outputs.append(TensorSpec(np.dtype(np.float32), (-1, h, w, k), "heatmap"))
    return ModelSignature(
        inputs=Schema([TensorSpec(np.dtype(np.uint8), (-1, s, s, 3), "image")]),
        outputs=Schema(outputs),
    )


def register(directory: Path, name: str = DEFAULT_NAME) -> int:
    """Log an export with the MLflow ONNX flavor and register it as a new version.

    The model is logged to its source training run when that run is in this tracking
    store (so the version links back to it), else to a run of the experiment
    `thyroid-cad-registry`.
    """
    onnx_path, card = read_export(directory)
    try:
        import mlflow
        import numpy as np
        import onnx
    except ImportError as e:  # a serving-only install has neither onnx nor full mlflow
        raise RegistryError(f"registering needs the 'train' extra ({e.name} is missing)") from e
    # register_model uses the process-wide registry URI: pin it to the store we work on.
    mlflow.set_tracking_uri(settings.tracking_uri())
    mlflow.set_registry_uri(settings.tracking_uri())
    c = client()
    source = card.get("source_run_id")
    try:
        run = c.get_run(source) if source else None
    except MlflowException:
        run = None
    run_kwargs = None
    if run is not None:
        # start_run(run_id=...) refuses a run outside the process's active experiment
        # (set by whatever ran before in this process): make the run's own one active.
        mlflow.set_experiment(experiment_id=run.info.experiment_id)
        run_kwargs = {"run_id": run.info.run_id}
    if run_kwargs is None:
        experiment_id = settings.use_experiment("thyroid-cad-registry")
        run_kwargs = {"experiment_id": experiment_id, "run_name": f"register-{name}"}
    model = onnx.load_model(onnx_path)
    size = int(card["input_size"])
    example = np.zeros((1, size, size, 3), dtype=np.uint8)
    with mlflow.start_run(**run_kwargs):
        info = mlflow.onnx.log_model(
            model,
            name="model",
            signature=_signature(card, card.get("heatmap_shape")),
            input_example=example,
            pip_requirements=["onnxruntime>=1.20", "numpy"],
            save_as_external_data=False,
            metadata={"model_card": card},
            # logged under extra_files/ in the model; resolve() puts them back beside it
            extra_files=[str(Path(directory) / n) for n in card.get("bundle") or {}] or None,
        )
        mlflow.log_dict(card, "model_card.json")
    version = mlflow.register_model(info.model_uri, name)
    metrics = card.get("metrics", {})
    tags = {
        "sha256": card["sha256"],
        "parity_passed": str(bool(card["parity"].get("passed"))).lower(),
        "source_run_id": source or "",
        "backbone": str(card.get("backbone")),
        "classifier": str(card.get("classifier")),
        "heatmap": str(bool(card["heatmap"])).lower(),
        "class_names": ",".join(card["class_names"]),
        "input_size": str(size),
        "threshold": str(card["threshold"]),
        gate.TAG: gate.tag_value(card),
    }
    for split in ("val", "test"):
        for key in ("auc", "auc_ci_low", "auc_ci_high", "sensitivity", "specificity"):
            if key in metrics.get(split, {}):
                tags[f"{split}_{key}"] = repr(float(metrics[split][key]))
    for key, value in tags.items():
        c.set_model_version_tag(name, version.version, key, value)
    c.update_model_version(name, version.version, description=_describe(card))
    return int(version.version)


def _describe(card: dict) -> str:
    m = card.get("metrics", {}).get("val", {})
    auc = f"val AUC {m['auc']:.3f} [{m['auc_ci_low']:.3f}, {m['auc_ci_high']:.3f}]" if m else ""
    return (
        f"{card.get('backbone')} / {card.get('strategy')} / {card.get('classifier')}; "
        f"{auc}; parity {'passed' if card['parity'].get('passed') else 'FAILED'}; "
        f"{card.get('disclaimer', '')}"
    )


@dataclass
class VersionInfo:
    name: str
    version: int
    aliases: list[str]
    tags: dict[str, str]
    source_run: str
    created: str
    description: str

    def to_json(self) -> dict:
        return {
            "name": self.name,
            "version": self.version,
            "aliases": self.aliases,
            "source_run_id": self.source_run,
            "created": self.created,
            "parity_passed": self.tags.get("parity_passed") == "true",
            "val_auc": _float(self.tags.get("val_auc")),
            "test_auc": _float(self.tags.get("test_auc")),
            "robust_score": gate.robust_score(self.tags.get(gate.TAG)),
            "heatmap": self.tags.get("heatmap") == "true",
            "sha256": self.tags.get("sha256"),
            "tags": self.tags,
            "description": self.description,
        }


def _float(value: str | None) -> float | None:
    return float(value) if value not in (None, "") else None


def _aliases(name: str) -> dict[int, list[str]]:
    """version -> aliases (search results do not carry aliases)."""
    by_version: dict[int, list[str]] = {}
    for alias, version in (client().get_registered_model(name).aliases or {}).items():
        by_version.setdefault(int(version), []).append(alias)
    return by_version


def _version_info(mv, aliases: dict[int, list[str]] | None = None) -> VersionInfo:
    aliases = aliases if aliases is not None else _aliases(mv.name)
    return VersionInfo(
        name=mv.name,
        version=int(mv.version),
        aliases=sorted(aliases.get(int(mv.version), [])),
        tags=dict(mv.tags or {}),
        source_run=(mv.tags or {}).get("source_run_id") or mv.run_id or "",
        created=datetime.fromtimestamp(mv.creation_timestamp / 1000, UTC).isoformat(
            timespec="seconds"
        ),
        description=mv.description or "",
    )


def _get_version(name: str, version: int):
    try:
        return client().get_model_version(name, str(version))
    except MlflowException as e:
        raise RegistryError(f"{name} has no version {version}") from e


def list_versions(name: str = DEFAULT_NAME) -> list[VersionInfo]:
    """Every version of `name`, newest first; none when nothing was registered under it."""
    try:
        versions = client().search_model_versions(f"name = '{name}'")
        if not versions:
            return []
        aliases = _aliases(name)
    except MlflowException as e:
        raise RegistryError(f"cannot list {name}: {e}") from e
    return sorted((_version_info(mv, aliases) for mv in versions), key=lambda v: -v.version)


def show(version: int, name: str = DEFAULT_NAME) -> VersionInfo:
    return _version_info(_get_version(name, version))


def reference(text: str, name: str = DEFAULT_NAME) -> str:
    """What a user typed for a version, as `NAME@ALIAS` or `NAME/VERSION`: a number is a
    version of `name`, a bare word one of its aliases (`champion`), anything with `@` or
    `/` a full reference."""
    text = text.strip()
    if text.isdigit():
        return f"{name}/{text}"
    if "@" in text or "/" in text:
        return text
    return f"{name}@{text}"


def find(text: str, name: str = DEFAULT_NAME) -> VersionInfo:
    """The version a reference (see `reference`) names."""
    uri = reference(text, name)
    name, alias, version = parse_uri(uri)
    if alias:
        version = alias_version(name, alias)
        if version is None:
            raise AliasNotSet(name, alias)
    return show(version, name)


def alias_version(name: str, alias: str) -> int | None:
    try:
        return int(client().get_model_version_by_alias(name, alias).version)
    except MlflowException:
        return None


def history(name: str = DEFAULT_NAME) -> list[dict]:
    """Every promotion and rollback, oldest first."""
    try:
        tags = client().get_registered_model(name).tags
    except MlflowException as e:
        raise RegistryError(f"no registered model {name}") from e
    events = [json.loads(v) for k, v in tags.items() if k.startswith(HISTORY_PREFIX)]
    return sorted(events, key=lambda e: e["when"])


def _record(name: str, event: dict) -> None:
    key = HISTORY_PREFIX + event["when"].replace(":", "").replace("+", "Z")
    client().set_registered_model_tag(name, key, json.dumps(event, sort_keys=True))


def _move_alias(
    name: str,
    alias: str,
    version: int,
    previous: int | None,
    action: str,
    reason: str | None,
    **extra,
) -> dict:
    """Point the alias at version and record who did it, when and why."""
    client().set_registered_model_alias(name, alias, str(version))
    event = {
        "action": action,
        "alias": alias,
        "version": version,
        "previous": previous,
        "who": _who(),
        "when": datetime.now(UTC).isoformat(timespec="microseconds"),
        "why": reason or "",
        **extra,
    }
    _record(name, event)
    return event


def _who() -> str:
    return os.environ.get("THYROID_CAD_USER") or getpass.getuser()


def promote(
    version: int,
    alias: str = "champion",
    name: str = DEFAULT_NAME,
    force: bool = False,
    reason: str | None = None,
) -> dict:
    """Point `alias` at `version`, if the gate allows; returns the recorded event.

    The gate refuses a version whose parity check failed, one whose validation AUC is
    below the alias's current holder, and one whose card shows a shortcut (registry.gate:
    not above the shortcut floor, or at chance within a source), unless force=True with
    a reason.
    """
    if force and not (reason and reason.strip()):
        raise RegistryError("--force needs --reason: say why the gate is overridden")
    if not re.fullmatch(r"[A-Za-z][A-Za-z0-9_-]*", alias):
        raise RegistryError(f"invalid alias {alias!r}")
    candidate = show(version, name)
    previous = alias_version(name, alias)
    problems = []
    if candidate.tags.get("parity_passed") != "true":
        problems.append(f"version {version} failed its ONNX parity check")
    if previous is not None and previous != version:
        held = show(previous, name).to_json()["val_auc"]
        new = candidate.to_json()["val_auc"]
        if held is not None and (new is None or new < held):
            problems.append(
                f"version {version} has validation AUC {new} below {alias} v{previous} ({held})"
            )
    problems += [f"version {version}: {p}" for p in gate.problems(candidate.tags.get(gate.TAG))]
    if problems and not force:
        raise RegistryError("; ".join(problems) + " (use --force --reason to override)")
    event = _move_alias(
        name,
        alias,
        version,
        previous,
        "promote",
        reason,
        forced=bool(problems),
        overridden=problems,
    )
    client().set_model_version_tag(name, str(version), f"promoted_to_{alias}", event["when"])
    return event


def rollback(alias: str = "champion", name: str = DEFAULT_NAME, reason: str | None = None) -> dict:
    """Point `alias` back at the version it held before the current one."""
    stack: list[int] = []
    for event in history(name):
        if event["alias"] != alias:
            continue
        if event["action"] == "promote":
            if event.get("previous") is not None and not stack:
                stack.append(event["previous"])
            stack.append(event["version"])
        elif event["action"] == "rollback" and stack:
            stack.pop()
    current = alias_version(name, alias)
    if len(stack) < 2 or current is None:
        raise RegistryError(f"{name}@{alias} has no previous version to roll back to")
    target = stack[-2]
    return _move_alias(name, alias, target, current, "rollback", reason)


def parse_uri(uri: str) -> tuple[str, str | None, int | None]:
    """`NAME@ALIAS` or `NAME/VERSION` (a leading `models:/` is accepted)."""
    match = _URI.match(uri.removeprefix("models:/"))
    if not match:
        raise RegistryError(f"model reference must be NAME@ALIAS or NAME/VERSION, got {uri!r}")
    version = match["version"]
    return match["name"], match["alias"], int(version) if version else None


@dataclass
class Resolved:
    name: str
    version: int
    alias: str | None
    onnx_path: Path
    card: dict
    cached: bool  # served from the local cache without asking the registry

    @property
    def directory(self) -> Path:
        return self.onnx_path.parent


def cache_root() -> Path:
    return settings.home() / "models"


def _pointer(name: str, alias: str) -> Path:
    return cache_root() / name / f"@{alias}.json"


def resolve(uri: str, out_dir: Path | None = None) -> Resolved:
    """Download (or reuse from cache) the ONNX file and card a reference points at.

    The cache is keyed by version and SHA-256, and the file's hash is checked against
    the card on every resolve. An alias pointer is remembered so that `cached()` can
    answer when the registry is unreachable.
    """
    name, alias, version = parse_uri(uri)
    c = client()
    try:
        mv = (
            c.get_model_version_by_alias(name, alias)
            if alias
            else c.get_model_version(name, str(version))
        )
    except MlflowException as e:
        raise _lookup_error(uri, e, name, alias) from e
    sha = (mv.tags or {}).get("sha256", "")
    target = cache_root() / name / f"{mv.version}-{sha[:12]}"
    hit = (target / "model.onnx").is_file() and sha256_file(target / "model.onnx") == sha
    if hit:
        try:
            _check_bundle(target, json.loads((target / "model_card.json").read_text()))
        except (RegistryError, OSError, ValueError):
            hit = False
    if not hit:
        target.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
            try:
                local = Path(_download(mv, tmp))
            except MlflowException as e:
                raise RegistryUnavailable(f"cannot download {uri}: {e.message}") from e
            meta = yaml.safe_load((local / "MLmodel").read_text())
            card = (meta.get("metadata") or {}).get("model_card")
            if card is None:
                raise RegistryError(f"{uri} has no model card: was it registered by thyroid-cad?")
            staged = Path(tmp) / "staged"
            staged.mkdir()
            shutil.copy(local / "model.onnx", staged / "model.onnx")
            for extra in card.get("bundle") or {}:
                if not (local / "extra_files" / extra).is_file():
                    raise RegistryError(f"{uri} lacks {extra}, which its model card bundles")
                shutil.copy(local / "extra_files" / extra, staged / extra)
            (staged / "model_card.json").write_text(json.dumps(card, indent=1))
            got = sha256_file(staged / "model.onnx")
            if got != card["sha256"] or got != sha:
                raise RegistryError(f"{uri}: downloaded file's SHA-256 {got[:12]} does not match")
            _check_bundle(staged, card)
            if target.exists():
                shutil.rmtree(target)
            staged.rename(target)  # atomic within one filesystem: readers never see half a model
    card = json.loads((target / "model_card.json").read_text())
    result = Resolved(name, int(mv.version), alias, target / "model.onnx", card, cached=False)
    if alias:
        _pointer(name, alias).write_text(
            json.dumps(
                {
                    "version": result.version,
                    "path": str(target),
                    "resolved_at": datetime.now(UTC).isoformat(timespec="seconds"),
                }
            )
        )
    if out_dir is not None:
        copy_out(result, out_dir)
    return result


def copy_out(resolved: Resolved, out_dir: Path) -> None:
    """Copy a resolved model's files (ONNX, card, bundled files) into a folder."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for f in ("model.onnx", "model_card.json", *(resolved.card.get("bundle") or {})):
        shutil.copy(resolved.directory / f, out_dir / f)


def _download(mv, dst: str) -> str:
    import mlflow

    uri = settings.tracking_uri()
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    return mlflow.artifacts.download_artifacts(artifact_uri=mv.source, dst_path=dst)


def cached(uri: str) -> Resolved | None:
    """The last model `uri` resolved to on this host, without asking the registry."""
    name, alias, version = parse_uri(uri)
    if alias:
        pointer = _pointer(name, alias)
        if not pointer.is_file():
            return None
        target, version = (
            Path(json.loads(pointer.read_text())["path"]),
            json.loads(pointer.read_text())["version"],
        )
    else:
        candidates = sorted((cache_root() / name).glob(f"{version}-*"))
        if not candidates:
            return None
        target = candidates[-1]
    if not (target / "model.onnx").is_file():
        return None
    card = json.loads((target / "model_card.json").read_text())
    if sha256_file(target / "model.onnx") != card["sha256"]:
        return None
    try:
        _check_bundle(target, card)
    except RegistryError:
        return None
    return Resolved(name, int(version), alias, target / "model.onnx", card, cached=True)
