"""Reads requirements/lock.txt (written by scripts/lock); stdlib only, so it
runs in any virtualenv, before anything is installed.

``python scripts/lockfile.py extras LOCK`` prints the distributions installed
beside this interpreter that the lock does not name (pip itself and
junebug-api aside): scripts/_common.sh removes them, so that a virtualenv
holds exactly the lock. tests/unit/test_dependencies.py checks the lock
against setup.cfg with ``read``.
"""

from __future__ import annotations

import re
import sys
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


def extras(lock: Path) -> list[str]:
    """Installed distributions that the lock does not name."""
    installed = {canonical(d.metadata["Name"] or "") for d in metadata.distributions()}
    return sorted(installed - set(read(lock)) - NOT_LOCKED - {""})


if __name__ == "__main__":
    if len(sys.argv) != 3 or sys.argv[1] != "extras":
        sys.exit("usage: lockfile.py extras LOCK")
    print(" ".join(extras(Path(sys.argv[2]))))
