"""How models run: onnxruntime providers, session options and the batch policy.

Apart from the rest of inference/ so the service's settings (service/config.py) can
describe it without importing onnxruntime: `thyroid-cad keys list` and other commands
that only read the settings stay quick.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:
    import onnxruntime as ort

    from service.inference.batching import BatchPolicy

# The GPU when there is one, else the CPU (onnxruntime falls back by itself).
DEFAULT_PROVIDERS = ("CUDAExecutionProvider", "CPUExecutionProvider")
GraphOptimization = Literal["disable", "basic", "extended", "all"]
IoBinding = Literal["auto", "on", "off"]  # auto: on with the CUDA provider
# Names of onnxruntime's GraphOptimizationLevel members (looked up when a session is made).
GRAPH_OPTIMIZATION: dict[GraphOptimization, str] = {
    "disable": "ORT_DISABLE_ALL",
    "basic": "ORT_ENABLE_BASIC",
    "extended": "ORT_ENABLE_EXTENDED",
    "all": "ORT_ENABLE_ALL",
}
# Default frames per call, by provider. Measured in docs/benchmarks.md: on CPU one
# onnxruntime call already uses every core and batching gains nothing, so requests only
# queue (and run one at a time); on a GPU, batches pay off.
DEFAULT_BATCH = {"CPUExecutionProvider": 1}
GPU_DEFAULT_BATCH = 16


@dataclass(frozen=True)
class Runtime:
    """How models are run: onnxruntime providers and session options, and batching."""

    providers: tuple[str, ...] = DEFAULT_PROVIDERS
    intra_op_threads: int = 0  # 0: onnxruntime's default (one per physical core)
    inter_op_threads: int = 0
    # Spinning intra-op threads busy-wait between calls: in a service they burn the cores
    # that decoding, the event loop and the HTTP stack share with them (docs/benchmarks.md).
    allow_spinning: bool = False
    graph_optimization: GraphOptimization = "all"
    io_binding: IoBinding = "auto"
    max_batch_size: int | None = None  # None: DEFAULT_BATCH by the provider in use
    max_queue_delay_s: float = 0.002
    max_queue_size: int = 64

    def session_options(self) -> ort.SessionOptions:
        import onnxruntime as ort

        options = ort.SessionOptions()
        # Severity 4: the CUDA provider's failure on a CPU host is an [E] line with colour
        # codes at every session; load() reports the provider in use itself, in one line.
        options.log_severity_level = 4
        options.intra_op_num_threads = self.intra_op_threads
        options.inter_op_num_threads = self.inter_op_threads
        spin = "1" if self.allow_spinning else "0"
        options.add_session_config_entry("session.intra_op.allow_spinning", spin)
        options.add_session_config_entry("session.inter_op.allow_spinning", spin)
        options.graph_optimization_level = getattr(
            ort.GraphOptimizationLevel, GRAPH_OPTIMIZATION[self.graph_optimization]
        )
        return options

    def policy_for(self, provider: str) -> BatchPolicy:
        from service.inference.batching import BatchPolicy  # numpy: not for settings

        size = self.max_batch_size or DEFAULT_BATCH.get(provider, GPU_DEFAULT_BATCH)
        # With batches of one there is nothing to wait for.
        delay = self.max_queue_delay_s if size > 1 else 0.0
        return BatchPolicy(size, delay, self.max_queue_size)
