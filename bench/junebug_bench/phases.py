"""The phases: the bare server as the HTTP ceiling, outbound under wrk, the
inbound and event drains, the session round trip, and the runs that compare
configurations (several setups, many channels in one process)."""

from __future__ import annotations

import contextlib
import sys
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import roundtrip

from junebug_api.formats.queue_names import failed_queue

from .accounting import (
    Meter,
    count_deliveries,
    drain_status,
    http_row,
    outbound_count,
    reset_peak_rss,
    status_kb,
)
from .console import BenchError, say, shout
from .host import free_port, tail
from .load import preload, run_wrk
from .messages import event_body, event_expected, inbound_body, inbound_expected
from .nginx import Balancer, LineCounter, Nginx, decode_body
from .plan import Plan, Setup
from .rabbitmq import Broker, RabbitNode
from .redis_keys import RedisKeys
from .report import channel_lines, fmt
from .results import Row, SetupResult
from .services import Process, ServiceGroup, checkout, service_group
from .settings import (
    BARE_SERVER,
    BASE_PATH,
    BENCH,
    CLK_TCK,
    HOST,
    OTHER_CORE,
    QUEUES,
    REDIS_CLASS,
    SERVICE_CORE,
)


@dataclass
class Context:
    """What every configuration shares: the plan, the nodes, the accounting."""

    tmp: Path
    stack: contextlib.ExitStack  # what to stop at the end
    plan: Plan
    rabbit: RabbitNode
    nginx: Nginx
    broker: Broker
    meter_pids: dict[str, int | None]  # RabbitMQ, nginx, Redis: metered in every phase
    ours: set[int]  # every process the run started (the rest is "other load")
    redis: RedisKeys | None
    script: Path  # wrk's Lua script (post.lua, or with an event_url)
    ceilings: dict[int, float] = field(default_factory=dict)  # bare req/s by connections


def bare_phase(tmp: Path, connections: list[int], duration: int, warmup: int) -> list[Row]:
    port = free_port()
    bare = Process(
        "bare twisted.web",
        [sys.executable, str(BARE_SERVER), str(port)],
        port,
        "/",
        tmp / "bare.out",
    )
    rows = []
    try:
        bare.start().wait_healthy(30)
        url = f"http://{HOST}:{port}/channels/bench/messages"
        run_wrk(url, 16, warmup)
        for c in connections:
            name = f"bare twisted.web @{c}"
            say(f"{name}: wrk {duration} s")
            reset_peak_rss(bare.pid)
            meter = Meter({"bare": bare.pid})
            wrk = run_wrk(url, c, duration)
            usage = meter.stop()
            row = http_row(name, wrk, usage.cpu["bare"], status_kb(bare.pid, "VmHWM"))
            row.notes.append(usage.describe())
            say(f"{name}: {wrk.rate:,.0f} req/s, p99 {wrk.p99:.2f} ms; {usage.describe()}")
            rows.append(row)
    finally:
        bare.stop()
    return rows


