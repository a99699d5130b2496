"""The import layers of the package, checked by walking every import statement.

helpers -> activations/initializers -> models -> driver, Jacobians, matrix-free ->
diagnostics; theory imports only activations (and theory); figures (``plot``) import the
result types; experiments use the public API. A module imports only from its own level or
below, and no file of the project imports an underscore name from another module."""

import ast
import pathlib

ROOT = pathlib.Path(__file__).resolve().parents[1]

LEVELS = {
    "checks": 0,
    "compilation_cache": 0,
    "activations": 1,
    "initializers": 1,
    "datasets": 1,
    "model": 2,
    "adapters": 2,
    "reading": 2,
    "frontends": 2,
    "networks": 3,
    "convnets": 3,
    "chain": 3,
    "zoo": 3,
    "transformer": 3,
    "driver": 4,
    "jacobians": 4,
    "matrix_free": 4,
    "sharding": 4,
    "layered": 5,
    "gsc": 5,
    "residual": 5,
    "paths": 5,
    "domain": 5,
    "dilution": 5,
    "spectra": 5,
    "tokens": 5,
    "tables": 5,
    "meanfield": 6,
    "random_matrix": 6,
    "training": 6,
    "inspection": 7,
    # figures of the result types (of training's History too); matplotlib enters here
    "plot": 7,
}
THEORY = {"meanfield", "random_matrix"}


def _imports(path: pathlib.Path):
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            yield node.module, [a.name for a in node.names], node.lineno
        elif isinstance(node, ast.Import):
            for a in node.names:
                yield a.name, [], node.lineno


def _module_of(dotted: str) -> str | None:
    parts = dotted.split(".")
    return parts[1] if parts[0] == "jacobian_lab" and len(parts) > 1 else None


def test_every_library_module_has_a_level():
    modules = {p.stem for p in (ROOT / "jacobian_lab").glob("*.py")} - {"__init__"}
    assert modules == set(LEVELS), "give a new module its level in LEVELS"


def test_modules_import_only_from_their_level_or_below():
    bad = []
    for path in (ROOT / "jacobian_lab").glob("*.py"):
        if path.stem == "__init__":
            continue
        level = LEVELS[path.stem]
        for module, _, line in _imports(path):
            target = _module_of(module)
            if target is None and module == "jacobian_lab":
                bad.append(f"{path.name}:{line} imports the package top level")
            if target is None:
                continue
            if target == "experiments" or LEVELS.get(target, 99) > level:
                bad.append(f"{path.name}:{line} ({path.stem}) imports {module} (higher level)")
            if path.stem in THEORY and target not in THEORY | {"activations"}:
                bad.append(f"{path.name}:{line}: theory imports {module}")
    assert not bad, "\n".join(bad)


def test_experiments_use_the_public_api_only():
    bad = []
    for path in (ROOT / "jacobian_lab" / "experiments").glob("*.py"):
        for module, _, line in _imports(path):
            target = _module_of(module)
            if target is not None and target != "experiments" and target not in LEVELS:
                bad.append(f"{path.name}:{line} imports {module}")
    assert not bad, "\n".join(bad)


def test_no_file_imports_an_underscore_name_from_another_module():
    bad = []
    for folder in ("jacobian_lab", "analyses", "benchmarks", "tests", "examples"):
        for path in (ROOT / folder).rglob("*.py"):
            for module, names, line in _imports(path):
                if not module.startswith("jacobian_lab"):
                    continue
                private = [n for n in names if n.startswith("_") and not n.startswith("__")]
                if private or any(p.startswith("_") for p in module.split(".")[1:]):
                    bad.append(f"{path.relative_to(ROOT)}:{line}: {module} {private}")
    assert not bad, "\n".join(bad)


def test_only_the_figures_import_matplotlib():
    """``import jacobian_lab`` stays free of matplotlib (seconds of import time): only
    ``plot`` (loaded on first use of ``jl.plot``) and the experiment layer import it."""
    bad = []
    for path in (ROOT / "jacobian_lab").glob("*.py"):
        for module, _, line in _imports(path):
            if module.split(".")[0] == "matplotlib" and path.stem != "plot":
                bad.append(f"{path.name}:{line} imports {module}")
    assert not bad, "\n".join(bad)
