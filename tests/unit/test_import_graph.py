"""The modules of junebug_api import one another without a cycle, and the
subpackages import only their own layer and the layers below.

The graph is read from the source (ast): every import of a junebug_api
module, at the top, inside a function or under ``if TYPE_CHECKING:``, is an
edge. A cycle means two modules each need the other to be read first (or, for
type hints, each to be understood first): the lower one must not know the
higher one.
"""

from __future__ import annotations

import ast
from pathlib import Path

import junebug_api

PACKAGE = Path(junebug_api.__file__).parent

#: The subpackages by layer, lowest first (README "Layout"): a module may
#: import its own subpackage, its layer's others and the layers below.
LAYERS = (
    ("formats",),
    ("config",),
    ("state", "amqp", "observe"),
    ("delivery", "http"),
    ("channels",),
    ("cli", "service", "tap", "testing"),
)

#: Known imports against the layers (none).
KNOWN_UPWARD: set[tuple[str, str]] = set()


def module_name(path: Path) -> str:
    """``junebug_api/amqp/service.py`` -> ``amqp.service``; a package is its ``__init__``."""
    parts = list(path.relative_to(PACKAGE).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _absolute(module: str, is_package: bool, node: ast.ImportFrom) -> str:
    if not node.level:
        return node.module or ""
    base = ["junebug_api", *module.split(".")] if module else ["junebug_api"]
    if not is_package:
        base = base[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def _imported(module: str, path: Path, modules: set[str]) -> set[str]:
    """The junebug_api modules ``module``'s source imports (TYPE_CHECKING ones too)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = _absolute(module, path.name == "__init__.py", node)
            # ``from junebug_api.amqp import service`` imports module amqp.service.
            names = [base] + [f"{base}.{alias.name}" for alias in node.names]
        else:
            continue
        for name in names:
            parts = name.split(".")
            if parts[0] != "junebug_api":
                continue
            parts = parts[1:]
            while parts and ".".join(parts) not in modules:
                parts.pop()
            if parts:
                found.add(".".join(parts))
    found.discard(module)
    return found


def import_graph() -> dict[str, set[str]]:
    """Each junebug_api module (dotted, below the package) and the ones it imports."""
    files = {module_name(path): path for path in PACKAGE.rglob("*.py")}
    files.pop("", None)  # junebug_api/__init__.py: the version only
    modules = set(files)
    return {name: _imported(name, path, modules) for name, path in files.items()}


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


def layer_of(module: str) -> int:
    top = module.split(".")[0]
    for rank, names in enumerate(LAYERS):
        if top in names:
            return rank
    raise AssertionError(f"{module} is in no layer: add its subpackage to LAYERS")


def upward_imports(graph: dict[str, set[str]]) -> set[tuple[str, str]]:
    """Imports of a module from a higher layer than its own."""
    return {
        (module, imported)
        for module, imports in graph.items()
        for imported in imports
        if layer_of(imported) > layer_of(module)
    }


def test_the_package_has_no_import_cycle() -> None:
    cycle = find_cycle(import_graph())
    assert cycle is None, " -> ".join(cycle or [])


def test_every_module_is_in_a_layer_and_imports_point_down() -> None:
    assert upward_imports(import_graph()) == KNOWN_UPWARD


def test_the_graph_sees_function_level_and_type_checking_imports() -> None:
    graph = import_graph()
    assert "service" in graph["tap"]  # imported inside makeService
    assert "observe.error_reporting" in graph["service"]  # imported inside a method
    assert "amqp.service" in graph["delivery.consumer"]


def test_a_cycle_is_found() -> None:
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_an_upward_import_is_found() -> None:
    assert upward_imports({"formats.x": {"service"}, "service": {"formats.x"}}) == {
        ("formats.x", "service")
    }