def outbound_phase(
    group: ServiceGroup,
    url: str,
    tag: str,
    broker: Broker,
    meter_pids: dict[str, int | None],
    connections: list[int],
    duration: int,
    warmup: int,
    ceilings: dict[int, float],
    script: Path,
) -> list[Row]:
    """wrk against url (a service process, or the balancer in front of group)."""
    queue = QUEUES.outbound
    run_wrk(url, 16, warmup, script)
    broker.settled_count(queue)
    rows = []
    for c in connections:
        name = f"outbound @{c}{tag}"
        measure = f"outbound @{c} by {len(group)} process(es)"
        broker.purge(queue)
        say(f"{name}: wrk {duration} s against {url}")
        group.reset_peak_rss()
        meter = Meter({**group.names(), **meter_pids})
        wrk = run_wrk(url, c, duration, script)
        usage = meter.stop()
        peak = group.peak_kb()
        service_cpu = sum(usage.cpu[key] for key in group.names())
        row = http_row(name, wrk, service_cpu, peak, measure)
        row.cpu_ms = service_cpu * 1000 / max(1, wrk.created)
        row.ceiling = wrk.rate / ceilings[c] if ceilings.get(c) else None
        queued = broker.settled_count(queue)
        check, note = outbound_count(queue, queued, wrk.created, c, wrk.socket_errors)
        row.notes.append(note)
        if check == "in flight":
            extra = queued - wrk.created
            say(
                f"!!! {name}: NOT EQUAL: {queued} messages on {queue}, {wrk.created} answers"
                f" 201; the {extra} extra are requests in flight when wrk stopped (wrk does not"
                f" count them; at most one per connection, {c})"
            )
        elif check != "ok":
            row.status = check
            shout(f"{name}: COUNT MISMATCH: {queued} messages on {queue}, {wrk.created} x 201")
        row.notes.append(usage.describe())
        say(
            f"{name}: {wrk.rate:,.0f} req/s, p50 {wrk.p50:.2f} p99 {wrk.p99:.2f} ms,"
            f" {row.cpu_ms:.3f} CPU ms/req, {queued} queued for {wrk.created} x 201;"
            f" {usage.describe()}"
        )
        rows.append(row)
    broker.purge(queue)
    return rows


@dataclass
class DrainResult:
    row: Row
    rss_after_kb: int


@dataclass
class DrainProgress:
    """How far a drain got, and when the first body arrived (for the steady rate)."""

    count: int = 0
    first_at: float | None = None
    first_count: int = 0
    first_ticks: int = 0


def drain_phase(
    phase: str,
    tag: str,
    kind: str,
    n: int,
    make_body: Callable[[str], bytes],
    expected: Callable[[str], dict],
    group: ServiceGroup,
    broker: Broker,
    nginx: Nginx,
    meter_pids: dict[str, int | None],
) -> DrainResult:
    """Pre-load n messages on <connector>.<kind>, start the service processes,
    time how long until nginx saw n bodies, then check each arrived exactly
    once, unchanged. The row is named phase + tag (the configuration's marks)."""
    name = phase + tag
    queue = QUEUES.by_role()[kind]
    ids = [uuid.uuid4().hex for _ in range(n)]
    preload_queue(name, queue, ids, make_body, broker)
    log_offsets = group.log_offsets()
    bodies_offset = nginx.size()
    counter = LineCounter(nginx.bodies, bodies_offset)
    row = Row(name, "msg/s", measure=phase)
    meter = Meter(meter_pids)
    group.start()
    for key, pid in group.names().items():
        meter.add(key, pid)
    progress = wait_for_bodies(name, n, counter, group)
    done_at = time.monotonic()
    done_ticks = group.cpu_ticks()
    usage = meter.stop()
    time.sleep(2)  # anything still coming (a duplicate, a late retry) arrives now
    rss_after = group.rss_kb()
    row.peak_mb = group.peak_kb() / 1024
    elapsed = done_at - group.launched_at
    count, first_at = progress.count, progress.first_at
    row.rate = min(count, n) / elapsed
    if first_at is not None and done_at > first_at and count > progress.first_count:
        steady = (count - progress.first_count) / (done_at - first_at)
        row.cpu_ms = (
            (done_ticks - progress.first_ticks) / CLK_TCK * 1000 / (count - progress.first_count)
        )
        row.notes.append(
            f"first body {first_at - group.launched_at:.2f} s after the first service process"
            f" started; {steady:,.0f} msg/s from then on (CPU ms/op, summed over"
            f" {len(group)} process(es), measured over that window)"
        )
    row.notes.append(usage.describe())
    group.stop()
    check_drain(row, queue, ids, expected, nginx.read_lines(bodies_offset), broker)
    problems = group.log_problems(log_offsets)
    row.notes[0] += f"; {len(problems)} error line(s) in the service log"
    if row.status != "ok":
        shout(f"{name}: {row.notes[0]}")
    for line in problems[:5]:
        say(f"{name}: service log: {line[:200]}")
    say(
        f"{name}: {row.rate:,.0f} msg/s from start, {fmt(row.cpu_ms, '.3f')} CPU ms/msg,"
        f" peak RSS {row.peak_mb:.1f} MiB; {row.notes[0]}"
    )
    return DrainResult(row, rss_after)


