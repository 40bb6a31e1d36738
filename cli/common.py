"""Shared pieces of the `thyroid-cad` command line: the root app and error handling.

Heavy modules (TensorFlow, MLflow) are imported inside the commands that need them,
so `--help` is instant and serving never loads TensorFlow. Results that scripts read
(run ids, JSON) go to stdout; logs and Keras progress go to stderr.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
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
