"""The structure rules, read from the source (ast): imports inside functions count.

No import circle in orchestrator/ and actors/; actors/ never imports orchestrator/ (the
dependency runs orchestrator -> actors); no module of orchestrator/ more than 6 import levels
above the lowest module; no class over 250 lines and no function over 60.
"""

from __future__ import annotations

import ast
from functools import cache
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("orchestrator", "actors")
MAX_LEVEL, MAX_CLASS, MAX_FUNCTION = 6, 250, 60


def _modules() -> dict[str, Path]:
    out = {}
    for pkg in PACKAGES:
        for path in sorted((ROOT / pkg).glob("*.py")):
            out[pkg if path.stem == "__init__" else f"{pkg}.{path.stem}"] = path
    return out


MODULES = _modules()


def _imports(tree: ast.AST) -> set[str]:
    """Our modules a module imports, wherever the import statement sits."""
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found.update(f"{node.module}.{a.name}" for a in node.names)
    return {m for m in found if m in MODULES}


@cache
def _graph() -> dict[str, set[str]]:
    return {m: _imports(ast.parse(p.read_text())) - {m} for m, p in MODULES.items()}


def _definitions() -> dict[str, tuple[str, int]]:
    """Every class and function by qualified name: ("class" | "function", lines)."""
    found: dict[str, tuple[str, int]] = {}

    def visit(node: ast.AST, prefix: str) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                name = f"{prefix}.{child.name}"
                kind = "class" if isinstance(child, ast.ClassDef) else "function"
                found[name] = (kind, child.end_lineno - child.lineno + 1)
                visit(child, name)
            else:
                visit(child, prefix)

    for module, path in MODULES.items():
        visit(ast.parse(path.read_text()), module)
    return found


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import circle, as the modules along it, or None."""
    state: dict[str, int] = {}  # 1: on the path, 2: done
    path: list[str] = []

    def walk(m: str) -> list[str] | None:
        state[m] = 1
        path.append(m)
        for dep in sorted(graph[m]):
            if state.get(dep) == 1:
                return path[path.index(dep) :] + [dep]
            if dep not in state and (found := walk(dep)):
                return found
        path.pop()
        state[m] = 2
        return None

    for m in sorted(graph):
        if m not in state and (found := walk(m)):
            return found
    return None


def test_no_import_circle():
    assert _cycle(_graph()) is None, " -> ".join(_cycle(_graph()) or [])


def test_the_checker_finds_a_circle_made_inside_a_function():
    tree = ast.parse("def f():\n    from orchestrator.driver import execute\n")
    graph = {**_graph(), "orchestrator.recipe": _imports(tree)}
    graph["orchestrator.driver"] = graph["orchestrator.driver"] | {"orchestrator.recipe"}
    assert _cycle(graph) is not None


def test_actors_never_import_the_orchestrator():
    wrong = {m: sorted(d) for m, d in _graph().items() if m.startswith("actors")}
    wrong = {m: [d for d in deps if d.startswith("orchestrator")] for m, deps in wrong.items()}
    assert not {m: d for m, d in wrong.items() if d}


def test_orchestrator_is_at_most_six_import_levels_deep():
    """Levels among orchestrator/'s own modules (a module importing none of them is level 0).
    The mode assemblies stand at level 3, the driver at 4, stages at 5, the CLI at 6."""
    graph = {
        m: {d for d in deps if d.startswith("orchestrator")}
        for m, deps in _graph().items()
        if m.startswith("orchestrator")
    }

    @cache
    def level(m: str) -> int:
        return 1 + max((level(d) for d in graph[m]), default=-1)

    deepest = max(level(m) for m in graph)
    assert deepest <= MAX_LEVEL, {m: level(m) for m in graph if level(m) > MAX_LEVEL}


@pytest.mark.parametrize("kind", ["class", "function"])
def test_classes_and_functions_fit_one_reading(kind):
    limit = MAX_CLASS if kind == "class" else MAX_FUNCTION
    mine = {n: lines for n, (k, lines) in _definitions().items() if k == kind}
    over = {n: lines for n, lines in mine.items() if lines > limit}
    assert not over, f"over {limit} lines: {over}"
