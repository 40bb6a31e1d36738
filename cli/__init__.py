"""The `thyroid-cad` command line: one entry point for every job.

Each module of this package registers the commands of one area on the root app.
This package sits on top of the import graph: it imports training/, registry/ and
service/, and none of them imports it.
"""

from cli import (  # noqa: F401 - they register commands
    data,
    localiser,
    outcomes,
    pacs,
    registry,
    score,
    service,
    training,
)
from cli.common import app

__all__ = ["app"]
