"""The shape of the package, bench/ and scripts/: no import cycle (imports inside functions count), no module over 600
lines, and imports inside functions only of heavy or optional dependencies, each saying which in a comment (in bench/
and scripts/ also listed here with the reason). Functions over 80 lines outside tests are reported, not refused.
Pure `ast`, no import."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "trl_guided"
# A script runs as `python bench/x.py`: its folder is its import root (bench's scripts import their siblings, e.g.
# `from harness import ...`, and the study's package as `study`).
SCRIPT_FOLDERS = (ROOT / "bench", ROOT / "scripts")
MAX_LINES = 600
MAX_FUNCTION_LINES = 80
# Imported inside a function only: optional extras (vllm, deepspeed, wandb, math-verify, requests) or heavy and needed
# by a few commands only (matplotlib). Everything else the package needs is imported at module top.
DEFERRED = {"vllm", "deepspeed", "wandb", "math_verify", "requests", "matplotlib"}
# Imports inside a function in the package itself (file -> imported module -> why): the `trl-guided` dispatcher and the
# package's two public names load torch and TRL on demand, so that `trl-guided --help` answers at once.
_ON_DEMAND = "loads torch and TRL when used: importing the package (`trl-guided --help`) does without them"
PACKAGE_DEFERRED = {
    "cli.py": {"trl_guided.train": _ON_DEMAND, "trl_guided.commands": _ON_DEMAND},
    "__init__.py": {"trl_guided.config": _ON_DEMAND, "trl_guided.trainer": _ON_DEMAND},
}
_CHILD = "loads torch, transformers and trl_guided: the study's children only (the parent, the ballast, --plan and "
_CHILD += "--markdown start without them)"
_STUDY = "loads trl_guided (torch, TRL): running or reporting a study only (--plan and --markdown start without it)"
# Imports inside a function in bench/ and scripts/ (file -> imported module -> why it is deferred). Anything else is
# imported at the top; an import missing here, or listed but gone, fails.
SCRIPT_DEFERRED = {
    "study/cli.py": {
        "study.evaluation": _CHILD,
        "study.worker": _CHILD,
        "study.outputs": _STUDY,
        "study.runner": _STUDY,
        "trl_guided.tiny_models": "builds the tiny model of a --tiny study (torch, transformers)",
    },
    "study/outputs.py": {"matplotlib": "heavy; only the plot", "matplotlib.pyplot": "after choosing its backend"},
    "decisive/report.py": {"matplotlib": "heavy; only the plot", "matplotlib.pyplot": "after choosing its backend"},
    "vllm_cpu_bench.py": {"vllm": "optional: only the vLLM venv has it, and only the vLLM side needs it"},
}


def _modules(root: Path = PACKAGE.parent, folder: Path = PACKAGE) -> dict[str, Path]:
    """Dotted module name (relative to the import root `root`) -> file of every module in `folder`, e.g.
    `trl_guided.train`, `trl_guided` for the package's __init__; `study.plan`, `harness` in bench/."""
    names = {}
    for path in sorted(folder.rglob("*.py")):
        parts = path.relative_to(root).with_suffix("").parts
        names[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return names


def _all_modules() -> list[dict[str, Path]]:
    """The package's modules, and each script folder's (its own import root)."""
    return [_modules(), *(_modules(folder, folder) for folder in SCRIPT_FOLDERS)]


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


def _graph(modules: dict[str, Path] | None = None) -> dict[str, set[str]]:
    modules = _modules() if modules is None else modules
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
    for folder in SCRIPT_FOLDERS:
        graph = _graph(_modules(folder, folder))
        assert _cycle(graph) is None, f"{folder.name}/: " + " -> ".join(_cycle(graph))
    bench = _graph(_modules(SCRIPT_FOLDERS[0], SCRIPT_FOLDERS[0]))
    assert {"study.worker", "study.evaluation"} <= bench["study.cli"] and "harness" in bench["run_all"]


def test_the_cycle_check_finds_a_cycle():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None


def test_no_module_over_600_lines():
    files = [path for modules in _all_modules() for path in modules.values()]
    assert any(path.name == "learning.py" for path in files) and any(path.parent.name == "scripts" for path in files)
    long = {str(path.relative_to(ROOT)): n for path in files if (n := len(path.read_text().splitlines())) > MAX_LINES}
    assert not long, f"split these by concern (at most {MAX_LINES} lines each): {long}"


def _inside(modules: dict[str, Path]):
    """(path, source lines, import node, imported module) of every import inside a function."""
    for name, path in modules.items():
        lines = path.read_text().splitlines()
        for node, target, inside in _imports(name, path):
            if inside:
                yield path, lines, node, target


def _commented(lines: list[str], node: ast.AST) -> bool:
    return "#" in lines[node.lineno - 1] or lines[node.lineno - 2].strip().startswith("#")


def test_imports_inside_functions_are_heavy_or_optional_and_say_so():
    found, wrong = {}, []
    for path, lines, node, target in _inside(_modules()):
        found.setdefault(path.name, set()).add(target)
        listed = target in PACKAGE_DEFERRED.get(path.name, {})
        if (target.split(".")[0] not in DEFERRED and not listed) or not _commented(lines, node):
            wrong.append(f"{path.name}:{node.lineno} {target}")
    gone = {file: sorted(set(targets) - found.get(file, set())) for file, targets in PACKAGE_DEFERRED.items()}
    assert not any(gone.values()), f"listed in PACKAGE_DEFERRED but no longer imported inside a function: {gone}"
    assert not wrong, (
        f"move to the module top (or defer a heavy/optional package with a comment saying which): {wrong}"
    )


def test_imports_inside_functions_of_bench_and_scripts_are_listed_with_a_reason():
    found, wrong = {}, []
    for folder in SCRIPT_FOLDERS:
        for path, lines, node, target in _inside(_modules(folder, folder)):
            file = str(path.relative_to(folder))
            found.setdefault(file, set()).add(target)
            if target not in SCRIPT_DEFERRED.get(file, {}):
                wrong.append(f"{folder.name}/{file}:{node.lineno} {target} (not listed)")
            elif not _commented(lines, node):
                wrong.append(f"{folder.name}/{file}:{node.lineno} {target} (no comment saying why)")
    assert not wrong, (
        "move to the module top, or defer a heavy/optional import with a comment and list it in SCRIPT_DEFERRED: "
        f"{wrong}"
    )
    gone = {file: sorted(set(targets) - found.get(file, set())) for file, targets in SCRIPT_DEFERRED.items()}
    assert not any(gone.values()), f"listed in SCRIPT_DEFERRED but no longer imported inside a function: {gone}"


def _long_functions(paths: list[Path]) -> list[str]:
    """'file:line name (N lines)' of every function over MAX_FUNCTION_LINES lines."""
    long = []
    for path in paths:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                size = node.end_lineno - node.lineno + 1
                if size > MAX_FUNCTION_LINES:
                    shown = path.relative_to(ROOT) if path.is_relative_to(ROOT) else path.name
                    long.append(f"{shown}:{node.lineno} {node.name} ({size} lines)")
    return long


def test_functions_over_80_lines_are_reported(capsys, tmp_path):
    """Reported, not refused: a long function is a candidate for splitting by job, not always wrong."""
    sample = tmp_path / "sample.py"
    sample.write_text("def short():\n    pass\n\n\ndef long():\n" + "    x = 1\n" * MAX_FUNCTION_LINES)
    assert _long_functions([sample]) == [f"sample.py:5 long ({MAX_FUNCTION_LINES + 1} lines)"]
    files = [path for modules in _all_modules() for path in modules.values()]
    long = _long_functions(files)
    with capsys.disabled():
        print(f"\nfunctions over {MAX_FUNCTION_LINES} lines outside tests ({len(long)}):", *long, sep="\n  ")
