"""Reads requirements/lock.txt (written by scripts/lock); stdlib only, so it
runs in any virtualenv, before anything is installed.

``python scripts/lockfile.py extras LOCK`` prints the distributions installed
beside this interpreter that the lock does not name (pip itself and
junebug-api aside): scripts/_common.sh removes them, so that a virtualenv
holds exactly the lock; ``build-requires ROOT`` prints pyproject.toml's
build requirements, for scripts/lock. ``declared`` reads what the lock is made from
(setup.cfg, pyproject.toml): tests/unit/test_dependencies.py checks the lock
against it, scripts/canary.py installs it.
"""

from __future__ import annotations

import configparser
import re
import sys
import tomllib
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path

_PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s;\\]+)")
_HASH = re.compile(r"^\s+--hash=(\w+:\w+)")
_VIA = re.compile(r"^\s+#\s+(?:via\s+)?(\S.*?)\s*$")
NOT_LOCKED = frozenset({"pip", "junebug-api"})


@dataclass
class Pin:
    """One ``name==version`` entry: its hashes and what asked for it
    (uv's ``# via`` lines: ``junebug-api (setup.cfg)`` or another package)."""

    version: str
    hashes: list[str] = field(default_factory=list)
    via: list[str] = field(default_factory=list)


def canonical(name: str) -> str:
    """A distribution name as PEP 503 compares them."""
    return re.sub(r"[-_.]+", "-", name).lower()


def read(lock: Path) -> dict[str, Pin]:
    """``{canonical name: Pin}`` of every entry of the lock."""
    found: dict[str, Pin] = {}
    current: Pin | None = None
    for line in lock.read_text(encoding="utf-8").splitlines():
        pin, hashed, via = _PIN.match(line), _HASH.match(line), _VIA.match(line)
        if pin:
            current = found[canonical(pin.group(1))] = Pin(pin.group(2))
        elif current is not None and hashed:
            current.hashes.append(hashed.group(1))
        elif current is not None and via and via.group(1) != "via":
            current.via.append(via.group(1))
    return found


def declared(root: Path) -> dict[str, list[str]]:
    """The requirements the lock is made from, by group: setup.cfg's
    ``install_requires`` and each extra, and pyproject.toml's ``build-system``."""
    cfg = configparser.ConfigParser()
    cfg.read(root / "setup.cfg", encoding="utf-8")

    def lines(value: str) -> list[str]:
        stripped = (line.strip() for line in value.splitlines())
        return [line for line in stripped if line and not line.startswith("#")]

    found = {"install_requires": lines(cfg["options"]["install_requires"])}
    for extra, value in cfg["options.extras_require"].items():
        found[extra] = lines(value)
    with open(root / "pyproject.toml", "rb") as f:
        found["build-system"] = list(tomllib.load(f)["build-system"]["requires"])
    return found


def extras(lock: Path) -> list[str]:
    """Installed distributions that the lock does not name."""
    installed = {canonical(d.metadata["Name"] or "") for d in metadata.distributions()}
    return sorted(installed - set(read(lock)) - NOT_LOCKED - {""})


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "extras":
        print(" ".join(extras(Path(sys.argv[2]))))
    elif len(sys.argv) == 3 and sys.argv[1] == "build-requires":
        print("\n".join(declared(Path(sys.argv[2]))["build-system"]))
    else:
        sys.exit("usage: lockfile.py extras LOCK | build-requires PROJECT_ROOT")
