"""No code in junebug_api, tests/ or bench/ reaches into private names it
does not own: the tests and the benchmark use the service through its public
names, as the next engineer's code would.

Read from the source (the ``ast`` of every module, so comments and most
strings do not count):

- ``thing._name`` only on ``self`` or ``cls``: never on another object, a
  library's module or class, or ``super()``;
- no import from a private module (``twisted.web._newclient``) and no
  private name imported from any module (ours included);
- no ``getattr``/``setattr``/``hasattr``/``delattr`` with a private name,
  called as a builtin or as a method (``monkeypatch.setattr``), and no
  ``patch``/``patch.object`` of a private name or dotted path;
- a class that subclasses another module's class (a library's, or ours)
  neither uses nor overrides a private name that base class defines.

The exceptions are :data:`ALLOWED` (names public despite the underscore) and
:data:`EXCEPTIONS` (reach-ins that must stay, each with the reason).
"""

from __future__ import annotations

import ast
import importlib
import inspect
import re
from functools import cache
from pathlib import Path
from types import ModuleType

import pytest

import junebug_api

PACKAGE = Path(junebug_api.__file__).parent
ROOT = PACKAGE.parent

#: Each tree scanned, and the directory its modules are imported from: the
#: benchmark runs with bench/ on sys.path (as tests/unit/test_bench_report.py
#: has it), the tests from the repository root.
TREES = {PACKAGE: ROOT, ROOT / "tests": ROOT, ROOT / "bench": ROOT / "bench"}

#: ``._name`` accesses that are public API despite the underscore.
ALLOWED = {
    # namedtuple's documented API (underscored so as not to clash with
    # field names); urllib.parse's results are namedtuples.
    "_replace": "namedtuple._replace, public (urllib.parse.SplitResult)",
}

#: Reach-ins that must stay: (file from the repository root, the reach-in as
#: reported without its line) -> why there is no public way. Only for a
#: library's private name that a test must read to check a contract nothing
#: public shows; none is needed now. A stale entry fails
#: ``test_every_exception_is_still_needed``.
EXCEPTIONS: dict[tuple[str, str], str] = {}

ATTRIBUTE_FUNCTIONS = {"getattr", "setattr", "hasattr", "delattr"}


def private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def modules() -> list[Path]:
    return sorted(path for tree in TREES for path in tree.rglob("*.py"))


def import_base(path: Path) -> Path:
    return next(base for tree, base in TREES.items() if path.is_relative_to(tree))


def module_name(path: Path) -> str:
    parts = path.relative_to(import_base(path)).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def names_private(value: object) -> bool:
    """A string naming a private attribute or dotted path (``"a._b.c"``)."""
    return isinstance(value, str) and any(private(part) for part in value.split("."))


def reaches_by_name(call: ast.Call) -> bool:
    """``getattr(x, "_y")``, ``monkeypatch.setattr(x, "_y", v)``,
    ``patch("m._y")``, ``patch.object(x, "_y")``."""
    func = call.func
    name = func.id if isinstance(func, ast.Name) else getattr(func, "attr", None)
    patch_object = (
        name == "object"
        and isinstance(func, ast.Attribute)
        and (
            getattr(func.value, "id", None) == "patch"
            or getattr(func.value, "attr", None) == "patch"
        )
    )
    if name not in ATTRIBUTE_FUNCTIONS and name != "patch" and not patch_object:
        return False
    return any(isinstance(arg, ast.Constant) and names_private(arg.value) for arg in call.args[:2])


def reach_ins(tree: ast.AST) -> list[str]:
    """Private names this module's code takes from objects it does not own."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            module = node.module or ""
            if any(private(part) for part in module.split(".")):
                found.append(f"{node.lineno}: from private module {module}")
            found += [
                f"{node.lineno}: imports {module}.{alias.name}"
                for alias in node.names
                if private(alias.name)
            ]
        elif isinstance(node, ast.Import):
            found += [
                f"{node.lineno}: imports private module {alias.name}"
                for alias in node.names
                if any(private(part) for part in alias.name.split("."))
            ]
        elif isinstance(node, ast.Attribute) and private(node.attr):
            owner = node.value
            if isinstance(owner, ast.Name) and owner.id in ("self", "cls"):
                continue
            if node.attr in ALLOWED:
                continue
            found.append(f"{node.lineno}: {ast.unparse(node)}")
        elif isinstance(node, ast.Call) and reaches_by_name(node):
            found.append(f"{node.lineno}: {ast.unparse(node)}")
    return found


def own_private_names(node: ast.ClassDef) -> set[str]:
    """Private names a class's body defines or uses on ``self``/``cls``."""
    names = set()
    for sub in ast.walk(node):
        if (
            isinstance(sub, ast.Attribute)
            and isinstance(sub.value, ast.Name)
            and sub.value.id in ("self", "cls")
            and private(sub.attr)
        ):
            names.add(sub.attr)
        elif isinstance(sub, ast.FunctionDef | ast.AsyncFunctionDef) and private(sub.name):
            names.add(sub.name)
        elif isinstance(sub, ast.Name) and isinstance(sub.ctx, ast.Store) and private(sub.id):
            names.add(sub.id)
    return names


