"""Accounting: CPU and memory of processes (from /proc), busy share of each
core, and the checks that turn counts into a row's figures and status."""

from __future__ import annotations

import collections
import os
import re
import resource
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .console import BenchError, shout
from .load import WrkResult
from .results import Row
from .settings import CLK_TCK


def cpu_ticks(pid: int) -> int:
    """utime + stime of a process, in clock ticks (0 once it is gone)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return 0
    fields = stat.rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])


def status_kb(pid: int, key: str) -> int:
    """A ``kB`` line of /proc/<pid>/status (VmRSS, VmHWM)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise BenchError(f"no {key} in /proc/{pid}/status")


def reset_peak_rss(pid: int) -> None:
    Path(f"/proc/{pid}/clear_refs").write_text("5")


def core_times() -> dict[str, tuple[int, int]]:
    """(busy, total) jiffies of each core."""
    times = {}
    for line in Path("/proc/stat").read_text().splitlines():
        name, *values = line.split()
        if re.fullmatch(r"cpu\d+", name):
            numbers = [int(v) for v in values[:8]]
            total = sum(numbers)
            times[name] = (total - numbers[3] - numbers[4], total)
    return times


def children_of(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(entry.name))
    return found


def all_cpu_ticks() -> dict[int, tuple[int, str]]:
    """Every process's CPU ticks and a short description of it."""
    result = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            ticks = cpu_ticks(int(entry.name))
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        result[int(entry.name)] = (ticks, cmdline.strip()[:90])
    return result


@dataclass
class Usage:
    """CPU seconds of named processes, of wrk and busy share of each core."""

    seconds: float
    cpu: dict[str, float]
    cores: dict[str, float]

    @property
    def others(self) -> float:
        """CPU seconds the cores were busy with anything not named here."""
        busy = sum(self.cores.values()) * self.seconds
        return max(0.0, busy - sum(self.cpu.values()))

    def describe(self) -> str:
        cores = ", ".join(f"{name} {busy:.0%}" for name, busy in sorted(self.cores.items()))
        named = [*self.cpu.items(), ("anything else", self.others)]
        procs = ", ".join(f"{name} {value / self.seconds:.0%}" for name, value in named if value)
        return f"cores busy: {cores}; of one core: {procs}"


class Meter:
    """Measures CPU use between its creation and :meth:`stop`."""

    def __init__(self, pids: dict[str, int | None]) -> None:
        self.pids = {name: pid for name, pid in pids.items() if pid}
        self.started = time.monotonic()
        self.ticks = {name: cpu_ticks(pid) for name, pid in self.pids.items()}
        self.cores = core_times()
        self.children = self._rusage(resource.RUSAGE_CHILDREN)
        self.own = self._rusage(resource.RUSAGE_SELF)

    def add(self, name: str, pid: int) -> None:
        """A process started after the meter: all its CPU counts."""
        self.pids[name] = pid
        self.ticks[name] = 0

    @staticmethod
    def _rusage(who: int) -> float:
        usage = resource.getrusage(who)
        return usage.ru_utime + usage.ru_stime

    def stop(self) -> Usage:
        seconds = time.monotonic() - self.started
        cpu = {
            name: (cpu_ticks(pid) - self.ticks[name]) / CLK_TCK for name, pid in self.pids.items()
        }
        cpu["wrk"] = self._rusage(resource.RUSAGE_CHILDREN) - self.children
        cpu["benchmark.py"] = self._rusage(resource.RUSAGE_SELF) - self.own
        cores = {}
        for name, (busy, total) in core_times().items():
            busy0, total0 = self.cores.get(name, (busy, total))
            cores[name] = (busy - busy0) / max(1, total - total0)
        return Usage(seconds, cpu, cores)


def other_load(before: dict[int, tuple[int, str]], ours: set[int], seconds: float) -> str:
    after = all_cpu_ticks()
    used = []
    for pid, (ticks, cmd) in after.items():
        if pid in ours or pid == os.getpid():
            continue
        delta = (ticks - before.get(pid, (0, ""))[0]) / CLK_TCK
        if delta >= 1:
            used.append((delta, pid, cmd))
    used.sort(reverse=True)
    if not used:
        return "other processes alive at the end: none used a second of CPU during the run"
    top = "; ".join(f"pid {pid} {delta:.0f} s ({cmd[:60]})" for delta, pid, cmd in used[:3])
    return f"CPU of other processes alive at the end, during the {seconds:.0f} s run: {top}"


def http_row(name: str, wrk: WrkResult, cpu_seconds: float, peak_kb: int, measure: str = "") -> Row:
    row = Row(name, "req/s", wrk.rate, wrk.p50, wrk.p90, wrk.p99, measure=measure)
    row.cpu_ms = cpu_seconds * 1000 / max(1, wrk.requests)
    row.peak_mb = peak_kb / 1024
    row.status = "ok"
    if wrk.non201 or wrk.socket_errors:
        row.status = "not 201"
        row.notes.append(
            f"{wrk.non201} answer(s) not 201 (last {wrk.last_non201}),"
            f" {wrk.socket_errors} socket error(s)"
        )
        shout(f"{name}: {wrk.non201} answer(s) not 201, {wrk.socket_errors} socket error(s)")
    return row


def outbound_count(
    queue: str, queued: int, created: int, connections: int, socket_errors: int
) -> tuple[str, str]:
    """Messages on the outbound queue against the answers 201 wrk counted: a
    status (ok, in flight, lost, count mismatch) and the note saying so.

    wrk counts a request only once its answer arrived; when the time is up
    each connection has one request in flight, which the service may still
    publish (the client is gone, but the message was sent to the broker): up
    to one extra message per connection is not a failure.
    """
    extra = queued - created
    if extra == 0:
        return "ok", f"{queued} on {queue} = {created} answers 201"
    if 0 < extra <= connections + socket_errors:
        return "in flight", (
            f"{queued} on {queue} = {created} answers 201 + {extra} request(s) in"
            f" flight when wrk stopped (at most one per connection: {connections}); not equal"
        )
    return "lost" if extra < 0 else "count mismatch", (
        f"{queued} on {queue} but {created} answers 201"
    )


@dataclass
class Deliveries:
    """What the sink received for a drain: each expected id once, unchanged?"""

    bodies: int
    distinct: int
    duplicates: int
    missing: int
    malformed: int  # not JSON, an unknown id, or not the expected body


def count_deliveries(
    bodies: list[Any], ids: list[str], expected: Callable[[str], dict]
) -> Deliveries:
    """Count the decoded bodies (None: not JSON) against the ids pre-loaded."""
    seen: collections.Counter[str] = collections.Counter()
    malformed = 0
    wanted = set(ids)
    for body in bodies:
        try:
            message_id = body["message_id"]
        except (TypeError, KeyError):
            malformed += 1
            continue
        if message_id not in wanted or body != expected(message_id):
            malformed += 1
            continue
        seen[message_id] += 1
    duplicates = sum(c - 1 for c in seen.values() if c > 1)
    return Deliveries(len(bodies), len(seen), duplicates, len(ids) - len(seen), malformed)


def drain_status(deliveries: Deliveries, left: int, failed: int) -> str:
    """A drain row's status: ok, or what went wrong (lost, duplicates, count mismatch)."""
    status = []
    if deliveries.missing:
        status.append("lost")
    if deliveries.duplicates:
        status.append("duplicates")
    if deliveries.malformed or left or failed:
        status.append("count mismatch")
    return " + ".join(status) or "ok"
