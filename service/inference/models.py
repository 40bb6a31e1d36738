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
from service.inference.batching import Batcher, Outputs, Overloaded, Result
from service.inference.runtime import Runtime
from thyroid_cad import imaging, nodule
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
    io_binding: bool = False
    batcher: Batcher | None = field(default=None, repr=False, compare=False)
    # The nodule localiser bundled with a model trained on ROI crops (card `roi.localiser`).
    localiser: ort.InferenceSession | None = field(default=None, repr=False, compare=False)

    @property
    def input_size(self) -> int:
        return int(self.card["input_size"])

    @property
    def roi(self) -> dict | None:
        """The card's ROI settings (margin, localiser) for ROI models; None otherwise."""
        return self.card.get("roi") or None

    def localise(self, rgb: np.ndarray, within: imaging.Box | None = None) -> nodule.Proposal:
        """The bundled localiser's nodule on a frame (inside `within` when given)."""
        info = self.roi["localiser"]
        square, geometry = imaging.prepare_input(rgb, int(info["input_size"]))
        (mask,) = self.localiser.run(["mask"], {"image": square[None]})
        return nodule.propose(
            mask[0], geometry, float(info.get("threshold", nodule.MASK_THRESHOLD)), within
        )

    @property
    def has_heatmap(self) -> bool:
        return bool(self.card.get("heatmap"))

    @property
    def output_names(self) -> list[str]:
        """Every output of the graph: `probabilities`, then any of `heatmap` and others."""
        return [o.name for o in self.session.get_outputs()]

    def run(self, batch: np.ndarray) -> Outputs:
        """The graph's outputs by name (`probabilities` N x K, `heatmap` N x h x w x K
        when the card has one, and any others) for uint8 N x S x S x 3."""
        names = self.output_names
        if self.io_binding:
            binding = self.session.io_binding()
            binding.bind_cpu_input("image", np.ascontiguousarray(batch))
            for name in names:
                binding.bind_output(name, "cpu")
            self.session.run_with_iobinding(binding)
            out = binding.copy_outputs_to_cpu()
        else:
            out = self.session.run(names, {"image": batch})
        return dict(zip(names, out, strict=True))

    def infer(self, batch: np.ndarray) -> Result:
        """Run through this model's batcher (queued with other requests' frames).

        Raises:
            ApiError: 503 `overloaded` with Retry-After when the queue is full.
        """
        if self.batcher is None:
            return Result(self.run(batch), 0.0, len(batch))
        try:
            return self.batcher.submit(batch)
        except Overloaded as e:
            raise ApiError(
                503,
                "overloaded",
                f"the inference queue is full ({e}); retry after {e.retry_after_s} s",
                headers={"Retry-After": str(e.retry_after_s)},
            ) from e

    def close(self) -> None:
        """Finish queued requests and stop the batcher (the session is freed with self)."""
        if self.batcher is not None:
            self.batcher.close()

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
            "io_binding": self.io_binding,
            "batching": None if self.batcher is None else self.batcher.describe(),
            "card": self.card,
        }


_cpu_fallback_logged = False


def _report_providers(requested: tuple[str, ...], used: list[str]) -> None:
    """One plain line, once per process, when a GPU provider was asked for but is absent."""
    global _cpu_fallback_logged
    missing = [p for p in requested if p not in used and p != "CPUExecutionProvider"]
    if missing and not _cpu_fallback_logged:
        _cpu_fallback_logged = True
        log.warning("%s not usable on this host; models run on %s", ", ".join(missing), used[0])


def load(resolved: store.Resolved, runtime: Runtime, on_event=None) -> LoadedModel:
    """Open and check a resolved model: hash matches the card, a warm-up inference runs.

    `on_event("batch", ...)` hears of every batch its batcher runs (metrics).

    Raises:
        ValueError: the file fails a check; the caller keeps what it had.
    """
    card = resolved.card
    if sha256_file(resolved.onnx_path) != card.get("sha256"):
        raise ValueError(f"{resolved.name} v{resolved.version}: file does not match its card")
    # The CUDA provider's failure to load on a CPU host goes to the default logger as an
    # [E] line with colour codes; _report_providers() says it once, plainly, instead.
    ort.set_default_logger_severity(4)
    try:
        session = ort.InferenceSession(
            str(resolved.onnx_path), runtime.session_options(), providers=list(runtime.providers)
        )
    except Exception as e:  # onnxruntime raises its own Fail/InvalidGraph classes
        raise ValueError(f"{resolved.name} v{resolved.version} does not load: {e}") from e
    used = session.get_providers()
    _report_providers(runtime.providers, used)
    on_cuda = used[0] == "CUDAExecutionProvider"
    localiser = _load_localiser(resolved, runtime)
    model = LoadedModel(
        name=resolved.name,
        version=resolved.version,
        card=card,
        session=session,
        providers=tuple(used),
        path=resolved.onnx_path,
        loaded_at=datetime.now(UTC).isoformat(timespec="seconds"),
        from_cache=resolved.cached,
        io_binding=runtime.io_binding == "on" or (runtime.io_binding == "auto" and on_cuda),
        localiser=localiser,
    )
    size = model.input_size
    try:
        probs = model.run(np.zeros((1, size, size, 3), dtype=np.uint8))["probabilities"]
    except Exception as e:
        raise ValueError(f"{resolved.name} v{resolved.version} fails its warm-up: {e}") from e
    if probs.shape != (1, len(card["class_names"])) or not np.all(np.isfinite(probs)):
        raise ValueError(f"{resolved.name} v{resolved.version}: warm-up output is malformed")
    policy = runtime.policy_for(used[0])
    version = str(model.version)

    def on_batch(frames: int, seconds: float) -> None:
        if on_event is not None:
            on_event("batch", model_version=version, frames=frames, seconds=seconds)

    batcher = Batcher(model.run, policy, f"{model.name}-v{version}", on_batch)
    model = dataclasses.replace(model, batcher=batcher)
    log.info(
        "loaded %s v%s on %s (batch <= %d, queue <= %d)",
        model.name,
        model.version,
        used[0],
        policy.max_batch_size,
        policy.max_queue_size,
    )
    return model


