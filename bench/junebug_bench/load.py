"""The load: wrk against the HTTP API, pre-loaded queues for the inbound and
event drains, and the Redis round-trip driver."""

from __future__ import annotations

import collections
import json
import re
import sys
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pika
import pika.spec

from .console import BenchError, say
from .host import run
from .rabbitmq import Broker
from .redis_keys import RedisKeys
from .settings import OTHER_CORE, POST_LUA, ROOT, SERVICE_CORE


@dataclass
class WrkResult:
    """One wrk run: its counts, rate and latency percentiles (ms)."""

    requests: int
    seconds: float
    rate: float
    p50: float
    p90: float
    p99: float
    created: int
    non201: int
    last_non201: int
    socket_errors: int
    output: str


_UNITS_MS = {"us": 0.001, "ms": 1.0, "s": 1000.0, "m": 60000.0, "h": 3600000.0}


def run_wrk(url: str, connections: int, duration: int, script: Path = POST_LUA) -> WrkResult:
    """One wrk run (one thread, on the other core) with script's Lua counting answers."""
    cmd = ["taskset", "-c", OTHER_CORE, "wrk", "-t1", f"-c{connections}", f"-d{duration}s"]
    cmd += ["--latency", "-s", str(script), url]
    result = run(cmd, duration + 60)
    out = result.stdout
    if result.returncode != 0 or "Requests/sec" not in out:
        raise BenchError(f"wrk failed ({result.returncode}): {out}{result.stderr}")
    return parse_wrk(out)


def parse_wrk(out: str) -> WrkResult:
    """wrk's ``--latency`` output and post.lua's counts line, in numbers (ms)."""
    percentiles = {
        int(m[1]): float(m[2]) * _UNITS_MS[m[3]]
        for m in re.finditer(r"^\s+(\d+)%\s+([\d.]+)(us|ms|s|m|h)\s*$", out, re.M)
    }
    done = re.search(r"(\d+) requests in ([\d.]+)(us|ms|s|m|h)", out)
    lua = re.search(r"wrk-lua: status201=(\d+) non201=(\d+) last_non201=(\d+)", out)
    errors = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    rate = re.search(r"Requests/sec:\s+([\d.]+)", out)
    if done is None or lua is None or rate is None or not {50, 90, 99} <= percentiles.keys():
        raise BenchError(f"cannot parse the wrk output:\n{out}")
    return WrkResult(
        requests=int(done[1]),
        seconds=float(done[2]) * _UNITS_MS[done[3]] / 1000,
        rate=float(rate[1]),
        p50=percentiles[50],
        p90=percentiles[90],
        p99=percentiles[99],
        created=int(lua[1]),
        non201=int(lua[2]),
        last_non201=int(lua[3]),
        socket_errors=sum(int(x) for x in errors.groups()) if errors else 0,
        output=out,
    )


def preload(broker: Broker, queue: str, bodies: Iterable[bytes], n: int, timeout: float) -> float:
    """Publish n persistent messages to the vumi exchange, at most 2000
    unconfirmed at a time (publisher confirms, mandatory); the seconds taken."""
    broker.declare(queue)
    started = time.monotonic()
    loader = Preloader(queue, iter(bodies), n)
    connection = pika.SelectConnection(
        broker.params,
        on_open_callback=lambda conn: conn.channel(on_open_callback=loader.on_channel),
        on_open_error_callback=lambda _conn, error: loader.fail(f"cannot connect: {error}"),
        on_close_callback=lambda conn, _reason: conn.ioloop.stop(),
    )
    loader.connection = connection
    connection.ioloop.call_later(timeout, lambda: loader.fail(f"not done after {timeout:g} s"))
    connection.ioloop.start()
    if loader.confirmed != n:
        raise BenchError(
            f"pre-loading {queue}: {loader.confirmed} of {n} confirmed: {loader.error}"
        )
    return time.monotonic() - started


