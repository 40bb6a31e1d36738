"""Service settings: environment variables prefixed THYROID_CAD_, plus DATABASE_URL.

Built once per process by get_settings() (cached), never at import time.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from pydantic import AliasChoices, Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from service.models import GRAPH_OPTIMIZATION, Runtime
from thyroid_cad import settings as paths


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="THYROID_CAD_", extra="ignore")

    model: str = Field(
        "thyroid-nodule-classifier@champion",
        description="Registry reference served by /v1/predict (NAME@ALIAS).",
    )
    extra_aliases: list[str] = Field(
        ["challenger"], description="Other aliases kept loaded when they exist."
    )
    poll_interval_s: float = Field(30.0, description="How often the aliases are re-resolved.")
    max_loaded_models: int = Field(4, description="Bound on sessions held in memory.")
    providers: list[str] = Field(
        ["CUDAExecutionProvider", "CPUExecutionProvider"],
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
    public_health: bool = Field(True, description="Health and readiness routes need no key.")
    public_metrics: bool = Field(True, description="/metrics needs no key.")
    max_upload_bytes: int = Field(20 * 1024 * 1024, description="Largest accepted upload.")
    max_image_pixels: int = Field(40_000_000, description="Largest accepted width x height.")
    # Batching and onnxruntime (service/batching.py, docs/benchmarks.md for the defaults).
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
    graph_optimization: str = Field(
        "all", description=f"onnxruntime graph optimisation: {', '.join(GRAPH_OPTIMIZATION)}."
    )
    io_binding: str = Field("auto", description="auto (on with CUDA), on or off.")

    def audit_url(self) -> str:
        if self.database_url:
            return self.database_url  # a folder missing here is an outage, not ours to make
        paths.home().mkdir(parents=True, exist_ok=True)
        return f"sqlite:///{paths.home() / 'requests.db'}"

    def audit_spool(self) -> Path:
        return self.spool_dir or paths.home() / "audit-spool"

    def runtime(self) -> Runtime:
        """How models run: providers, session options, and the batch policy."""
        if self.graph_optimization not in GRAPH_OPTIMIZATION:
            raise ValueError(f"graph_optimization must be one of {list(GRAPH_OPTIMIZATION)}")
        if self.io_binding not in ("auto", "on", "off"):
            raise ValueError("io_binding must be auto, on or off")
        return Runtime(
            providers=tuple(self.providers),
            intra_op_threads=self.intra_op_threads,
            inter_op_threads=self.inter_op_threads,
            graph_optimization=self.graph_optimization,
            io_binding=self.io_binding,
            max_batch_size=self.max_batch_size,
            max_queue_delay_s=self.max_queue_delay_ms / 1e3,
            max_queue_size=self.max_queue_size,
        )


@lru_cache
def get_settings() -> Settings:
    return Settings()