def _load_localiser(resolved: store.Resolved, runtime: Runtime) -> ort.InferenceSession | None:
    """The localiser bundled beside an ROI model, checked and warmed up (None if none).

    Raises:
        ValueError: the card names a localiser that is missing, altered or broken.
    """
    info = (resolved.card.get("roi") or {}).get("localiser")
    if not info:
        return None
    where = f"{resolved.name} v{resolved.version}"
    path = resolved.directory / info["file"]
    if not path.is_file() or sha256_file(path) != info["sha256"]:
        raise ValueError(f"{where}: its bundled localiser {info['file']} is missing or altered")
    try:
        session = ort.InferenceSession(
            str(path), runtime.session_options(), providers=list(runtime.providers)
        )
        size = int(info["input_size"])
        (mask,) = session.run(["mask"], {"image": np.zeros((1, size, size, 3), np.uint8)})
    except Exception as e:  # onnxruntime's own error classes
        raise ValueError(f"{where}: its bundled localiser does not run: {e}") from e
    if mask.shape != (1, size, size):
        raise ValueError(f"{where}: its bundled localiser's output is malformed")
    return session


class ModelManager:
    """The served alias (and a few others), kept current by polling the registry."""

    def __init__(
        self,
        reference: str,
        extra_aliases: list[str],
        runtime: Runtime,
        max_loaded: int,
        on_event=None,
    ):
        self.name, alias, version = store.parse_uri(reference)
        if alias is None:
            raise ValueError(f"the served model must be NAME@ALIAS, got {reference!r}")
        self.aliases = [alias] + [a for a in extra_aliases if a != alias]
        self.default_alias = alias
        self.runtime = runtime
        self.max_loaded = max_loaded
        self.on_event = on_event or (lambda kind, **labels: None)
        self._by_alias: dict[str, LoadedModel] = {}
        self._pinned: OrderedDict[int, LoadedModel] = OrderedDict()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.registry_reachable = False
        self.errors: dict[str, str] = {}  # alias -> why it is not (or not newly) loaded
        # Extra aliases the registry says no version holds: normal (a fresh registry has
        # no challenger), so not an error. Replaced, never changed in place: routes read it
        # while the poller thread updates it.
        self.not_set: frozenset[str] = frozenset()

    # -- resolution ---------------------------------------------------------------
    def _resolve(self, alias: str) -> store.Resolved | None:
        try:
            resolved = store.resolve(f"{self.name}@{alias}")
            self.registry_reachable = True
            self.not_set = self.not_set - {alias}
            return resolved
        except store.AliasNotSet as e:
            self.registry_reachable = True
            if alias == self.default_alias:
                self.errors[alias] = str(e)
            else:
                self.errors.pop(alias, None)
                self.not_set = self.not_set | {alias}
            return None
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
                model = load(resolved, self.runtime, self.on_event)
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
            old = self._by_alias.get(alias)
            self._by_alias[alias] = model
            retired = old is not None and not self._holds_batcher(old.batcher)
        if retired:  # requests already queued on it finish; new ones reach `model`
            old.close()

    def _holds_batcher(self, batcher) -> bool:
        held = [*self._by_alias.values(), *self._pinned.values()]
        return any(m.batcher is batcher for m in held)

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
        with self._lock:
            held = {id(m.batcher): m for m in [*self._by_alias.values(), *self._pinned.values()]}
        for model in held.values():
            model.close()

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
            if alias in self.not_set:
                why = "no version holds that alias"
            elif alias in self.aliases:
                why = self.errors.get(alias, "not loaded yet")
            else:  # say how to have it served
                why = f"only {', '.join(self.aliases)} are served (THYROID_CAD_EXTRA_ALIASES)"
            raise ApiError(404, "alias_not_found", f"{self.name}@{alias} is not loaded: {why}")
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
            model = load(resolved, self.runtime, self.on_event)
        except ValueError as e:
            raise ApiError(503, "model_load_failed", str(e)) from e
        evicted = []
        with self._lock:
            if version in self._pinned:  # another request loaded it meanwhile
                evicted.append(model)
                model = self._pinned[version]
            self._pinned[version] = model
            while len(self._pinned) + len(self._by_alias) > self.max_loaded and self._pinned:
                evicted.append(self._pinned.popitem(last=False)[1])
        for old in evicted:
            if old is not model:
                old.close()
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