def preload_queue(
    name: str, queue: str, ids: list[str], make_body: Callable[[str], bytes], broker: Broker
) -> None:
    """One message per id on queue, confirmed by the broker, before the service starts."""
    n = len(ids)
    say(f"{name}: pre-loading {n:,} messages on {queue}")
    seconds = preload(broker, queue, (make_body(i) for i in ids), n, timeout=max(120, n / 200))
    queued = broker.count(queue)
    say(f"{name}: pre-loaded in {seconds:.1f} s ({n / seconds:,.0f} msg/s); {queued:,} on {queue}")
    if queued != n:
        raise BenchError(f"{queue} holds {queued} messages after pre-loading {n}")


def wait_for_bodies(
    name: str, n: int, counter: LineCounter, group: ServiceGroup, stall_limit: float = 60.0
) -> DrainProgress:
    """Until the sink saw n bodies, or none came for stall_limit seconds."""
    progress = DrainProgress()
    last_progress = last_report = time.monotonic()
    while True:
        count = counter.update()
        now = time.monotonic()
        gone = group.exited()
        if gone is not None:
            raise BenchError(f"{gone.name} exited during {name}:\n{tail(gone.out)}")
        if count and progress.first_at is None:
            progress.first_at, progress.first_count = now, count
            progress.first_ticks = group.cpu_ticks()
        if count != progress.count:
            progress.count, last_progress = count, now
        if count >= n:
            return progress
        if now - last_progress > stall_limit:
            shout(f"{name}: no progress for {stall_limit:g} s at {count:,} of {n:,}; giving up")
            return progress
        if now - last_report >= 5:
            last_report = now
            say(f"{name}: {count:,} of {n:,} delivered")
        time.sleep(0.05)


def check_drain(
    row: Row,
    queue: str,
    ids: list[str],
    expected: Callable[[str], dict],
    lines: list[bytes],
    broker: Broker,
) -> None:
    """Each id delivered exactly once as expected, none left or dead-lettered:
    the row's status and its first note."""
    left = broker.count(queue)
    failed = broker.count(failed_queue(queue))
    got = count_deliveries([decoded(line) for line in lines], ids, expected)
    row.status = drain_status(got, left, failed)
    row.notes.insert(
        0,
        f"{got.bodies:,} bodies: {got.distinct:,} distinct expected ids,"
        f" {got.duplicates} duplicate(s), {got.missing} missing, {got.malformed}"
        f" unexpected/malformed; {left} left on {queue}, {failed} on {failed_queue(queue)}",
    )


def decoded(line: bytes) -> Any:
    """A bodies.log line's JSON body, or None when it is not JSON."""
    try:
        return decode_body(line)
    except ValueError:
        return None


def run_setup(ctx: Context, setup: Setup) -> SetupResult:
    """Every chosen phase for one configuration of the service: outbound,
    the idle RSS, the drains, the round trip."""
    result = SetupResult(setup)
    options = service_options(ctx, setup)
    code = checkout(ctx.tmp, setup.code) if setup.code else None
    group = service_group(
        ctx.tmp,
        setup.key,
        setup.processes,
        ctx.rabbit,
        ctx.nginx,
        ctx.plan.concurrency,
        options,
        tls=setup.tls,
        code=code,
        spread=ctx.plan.spread,
    )
    ctx.stack.callback(group.stop)
    say(
        f"=== {setup.processes} service process(es), {setup.cache} state cache, all on core"
        f" {SERVICE_CORE} (taskset -c {SERVICE_CORE})"
        + (", outbound through the nginx balancer" if setup.balancer else "")
    )
    redis = ctx.redis if setup.cache == "redis" else None
    if "outbound" in ctx.plan.phases:
        setup_outbound(ctx, setup, group, result, redis)
    baseline_kb = idle_rss_kb(ctx, group) if "inbound" in ctx.plan.phases else 0
    for drain in DRAINS:
        if drain.phase in ctx.plan.phases:
            setup_drain(ctx, setup, group, drain, result, baseline_kb, redis)
    if "roundtrip" in ctx.plan.phases:
        result.rows += roundtrip_rows(ctx, setup, options, code)
    if redis is not None:
        redis.cleanup()
    return result


