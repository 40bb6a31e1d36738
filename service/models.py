"""ONNX models in memory: resolved through the registry, checked, swapped atomically.

A LoadedModel is immutable once built; a request takes a reference to one and runs on
it to the end, so a swap (which only replaces the reference the manager hands out)
never disturbs requests in flight, and the old session is freed when the last of them
finishes.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import onnxruntime as ort

from registry import store
from service.errors import ApiError
from thyroid_cad.files import sha256_file

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LoadedModel:
    name: str
    version: int
    card: dict
    session: ort.InferenceSession = field(repr=False)
    providers: tuple[str, ...]
    path: Path
    loaded_at: str
    from_cache: bool

    @property
    def input_size(self) -> int:
        return int(self.card["input_size"])

    @property
    def has_heatmap(self) -> bool:
        return bool(self.card.get("heatmap"))

    def run(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """(probabilities N x K, heatmap N x h x w x K or None) for uint8 N x S x S x 3."""
        names = ["probabilities"] + (["heatmap"] if self.has_heatmap else [])
        out = self.session.run(names, {"image": batch})
        return out[0], (out[1] if self.has_heatmap else None)

    def describe(self) -> dict:
        return {
            "name": self.name,
            "version": self.version,
            "sha256": self.card["sha256"],
            "source_run_id": self.card.get("source_run_id"),
            "provider": self.providers[0],
            "providers": list(self.providers),
            "loaded_at": self.loaded_at,
            "from_cache": self.from_cache,
            "card": self.card,
        }


def load(resolved: store.Resolved, providers: list[str]) -> LoadedModel:
    """Open and check a resolved model: hash matches the card, a warm-up inference runs.

    Raises:
        ValueError: the file fails a check; the caller keeps what it had.
    """
    card = resolved.card
    if sha256_file(resolved.onnx_path) != card.get("sha256"):
        raise ValueError(f"{resolved.name} v{resolved.version}: file does not match its card")
    options = ort.SessionOptions()
    options.log_severity_level = 3  # the CUDA provider's fallback warning on CPU hosts
    try:
        session = ort.InferenceSession(str(resolved.onnx_path), options, providers=providers)
    except Exception as e:  # onnxruntime raises its own Fail/InvalidGraph classes
        raise ValueError(f"{resolved.name} v{resolved.version} does not load: {e}") from e
    model = LoadedModel(
        name=resolved.name,
        version=resolved.version,
        card=card,
        session=session,
        providers=tuple(session.get_providers()),
        path=resolved.onnx_path,
        loaded_at=datetime.now(UTC).isoformat(timespec="seconds"),
        from_cache=resolved.cached,
    )
    size = model.input_size
    try:
        probs, _ = model.run(np.zeros((1, size, size, 3), dtype=np.uint8))
    except Exception as e:
        raise ValueError(f"{resolved.name} v{resolved.version} fails its warm-up: {e}") from e
    if probs.shape != (1, len(card["class_names"])) or not np.all(np.isfinite(probs)):
        raise ValueError(f"{resolved.name} v{resolved.version}: warm-up output is malformed")
    log.info("loaded %s v%s on %s", model.name, model.version, model.providers[0])
    return model


class ModelManager:
    """The served alias (and a few others), kept current by polling the registry."""

    def __init__(
        self,
        reference: str,
        extra_aliases: list[str],
        providers: list[str],
        max_loaded: int,
        on_event=None,
    ):
        self.name, alias, version = store.parse_uri(reference)
        if alias is None:
            raise ValueError(f"the served model must be NAME@ALIAS, got {reference!r}")
        self.aliases = [alias] + [a for a in extra_aliases if a != alias]
        self.default_alias = alias
        self.providers = providers
        self.max_loaded = max_loaded
        self.on_event = on_event or (lambda kind, **labels: None)
        self._by_alias: dict[str, LoadedModel] = {}
        self._pinned: OrderedDict[int, LoadedModel] = OrderedDict()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.registry_reachable = False
        self.errors: dict[str, str] = {}  # alias -> why it is not (or not newly) loaded

    # -- resolution ---------------------------------------------------------------
    def _resolve(self, alias: str) -> store.Resolved | None:
        try:
            resolved = store.resolve(f"{self.name}@{alias}")
            self.registry_reachable = True
            return resolved
        except store.RegistryError as e:
            self.registry_reachable = not isinstance(e, store.RegistryUnavailable)
            self.errors[alias] = str(e)
            if not self.registry_reachable:
                cached = store.cached(f"{self.name}@{alias}")
                if cached is not None:
                    log.warning(
                        "registry unreachable; serving cached %s@%s v%s",
                        self.name,
                        alias,
                        cached.version,
                    )
                return cached
            return None

    def refresh(self) -> list[str]:
        """Re-resolve every alias; load and swap in new versions. Returns what changed."""
        changes = []
        for alias in self.aliases:
            resolved = self._resolve(alias)
            current = self._by_alias.get(alias)
            if resolved is None or (current and current.version == resolved.version):
                if current is not None and resolved is not None and not resolved.cached:
                    if current.from_cache:  # same version, now confirmed by the registry
                        self._swap(alias, dataclasses.replace(current, from_cache=False))
                continue
            try:
                model = load(resolved, self.providers)
            except ValueError as e:
                log.error("refusing %s@%s v%s: %s", self.name, alias, resolved.version, e)
                self.errors[alias] = f"refused v{resolved.version}: {e}"
                self.on_event("load", result="refused")
                continue
            self.on_event("load", result="ok")
            self.errors.pop(alias, None)
            if current is not None:
                self.on_event("swap")
            self._swap(alias, model)
            changes.append(f"{alias}: v{current.version if current else None} -> v{model.version}")
        return changes

    def _swap(self, alias: str, model: LoadedModel) -> None:
        with self._lock:
            self._by_alias[alias] = model

    # -- polling ------------------------------------------------------------------
    def start(self, interval_s: float) -> None:
        self.refresh()
        self._stop.clear()
        self._thread = threading.Thread(
            target=self._poll, args=(interval_s,), daemon=True, name="model-poller"
        )
        self._thread.start()

    def _poll(self, interval_s: float) -> None:
        while not self._stop.wait(interval_s):
            try:
                for change in self.refresh():
                    log.info("model swap %s", change)
            except Exception:  # noqa: BLE001 - the poller must survive anything
                log.exception("model refresh failed")

    def stop(self) -> None:
        self._stop.set()
        if self._thread:
            self._thread.join(timeout=5)

    # -- lookup -------------------------------------------------------------------
    @property
    def last_error(self) -> str | None:
        return self.errors.get(self.default_alias)

    @property
    def ready(self) -> bool:
        return self.default_alias in self._by_alias

    def get(
        self, alias: str | None = None, version: int | None = None, name: str | None = None
    ) -> tuple[LoadedModel, str | None]:
        """(model, alias it was reached by) or ApiError 404/503."""
        if name is not None and name != self.name:
            raise ApiError(
                404, "model_not_found", f"this service serves {self.name!r}, not {name!r}"
            )
        if version is not None:
            return self._get_version(version), None
        alias = alias or self.default_alias
        with self._lock:
            model = self._by_alias.get(alias)
        if model is None:
            if alias == self.default_alias:
                raise ApiError(
                    503,
                    "model_not_ready",
                    f"no model loaded for {self.name}@{alias}: {self.last_error}",
                )
            raise ApiError(404, "alias_not_found", f"{self.name}@{alias} is not loaded")
        return model, alias

    def _get_version(self, version: int) -> LoadedModel:
        with self._lock:
            for model in self._by_alias.values():
                if model.version == version:
                    return model
            if version in self._pinned:
                self._pinned.move_to_end(version)
                return self._pinned[version]
        try:
            resolved = store.resolve(f"{self.name}/{version}")
        except store.RegistryError as e:
            resolved = store.cached(f"{self.name}/{version}")
            if resolved is None:
                raise ApiError(404, "version_not_found", str(e)) from e
        try:
            model = load(resolved, self.providers)
        except ValueError as e:
            raise ApiError(503, "model_load_failed", str(e)) from e
        with self._lock:
            self._pinned[version] = model
            while len(self._pinned) + len(self._by_alias) > self.max_loaded and self._pinned:
                self._pinned.popitem(last=False)
        return model

    def loaded(self) -> list[dict]:
        with self._lock:
            entries = [
                (m, [a for a, x in self._by_alias.items() if x is m])
                for m in {id(m): m for m in self._by_alias.values()}.values()
            ]
            entries += [(m, []) for m in self._pinned.values()]
        return [{**m.describe(), "aliases": aliases, "status": "ready"} for m, aliases in entries]

    def wait_ready(self, timeout_s: float) -> bool:
        end = time.monotonic() + timeout_s
        while time.monotonic() < end and not self.ready:
            time.sleep(0.05)
        return self.ready
