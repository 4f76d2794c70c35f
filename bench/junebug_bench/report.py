"""The report: the table (or the scaling table), the lines under it and the notes."""

from __future__ import annotations

import importlib.metadata
import os
import platform
from dataclasses import dataclass
from pathlib import Path

from .plan import Plan
from .results import Row, SetupResult, Tally
from .settings import OTHER_CORE, SERVICE_CORE


def fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def render(rows: list[Row], extra: list[str]) -> str:
    header = [
        "row",
        "rate",
        "unit",
        "p50 ms",
        "p90 ms",
        "p99 ms",
        "CPU ms/op",
        "peak RSS MiB",
        "of ceiling",
        "status",
    ]
    body = [
        [
            r.name,
            fmt(r.rate, ",.0f"),
            r.unit,
            fmt(r.p50, ".2f"),
            fmt(r.p90, ".2f"),
            fmt(r.p99, ".2f"),
            fmt(r.cpu_ms, ".3f"),
            fmt(r.peak_mb, ".1f"),
            fmt(r.ceiling, ".0%"),
            r.status,
        ]
        for r in rows
    ]
    widths = [max(len(line[i]) for line in [header, *body]) for i in range(len(header))]
    left = {0, 2, 9}

    def line(cells: list[str]) -> str:
        return "  ".join(
            c.ljust(w) if i in left else c.rjust(w)
            for i, (c, w) in enumerate(zip(cells, widths, strict=True))
        ).rstrip()

    out = [line(header), line(["-" * w for w in widths])]
    out += [line(cells) for cells in body]
    return "\n".join([*out, *extra])


def paired_rows(base: SetupResult, other: SetupResult) -> list[tuple[Row, Row]]:
    """Each row of other beside base's row of the same measure, where both have a rate."""
    by_measure = {row.measure: row for row in base.rows if row.measure}
    pairs = []
    for row in other.rows:
        twin = by_measure.get(row.measure) if row.measure else None
        if twin is not None and twin.rate and row.rate:
            pairs.append((twin, row))
    return pairs


def cache_ratios(results: list[SetupResult]) -> list[str]:
    """Redis rate / memory rate for each row both configurations have."""
    by_cache = {r.setup.cache: r for r in results}
    if not {"memory", "redis"} <= by_cache.keys():
        return []
    lines = ["Redis / memory (same run, one process; the issue's target: 0.90 or more):"]
    for base, row in paired_rows(by_cache["memory"], by_cache["redis"]):
        if row.unit == "ses/s":
            continue
        assert base.rate and row.rate
        lines.append(
            f"  {base.name}: {row.rate:,.0f} / {base.rate:,.0f} = {row.rate / base.rate:.2f}"
        )
    return lines


def render_scaling(results: list[SetupResult], connections: int) -> str:
    header = [
        "configuration",
        f"outbound req/s @{connections}",
        "p99 ms",
        "out CPU ms/req",
        "inbound msg/s",
        "in CPU ms/msg",
        "checks",
    ]
    body = []
    for r in results:
        out_rows = r.outbound.get(r.setup.processes) or [None]
        out = out_rows[-1]
        status = {row.status for row in r.rows} or {"not run"}
        body.append(
            [
                r.setup.label,
                fmt(out.rate if out else None, ",.0f"),
                fmt(out.p99 if out else None, ".1f"),
                fmt(out.cpu_ms if out else None, ".3f"),
                fmt(r.inbound.rate if r.inbound else None, ",.0f"),
                fmt(r.inbound.cpu_ms if r.inbound else None, ".3f"),
                " + ".join(sorted(status)),
            ]
        )
    widths = [max(len(line[i]) for line in [header, *body]) for i in range(len(header))]

    def line(cells: list[str]) -> str:
        return "  ".join(
            c.ljust(w) if i in (0, 6) else c.rjust(w)
            for i, (c, w) in enumerate(zip(cells, widths, strict=True))
        ).rstrip()

    return "\n".join([line(header), line(["-" * w for w in widths]), *map(line, body)])


def metrics_pairs(results: list[SetupResult]) -> list[tuple[SetupResult, SetupResult]]:
    """Each metrics-off configuration beside the one it repeats (--compare-metrics),
    as the plan pairs them."""
    by_key = {r.setup.key: r for r in results}
    return [
        (by_key[off.setup.metrics_off_of], off)
        for off in results
        if off.setup.metrics_off_of is not None and off.setup.metrics_off_of in by_key
    ]


def metrics_cost(results: list[SetupResult]) -> list[str]:
    """How much slower each phase ran with metrics on than off (--compare-metrics)."""
    return on_off_cost("metrics", metrics_pairs(results))


def channel_api_pairs(results: list[SetupResult]) -> list[tuple[SetupResult, SetupResult]]:
    """Each channel_api configuration (on) beside the one it repeats (off), as
    --compare-channel-api pairs them."""
    by_key = {r.setup.key: r for r in results}
    return [
        (on, by_key[on.setup.channel_api_of])
        for on in results
        if on.setup.channel_api_of is not None and on.setup.channel_api_of in by_key
    ]


