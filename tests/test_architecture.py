"""The module boundaries the README promises, checked on the sources."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def imports(path: Path) -> set[str]:
    """Top-level package names a source file imports (anywhere in it, lazy imports included)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module.split(".")[0])
    return found


def importers(folder: str, package: str) -> list[str]:
    return sorted(str(p.relative_to(ROOT)) for p in (ROOT / folder).rglob("*.py") if package in imports(p))


def test_ray_only_in_the_ray_module_and_mlflow_only_in_tracking():
    assert importers("orchestrator", "ray") == ["orchestrator/ray_backend.py"]
    assert importers("orchestrator", "mlflow") == ["orchestrator/tracking.py"]


def test_methods_are_pure_pytorch():
    for package in ("ray", "mlflow", "optuna", "orchestrator", "omegaconf"):
        assert importers("methods", package) == [], package


def test_orchestrator_never_names_a_method():
    from methods import METHODS

    for path in (ROOT / "orchestrator").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Compare) and any(isinstance(c, ast.Constant) and c.value in METHODS for c in node.comparators):
                raise AssertionError(f"{path.relative_to(ROOT)}:{node.lineno} branches on a method name")
