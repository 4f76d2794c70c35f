"""The session round trip: what a USSD user feels, measured by bench/benchmark.py.

A peer process (bench/roundtrip_peer.py) plays the vumi transport and
RapidPro: it publishes inbound messages to ``bench.inbound`` at a fixed
rate; the service delivers each to the peer's RapidPro side, which answers
200 and at once POSTs a reply (``reply_to``) to the service; the service
publishes the reply to ``bench.outbound``, where the peer consumes it. The
round trip is the time from the inbound's publish to the reply's arrival,
both taken by the peer (one clock). Rates: 200 and 1,000 sessions/s, then
higher steps until one is not sustained (a reply missing after the grace
time, or p99 above ``SUSTAINED_P99_MS``); the last sustained step is the
"max" row.

The peer runs on the other core with RabbitMQ, the service on its own core,
as in every other phase. Each row's notes split the round trip into stages
(the peer's own lag included) and give the CPU each process spent, so a
figure that comes from the benchmark's side shows as such.
"""

from __future__ import annotations

import json
import os
import select
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

RATES = (200, 1000)
HIGHER = (1500, 2000, 2500, 3000, 4000, 5000, 6000)
SUSTAINED_P99_MS = 250.0
GRACE = 5.0  # seconds after the last publish for the last replies
CLK_TCK = os.sysconf("SC_CLK_TCK")
PEER = Path(__file__).with_name("roundtrip_peer.py")
# Slots of a message's times in the peer's answer (see roundtrip_peer.py).
DUE, SENT, ARRIVED, REPLY_SENT, ANSWERED, GOT = range(6)


@dataclass
class RoundTrip:
    """One rate's result."""

    offered: float
    published: int
    replied: int
    took: float
    p50: float | None
    p90: float | None
    p99: float | None
    cpu_seconds: float
    # Per inbound message id: due, published, at RapidPro, reply POSTed,
    # reply answered, reply consumed (time.monotonic(); None: did not happen).
    times: dict[str, list[float | None]] = field(default_factory=dict, repr=False)
    errors: dict[str, Any] = field(default_factory=dict)
    # CPU seconds of the other processes while this rate ran (None: unknown).
    helpers_cpu: dict[str, float | None] = field(default_factory=dict)
    cores_busy: list[float] = field(default_factory=list)  # per core, 0..1
    legs: str = ""  # where the time goes, stage by stage

    @property
    def rate(self) -> float:
        return self.replied / self.took if self.took else 0.0

    @property
    def kept_rate(self) -> bool:
        """Whether the driver published at the offered rate (5% slack)."""
        return self.published >= 0.95 * self.offered * self.took

    @property
    def sustained(self) -> bool:
        return (
            self.replied == self.published
            and self.kept_rate
            and self.p99 is not None
            and self.p99 <= SUSTAINED_P99_MS
        )


@dataclass
class RoundTripPlan:
    """What the phase needs from bench/benchmark.py, given rather than imported."""

    tmp: Path
    amqp_port: int
    other_core: str
    seconds: float
    start_service: Callable[[str], Any]  # mo_message_url -> a started, healthy group
    service_url: Callable[[Any], str]  # group -> its messages URL
    service_cpu: Callable[[Any], float]  # group -> CPU seconds so far
    stop_service: Callable[[Any], None]
    purge: Callable[[str], None]
    say: Callable[[str], None]
    free_port: Callable[[], int]
    broker_pid: int | None = None
    results: list[RoundTrip] = field(default_factory=list)


def percentile(sorted_ms: list[float], p: float) -> float | None:
    if not sorted_ms:
        return None
    return sorted_ms[min(len(sorted_ms) - 1, int(len(sorted_ms) * p / 100))]


def _wait_port(port: int, timeout: float = 20) -> None:
    import socket

    deadline = time.monotonic() + timeout
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            if time.monotonic() > deadline:
                raise RuntimeError(f"the round-trip peer does not listen on {port}") from None
            time.sleep(0.05)


def _process_cpu(pid: int | None) -> float | None:
    """CPU seconds (user + system) of process ``pid`` so far; None if unknown."""
    if pid is None:
        return None
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def _core_ticks() -> list[tuple[int, int]]:
    """(busy, total) jiffies of each core, from /proc/stat."""
    ticks = []
    for line in Path("/proc/stat").read_text().splitlines():
        name, *values = line.split()
        if name.startswith("cpu") and name != "cpu":
            numbers = [int(v) for v in values[:8]]
            idle = numbers[3] + numbers[4]  # idle + iowait
            ticks.append((sum(numbers) - idle, sum(numbers)))
    return ticks


class Peer:
    """The running bench/roundtrip_peer.py: one rate per command."""

    def __init__(self, plan: RoundTripPlan, http_port: int, service_url: str) -> None:
        self.log_path = plan.tmp / f"roundtrip-peer-{http_port}.log"
        self.log = open(self.log_path, "w")
        cmd = ["taskset", "-c", plan.other_core, sys.executable, str(PEER)]
        cmd += [str(plan.amqp_port), str(http_port), service_url]
        self.process = subprocess.Popen(
            cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.log, text=True
        )
        self.pid = self.process.pid

    def run(self, rate: float, seconds: float) -> dict[str, Any]:
        """One rate's answer (see roundtrip_peer.py); RuntimeError if none came."""
        assert self.process.stdin is not None and self.process.stdout is not None
        self.process.stdin.write(f"{rate} {seconds} {GRACE}\n")
        self.process.stdin.flush()
        ready, _, _ = select.select([self.process.stdout], [], [], seconds + GRACE + 120)
        line = self.process.stdout.readline() if ready else ""
        if not line:
            raise RuntimeError(f"the round-trip peer gave no answer at {rate:,}/s: {self.tail()}")
        return json.loads(line)

    def tail(self) -> str:
        self.log.flush()
        return self.log_path.read_text()[-2000:] or "(no output)"

    def stop(self) -> None:
        if self.process.stdin is not None:
            self.process.stdin.close()  # the peer stops at the end of its stdin
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self.log.close()


