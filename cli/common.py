"""Shared pieces of the `thyroid-cad` command line: the root app and error handling.

Heavy modules (TensorFlow, MLflow) are imported inside the commands that need them,
so `--help` is instant and serving never loads TensorFlow. Results that scripts read
(run ids, JSON) go to stdout; logs and Keras progress go to stderr.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import sys
import tempfile
from pathlib import Path
from typing import Annotated

import typer

app = typer.Typer(
    help="Thyroid nodule CAD: demo data, dataset audit, training, sweeps, ONNX export, "
    "model registry, inference service. Research software: not for diagnostic use.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
ModelName = Annotated[str, typer.Option("--name", help="Registered model name.")]

log = logging.getLogger("thyroid_cad")


@app.callback()
def _main(verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Debug logs.")] = False):
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    for noisy in ("mlflow", "alembic", "urllib3", "h5py", "matplotlib", "PIL"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def fail(message: str, code: int = 2) -> typer.Exit:
    typer.echo(f"error: {message}", err=True)
    return typer.Exit(code)


@contextlib.contextmanager
def user_errors():
    """Turn bad input into one clear line and exit status 2, not a traceback."""
    try:
        yield
    except KeyError as e:
        raise fail(f"missing {e}") from e
    except (ValueError, FileNotFoundError) as e:
        raise fail(str(e)) from e
    except Exception as e:
        if type(e).__name__ in ("MlflowException", "RestException"):
            raise fail(f"MLflow: {e}") from e
        raise


# What TensorFlow's and onnxruntime's C++ sides write to stderr on a host without an
# NVIDIA GPU, straight to file descriptor 2 (so no logging setting reaches all of it):
# TensorFlow looks for CUDA at import and calls cuInit at the first device query;
# onnxruntime-gpu, asked for its CUDA provider (MLflow validates a logged ONNX model
# that way), prints a red [E] and a yellow [W] line. None of it is news on a CPU host.
CPU_HOST_NOISE = (
    "All log messages before absl::InitializeLog() is called",
    "cudart_stub.cc",
    "cuda_platform.cc",
    "cuInit",
    "oneDNN custom operations are on",
    "provider_bridge_ort.cc",
    "CreateExecutionProviderFactoryInstance",
)
_COLOUR_ONLY = re.compile(r"^(\x1b\[[0-9;]*m)+\s*$")  # what is left of a colour reset


def has_nvidia_gpu() -> bool:
    """An NVIDIA driver is present (its device nodes or its /proc entry)."""
    return any(Path(p).exists() for p in ("/dev/nvidiactl", "/proc/driver/nvidia/version"))


@contextlib.contextmanager
def stderr_without(noise: tuple[str, ...]):
    """Capture file descriptor 2 (C++ libraries write there directly); afterwards, write
    back every captured line that contains none of `noise`."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as captured:
        os.dup2(captured.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            captured.seek(0)
            for line in captured.read().decode(errors="replace").splitlines(keepends=True):
                if not any(n in line for n in noise) and not _COLOUR_ONLY.match(line):
                    sys.stderr.write(line)
            sys.stderr.flush()


@contextlib.contextmanager
def quiet_cuda_probes():
    """On a host without an NVIDIA GPU, drop TensorFlow's and onnxruntime's CUDA probing
    messages from stderr (anything else they print still gets through). On a GPU host
    nothing is filtered: there those messages can matter."""
    if has_nvidia_gpu():
        yield
        return
    with stderr_without(CPU_HOST_NOISE):
        yield


def start_tensorflow() -> None:
    """Import TensorFlow for a command that trains or exports, quietly on a CPU host:
    its CUDA probing is replaced by one plain log line."""
    if "tensorflow" in sys.modules:
        return
    with quiet_cuda_probes():
        import tensorflow as tf

        gpus = tf.config.list_physical_devices("GPU")  # cuInit happens here, once
    if not gpus:
        log.info("no NVIDIA GPU found: TensorFlow runs on the CPU")
