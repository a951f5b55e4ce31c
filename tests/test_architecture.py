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


def module_imports() -> dict[str, set[str]]:
    """First-party module -> the first-party modules it imports, function-level imports
    included (a lazy import still closes a circle; it only hides it until run time)."""
    files = {}
    for package in ("orchestrator", "methods", "bench", "mutations"):
        for path in (ROOT / package).rglob("*.py"):
            parts = path.relative_to(ROOT).with_suffix("").parts
            files[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path

    def module_of(name: str) -> str | None:
        while name and name not in files:
            name = name.rpartition(".")[0]
        return name or None

    graph = {}
    for module, path in files.items():
        package = module if path.name == "__init__.py" else module.rpartition(".")[0]
        targets = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets.update(module_of(a.name) for a in node.names)
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                    base = f"{anchor}.{base}".rstrip(".")
                targets.update(module_of(f"{base}.{a.name}") if f"{base}.{a.name}" in files else module_of(base) for a in node.names)
        graph[module] = targets - {None, module}
    return graph


def test_the_import_graph_has_no_circle():
    graph = module_imports()
    assert {"orchestrator.config", "orchestrator.training", "orchestrator.data.synthetic"} <= set(graph)
    state: dict[str, str] = {}

    def visit(module: str, path: list[str]) -> None:
        state[module] = "open"
        for target in sorted(graph[module]):
            if state.get(target) == "open":
                circle = path[path.index(target):] + [target]
                raise AssertionError("import circle: " + " -> ".join(circle))
            if target not in state:
                visit(target, path + [target])
        state[module] = "done"

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])
