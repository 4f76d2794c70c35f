"""What setup.cfg's bounds stand for, and the lock that pins them.

The AMQP layer works with the installed Twisted, warning about nothing but
txAMQP's use of ``returnValue``: txAMQP 0.8.2 calls
``twisted.internet.defer.returnValue`` (deprecated since Twisted 24.7) while it
runs. A Twisted that drops it, or a new deprecation met on the way, fails these
tests before it fails a connection.

requirements/lock.txt agrees with setup.cfg and pyproject.toml: every declared
requirement is locked within its bounds, each bound stops at the locked
version's next major (next minor for 0.x), the lock holds nothing that nobody
asks for, every pin is hashed, and (outside the canary, ``scripts/test
--newest``, which installs other versions on purpose) the virtualenv holds
exactly the locked versions.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import warnings
from importlib import metadata
from pathlib import Path
from types import ModuleType

import pytest
from packaging.requirements import Requirement
from packaging.version import Version
from twisted.internet.task import Clock

from junebug_api.amqp.protocol import JunebugAMQPClient, JunebugDelegate, load_spec
from junebug_api.amqp.testing import RecordingConnectionEvents

RETURN_VALUE_DEPRECATION = "twisted.internet.defer.returnValue was deprecated"
AMQP_MODULES = [
    "junebug_api.amqp.protocol",
    "junebug_api.amqp.service",
    "junebug_api.amqp.connect",
    "txamqp.client",
    "txamqp.codec",
    "txamqp.connection",
    "txamqp.endpoint",
    "txamqp.protocol",
    "txamqp.spec",
]


def test_the_amqp_layer_imports_with_warnings_as_errors() -> None:
    """A fresh interpreter, so that every module is really imported."""
    imported = subprocess.run(
        [
            sys.executable,
            "-W",
            "error",
            "-W",
            f"ignore:{RETURN_VALUE_DEPRECATION}:DeprecationWarning",
            "-c",
            "import " + ", ".join(AMQP_MODULES),
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert imported.returncode == 0, imported.stderr


def test_txamqp_calls_returnValue_and_warns_of_nothing_else() -> None:
    client = JunebugAMQPClient(
        JunebugDelegate(), "/", load_spec(), clock=Clock(), events=RecordingConnectionEvents()
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        queue = client.queue("a-consumer-tag")  # an inlineCallbacks ending in returnValue
    results: list[object] = []
    queue.addBoth(results.append)
    assert results == [client.queues["a-consumer-tag"]]
    messages = [str(w.message) for w in caught]
    assert messages, "txAMQP no longer calls returnValue: the Twisted bound may go"
    assert all(m.startswith(RETURN_VALUE_DEPRECATION) for m in messages), messages


ROOT = Path(__file__).resolve().parents[2]
LOCK = ROOT / "requirements" / "lock.txt"
SETUP_CFG_ENTRY = "junebug-api (setup.cfg)"
# Capped below the next major, for a reason setup.cfg gives.
OWN_CAPS = {"twisted": "txAMQP's returnValue (Twisted issue 12396)"}


def load_lockfile() -> ModuleType:
    """scripts/lockfile.py, the lock's reader that scripts/_common.sh uses too."""
    spec = importlib.util.spec_from_file_location("lockfile", ROOT / "scripts" / "lockfile.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault(spec.name, module)  # its dataclass looks itself up there
    spec.loader.exec_module(module)
    return module


lockfile = load_lockfile()


def declared() -> dict[str, list[Requirement]]:
    """setup.cfg's install_requires and extras, and the build's requires."""
    return {g: [Requirement(r) for r in rs] for g, rs in lockfile.declared(ROOT).items()}


def all_declared() -> list[Requirement]:
    return [r for group in declared().values() for r in group]


def next_major(version: Version) -> Version:
    """The first release that may break: the next major, or for 0.x the next minor."""
    if version.major == 0:
        return Version(f"0.{version.minor + 1}")
    return Version(f"{version.major + 1}")


def test_every_declared_requirement_is_locked_within_its_bounds() -> None:
    pins = lockfile.read(LOCK)
    for requirement in all_declared():
        name = lockfile.canonical(requirement.name)
        assert name in pins, f"{requirement} is not in the lock: run scripts/lock"
        assert requirement.specifier.contains(pins[name].version, prereleases=True), (
            f"the lock has {name}=={pins[name].version}, outside {requirement}: run scripts/lock"
        )


def test_each_bound_stops_at_the_locked_versions_next_major() -> None:
    """So that `pip install .` takes what was tested, up to the next release
    that may break it (for a 0.x package, SemVer lets the next minor break)."""
    pins = lockfile.read(LOCK)
    for requirement in all_declared():
        name = lockfile.canonical(requirement.name)
        locked = Version(pins[name].version)
        uppers = [Version(s.version) for s in requirement.specifier if s.operator in ("<", "==")]
        assert uppers, f"{requirement} has no upper bound"
        if name in OWN_CAPS or any(s.operator == "==" for s in requirement.specifier):
            continue
        assert min(uppers) == next_major(locked), (
            f"{requirement}: the lock has {locked}, so the bound is < {next_major(locked)}"
        )


def test_the_lock_holds_only_what_is_asked_for() -> None:
    """An entry is there for setup.cfg, for the build, or for another entry."""
    pins = lockfile.read(LOCK)
    canonical = lockfile.canonical
    by_group = {g: {canonical(r.name) for r in rs} for g, rs in declared().items()}
    for_setup_cfg = {name for name, pin in pins.items() if SETUP_CFG_ENTRY in pin.via}
    assert for_setup_cfg == set().union(
        *(names for g, names in by_group.items() if g != "build-system")
    )
    unannotated = {name for name, pin in pins.items() if not pin.via}
    assert unannotated == by_group["build-system"]
    for name, pin in pins.items():
        for asker in pin.via:
            assert asker == SETUP_CFG_ENTRY or asker in pins, f"{name} is there for {asker}"


def test_every_pin_is_hashed() -> None:
    pins = lockfile.read(LOCK)
    assert len(pins) > 50
    for name, pin in pins.items():
        assert pin.hashes and all(h.startswith("sha256:") for h in pin.hashes), name


@pytest.mark.skipif(
    bool(os.environ.get("JUNEBUG_CANARY")), reason="the canary installs other versions"
)
def test_the_virtualenv_holds_the_locked_versions() -> None:
    """scripts/test reinstalls when the lock changes: what runs is what is locked."""
    for name, pin in lockfile.read(LOCK).items():
        assert metadata.version(name) == pin.version, name
