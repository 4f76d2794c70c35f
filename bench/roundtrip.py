"""The session round trip: what a USSD user feels, measured by bench/benchmark.py.

A driver publishes inbound messages to ``bench.inbound`` at a fixed rate, as a
transport does; the service delivers each to a RapidPro stand-in, which
answers 200 and at once POSTs a reply (``reply_to``) to the service; the
service publishes the reply to ``bench.outbound``, where the driver consumes
it. The round trip is the time from the inbound's publish to the reply's
arrival, both taken by the driver (one clock). Rates: 200 and 1,000
sessions/s, then higher steps until one is not sustained (a reply missing
after the grace time, or p99 above ``SUSTAINED_P99_MS``); the last sustained
step is the "max" row.

The stand-in (Twisted, one persistent connection pool) and the driver (pika,
one connection for publishing, one for consuming) run on the other core with
RabbitMQ, the service on its own core, as in every other phase.
"""

from __future__ import annotations

import json
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

STANDIN_SCRIPT = '''\
"""RapidPro stand-in: answers 200 to every inbound POST and at once POSTs a
reply to it. Written and run by bench/roundtrip.py:
    python standin.py PORT SERVICE_MESSAGES_URL ARRIVALS_JSON
On SIGTERM it prints one JSON line of counts and writes when each inbound
arrived (time.monotonic()) to ARRIVALS_JSON."""

import json
import sys
import time

from twisted.internet import reactor
from twisted.internet.protocol import Protocol
from twisted.web.client import Agent, HTTPConnectionPool
from twisted.web.http_headers import Headers
from twisted.web.resource import Resource
from twisted.web.server import Site

port, url = int(sys.argv[1]), sys.argv[2].encode()
pool = HTTPConnectionPool(reactor, persistent=True)
pool.maxPersistentPerHost = 64
pool.retryAutomatically = False
agent = Agent(reactor, pool=pool)
headers = Headers({b"Content-Type": [b"application/json"]})
arrivals = {}
counts = {"inbound": 0, "replied": 0, "not_201": 0, "errors": 0, "last_error": ""}


class _Body:
    def __init__(self, data):
        self.data, self.length = data, len(data)

    def startProducing(self, consumer):
        consumer.write(self.data)
        from twisted.internet.defer import succeed
        return succeed(None)

    def pauseProducing(self):
        pass

    def resumeProducing(self):
        pass

    def stopProducing(self):
        pass


def reply(message_id):
    body = json.dumps({"reply_to": message_id, "content": "next menu"}).encode()
    d = agent.request(b"POST", url, headers, _Body(body))

    def answered(response):
        if response.code == 201:
            counts["replied"] += 1
        else:
            counts["not_201"] += 1
            counts["last_error"] = str(response.code)
        response.deliverBody(_Discard())

    def failed(failure):
        counts["errors"] += 1
        counts["last_error"] = failure.getErrorMessage()[:200]

    d.addCallbacks(answered, failed).addErrback(failed)


class _Discard(Protocol):
    def dataReceived(self, data):
        pass


class Inbound(Resource):
    isLeaf = True

    def render_POST(self, request):
        message = json.loads(request.content.read())
        counts["inbound"] += 1
        arrivals[message["message_id"]] = time.monotonic()
        reactor.callLater(0, reply, message["message_id"])
        request.setHeader(b"Content-Type", b"application/json")
        return b"{}"

    def render_GET(self, request):
        return b"ok"


def report():
    print(json.dumps(counts), flush=True)
    with open(sys.argv[3], "w") as f:
        json.dump(arrivals, f)


reactor.addSystemEventTrigger("before", "shutdown", report)
site = Site(Inbound())
site.noisy = False
reactor.listenTCP(port, site, interface="127.0.0.1", backlog=1024)
reactor.run()
'''

