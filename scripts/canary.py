"""The canary (``scripts/test --newest``): would the newest releases break us?

Two throwaway virtualenvs, each with setup.cfg's requirements (install_requires,
the test and docs extras) and pyproject.toml's build requirements, fresh from
the registry, then the project on top (``--no-deps``):

- ``bounded``: the newest versions setup.cfg's bounds admit, which is what
  ``pip install .`` gives an operator today;
- ``newest``: the newest releases of everything, upper bounds ignored, which
  is what the next bound raise would give.

The unit tests (``-m "not e2e"``) run in each, and a short report says which
versions differ from requirements/lock.txt and which tests fail. Exit status:
1 when the bounded virtualenv fails to install or fails a test (an operator's
``pip install .`` is broken now), else 0: a failure beyond the bounds is news
for the next bound raise, not a broken install. Stdlib only; run with the
Python the project uses (``PYTHON``, default python3).
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from lockfile import canonical, declared, read

ROOT = Path(__file__).resolve().parent.parent
LOCK = ROOT / "requirements" / "lock.txt"
_NAME = re.compile(r"^\s*([A-Za-z0-9][A-Za-z0-9._-]*(?:\[[^\]]*\])?)\s*[^;]*(;.*)?$")
_IGNORED_PIP_WARNING = re.compile(r"^WARNING: Location '.*' is ignored")


def unbounded(requirement: str) -> str:
    """``requirement`` without its version specifiers (name, extras, marker)."""
    match = _NAME.match(requirement)
    if match is None:
        raise ValueError(f"cannot read the requirement {requirement!r}")
    return match.group(1) + (match.group(2) or "")


@dataclass
class Run:
    """One virtualenv's outcome."""

    name: str
    title: str
    installed: dict[str, str] = field(default_factory=dict)
    install_error: str = ""
    summary: str = ""
    failed: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.install_error and not self.failed and bool(self.summary)


def pip(venv: Path, *args: str) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(
        [str(venv / "bin" / "python"), "-m", "pip", "--disable-pip-version-check", *args],
        capture_output=True,
        text=True,
    )
    done.stderr = "\n".join(
        line for line in done.stderr.splitlines() if not _IGNORED_PIP_WARNING.match(line)
    )
    return done


def install(run: Run, venv: Path, requirements: list[str]) -> bool:
    """A fresh virtualenv with ``requirements`` and the project; False on failure."""
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    steps = [
        ["install", "--quiet", "--upgrade", *requirements],
        ["install", "--quiet", "--no-deps", "--no-build-isolation", "-e", str(ROOT)],
    ]
    for step in steps:
        done = pip(venv, *step)
        if done.returncode != 0:
            run.install_error = (done.stderr or done.stdout).strip()[-2000:]
            return False
    listed = pip(venv, "list", "--format=freeze", "--exclude-editable")
    for line in listed.stdout.splitlines():
        name, _, version = line.partition("==")
        run.installed[canonical(name)] = version
    conflicts = pip(venv, "check")
    if conflicts.returncode != 0:
        run.install_error = "pip check: " + conflicts.stdout.strip()
        return False
    return True


def unit_tests(run: Run, venv: Path, pytest_args: list[str]) -> None:
    """The unit tests in ``venv``; failures and pytest's closing line into ``run``."""
    report = venv / "junit.xml"
    done = subprocess.run(
        [
            str(venv / "bin" / "python"),
            "-m",
            "pytest",
            "-m",
            "not e2e",
            "-q",
            "--no-cov",
            f"--junitxml={report}",
            *pytest_args,
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env={**os.environ, "JUNEBUG_CANARY": "1"},
    )
    lines = [line for line in done.stdout.splitlines() if line.strip()]
    run.summary = lines[-1].strip("= ") if lines else f"pytest exited {done.returncode}"
    if report.exists():
        for case in ET.parse(report).getroot().iter("testcase"):
            if case.find("failure") is not None or case.find("error") is not None:
                run.failed.append(f"{case.get('classname')}::{case.get('name')}")
    if done.returncode not in (0, 1) and not run.failed:
        run.failed.append(f"pytest exited {done.returncode}: {run.summary}")


def differences(run: Run, locked: dict[str, str]) -> list[str]:
    """``name lock -> installed`` for each version that is not the locked one."""
    changed = []
    for name in sorted(set(locked) | set(run.installed)):
        if name == "pip":
            continue
        was, now = locked.get(name, "-"), run.installed.get(name, "-")
        if was != now:
            changed.append(f"{name} {was} -> {now}")
    return changed


def report(runs: list[Run], locked: dict[str, str]) -> str:
    out = []
    for run in runs:
        out.append(f"canary [{run.name}] {run.title}")
        if run.install_error:
            out.append("  install FAILED:")
            out += ["    " + line for line in run.install_error.splitlines()]
            continue
        changed = differences(run, locked)
        out.append(f"  differs from the lock ({len(changed)}):")
        out += ["    " + c for c in changed] or ["    nothing"]
        out.append(f"  unit tests: {run.summary}")
        out += ["    FAILED " + f for f in run.failed]
    if len(runs) == 2 and all(r.installed for r in runs):
        bounded, newest = runs
        held = [
            f"{n} {bounded.installed.get(n, '-')} -> {v}"
            for n, v in sorted(newest.installed.items())
            if bounded.installed.get(n) != v
        ]
        out.append(f"held back by setup.cfg's bounds ({len(held)}):")
        out += ["  " + h for h in held] or ["  nothing"]
    return "\n".join(out)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--keep", action="store_true", help="keep the virtualenvs")
    args, pytest_args = parser.parse_known_args()
    locked = {name: pin.version for name, pin in read(LOCK).items()}
    requirements = [r for group in declared(ROOT).values() for r in group]
    plans = [
        ("bounded", "newest versions within setup.cfg's bounds", requirements),
        (
            "newest",
            "newest releases, upper bounds ignored",
            [unbounded(r) for r in requirements],
        ),
    ]
    base = Path(tempfile.mkdtemp(prefix="junebug-canary-"))
    runs = []
    for name, title, reqs in plans:
        run = Run(name, title)
        runs.append(run)
        venv = base / name
        print(f"junebug-api: canary [{name}]: installing into {venv}", file=sys.stderr)
        if install(run, venv, reqs):
            print(f"junebug-api: canary [{name}]: unit tests", file=sys.stderr)
            unit_tests(run, venv, pytest_args)
    print(report(runs, locked))
    if args.keep:
        print(f"virtualenvs kept in {base}")
    else:
        shutil.rmtree(base, ignore_errors=True)
    return 0 if runs[0].ok else 1


if __name__ == "__main__":
    sys.exit(main())
