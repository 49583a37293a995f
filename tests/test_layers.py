"""The package's layers: imports run one way (core types → engine → methods → formats → API → integrations), no
import cycle, and no function-level import of our own modules (those would hide a cycle)."""

import ast
from pathlib import Path

PACKAGE = Path(__file__).parent.parent / "diffusers_erase"

# Layer of each module (a folder's modules share its layer unless listed).
LAYERS = {
    "_version": 0, "config": 0, "corpus": 0, "families": 0, "deltas": 0, "kinds": 0, "registry": 0, "tiny": 0,
    "text": 1, "state": 1, "runtime": 1, "engine": 1, "adversarial": 1,
    "methods": 2,
    "formats": 3,
    "api": 4, "locate": 4, "arguments": 4,
    "mixin": 5, "hub": 5, "shapes": 5, "detectors": 5, "attacks": 5, "evaluation": 5,
    "cli": 6, "comfyui": 6, "__init__": 6, "__main__": 6,
}


def _modules() -> dict[str, Path]:
    out = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE).with_suffix("").parts
        out[".".join(p for p in parts if p != "__init__") or "__init__"] = path
    return out


def _layer(module: str) -> int:
    return LAYERS[module.split(".")[0]]


def _resolve(module: str, path: Path, node: ast.ImportFrom) -> list[str]:
    package = module.split(".") if path.name == "__init__.py" and module != "__init__" else module.split(".")[:-1]
    if module == "__init__":
        package = []
    base = package[: len(package) - (node.level - 1)] if node.level else []
    if not node.level:
        if not (node.module or "").startswith("diffusers_erase"):
            return []
        base = node.module.split(".")[1:]
    elif node.module:
        base = base + node.module.split(".")
    known = _modules()
    targets = []
    for alias in node.names:
        candidate = ".".join(base + [alias.name])
        targets.append(candidate if candidate in known else ".".join(base) or "__init__")
    return targets


def _imports(module: str, path: Path):
    """(imported module, at function level?) for every import of our package in `module`."""
    tree = ast.parse(path.read_text())
    functions = {id(n) for f in ast.walk(tree) if isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef))
                 for n in ast.walk(f)}
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            for target in _resolve(module, path, node):
                yield target, id(node) in functions
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("diffusers_erase"):
                    yield ".".join(alias.name.split(".")[1:]) or "__init__", id(node) in functions


def _graph():
    return {module: sorted({t for t, _ in _imports(module, path) if t != module})
            for module, path in _modules().items()}


def test_every_module_has_a_layer():
    assert [m for m in _modules() if m.split(".")[0] not in LAYERS] == []


def test_imports_run_one_way_only():
    upward = [f"{m} (layer {_layer(m)}) imports {t} (layer {_layer(t)})"
              for m, targets in _graph().items() for t in targets if _layer(t) > _layer(m)]
    assert upward == []


def test_no_import_cycle():
    graph, done, stack, cycles = _graph(), set(), [], []

    def visit(node):
        if node in stack:
            cycles.append(stack[stack.index(node):] + [node])
            return
        if node in done:
            return
        stack.append(node)
        for target in graph.get(node, []):
            visit(target)
        stack.pop()
        done.add(node)

    for node in graph:
        visit(node)
    assert cycles == []


def test_no_function_level_imports_of_our_modules():
    late = [f"{m} imports {t}" for m, path in _modules().items() for t, inside in _imports(m, path) if inside]
    assert late == []


def test_the_check_sees_a_cycle_and_an_upward_import(tmp_path):
    # The graph check itself must be able to fail: a module importing api from the engine layer is upward.
    assert _layer("engine") < _layer("api")
    tree = ast.parse("from .api import erase_concept")
    node = tree.body[0]
    assert _resolve("engine", PACKAGE / "engine.py", node) == ["api"]


def test_modules_and_functions_stay_small():
    """No module over 600 lines, no library function over 60 (the shapes world's training scripts excepted)."""
    too_long = []
    for module, path in _modules().items():
        lines = path.read_text().count("\n")
        if lines > 600:
            too_long.append(f"{module}: {lines} lines")
        if module.startswith("shapes"):
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno >= 60:
                too_long.append(f"{module}.{node.name}: {node.end_lineno - node.lineno + 1} lines")
    assert too_long == []