def service_options(ctx: Context, setup: Setup) -> dict[str, Any] | None:
    """The config options a setup adds: the Redis state cache, metrics off."""
    options = None
    if setup.cache == "redis":
        assert ctx.redis is not None
        options = {
            "state_cache_class": REDIS_CLASS,
            "state_cache_config": {"url": ctx.redis.url, "key_prefix": ctx.redis.prefix},
        }
    if not setup.metrics:
        options = {**(options or {}), "metrics_enabled": False}
    return options


def setup_outbound(
    ctx: Context,
    setup: Setup,
    group: ServiceGroup,
    result: SetupResult,
    redis: RedisKeys | None,
) -> None:
    """Outbound at every connection count; with the balancer and N processes,
    one process through it first (so both figures pay for the balancer)."""
    groups = [group]
    if setup.balancer and setup.processes > 1 and ctx.plan.single_via_balancer:
        groups.insert(0, group.subset(1))
    for g in groups:
        rows = outbound_through(ctx, setup, g)
        result.outbound[len(g)] = rows
        result.rows += rows
    if redis is not None:
        events = redis.count("event-info:")
        result.rows[-1].notes.append(f"Redis: {events:,} event-info keys under the prefix")


def outbound_through(ctx: Context, setup: Setup, group: ServiceGroup) -> list[Row]:
    """Start group, put the balancer in front if the setup has one, run wrk, stop."""
    group.start()
    took = group.wait_healthy()
    ctx.ours.update(group.pids)
    say(
        f"{len(group)} service process(es) healthy after {took:.1f} s"
        f" (worker_concurrency {ctx.plan.concurrency} each)"
    )
    balancer = None
    meter_pids = dict(ctx.meter_pids)
    url = f"http://{HOST}:{group.ports[0]}{BASE_PATH}/messages"
    try:
        if setup.balancer:
            balancer = Balancer(ctx.tmp, f"{setup.key}-{len(group)}", group.ports).start()
            ctx.ours.update(p for p in (balancer.worker, balancer.process.pid) if p)
            meter_pids["balancer"] = balancer.worker
            url = balancer.url(f"{BASE_PATH}/messages")
        offsets = group.log_offsets()
        rows = outbound_phase(
            group,
            url,
            setup.tag(len(group), outbound=True),
            ctx.broker,
            meter_pids,
            ctx.plan.connections,
            ctx.plan.duration,
            ctx.plan.warmup,
            ctx.ceilings,
            ctx.script,
        )
        for line in group.log_problems(offsets)[:5]:
            say(f"outbound: service log: {line[:200]}")
    finally:
        if balancer is not None:
            balancer.stop()
        group.stop()
    return rows


def idle_rss_kb(ctx: Context, group: ServiceGroup) -> int:
    """VmRSS of fresh service processes with empty queues: the drains' baseline."""
    group.start()
    group.wait_healthy()
    ctx.ours.update(group.pids)
    time.sleep(1)
    baseline_kb = group.rss_kb()
    say(f"fresh service process(es) with empty queues: VmRSS {baseline_kb / 1024:.1f} MiB")
    group.stop()
    return baseline_kb


@dataclass(frozen=True)
class Drain:
    """A queue the service drains to the sink: inbound messages or events."""

    phase: str  # in --phases and the row's name
    kind: str  # the queue: <connector>.<kind>
    count: Callable[[Plan], int]
    make_body: Callable[[str], bytes]
    expected: Callable[[str], dict]