def defines(base: type, name: str) -> bool:
    """Whether ``base`` defines ``name``: in its class body, or set on ``self``
    in its source."""
    if name in vars(base):
        return True
    return re.search(rf"\bself\.{re.escape(name)}\b", source_of(base)) is not None


@cache
def source_of(cls: type) -> str:
    try:
        return inspect.getsource(cls)
    except (OSError, TypeError):
        return ""


def inherited_private_names(module: ModuleType, tree: ast.AST) -> list[str]:
    """Private names that a class of ``module`` shares with a base class of
    another module (using or overriding that base class's private state)."""
    found = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.ClassDef):
            continue
        cls = getattr(module, node.name, None)
        if not inspect.isclass(cls):
            continue
        others = [
            base
            for base in cls.__mro__[1:]
            if base is not object and base.__module__ != module.__name__
        ]
        for name in sorted(own_private_names(node)):
            found += [
                f"{node.lineno}: {node.name}.{name} is {base.__module__}.{base.__qualname__}'s"
                for base in others
                if defines(base, name)
            ][:1]
    return found


def unexcepted(path: Path, found: list[str]) -> list[str]:
    where = str(path.relative_to(ROOT))
    return [f for f in found if (where, f.partition(": ")[2]) not in EXCEPTIONS]


def findings(path: Path, monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Every reach-in of the module at ``path``, exceptions included."""
    monkeypatch.syspath_prepend(str(import_base(path)))
    tree = ast.parse(path.read_text(encoding="utf-8"))
    module = importlib.import_module(module_name(path))
    return reach_ins(tree) + inherited_private_names(module, tree)


@pytest.mark.parametrize("path", modules(), ids=lambda p: str(p.relative_to(ROOT)))
def test_no_reach_into_private_names(path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert unexcepted(path, findings(path, monkeypatch)) == []


def test_every_exception_is_still_needed(monkeypatch: pytest.MonkeyPatch) -> None:
    used = set()
    for where in {where for where, _ in EXCEPTIONS}:
        found = findings(ROOT / where, monkeypatch)
        used |= {(where, f.partition(": ")[2]) for f in found}
    assert set(EXCEPTIONS) - used == set()


def test_tests_and_bench_are_scanned() -> None:
    scanned = {str(path.relative_to(ROOT)) for path in modules()}
    assert {
        "junebug_api/amqp/service.py",
        "tests/conftest.py",
        "tests/unit/helpers.py",
        "tests/test_state_caches.py",
        "bench/junebug_bench/main.py",
        "bench/soak.py",
    } <= scanned


def test_the_check_finds_what_it_looks_for() -> None:
    """Each kind of reach-in is found (so an empty result above means something)."""
    source = """
from twisted.web._newclient import ResponseFailed
from .config import _check_url
import twisted.web._newclient
pool._factory = Quiet
super()._pack_frame(frame)
getattr(request, "_disconnected")
self._mine = parts._replace(netloc="")
monkeypatch.setattr(pool, "_factory", Quiet)
mock.patch("twisted.web._newclient.ResponseFailed")
mock.patch.object(request, "_disconnected", True)
monkeypatch.setattr(pool, "maxPersistentPerHost", 1)
"""
    found = reach_ins(ast.parse(source))
    assert sorted(int(line.split(":")[0]) for line in found) == [2, 3, 4, 5, 6, 7, 9, 10, 11]


def test_a_subclass_using_its_library_base_class_private_names_is_found(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "subclassing.py").write_text(
        "from twisted.web.http import Request\n"
        "class Mine(Request):\n"
        "    def gone(self):\n"
        "        return self._disconnected\n",
        encoding="utf-8",
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    tree = ast.parse((tmp_path / "subclassing.py").read_text(encoding="utf-8"))
    found = inherited_private_names(importlib.import_module("subclassing"), tree)
    assert found == ["2: Mine._disconnected is twisted.web.http.Request's"]