class Preloader:
    """pika callbacks that keep a window of unconfirmed publishes full until n
    are confirmed, and close the connection when done or on the first failure."""

    window = 2000
    properties = pika.BasicProperties(delivery_mode=2, content_type="application/json")

    def __init__(self, queue: str, source: Iterator[bytes], n: int) -> None:
        self.queue = queue
        self.source = source
        self.n = n
        self.sent = 0
        self.confirmed = 0
        self.error: str | None = None
        self.channel: Any = None
        self.connection: Any = None  # the SelectConnection, set before its ioloop runs
        self.unconfirmed: collections.deque[int] = collections.deque()

    def fail(self, reason: str) -> None:
        if self.error is None:
            self.error = reason
        if self.connection.is_open:
            self.connection.close()
        else:
            self.connection.ioloop.stop()

    def pump(self) -> None:
        while self.sent < self.n and len(self.unconfirmed) < self.window:
            self.channel.basic_publish(
                "vumi", self.queue, next(self.source), self.properties, mandatory=True
            )
            self.sent += 1
            self.unconfirmed.append(self.sent)

    def on_confirm(self, frame: Any) -> None:
        method = frame.method
        if isinstance(method, pika.spec.Basic.Nack):
            self.fail(f"the broker nacked message {method.delivery_tag}")
            return
        if method.multiple:
            while self.unconfirmed and self.unconfirmed[0] <= method.delivery_tag:
                self.unconfirmed.popleft()
                self.confirmed += 1
        else:
            self.unconfirmed.remove(method.delivery_tag)
            self.confirmed += 1
        if self.confirmed == self.n:
            self.connection.close()
        else:
            self.pump()

    def on_channel(self, channel: Any) -> None:
        self.channel = channel
        channel.add_on_return_callback(
            lambda *_: self.fail(f"a message to {self.queue} was unroutable")
        )
        channel.add_on_close_callback(lambda _ch, reason: self.fail(f"channel closed: {reason}"))
        channel.confirm_delivery(self.on_confirm, callback=lambda _frame: self.pump())


def event_url_script(tmp: Path, sink_url: str) -> Path:
    """post.lua with an event_url in every request, so the cache is written."""
    text = POST_LUA.read_text()
    old = """wrk.body = '{"to": "+27820000001", "from": "8110", "content": "hello"}'"""
    if old not in text:
        raise BenchError(f"{POST_LUA} has no wrk.body line to add event_url to")
    new = old[:-2] + f', "event_url": "{sink_url}/event"}}\''
    script = tmp / "post-event-url.lua"
    script.write_text(text.replace(old, new))
    return script