DRAINS = (
    Drain("inbound", "inbound", lambda plan: plan.n_inbound, inbound_body, inbound_expected),
    Drain("events", "event", lambda plan: plan.n_events, event_body, event_expected),
)


def setup_drain(
    ctx: Context,
    setup: Setup,
    group: ServiceGroup,
    drain: Drain,
    result: SetupResult,
    baseline_kb: int,
    redis: RedisKeys | None,
) -> None:
    """One drain's row; for inbound also the RSS per cached message and the
    Redis keys written."""
    n = drain.count(ctx.plan)
    keys_before = redis.count("inbound:") if redis is not None and drain.kind == "inbound" else 0
    drained = drain_phase(
        drain.phase,
        setup.tag(),
        drain.kind,
        n,
        drain.make_body,
        drain.expected,
        group,
        ctx.broker,
        ctx.nginx,
        ctx.meter_pids,
    )
    ctx.ours.update(group.pids)
    row = drained.row
    top = ctx.ceilings.get(max(ctx.plan.connections)) if ctx.plan.connections else None
    row.ceiling = row.rate / top if row.rate and top else None
    result.rows.append(row)
    if drain.kind != "inbound":
        return
    result.inbound = row
    per = (drained.rss_after_kb - baseline_kb) * 1024 / n
    where = " (the cache is in Redis)" if setup.cache == "redis" else ""
    result.extra.append(
        f"RSS per cached inbound{setup.tag()}: {per:,.0f} bytes{where} (VmRSS"
        f" {drained.rss_after_kb / 1024:.1f} MiB after {n:,} delivered, baseline"
        f" {baseline_kb / 1024:.1f} MiB; summed over {len(group)} process(es))"
    )
    if redis is not None:
        stored = redis.count("inbound:") - keys_before
        row.notes.append(
            f"Redis: {stored:,} new inbound keys under the prefix (one per message: {n:,})"
        )
        if stored != n:
            shout(f"{row.name}: {stored:,} inbound keys in Redis for {n:,} messages")


# --- many channels in one process (--compare-channels) ----------------------------


def idle_channels(n: int, nginx: Nginx) -> dict[str, Any]:
    """``channels:`` entries for n idle channels (their queues stay empty)."""
    return {f"idle-{i:03d}": {"mo_url": f"{nginx.url}/inbound-idle"} for i in range(1, n + 1)}


def compare_channels(ctx: Context, n_channels: int) -> tuple[list[Row], list[str]]:
    """One busy channel alone, then beside n_channels - 1 idle ones, in one run.

    The busy channel is the top-level connector (``bench``, the queues and
    path every phase uses); the idle ones are ``channels:`` entries, each with
    its own queues and consumers (two AMQP channels with their own prefetch).
    Measures start-up time (launch to healthy /health), idle RSS, outbound @64
    and the inbound drain of the busy channel, and how the N-channel figures
    compare with the one-channel ones.
    """
    rows: list[Row] = []
    figures: dict[int, dict[str, float]] = {}
    for count in (1, n_channels):
        channel_rows, figures[count] = channels_run(ctx, count)
        rows += channel_rows
    return rows, channel_lines(figures[1], figures[n_channels], n_channels)


