"""Stage two's shape: no module of g2l_student imports another in a circle, every import of one
g2l_student module by another sits at its top, and `fit` and its loop read on one screen."""

from __future__ import annotations

import ast
import inspect
from pathlib import Path

PACKAGE = Path(__file__).parent.parent / "g2l_student"


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> tuple[set[str], list[str]]:
    """g2l_student modules a file imports, and those it imports inside a function (with line numbers)."""
    tree = ast.parse(path.read_text())
    found, nested = set(), []
    for node in ast.walk(tree):
        names = []
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("g2l_student"):
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names if a.name.startswith("g2l_student")]
        modules = {n for n in names if (PACKAGE.parent / (n.replace(".", "/") + ".py")).exists()
                   or (PACKAGE.parent / n.replace(".", "/") / "__init__.py").exists()}
        found |= modules
        if modules and node.col_offset > 0:
            nested.append(f"{path.name}:{node.lineno} {sorted(modules)}")
    return found, nested


def test_no_module_of_g2l_student_imports_another_in_a_circle():
    graph, nested = {}, []
    for path in PACKAGE.rglob("*.py"):
        modules, inner = _imports(path)
        graph[_module_name(path)] = {m for m in modules if m != _module_name(path)}
        nested += inner
    assert not nested, f"imports of g2l_student modules inside functions: {nested}"
    state: dict[str, int] = {}

    def visit(node: str, trail: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                raise AssertionError("import cycle: " + " -> ".join(trail[trail.index(nxt):] + [nxt]))
            if nxt not in state:
                visit(nxt, trail + [nxt])
        state[node] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])
    assert len(graph) > 20


def test_fit_and_its_loop_read_on_one_screen():
    from g2l_student.loop import train_loop
    from g2l_student.train import fit

    assert len(inspect.getsourcelines(fit)[0]) <= 60
    assert len(inspect.getsourcelines(train_loop)[0]) <= 80
