"""Import arrows point one way: cli -> service / registry / training -> thyroid_cad.

Checked on the source (every import statement, at any depth), so a lazy import inside
a function counts too.
"""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# package -> top-level names it must never import
FORBIDDEN = {
    "thyroid_cad": {"cli", "training", "registry", "service", "tensorflow", "keras"},
    "registry": {"cli", "training", "service", "tensorflow", "keras"},
    "service": {"cli", "training", "tensorflow", "keras", "tf2onnx"},
    "training": {"cli", "service"},
}


def imported_tops(path: Path) -> set[str]:
    tops = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            tops |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            tops.add(node.module.split(".")[0])
    return tops


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_import_arrows_point_one_way(package):
    files = sorted((ROOT / package).rglob("*.py"))
    assert files, f"{package}/ has no Python files"
    bad = {str(f.relative_to(ROOT)): sorted(imported_tops(f) & FORBIDDEN[package]) for f in files}
    assert not {f: names for f, names in bad.items() if names}


def test_the_cli_is_the_only_entry_point():
    import tomllib

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert project["scripts"] == {"thyroid-cad": "cli:app"}
