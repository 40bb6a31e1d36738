"""Service settings: environment variables prefixed THYROID_CAD_, plus DATABASE_URL.

Built once per process by get_settings() (cached), never at import time.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import (
    AliasChoices,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_settings import BaseSettings, SettingsConfigDict

from service.inference.runtime import (
    DEFAULT_PROVIDERS,
    GRAPH_OPTIMIZATION,
    GraphOptimization,
    IoBinding,
    Runtime,
)
from thyroid_cad import settings as paths

MAX_HEATMAP_PIXELS = 1920 * 1080  # full HD: the most a screen shows of one heatmap


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="THYROID_CAD_", extra="ignore")

    model: str = Field(
        "thyroid-nodule-classifier@champion",
        description="Registry reference served by /v1/predict (NAME@ALIAS).",
    )
    extra_aliases: list[str] = Field(
        ["challenger"], description="Other aliases kept loaded when they exist."
    )
    poll_interval_s: float = Field(30.0, gt=0, description="How often the aliases are re-resolved.")
    max_loaded_models: int = Field(4, ge=1, description="Bound on sessions held in memory.")
    providers: list[str] = Field(
        list(DEFAULT_PROVIDERS),
        min_length=1,
        description="onnxruntime providers, in order of preference.",
    )
    database_url: str = Field(
        "",
        validation_alias=AliasChoices("DATABASE_URL", "THYROID_CAD_DATABASE_URL"),
        description="Request audit database (SQLAlchemy URL); default SQLite in the home folder.",
    )
    spool_dir: Path | None = Field(
        None, description="Audit records wait here while the DB is down."
    )
    require_api_key: bool = Field(True, description="Predict and admin routes need a key.")
    key_cache_s: float = Field(
        300.0,
        ge=0,
        description="How long a verified API key is trusted without asking the database: "
        "a revoked key keeps working on a replica for at most this long (0: ask every time).",
    )
    public_health: bool = Field(True, description="Health and readiness routes need no key.")
    public_metrics: bool = Field(True, description="/metrics needs no key.")
    max_upload_bytes: int = Field(20 * 1024 * 1024, ge=1, description="Largest accepted upload.")
    # Memory (docs/api.md, "Limits"): ultrasound frames are 0.3-2 Mpx (640x480 to 1920x1080
    # screen captures); 16 Mpx is twice a 4K capture, and a decoded image of that size
    # costs ~50 MB (RGB) plus its decoding intermediates.
    max_image_pixels: int = Field(
        4096 * 4096,
        ge=1,
        description="Largest accepted width x height (one frame), read from the header "
        "before decoding: 16 Mpx, twice a 4K screen capture and 8-50x an ultrasound frame.",
    )
    decode_pixel_budget: int = Field(
        4096 * 4096,
        ge=1,
        description="Pixels being decoded, prepared and answered at once, all requests "
        "together: one maximum-size image or ~16 ordinary 1 Mpx frames (each costs up to "
        "~25 bytes/pixel in flight); beyond, a request waits admission_timeout_s, then 503 "
        "busy with Retry-After. Bounds peak memory.",
    )
    admission_timeout_s: float = Field(
        5.0, ge=0, description="How long a request waits for room in decode_pixel_budget."
    )
    max_heatmap_pixels: int = Field(
        MAX_HEATMAP_PIXELS,
        ge=1,
        description="Largest heatmap rendered (png, overlay): bigger images get theirs "
        "scaled down to it (same aspect ratio); full HD and smaller frames keep their size.",
    )
    # Batching and onnxruntime (service/inference/batching.py, docs/benchmarks.md for the defaults).
    max_batch_size: int | None = Field(
        None, ge=1, description="Frames per onnxruntime call; unset: 1 on CPU, 16 on GPU."
    )
    max_queue_delay_ms: float = Field(
        2.0, ge=0, description="How long the first request waits for others to join its batch."
    )
    max_queue_size: int = Field(
        64, ge=1, description="Frames waiting at most; beyond, 503 with Retry-After."
    )
    intra_op_threads: int = Field(0, ge=0, description="onnxruntime intra-op threads (0: auto).")
    inter_op_threads: int = Field(0, ge=0, description="onnxruntime inter-op threads (0: auto).")
    allow_spinning: bool = Field(
        False,
        description="Let onnxruntime's idle intra-op threads spin (busy-wait) for work: a "
        "little faster on an idle host, but they take the cores decoding and the event loop "
        "need.",
    )
    graph_optimization: GraphOptimization = Field(
        "all", description=f"onnxruntime graph optimisation: {', '.join(GRAPH_OPTIMIZATION)}."
    )
    io_binding: IoBinding = Field("auto", description="auto (on with CUDA), on or off.")
    ood_policy: Literal["flag", "refuse"] = Field(
        "flag",
        description="Images unlike the training data (docs/safety.md): flag (answer, with "
        "ood.in_distribution false) or refuse (422 out_of_distribution, no probabilities).",
    )

    @model_validator(mode="after")
    def _budget_holds_an_image(self) -> Settings:
        if self.decode_pixel_budget < self.max_image_pixels:
            raise ValueError(
                f"THYROID_CAD_DECODE_PIXEL_BUDGET={self.decode_pixel_budget} is under "
                f"THYROID_CAD_MAX_IMAGE_PIXELS={self.max_image_pixels}: the largest accepted "
                "image could never be decoded"
            )
        return self

    @field_validator("providers")
    @classmethod
    def _known_providers(cls, providers: list[str]) -> list[str]:
        if tuple(providers) == DEFAULT_PROVIDERS:
            return providers  # known to every build: no onnxruntime import just to read settings
        import onnxruntime as ort

        known = ort.get_all_providers()
        unknown = [p for p in providers if p not in known]
        if unknown:
            raise ValueError(f"unknown onnxruntime provider(s) {unknown}; known: {known}")
        return providers

    # The PACS gateway, `thyroid-cad pacs` (docs/integration.md).
    pacs_dicomweb_url: str = Field(
        "", description="DICOMweb root of the PACS, e.g. http://orthanc:8042/dicom-web."
    )
    pacs_orthanc_url: str = Field(
        "", description="Orthanc REST root: watch its change feed; empty: poll QIDO-RS."
    )
    pacs_username: str = Field("", description="HTTP basic auth user for the PACS (optional).")
    pacs_password: SecretStr = Field(SecretStr(""), description="Its password.")
    pacs_poll_interval_s: float = Field(5.0, gt=0, description="Pause between polls when idle.")
    pacs_backoff_max_s: float = Field(
        60.0, gt=0, description="Longest wait between retries while the PACS is down."
    )
    pacs_timeout_s: float = Field(30.0, gt=0, description="HTTP timeout of one PACS request.")
    pacs_start: Literal["first", "latest"] = Field(
        "first",
        description="Where a new model version starts reading the change feed: first "
        "(every instance is scored again) or latest (new instances only).",
    )
    pacs_modality: str = Field("US", description="QIDO-RS: the modality searched for.")
    pacs_lookback_days: int = Field(
        7, ge=0, description="QIDO-RS: studies of the last N days (0: all)."
    )
    pacs_frame: int | None = Field(
        None, ge=1, description="Multi-frame instances: the frame scored (default the first)."
    )

    def local_database(self) -> Path | None:
        """The SQLite file of the database, unless DATABASE_URL names another."""
        return None if self.database_url else paths.home() / "requests.db"

    def audit_url(self) -> str:
        if self.database_url:
            return self.database_url  # a folder missing here is an outage, not ours to make
        paths.home().mkdir(parents=True, exist_ok=True)
        return f"sqlite:///{self.local_database()}"

    def audit_spool(self) -> Path:
        return self.spool_dir or paths.home() / "audit-spool"

    def runtime(self) -> Runtime:
        """How models run: providers, session options, and the batch policy."""
        return Runtime(
            providers=tuple(self.providers),
            intra_op_threads=self.intra_op_threads,
            inter_op_threads=self.inter_op_threads,
            allow_spinning=self.allow_spinning,
            graph_optimization=self.graph_optimization,
            io_binding=self.io_binding,
            max_batch_size=self.max_batch_size,
            max_queue_delay_s=self.max_queue_delay_ms / 1e3,
            max_queue_size=self.max_queue_size,
        )


class SettingsError(ValueError):
    """The environment holds a setting the service cannot run with."""


def explain(error: ValidationError) -> str:
    """One line per bad setting, named as the environment variable that holds it."""
    lines = []
    for e in error.errors():
        field = ".".join(str(p) for p in e["loc"])
        where = field.split(".")[0] if field else ""
        message = e["msg"].removeprefix("Value error, ")
        if not where:  # a check across settings names them itself
            lines.append(message)
            continue
        name = "DATABASE_URL" if where == "database_url" else f"THYROID_CAD_{where.upper()}"
        lines.append(f"{name}={e['input']!r}: {message}")
    return "invalid service settings:\n  " + "\n  ".join(lines)


@lru_cache
def get_settings() -> Settings:
    """The process's settings from the environment.

    Raises:
        SettingsError: a variable holds a bad value, said plainly (no pydantic dump).
    """
    try:
        return Settings()
    except ValidationError as e:
        raise SettingsError(explain(e)) from None
