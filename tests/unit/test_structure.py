"""The package's shape: no import cycle (imports inside functions count), no module over 600 lines, and imports
inside functions only of heavy or optional dependencies, each saying which in a comment. Pure `ast`, no import."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[2] / "trl_guided"
MAX_LINES = 600
# Imported inside a function only: optional extras (vllm, deepspeed, wandb, math-verify, requests) or heavy and needed
# by a few commands only (matplotlib). Everything else the package needs is imported at module top.
DEFERRED = {"vllm", "deepspeed", "wandb", "math_verify", "requests", "matplotlib"}


def _modules() -> dict[str, Path]:
    """Dotted module name -> file, e.g. `trl_guided.train`, `trl_guided` for the package's __init__."""
    names = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        names[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return names


def _imports(name: str, path: Path) -> list[tuple[ast.AST, str, bool]]:
    """(node, imported module, inside a function) for every import of a file, relative ones resolved."""
    tree = ast.parse(path.read_text())
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    nested = {
        id(n) for f in ast.walk(tree) if isinstance(f, ast.FunctionDef | ast.AsyncFunctionDef) for n in ast.walk(f)
    }
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node, alias.name, id(node) in nested) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(
                    [*package.split(".")[: len(package.split(".")) - node.level + 1], *filter(None, [base])]
                )
            # `from . import x` imports the module `x` when there is one, else a name of the package.
            found += [
                (node, f"{base}.{alias.name}" if not node.module else base, id(node) in nested) for alias in node.names
            ]
    return found


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    graph = {}
    for name, path in modules.items():
        targets = set()
        for _, target, _ in _imports(name, path):
            while target and target not in modules and "." in target:
                target = target.rpartition(".")[0]  # `from .x import name`: the module x
            if target in modules and target != name:
                targets.add(target)
        graph[name] = targets
    return graph


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as a path of module names, or None (depth-first search)."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for target in sorted(graph[node]):
            if state.get(target) == 1:
                return path[path.index(target) :] + [target]
            if target not in state and (found := visit(target)):
                return found
        state[node] = 2
        path.pop()
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_no_import_cycle_counting_imports_inside_functions():
    graph = _graph()
    assert "trl_guided.train" in graph["trl_guided.cli"], "the graph misses imports"
    assert _cycle(graph) is None, " -> ".join(_cycle(graph))


def test_the_cycle_check_finds_a_cycle():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None


def test_no_module_over_600_lines():
    long = {path.name: n for path in PACKAGE.rglob("*.py") if (n := len(path.read_text().splitlines())) > MAX_LINES}
    assert not long, f"split these by concern (at most {MAX_LINES} lines each): {long}"


def test_imports_inside_functions_are_heavy_or_optional_and_say_so():
    wrong = []
    for name, path in _modules().items():
        lines = path.read_text().splitlines()
        for node, target, inside in _imports(name, path):
            if not inside:
                continue
            commented = "#" in lines[node.lineno - 1] or lines[node.lineno - 2].strip().startswith("#")
            if target.split(".")[0] not in DEFERRED or not commented:
                wrong.append(f"{path.name}:{node.lineno} {target}")
    assert not wrong, (
        f"move to the module top (or defer a heavy/optional package with a comment saying which): {wrong}"
    )