def channel_api_cost(results: list[SetupResult]) -> list[str]:
    """How much slower each phase ran with channel_api on than off (--compare-channel-api)."""
    return on_off_cost("channel_api", channel_api_pairs(results))


def on_off_cost(what: str, pairs: list[tuple[SetupResult, SetupResult]]) -> list[str]:
    """Each phase's rate (and CPU per operation) with ``what`` on vs off."""
    lines = []
    for on_result, off_result in pairs:
        for on, off in paired_rows(on_result, off_result):
            assert on.rate and off.rate
            rate = (on.rate - off.rate) / off.rate * 100
            cpu = ""
            if on.cpu_ms and off.cpu_ms:
                cpu = (
                    f"; CPU {on.cpu_ms:.3f} vs {off.cpu_ms:.3f} ms/{on.unit.split('/')[0]}"
                    f" ({(on.cpu_ms - off.cpu_ms) / off.cpu_ms * 100:+.1f}%)"
                )
            lines.append(
                f"{what} on vs off, {on.name}: {on.rate:,.0f} vs {off.rate:,.0f} {on.unit}"
                f" ({rate:+.1f}%){cpu}"
            )
    return lines


def machine_line() -> str:
    model = "unknown CPU"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            model = line.split(":", 1)[1].strip()
            break
    twisted_version = importlib.metadata.version("twisted")
    return (
        f"machine: nproc {os.cpu_count()}, {model}; Python {platform.python_version()},"
        f" Twisted {twisted_version}; load average at start {os.getloadavg()[0]:.2f}"
    )


def channel_lines(one: dict[str, float], many: dict[str, float], n_channels: int) -> list[str]:
    """--compare-channels: start-up, idle RSS per channel, and the busy channel's
    rates beside n_channels - 1 idle ones as a share of its rates alone."""
    per_idle = (many["rss_kb"] - one["rss_kb"]) * 1024 / max(1, n_channels - 1)
    lines = [
        f"channels: start-up (launch to healthy) {one['startup']:.2f} s with 1 channel,"
        f" {many['startup']:.2f} s with {n_channels}",
        f"channels: idle VmRSS {one['rss_kb'] / 1024:.1f} MiB with 1 channel,"
        f" {many['rss_kb'] / 1024:.1f} MiB with {n_channels}: {per_idle:,.0f} bytes per idle"
        " channel",
    ]
    for kind in ("outbound", "inbound"):
        ratio = many[kind] / one[kind] if one[kind] else 0.0
        verdict = "at least 90%: yes" if ratio >= 0.9 else "at least 90%: NO"
        lines.append(
            f"channels: busy channel {kind} {many[kind]:,.0f} with {n_channels} channels vs"
            f" {one[kind]:,.0f} alone: {ratio:.0%} of the one-channel rate ({verdict})"
        )
    return lines


def pinning_lines(plan: Plan, redis: bool) -> list[str]:
    """Which core ran what, and how outbound requests reached the service."""
    processes = max(s.processes for s in plan.setups)
    balanced = any(s.balancer for s in plan.setups)
    shared = f"{processes} process(es) share that one core" if processes > 1 else "one process"
    where = (
        "service process i on core (i-1) % 2 (--spread)"
        if plan.spread
        else f"every service process on core {SERVICE_CORE} (taskset -c {SERVICE_CORE}; {shared})"
    )
    lines = [
        f"pinning: {where}; RabbitMQ node, nginx sink"
        + (", nginx balancer" if balanced else "")
        + f" and wrk on core {OTHER_CORE}"
        + ("; the shared Redis is not pinned" if redis else "")
    ]
    if balanced:
        lines.append(
            "outbound through the nginx balancer (one worker, upstream keepalive 64)"
            " in front of every process count measured"
        )
    if plan.event_url:
        lines.append(
            "outbound requests carry an event_url, so each writes event info to the state cache"
        )
    return lines


@dataclass
class RunFacts:
    """What the report says about the run as a whole."""

    machine: str  # machine_line() at the start
    other_load: str  # accounting.other_load() at the end
    seconds: float  # the run's length so far
    redis: bool  # whether the shared Redis was used


def report(plan: Plan, tally: Tally, facts: RunFacts) -> str:
    """The table and every line under it, as printed and written to last-results.txt."""
    extra = [*tally.extra, *pinning_lines(plan, facts.redis), facts.machine, facts.other_load]
    notes = [f"  {r.name}: {note}" for r in tally.rows for note in r.notes]
    extra += ["notes:", *notes]
    extra.append(
        "of ceiling: rate / bare twisted.web at the same connections (inbound,"
        " events: / bare @64); rates of inbound/events count from the first service"
        " process's start; CPU ms/op is summed over the service processes; peak RSS"
        " is the largest VmHWM of them"
    )
    extra.append(f"total run time: {facts.seconds:.0f} s")
    if plan.compare_scaling:
        return render_scaling(tally.results, plan.connections[0]) + "\n" + "\n".join(extra)
    return render(tally.rows, extra)


def publish(table: str, path: Path) -> None:
    """Print the table and write it to path (bench/last-results.txt)."""
    print("\n" + table, flush=True)
    path.write_text(table + "\n")
