"""What to score: a folder, a list file, or a CSV / Parquet table of image paths.

Every form becomes one ordered list of absolute path strings without duplicates; relative
paths in a list or table are read against the folder that holds it (as manifests are).
"""

from __future__ import annotations

import csv
import fnmatch
import os
from pathlib import Path

from thyroid_cad.imaging import IMAGE_EXTENSIONS

DICOM_EXTENSIONS = frozenset({".dcm", ".dicom"})
SCORABLE_EXTENSIONS = IMAGE_EXTENSIONS | DICOM_EXTENSIONS
# Column names tried, in order, when a table does not name its path column.
PATH_COLUMNS = ("path", "image", "file", "filename")
LIST_SUFFIXES = (".txt", ".lst", ".list")


def discover(source: str | Path, glob: str | None = None, column: str | None = None) -> list[str]:
    """The image paths `source` names.

    Args:
        source: a folder (searched recursively), a `.csv` or `.parquet` table, or a text
            file with one path per line (`#` comments and blank lines skipped).
        glob: folder only: file-name pattern (e.g. `*` for extension-less DICOM files);
            default: the image and DICOM extensions, in any case.
        column: table only: the column holding paths; default the first of PATH_COLUMNS.

    Raises:
        ValueError: the source does not exist, is not a known form, or names no image.
    """
    source = Path(source)
    if source.is_dir():
        paths = _walk(source, glob)
    elif not source.is_file():
        raise ValueError(f"{source} does not exist")
    elif source.suffix.lower() == ".csv":
        paths = _relative_to(source, _csv_column(source, column))
    elif source.suffix.lower() in (".parquet", ".pq"):
        paths = _relative_to(source, _parquet_column(source, column))
    elif source.suffix.lower() in LIST_SUFFIXES:
        lines = source.read_text(encoding="utf-8").splitlines()
        paths = _relative_to(source, [x.strip() for x in lines])
    else:
        raise ValueError(
            f"{source}: give a folder, a .csv or .parquet table of paths, or a list file "
            f"({', '.join(LIST_SUFFIXES)}) with one path per line"
        )
    unique = list(dict.fromkeys(paths))
    if not unique:
        raise ValueError(f"{source} names no image to score")
    return unique


def _walk(folder: Path, glob: str | None) -> list[str]:
    found = []
    for root, dirs, files in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in sorted(files):
            if name.startswith("."):
                continue
            if glob is not None:
                keep = fnmatch.fnmatch(name, glob)
            else:
                keep = os.path.splitext(name)[1].lower() in SCORABLE_EXTENSIONS
            if keep:
                found.append(os.path.abspath(os.path.join(root, name)))
    return found


def _pick(columns: list[str], column: str | None, source: Path) -> str:
    if column is not None:
        if column not in columns:
            raise ValueError(f"{source} has no column {column!r} (columns: {columns})")
        return column
    for name in PATH_COLUMNS:
        if name in columns:
            return name
    raise ValueError(
        f"{source} has none of the columns {list(PATH_COLUMNS)}: name it with --column"
    )


def _csv_column(source: Path, column: str | None) -> list[str]:
    with open(source, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        name = _pick(list(reader.fieldnames or []), column, source)
        return [row[name] or "" for row in reader]


def _parquet_column(source: Path, column: str | None) -> list[str]:
    import pyarrow.parquet as pq

    names = pq.read_schema(source).names
    name = _pick(names, column, source)
    values = pq.read_table(source, columns=[name]).column(name).to_pylist()
    return ["" if v is None else str(v) for v in values]


def _relative_to(source: Path, entries: list[str]) -> list[str]:
    base = source.resolve().parent
    paths = []
    for entry in entries:
        entry = entry.strip()
        if not entry or entry.startswith("#"):
            continue
        entry = entry.removeprefix("file://") if entry.startswith("file:///") else entry
        paths.append(os.path.abspath(base / os.path.expanduser(entry)))
    return paths
