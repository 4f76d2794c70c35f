"""bench/run's entry point: the plan from the command line, the nodes, the
steps of a run in order (a table), and the report."""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from .accounting import all_cpu_ticks, other_load
from .console import BenchError, say, shout
from .load import event_url_script, redis_round_trips
from .nginx import Nginx
from .phases import Context, bare_phase, compare_channels, run_setup
from .plan import Plan, parse_plan
from .rabbitmq import Broker, RabbitNode
from .redis_keys import RedisKeys, redis_server_pid
from .report import (
    RunFacts,
    cache_ratios,
    channel_api_cost,
    machine_line,
    metrics_cost,
    publish,
    report,
)
from .results import Tally
from .settings import POST_LUA, QUEUES, REDIS_URL, RESULTS, ROOT


def bare_step(ctx: Context, tally: Tally) -> None:
    """The bare twisted.web server: the HTTP ceiling the other rows are compared with."""
    plan = ctx.plan
    rows = bare_phase(ctx.tmp, plan.connections, plan.duration, plan.warmup)
    tally.rows += rows
    ctx.ceilings.update({c: r.rate for c, r in zip(plan.connections, rows, strict=True) if r.rate})


def channels_step(ctx: Context, tally: Tally) -> None:
    assert ctx.plan.compare_channels is not None
    rows, lines = compare_channels(ctx, ctx.plan.compare_channels)
    tally.rows += rows
    tally.extra += lines


def setups_step(ctx: Context, tally: Tally) -> None:
    for setup in ctx.plan.setups:
        tally.add(run_setup(ctx, setup))


def cache_ratios_step(ctx: Context, tally: Tally) -> None:
    tally.extra += cache_ratios(tally.results)


def redis_step(ctx: Context, tally: Tally) -> None:
    assert ctx.redis is not None
    tally.extra += redis_round_trips(ctx.tmp, ctx.redis)


def metrics_step(ctx: Context, tally: Tally) -> None:
    tally.extra += metrics_cost(tally.results)


def channel_api_step(ctx: Context, tally: Tally) -> None:
    tally.extra += channel_api_cost(tally.results)


# The steps of a run, in order: when each runs, and what it does.
STEPS: tuple[tuple[Callable[[Plan], bool], Callable[[Context, Tally], None]], ...] = (
    (lambda plan: "bare" in plan.phases, bare_step),
    (lambda plan: bool(plan.compare_channels), channels_step),
    (lambda plan: not plan.compare_channels, setups_step),
    (lambda plan: plan.compare_caches, cache_ratios_step),
    (lambda plan: plan.uses_redis and plan.redis_round_trips, redis_step),
    (lambda plan: plan.compare_metrics, metrics_step),
    (lambda plan: plan.compare_channel_api, channel_api_step),
)


def check_machine() -> None:
    """The tools and the two cores the benchmark pins to."""
    for tool in ("wrk", "taskset"):
        if shutil.which(tool) is None:
            raise BenchError(f"{tool} not found (bench/run installs wrk)")
    if (os.cpu_count() or 1) < 2:
        raise BenchError("needs at least 2 cores (it pins to cores 0 and 1)")


def temporary_directory(stack: contextlib.ExitStack, keep: bool) -> Path:
    """Where everything the run starts keeps its files; removed at the end unless kept."""
    tmp = Path(tempfile.mkdtemp(prefix="jbbench-"))
    tmp.chmod(0o755)  # the RabbitMQ node runs as the rabbitmq user
    say(f"temporary directory {tmp}")
    if keep:
        stack.callback(say, f"kept {tmp}")
    else:
        stack.callback(shutil.rmtree, tmp, ignore_errors=True)
    return tmp


def start_nodes(
    plan: Plan, tmp: Path, stack: contextlib.ExitStack, ours: set[int], tally: Tally
) -> Context:
    """Redis (if used), the RabbitMQ node, the nginx sink and a broker client,
    each stopped when the stack closes."""
    redis: RedisKeys | None = None
    if plan.uses_redis:
        redis = RedisKeys(REDIS_URL, f"jbbench:{secrets.token_hex(4)}:")
        redis.check()
        stack.callback(redis.cleanup)
        say(f"Redis {REDIS_URL}, key prefix {redis.prefix} (deleted at the end)")
    rabbit = RabbitNode(tmp)
    if plan.tls:
        rabbit.enable_tls()
    stack.callback(rabbit.stop)
    rabbit.start()
    tally.extra.append(f"RabbitMQ {rabbit.version()}, {queue_policy(plan, rabbit)}")
    nginx = Nginx(tmp)
    stack.callback(nginx.stop)
    nginx.start()
    ours.update(p for p in (rabbit.pid, nginx.worker) if p)
    if nginx.process:
        ours.add(nginx.process.pid)
    broker = Broker(rabbit.port)
    stack.callback(broker.close)
    meter_pids = {"rabbitmq": rabbit.pid, "nginx": nginx.worker}
    if redis is not None:
        meter_pids["redis-server"] = redis_server_pid()
    return Context(
        tmp=tmp,
        stack=stack,
        plan=plan,
        rabbit=rabbit,
        nginx=nginx,
        broker=broker,
        meter_pids=meter_pids,
        ours=ours,
        redis=redis,
        script=event_url_script(tmp, nginx.url) if plan.event_url else POST_LUA,
    )


def queue_policy(plan: Plan, rabbit: RabbitNode) -> str:
    """Set the lazy policy on the outbound queue unless --no-lazy-queues; what was done."""
    if not plan.lazy_queues:
        return "no queue policy (--no-lazy-queues)"
    if rabbit.lazy_outbound_queue():
        return (
            f"policy queue-mode=lazy on {QUEUES.outbound}, which nothing consumes"
            " (--no-lazy-queues: without)"
        )
    return "the queue-mode=lazy policy could not be set (see the log above)"


def main(argv: list[str] | None = None) -> int:
    """One benchmark run; 1 when a check failed or the run was aborted."""
    plan = parse_plan(argv)
    check_machine()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    started = time.monotonic()
    before = all_cpu_ticks()
    machine = machine_line()
    tally = Tally()
    ours: set[int] = set()
    failed = False
    with contextlib.ExitStack() as stack:
        tmp = temporary_directory(stack, plan.keep_tmp)
        try:
            ctx = start_nodes(plan, tmp, stack, ours, tally)
            for wanted, step in STEPS:
                if wanted(plan):
                    step(ctx, tally)
        except BenchError as e:
            shout(f"benchmark aborted: {e}")
            failed = True
        finally:
            if tally.rows:
                seconds = time.monotonic() - started
                load = other_load(before, ours, seconds)
                publish(
                    report(plan, tally, RunFacts(machine, load, seconds, plan.uses_redis)), RESULTS
                )
                say(f"written to {RESULTS.relative_to(ROOT)}")
    failed = failed or any(r.status != "ok" for r in tally.rows)
    return 1 if failed else 0


def run() -> None:
    """Exit with main()'s status; a BenchError outside a run (tools, cores) is shouted."""
    try:
        sys.exit(main())
    except BenchError as e:
        shout(str(e))
        sys.exit(1)