def run_rate(plan: RoundTripPlan, group: Any, peer: Peer, rate: float) -> RoundTrip:
    cpu0 = plan.service_cpu(group)
    broker0, peer0 = _process_cpu(plan.broker_pid), _process_cpu(peer.pid)
    cores0 = _core_ticks()
    data = peer.run(rate, plan.seconds)
    cpu = plan.service_cpu(group) - cpu0
    broker1, peer1 = _process_cpu(plan.broker_pid), _process_cpu(peer.pid)
    cores_busy = [
        (busy1 - busy0) / max(1, total1 - total0)
        for (busy0, total0), (busy1, total1) in zip(cores0, _core_ticks(), strict=True)
    ]
    times = data["times"]
    rtt = sorted((t[GOT] - t[SENT]) * 1000 for t in times.values() if t[GOT] is not None)
    return RoundTrip(
        offered=rate,
        published=data["published"],
        replied=data["replied"],
        took=data["took"],
        p50=percentile(rtt, 50),
        p90=percentile(rtt, 90),
        p99=percentile(rtt, 99),
        cpu_seconds=cpu,
        times=times,
        errors=data["errors"],
        helpers_cpu={
            "peer": None if peer0 is None or peer1 is None else peer1 - peer0,
            "broker": None if broker0 is None or broker1 is None else broker1 - broker0,
        },
        cores_busy=cores_busy,
    )


def roundtrip_phase(
    plan: RoundTripPlan, label: str, bench_dir: Path
) -> list[tuple[str, RoundTrip]]:
    """Rows (name, result) for one service configuration: @200, @1000, max."""
    http_port = plan.free_port()
    group = plan.start_service(f"http://127.0.0.1:{http_port}/inbound")
    peer: Peer | None = None
    rows: list[tuple[str, RoundTrip]] = []
    try:
        peer = Peer(plan, http_port, plan.service_url(group))
        _wait_port(http_port)
        run_rate(plan, group, peer, 100)  # warm-up
        best: RoundTrip | None = None
        for rate in (*RATES, *HIGHER):
            plan.purge("bench.outbound")
            result = run_rate(plan, group, peer, rate)
            result.legs = legs(result)
            plan.results.append(result)
            plan.say(
                f"round trip{label} @{rate:,}/s: {result.replied:,} of {result.published:,}"
                f" replies, {result.rate:,.0f}/s, p50 {result.p50 or 0:.2f}"
                f" p90 {result.p90 or 0:.2f} p99 {result.p99 or 0:.2f} ms"
                + ("" if result.sustained else " (not sustained)")
            )
            plan.say(f"round trip{label} @{rate:,}/s: {result.legs}")
            if any(result.errors.get(k) for k in ("not_201", "failed", "unexpected")):
                plan.say(f"round trip{label} @{rate:,}/s: peer errors {result.errors}")
            if rate in RATES:
                rows.append((f"round trip @{rate:,}/s{label}", result))
            if not result.sustained:
                break
            best = result
            time.sleep(1)  # let the queues empty
        if best is not None:
            rows.append((f"round trip max {best.offered:,.0f}/s{label}", best))
    finally:
        if peer is not None:
            peer.stop()
        plan.stop_service(group)
    return rows


STAGES = (
    # name, from slot, to slot
    ("peer lag", DUE, SENT),
    ("to RapidPro", SENT, ARRIVED),
    ("reply -> 201", REPLY_SENT, ANSWERED),
    ("reply to .outbound", REPLY_SENT, GOT),
)


def legs(trip: RoundTrip) -> str:
    """Where the time goes, stage by stage, p50/p99 in ms, and the CPU of each
    process while the rate ran (as a share of one core, over the publishing time).

    peer lag: an inbound's publish after its scheduled time (the peer's own
    delay, outside the round trip); to RapidPro: publish -> the peer's
    RapidPro side has the POST; reply -> 201: the service's answer to the
    reply POST (the broker's confirm included); reply to .outbound: the reply
    POSTed -> consumed by the peer.
    """
    parts = []
    for name, start, end in STAGES:
        values = sorted(
            (t[end] - t[start]) * 1000
            for t in trip.times.values()
            if t[start] is not None and t[end] is not None
        )
        if values:
            parts.append(f"{name} {percentile(values, 50):.2f}/{percentile(values, 99):.2f}")
    if not parts:
        return ""
    took = max(trip.took, 1e-9)
    cpu = ", ".join(
        f"{name} {seconds / took * 100:.0f}%"
        for name, seconds in {"service": trip.cpu_seconds, **trip.helpers_cpu}.items()
        if seconds is not None
    )
    cores = ", ".join(f"cpu{i} {busy * 100:.0f}%" for i, busy in enumerate(trip.cores_busy))
    return f"stages p50/p99 ms: {'; '.join(parts)}; of one core: {cpu}; busy: {cores}"