DRIVER_SCRIPT = '''\
"""Publishes inbound messages at a fixed rate and times each one's reply.
Written and run by bench/roundtrip.py:
    python driver.py AMQP_PORT RATE SECONDS GRACE
prints one JSON line: published, replied, the round trips in ms (sorted), the
seconds publishing took, when each inbound was published and its reply consumed."""

import json
import sys
import threading
import time
import uuid

import pika

port, rate = int(sys.argv[1]), float(sys.argv[2])
seconds, grace = float(sys.argv[3]), float(sys.argv[4])
sys.path.insert(0, sys.argv[5])
from cache_memory import inbound  # noqa: E402

params = pika.ConnectionParameters("127.0.0.1", port, "/", pika.PlainCredentials("guest", "guest"))
sent = {}
sent_at = {}
got_at = {}
rtt = []
done = threading.Event()
lock = threading.Lock()


def consume():
    connection = pika.BlockingConnection(params)
    channel = connection.channel()
    channel.basic_qos(prefetch_count=2000)

    def on_message(ch, method, properties, body):
        now = time.monotonic()
        reply = json.loads(body)
        with lock:
            started = sent.pop(reply.get("in_reply_to"), None)
        if started is not None:
            rtt.append((now - started) * 1000)
            got_at[reply.get("in_reply_to")] = now

    channel.basic_consume("bench.outbound", on_message, auto_ack=True)
    while not done.is_set():
        connection.process_data_events(time_limit=0.05)
    connection.close()


consumer = threading.Thread(target=consume, daemon=True)
consumer.start()
time.sleep(0.5)  # the consumer is attached
connection = pika.BlockingConnection(params)
channel = connection.channel()
props = pika.BasicProperties(delivery_mode=2, content_type="application/json")
n = 0
start = time.monotonic()
end = start + seconds
for i in range(int(rate * seconds)):
    due = start + i / rate
    now = time.monotonic()
    if now > end:
        break  # this publisher cannot keep the rate: what it managed is reported
    if due > now:
        time.sleep(due - now)
    n += 1
    message_id = uuid.uuid4().hex
    body = json.dumps(inbound(message_id, transport_name="bench")).encode()
    with lock:
        sent[message_id] = time.monotonic()
        sent_at[message_id] = sent[message_id]
    channel.basic_publish("vumi", "bench.inbound", body, props)
took = time.monotonic() - start
connection.close()
deadline = time.monotonic() + grace
while time.monotonic() < deadline:
    with lock:
        if not sent:
            break
    time.sleep(0.02)
done.set()
consumer.join(5)
rtt.sort()
result = {"published": n, "replied": len(rtt), "rtt": rtt, "took": took}
result.update(sent_at=sent_at, got_at=got_at)
print(json.dumps(result), flush=True)
'''


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
    sent_at: dict[str, float] = field(default_factory=dict, repr=False)
    got_at: dict[str, float] = field(default_factory=dict, repr=False)
    legs: str = ""  # publish -> RapidPro and RapidPro -> reply consumed

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
                raise RuntimeError(f"the RapidPro stand-in does not listen on {port}") from None
            time.sleep(0.05)


def run_rate(plan: RoundTripPlan, group: Any, rate: float, bench_dir: Path) -> RoundTrip:
    driver = plan.tmp / "roundtrip_driver.py"
    cpu0 = plan.service_cpu(group)
    cmd = ["taskset", "-c", plan.other_core, sys.executable, str(driver)]
    cmd += [str(plan.amqp_port), str(rate), str(plan.seconds), str(GRACE), str(bench_dir)]
    try:
        result = subprocess.run(
            cmd, capture_output=True, text=True, timeout=plan.seconds + GRACE + 120
        )
    except subprocess.TimeoutExpired:
        raise RuntimeError(f"the round-trip driver did not finish at {rate:,}/s") from None
    cpu = plan.service_cpu(group) - cpu0
    try:
        data = json.loads(result.stdout.strip().splitlines()[-1])
    except (IndexError, ValueError):
        raise RuntimeError(
            f"the round-trip driver failed ({result.returncode}): {result.stderr[-2000:]}"
        ) from None
    rtt = data["rtt"]
    return RoundTrip(
        offered=rate,
        published=data["published"],
        replied=data["replied"],
        took=data["took"],
        p50=percentile(rtt, 50),
        p90=percentile(rtt, 90),
        p99=percentile(rtt, 99),
        cpu_seconds=cpu,
        sent_at=data["sent_at"],
        got_at=data["got_at"],
    )