REDIS_RTT_SCRIPT = '''\
"""SET+GET pairs against Redis: with the service's own client
(junebug_api.state.redis_client: one pipelining connection), and for comparison with
txredisapi (a pool of 10, as the service used before) and blocking redis-py.
Written and run by bench/junebug_bench/load.py:
    python redis_rtt.py URL PREFIX N IN_FLIGHT
prints one JSON line: wall and CPU seconds, one pair at a time and IN_FLIGHT
pairs in flight."""

import json
import resource
import sys
import time

import txredisapi
from twisted.internet import defer, reactor, task

from junebug_api.state.redis_client import FixedLocator, RedisClient
from junebug_api.state.redis_options import parse_redis_url


def cpu():
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


async def pairs(set_, get, keys, value, in_flight):
    keys = iter(keys)

    async def worker():
        for key in keys:
            await set_(key, value)
            got = await get(key)
            if got not in (value, value.encode()):
                raise RuntimeError(f"GET {key} gave {got!r}")

    started, cpu0 = time.monotonic(), cpu()
    await defer.gatherResults(
        [defer.Deferred.fromCoroutine(worker()) for _ in range(in_flight)], consumeErrors=True
    )
    return time.monotonic() - started, cpu() - cpu0


async def measure(set_, get, prefix, n, in_flight):
    value = "x" * 300  # about a cached inbound
    await pairs(set_, get, [f"{prefix}warm:{i}" for i in range(500)], value, 1)
    sequential = await pairs(set_, get, [f"{prefix}seq:{i}" for i in range(n)], value, 1)
    concurrent = await pairs(
        set_, get, [f"{prefix}con:{i}" for i in range(n)], value, in_flight
    )
    return sequential, concurrent


async def main(reactor, url, prefix, n, in_flight):
    args = parse_redis_url(url)
    args.pop("tls")
    result = {}
    client = RedisClient(
        reactor,
        FixedLocator(args["host"], args["port"]),
        dbid=args["dbid"],
        username=args["username"],
        password=args["password"],
    )
    client.start()
    await client.command(b"PING")
    result["ours"] = await measure(
        lambda k, v: client.command(b"SET", k, v, b"EX", 600),
        lambda k: client.command(b"GET", k),
        f"{prefix}rtt:ours:",
        n,
        in_flight,
    )
    await client.stop()
    redis = await txredisapi.ConnectionPool(
        poolsize=10, reconnect=False, charset="utf-8", convertNumbers=False, **args
    )
    result["txredisapi"] = await measure(
        lambda k, v: redis.set(k, v, expire=600),
        redis.get,
        f"{prefix}rtt:tx:",
        n,
        in_flight,
    )
    await redis.disconnect()
    # The same pairs with the blocking redis-py client: what any client pays here.
    import redis as redis_py

    blocking = redis_py.Redis.from_url(url)
    started, cpu0 = time.monotonic(), cpu()
    for i in range(n):
        blocking.set(f"{prefix}rtt:py:{i}", "x" * 300, ex=600)
        blocking.get(f"{prefix}rtt:py:{i}")
    result["redis-py"] = (time.monotonic() - started, cpu() - cpu0)
    blocking.close()
    print(json.dumps(result), flush=True)


url, prefix, n, in_flight = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
task.react(lambda reactor: defer.ensureDeferred(main(reactor, url, prefix, n, in_flight)))
'''


def redis_round_trips(
    tmp: Path, redis: RedisKeys, n: int = 10_000, in_flight: int = 50
) -> list[str]:
    """Time n SET+GET pairs one at a time and n with in_flight pairs in flight,
    from a Twisted script on the service core; lines for the report."""
    script = tmp / "redis_rtt.py"
    script.write_text(REDIS_RTT_SCRIPT)
    say(f"Redis round trips: {n:,} SET+GET pairs one at a time, then {in_flight} in flight")
    cmd = ["taskset", "-c", SERVICE_CORE, sys.executable, str(script), redis.url, redis.prefix]
    result = run([*cmd, str(n), str(in_flight)], 300, cwd=ROOT)
    try:
        data = json.loads(result.stdout.strip().splitlines()[-1])
    except (IndexError, ValueError):
        raise BenchError(
            f"the Redis round-trip script failed ({result.returncode}):"
            f" {result.stdout}{result.stderr[-2000:]}"
        ) from None
    lines = [
        f"Redis round trip (300-byte values, client on core {SERVICE_CORE}, {redis.url};"
        " CPU is the client's own):"
    ]
    for key, label in (
        ("ours", "the service's client (one pipelining connection)"),
        ("txredisapi", "txredisapi, pool of 10 (the service before)"),
    ):
        for (wall, cpu), how in zip(
            data[key], ("one at a time", f"{in_flight} in flight"), strict=True
        ):
            trips = 2 * n
            lines.append(
                f"  {label}, {how}: {wall * 1e6 / trips:.1f} us per round trip wall"
                f" ({trips / wall:,.0f} commands/s), client CPU {cpu * 1e6 / trips:.1f} us"
                " per command"
            )
    wall, cpu = data["redis-py"]
    lines.append(
        f"  for reference, blocking redis-py one at a time: {wall * 1e6 / (2 * n):.1f} us wall,"
        f" client CPU {cpu * 1e6 / (2 * n):.1f} us per command"
    )
    return lines
