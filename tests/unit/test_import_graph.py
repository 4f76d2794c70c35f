"""The modules of junebug_api import one another without a cycle.

The graph is read from the source (ast): every import of a junebug_api
module, at the top or inside a function, is an edge; imports under
``if TYPE_CHECKING:`` are not (they never run). A cycle means two modules
each need the other to be read first: the lower one must not know the
higher one.
"""

from __future__ import annotations

import ast
from pathlib import Path

import junebug_api

PACKAGE = Path(junebug_api.__file__).parent


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _imported(module: str, tree: ast.AST, modules: set[str]) -> set[str]:
    """The junebug_api modules ``module``'s source imports."""
    found: set[str] = set()
    nodes = [tree]
    while nodes:
        node = nodes.pop()
        if isinstance(node, ast.If) and _is_type_checking(node):
            nodes.extend(node.orelse)
            continue
        nodes.extend(ast.iter_child_nodes(node))
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level > 1:
                raise AssertionError(f"{module}: relative import beyond the package")
            base = "junebug_api" if node.level == 1 else (node.module or "")
            if node.level == 1 and node.module:
                base = f"junebug_api.{node.module}"
            # ``from . import x`` and ``from junebug_api import x`` import module x.
            names = [base] + [f"{base}.{alias.name}" for alias in node.names]
        else:
            continue
        for name in names:
            parts = name.split(".")
            if parts[0] == "junebug_api" and len(parts) > 1 and parts[1] in modules:
                found.add(parts[1])
    found.discard(module)
    return found


def import_graph() -> dict[str, set[str]]:
    """Each junebug_api module and the junebug_api modules it imports."""
    files = {path.stem: path for path in PACKAGE.glob("*.py")}
    modules = set(files)
    return {
        name: _imported(name, ast.parse(path.read_text(encoding="utf-8")), modules)
        for name, path in files.items()
    }


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of ``graph`` as a path (first module repeated last), or None."""
    done: set[str] = set()
    path: list[str] = []
    on_path: set[str] = set()

    def visit(module: str) -> list[str] | None:
        path.append(module)
        on_path.add(module)
        for imported in sorted(graph[module]):
            if imported in on_path:
                return [*path[path.index(imported) :], imported]
            if imported not in done:
                cycle = visit(imported)
                if cycle:
                    return cycle
        path.pop()
        on_path.discard(module)
        done.add(module)
        return None

    for module in sorted(graph):
        if module not in done:
            cycle = visit(module)
            if cycle:
                return cycle
    return None


def test_the_package_has_no_import_cycle() -> None:
    cycle = find_cycle(import_graph())
    assert cycle is None, " -> ".join(cycle or [])


def test_the_graph_sees_function_level_imports_and_skips_type_checking() -> None:
    graph = import_graph()
    assert "service" in graph["tap"]  # imported inside makeService
    assert "amqp_connect" in graph["config"]  # imported inside the TLS check
    assert "config" not in graph["amqp_connect"]  # only under TYPE_CHECKING
    assert "queue_names" in graph["service"]


def test_a_cycle_is_found() -> None:
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None