def roundtrip_phase(
    plan: RoundTripPlan, label: str, bench_dir: Path
) -> list[tuple[str, RoundTrip]]:
    """Rows (name, result) for one service configuration: @200, @1000, max."""
    (plan.tmp / "roundtrip_driver.py").write_text(DRIVER_SCRIPT)
    standin_script = plan.tmp / "roundtrip_standin.py"
    standin_script.write_text(STANDIN_SCRIPT)
    standin_port = plan.free_port()
    group = plan.start_service(f"http://127.0.0.1:{standin_port}/inbound")
    out_path = plan.tmp / f"standin-{standin_port}.out"
    out = open(out_path, "w")
    standin = subprocess.Popen(
        [
            "taskset",
            "-c",
            plan.other_core,
            sys.executable,
            str(standin_script),
            str(standin_port),
            plan.service_url(group),
            str(plan.tmp / "arrivals.json"),
        ],
        stdout=out,
        stderr=subprocess.STDOUT,
    )
    rows: list[tuple[str, RoundTrip]] = []
    try:
        _wait_port(standin_port)
        run_rate(plan, group, 100, bench_dir)  # warm-up
        best: RoundTrip | None = None
        for rate in (*RATES, *HIGHER):
            plan.purge("bench.outbound")
            result = run_rate(plan, group, rate, bench_dir)
            plan.say(
                f"round trip{label} @{rate:,}/s: {result.replied:,} of {result.published:,}"
                f" replies, {result.rate:,.0f}/s, p50 {result.p50 or 0:.2f}"
                f" p90 {result.p90 or 0:.2f} p99 {result.p99 or 0:.2f} ms"
                + ("" if result.sustained else " (not sustained)")
            )
            if rate in RATES:
                rows.append((f"round trip @{rate:,}/s{label}", result))
            if not result.sustained:
                break
            best = result
            time.sleep(1)  # let the queues empty
        if best is not None:
            rows.append((f"round trip max {best.offered:,.0f}/s{label}", best))
    finally:
        standin.terminate()
        try:
            standin.wait(10)
        except subprocess.TimeoutExpired:
            standin.kill()
        out.close()
        plan.stop_service(group)
    counts = out_path.read_text()
    plan.say(f"round trip{label}: stand-in counts {counts.strip().splitlines()[-1:]}")
    try:
        arrivals = json.loads((plan.tmp / "arrivals.json").read_text())
    except (OSError, ValueError):
        arrivals = {}
    for _, trip in rows:
        trip.legs = legs(trip, arrivals)
    return rows


def legs(trip: RoundTrip, arrivals: dict[str, float]) -> str:
    """Where the time goes: inbound publish -> the stand-in's receipt, and the
    stand-in's receipt -> the reply consumed (one monotonic clock: one machine)."""
    inbound = sorted((arrivals[i] - t) * 1000 for i, t in trip.sent_at.items() if i in arrivals)
    reply = sorted((t - arrivals[i]) * 1000 for i, t in trip.got_at.items() if i in arrivals)
    if not inbound or not reply:
        return ""
    return (
        f"publish -> RapidPro p50 {percentile(inbound, 50):.2f} p99 {percentile(inbound, 99):.2f}"
        f" ms; RapidPro -> reply on .outbound p50 {percentile(reply, 50):.2f}"
        f" p99 {percentile(reply, 99):.2f} ms"
    )
