"""Import arrows point one way: cli -> scoring -> service / registry / training -> thyroid_cad.

Checked on the source (every import statement, at any depth), so a lazy import inside
a function counts too. Inside service/ the parts import one way, and inside training/
no modules import each other in a circle.
"""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# package -> top-level names it must never import
FORBIDDEN = {
    "thyroid_cad": {"cli", "training", "registry", "service", "scoring", "tensorflow", "keras"},
    "registry": {"cli", "training", "service", "scoring", "tensorflow", "keras"},
    "service": {"cli", "training", "scoring", "tensorflow", "keras", "tf2onnx"},
    # Archive scoring runs the service's scoring core (onnxruntime), never training code.
    "scoring": {"cli", "training", "tensorflow", "keras", "tf2onnx"},
    "training": {"cli", "service", "scoring"},
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


# service/ by job: api (HTTP) -> hospital (DICOM SR, FHIR, PACS) -> inference (decode,
# prepare, onnxruntime, heatmaps, safety); api -> store (database, audit, keys,
# outcomes). The top-level config, errors and schemas are the vocabulary all share.
SERVICE_FORBIDDEN = {
    "store": {"api", "hospital", "inference"},
    "inference": {"api", "hospital", "store"},
    "hospital": {"api"},
}


def service_parts(path: Path) -> set[str]:
    parts = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        parts |= {n.split(".")[1] for n in names if n.startswith("service.")}
    return parts


@pytest.mark.parametrize("part", sorted(SERVICE_FORBIDDEN))
def test_service_parts_import_one_way(part):
    files = sorted((ROOT / "service" / part).rglob("*.py"))
    assert files
    bad = {
        str(f.relative_to(ROOT)): sorted(service_parts(f) & SERVICE_FORBIDDEN[part]) for f in files
    }
    assert not {f: names for f, names in bad.items() if names}


def test_service_vocabulary_imports_no_part():
    for name in ("errors.py", "schemas.py"):
        assert not service_parts(ROOT / "service" / name), name


def training_imports(path: Path, modules: set[str]) -> set[str]:
    """The training/ modules that one training/ file imports, at any depth."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found |= {a.name.split(".")[1] for a in node.names if a.name.startswith("training.")}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            if node.module == "training":  # from training import models, ood
                found |= {a.name for a in node.names} & modules
            elif node.module.startswith("training."):
                found.add(node.module.split(".")[1])
    return found - {path.stem}


def test_training_modules_import_one_way():
    import graphlib

    files = {f.stem: f for f in (ROOT / "training").glob("*.py")}
    graph = {name: training_imports(f, set(files)) for name, f in files.items()}
    assert graph["localiser"] >= {"fitting", "unet"}, "the parser misses imports"
    try:
        tuple(graphlib.TopologicalSorter(graph).static_order())
    except graphlib.CycleError as e:
        pytest.fail(f"training/ imports in a circle: {' -> '.join(e.args[1])}")