def channels_run(ctx: Context, count: int) -> tuple[list[Row], dict[str, float]]:
    """One process with the busy channel and count - 1 idle ones: outbound and
    inbound rows, and its start-up time, idle RSS and rates."""
    tag = f" [{count} ch]"
    extra = {"channels": idle_channels(count - 1, ctx.nginx)} if count > 1 else None
    group = service_group(
        ctx.tmp,
        f"ch{count}",
        1,
        ctx.rabbit,
        ctx.nginx,
        ctx.plan.concurrency,
        None,
        extra,
        spread=ctx.plan.spread,
    )
    ctx.stack.callback(group.stop)
    say(f"=== {count} channel(s) in one process")
    group.start()
    startup = group.wait_healthy(timeout=120)
    ctx.ours.update(group.pids)
    time.sleep(1)
    rss_kb = group.rss_kb()
    say(f"{count} channel(s): healthy {startup:.2f} s after launch, VmRSS {rss_kb / 1024:.1f} MiB")
    url = f"http://{HOST}:{group.ports[0]}{BASE_PATH}/messages"
    try:
        outbound = outbound_phase(
            group,
            url,
            tag,
            ctx.broker,
            ctx.meter_pids,
            [max(ctx.plan.connections)],
            ctx.plan.duration,
            ctx.plan.warmup,
            ctx.ceilings,
            ctx.script,
        )[0]
    finally:
        group.stop()
    inbound_row = drain_phase(
        "inbound",
        tag,
        "inbound",
        ctx.plan.n_inbound,
        inbound_body,
        inbound_expected,
        group,
        ctx.broker,
        ctx.nginx,
        ctx.meter_pids,
    ).row
    figures = {
        "startup": startup,
        "rss_kb": rss_kb,
        "outbound": outbound.rate or 0.0,
        "inbound": inbound_row.rate or 0.0,
    }
    return [outbound, inbound_row], figures


def roundtrip_rows(
    ctx: Context, setup: Setup, cache: dict[str, Any] | None, code: Path | None
) -> list[Row]:
    """The session round trip (bench/roundtrip.py) for one configuration."""

    def start(mo_url: str) -> ServiceGroup:
        group = service_group(
            ctx.tmp,
            f"{setup.key}-rt",
            1,
            ctx.rabbit,
            ctx.nginx,
            ctx.plan.concurrency,
            cache,
            tls=setup.tls,
            code=code,
            mo_message_url=mo_url,
            spread=ctx.plan.spread,
        )
        group.start().wait_healthy()
        ctx.ours.update(group.pids)
        return group

    def purge(queue: str) -> None:
        ctx.broker.declare(queue)
        ctx.broker.purge(queue)

    trip_plan = roundtrip.RoundTripPlan(
        tmp=ctx.tmp,
        amqp_port=ctx.rabbit.port,
        other_core=OTHER_CORE,
        seconds=ctx.plan.duration,
        start_service=start,
        service_url=lambda g: f"http://{HOST}:{g.ports[0]}{BASE_PATH}/messages",
        service_cpu=lambda g: g.cpu_ticks() / CLK_TCK,
        stop_service=lambda g: g.stop(),
        purge=purge,
        say=say,
        free_port=free_port,
        broker_pid=ctx.rabbit.pid,
    )
    label = setup.tag(1)
    try:
        trips = roundtrip.roundtrip_phase(trip_plan, label, BENCH)
    except RuntimeError as e:
        raise BenchError(str(e)) from None
    # roundtrip.py names each row what it measured followed by the label it was given.
    return [roundtrip_row(name, name.removesuffix(label), trip) for name, trip in trips]


def roundtrip_row(name: str, measure: str, trip: roundtrip.RoundTrip) -> Row:
    """A round-trip rate's row: sessions/s, latencies, CPU per reply, checks."""
    row = Row(name, "ses/s", trip.rate, trip.p50, trip.p90, trip.p99, measure=measure)
    row.cpu_ms = trip.cpu_seconds * 1000 / max(1, trip.replied)
    row.status = "ok" if trip.replied == trip.published else "lost"
    row.notes.append(
        f"{trip.published:,} inbound published at {trip.offered:,.0f}/s, {trip.replied:,}"
        f" replies on {QUEUES.outbound} within {roundtrip.GRACE:g} s of the last;"
        f" round trip = inbound publish to reply consumed (the peer's clock)"
        + (
            ""
            if trip.sustained
            else f"; not sustained (p99 > {roundtrip.SUSTAINED_P99_MS:g} ms, replies"
            " missing, or the peer could not publish at that rate)"
        )
    )
    if trip.legs:
        row.notes.append(trip.legs)
    if trip.replied != trip.published and "max" not in name:
        row.status = "not sustained"
    return row
