"""Soak run: at-least-once delivery through broker restarts and a flaky RapidPro.

Not a test and not run by CI: a script to run by hand on a machine whose
RabbitMQ (127.0.0.1:5672, guest/guest) it may restart::

    .venv/bin/python bench/soak.py [--messages N] [--restarts K] [--fail-rate F] [--seed S]

Defaults: N=3000 messages per stream, K=2 broker restarts, F=0.2. It starts a
RapidPro stand-in HTTP sink in this process (answering 500 with probability
F, else 200, from a seeded random source) and the real service
(``twistd -n junebug-api``) as a subprocess, for a connector of its own
(``soak-<random>``) with fast retries and no dead-lettering by exhaustion.
Then, at the same time:

- it POSTs N outbound messages to the API, 16 in flight. A refused POST (a 503
  while the broker is away, a timeout, a dropped connection) is refused, not
  lost: it is tried again until it gets a 201;
- a thread publishes N inbound messages and N events (each with an id of its
  own) with pika and publisher confirms, reconnecting and publishing again
  after a broker error; one counts as sent once the broker confirmed it;
- the broker is restarted K times (``rabbitmqctl stop_app``, a pause,
  ``start_app``), spread over the sending.

Then it waits (at most 5 minutes) until every sent inbound message and event
reached the sink with a 200 answer or a ``.failed`` queue, drains
``<connector>.outbound`` and checks it holds the message of every 201 answer,
and prints a table per stream: sent, delivered (unique), duplicates,
dead-lettered, refused-then-retried (outbound) and lost. The exit status is 1
if anything was lost or could not be sent. Whatever happens, the service is
stopped with SIGTERM, the connector's queues are deleted and the broker is
left running. The service log stays in a temporary directory, printed at the
end.

Two more phases follow when asked for (``--restarts 0`` leaves the broker
alone, so these can run on a shared machine):

- ``--outage SECONDS``: RapidPro goes away (the sink stops listening:
  connections are refused) for that long while N more inbound messages and
  N events arrive; then it comes back. Its rows must show 0 lost and 0
  dead-lettered; the time from RapidPro's return to the last delivery is
  printed.
- ``--poison N``: N of each poison body (a lone surrogate, NaN, Infinity,
  nesting too deep, wrong field types, 10 MB, not UTF-8) and N good messages
  are published; every poison body must be on ``.inbound.failed`` with its
  ``x-junebug-reason``, every good one delivered.
"""

from __future__ import annotations

import argparse
import json
import random
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from collections import Counter, deque
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pika
import pika.exceptions
import treq
import yaml
from twisted.internet import reactor
from twisted.internet.defer import Deferred, DeferredList
from twisted.internet.task import deferLater
from twisted.internet.threads import deferToThread
from twisted.web.client import HTTPConnectionPool
from twisted.web.resource import Resource

from junebug_api.formats.queue_names import EXCHANGE, QueueNames, failed_queue
from junebug_api.testing import CuttableSite

ROOT = Path(__file__).resolve().parent.parent
HOST = "127.0.0.1"
AMQP_PARAMS = pika.ConnectionParameters(
    HOST,
    5672,
    "/",
    pika.PlainCredentials("guest", "guest"),
    connection_attempts=1,
    socket_timeout=5,
    blocked_connection_timeout=30,
)
BASE_PATH = "/channels/soak"
IN_FLIGHT = 16  # outbound POSTs at once
POST_TIMEOUT = 30.0  # client side, per POST
REFUSED_RETRY_DELAY = 0.25
SEND_LIMIT = 600.0  # seconds for all the sending
DELIVERY_LIMIT = 300.0  # seconds to wait for deliveries once sending is done
SETTLE_LIMIT = 30.0  # seconds to wait for the queues to empty (acks)
HEALTH_LIMIT = 60.0
BROKER_DOWN_SECONDS = 1.5
RESTART_GAP = 2.0  # seconds of health between two restarts, at least
PROPERTIES = pika.BasicProperties(delivery_mode=2, content_type="application/json")


def twistd() -> str:
    venv = ROOT / ".venv" / "bin" / "twistd"
    return str(venv if venv.exists() else Path(sys.executable).with_name("twistd"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def rabbitmqctl(*args: str) -> None:
    subprocess.run(["rabbitmqctl", *args], check=True, capture_output=True, timeout=120)


def queue_depths(queues: list[str]) -> dict[str, int]:
    """Messages (ready plus unacknowledged) per queue, from rabbitmqctl."""
    result = subprocess.run(
        ["rabbitmqctl", "list_queues", "-q", "--no-table-headers", "name", "messages"],
        check=True,
        capture_output=True,
        text=True,
        timeout=60,
    )
    depths = {}
    for line in result.stdout.splitlines():
        parts = line.split()
        if len(parts) == 2 and parts[0] in queues:
            depths[parts[0]] = int(parts[1])
    return depths


def rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def _not_utf8(body: bytes) -> bytes:
    return body.replace(b'"soak inbound', b'"soak \xff inbound', 1)


def _with(field: str, value: Any) -> Callable[[bytes], bytes]:
    def make(body: bytes) -> bytes:
        message = json.loads(body)
        message[field] = value
        return json.dumps(message).encode()

    return make


DEEP = "[" * 200_000 + "]" * 200_000
POISON: dict[str, Callable[[bytes], bytes]] = {
    "lone surrogate": lambda b: b.replace(b'"soak inbound', b'"\\ud800 soak inbound', 1),
    "NaN": _with("helper_metadata", {"x": float("nan")}),
    "Infinity": _with("helper_metadata", {"x": float("inf")}),
    "too deep": lambda b: b.replace(
        b'"helper_metadata": {}', f'"helper_metadata": {{"d": {DEEP}}}'.encode()
    ),
    "wrong types": _with("to_addr", ["not", "a", "string"]),
    "10 MB": _with("content", "x" * 10_000_000),
    "not UTF-8": _not_utf8,
}


def sleep(seconds: float) -> Deferred:
    return deferLater(reactor, seconds, lambda: None)


def inbound_body(connector: str, message_id: str) -> bytes:
    """A vumi inbound user message, as a vumi2 transport publishes it."""
    return json.dumps(
        {
            "message_id": message_id,
            "to_addr": "8110",
            "from_addr": "+27820000001",
            "transport_name": connector,
            "transport_type": "sms",
            "message_version": "20110921",
            "message_type": "user_message",
            "timestamp": "2026-11-26 13:23:18.965428",
            "routing_metadata": {},
            "helper_metadata": {},
            "transport_metadata": {},
            "in_reply_to": None,
            "session_event": None,
            "content": f"soak inbound {message_id}",
            "group": None,
        }
    ).encode()


def event_body(user_message_id: str) -> bytes:
    """A vumi ack event; its user_message_id is unique, so it goes to default_event_url."""
    return json.dumps(
        {
            "user_message_id": user_message_id,
            "event_type": "ack",
            "event_id": secrets.token_hex(16),
            "sent_message_id": user_message_id,
            "message_version": "20110921",
            "message_type": "event",
            "timestamp": "2026-11-26 13:23:18.966336",
            "routing_metadata": {},
            "helper_metadata": {},
            "transport_metadata": {},
            "nack_reason": None,
            "delivery_status": None,
        }
    ).encode()


class Sink(Resource):
    """RapidPro stand-in: 500 with probability ``fail_rate``, else 200; counts everything."""

    isLeaf = True

    def __init__(self, fail_rate: float, rng: random.Random) -> None:
        super().__init__()
        self.fail_rate = fail_rate
        self.rng = rng
        self.ok: dict[str, Counter[str]] = {"/inbound": Counter(), "/event": Counter()}
        self.posts: Counter[str] = Counter()
        self.refused: Counter[str] = Counter()
        self.unreadable = 0

    def render_POST(self, request: Any) -> bytes:
        path = request.path.decode("utf-8", "replace")
        self.posts[path] += 1
        if path not in self.ok:
            request.setResponseCode(404)
            return b'{"error": "no such path"}'
        try:
            message_id = json.loads(request.content.read())["message_id"]
        except (ValueError, KeyError, TypeError):
            self.unreadable += 1
            return b'{"ok": true}'
        if self.rng.random() < self.fail_rate:
            self.refused[path] += 1
            request.setResponseCode(500)
            return b'{"error": "soak failure"}'
        self.ok[path][message_id] += 1
        return b'{"ok": true}'


class Outbound:
    """POSTs N messages, ``IN_FLIGHT`` at once, each until a 201 answers it."""

    def __init__(self, url: str, count: int, run_id: str, deadline: float) -> None:
        self.url = url
        self.count = count
        self.run_id = run_id
        self.deadline = deadline
        self.answered: dict[int, str] = {}  # message index: message_id of its 201
        self.refusals: Counter[int] = Counter()  # message index: refused tries
        self.kinds: Counter[str] = Counter()  # why tries were refused

    def content(self, index: int) -> str:
        return f"soak {self.run_id} outbound {index}"

    def body(self, index: int) -> dict[str, Any]:
        """The request body of message ``index``."""
        return {"to": "+27820000002", "from": "8110", "content": self.content(index)}

    async def run(self) -> None:
        pool = HTTPConnectionPool(reactor, persistent=True)
        pool.maxPersistentPerHost = IN_FLIGHT
        todo = deque(range(self.count))
        workers = [Deferred.fromCoroutine(self._worker(todo, pool)) for _ in range(IN_FLIGHT)]
        try:
            await DeferredList(workers, fireOnOneErrback=True, consumeErrors=True)
        finally:
            await pool.closeCachedConnections()

    async def _worker(self, todo: deque[int], pool: HTTPConnectionPool) -> None:
        while todo and time.monotonic() < self.deadline:
            await self._send(todo.popleft(), pool)

    async def _send(self, index: int, pool: HTTPConnectionPool) -> None:
        body = json.dumps(self.body(index))
        while time.monotonic() < self.deadline:
            try:
                response = await treq.post(
                    self.url,
                    data=body.encode(),
                    headers={b"Content-Type": [b"application/json"]},
                    timeout=POST_TIMEOUT,
                    pool=pool,
                )
                text = await response.content()
            except Exception as e:  # timeouts, refused or dropped connections
                kind = type(e).__name__
            else:
                if response.code == 201:
                    self.answered[index] = json.loads(text)["result"]["message_id"]
                    return
                kind = f"HTTP {response.code}"
            self.refusals[index] += 1
            self.kinds[kind] += 1
            await sleep(REFUSED_RETRY_DELAY)


class Publisher(threading.Thread):
    """Publishes N inbound messages and N events with confirms, retrying on errors."""

    def __init__(
        self, connector: str, count: int, run_id: str, deadline: float, stop: threading.Event
    ) -> None:
        super().__init__(name="soak-publisher", daemon=True)
        self.connector = connector
        self.deadline = deadline
        self.stop = stop
        self.todo: deque[tuple[str, str]] = deque()
        for i in range(count):
            self.todo.append(("inbound", f"{run_id}-in-{i}"))
            self.todo.append(("event", f"{run_id}-ev-{i}"))
        # Written by this thread only; the reactor reads their sizes while it runs.
        self.confirmed: dict[str, set[str]] = {"inbound": set(), "event": set()}
        self.resent = 0  # publishes tried again after a broker error
        self.errors: Counter[str] = Counter()
        self.failure: str | None = None
        self.finished = False

    def run(self) -> None:
        try:
            self._publish_all()
        except BaseException:
            self.failure = traceback.format_exc()
        finally:
            self.finished = True

    def _connect(self) -> tuple[Any, Any]:
        connection = pika.BlockingConnection(AMQP_PARAMS)
        channel = connection.channel()
        channel.confirm_delivery()
        channel.exchange_declare(EXCHANGE, "direct", durable=True)
        for kind in ("inbound", "event"):
            queue = f"{self.connector}.{kind}"
            channel.queue_declare(queue, durable=True)
            channel.queue_bind(queue, EXCHANGE, routing_key=queue)
        return connection, channel

    def _publish_all(self) -> None:
        connection = channel = None
        while self.todo and not self.stop.is_set() and time.monotonic() < self.deadline:
            kind, message_id = self.todo[0]
            publishing = False
            try:
                if connection is None or not connection.is_open:
                    connection, channel = self._connect()
                body = (
                    inbound_body(self.connector, message_id)
                    if kind == "inbound"
                    else event_body(message_id)
                )
                publishing = True
                channel.basic_publish(
                    EXCHANGE, f"{self.connector}.{kind}", body, PROPERTIES, mandatory=True
                )
            except (pika.exceptions.AMQPError, OSError) as e:
                self.errors[type(e).__name__] += 1
                if publishing:
                    self.resent += 1
                _close(connection)
                connection = channel = None
                self.stop.wait(0.5)
                continue
            self.todo.popleft()
            self.confirmed[kind].add(message_id)
        _close(connection)


def _close(connection: Any) -> None:
    try:
        if connection is not None and connection.is_open:
            connection.close()
    except Exception:
        pass


def with_channel(work: Callable[[Any], Any]) -> Any:
    """Run ``work(channel)`` on a fresh pika connection (in a worker thread)."""
    connection = pika.BlockingConnection(AMQP_PARAMS)
    try:
        return work(connection.channel())
    finally:
        _close(connection)


def drain(channel: Any, queue: str, limit: int) -> list[bytes]:
    """Up to ``limit`` bodies taken (and acked) from ``queue``."""
    bodies = []
    while len(bodies) < limit:
        method, _, body = channel.basic_get(queue, auto_ack=True)
        if method is None:
            break
        bodies.append(body)
    return bodies


class Soak:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.count = args.messages
        self.run_id = secrets.token_hex(4)
        self.connector = f"soak-{self.run_id}"
        self.names = QueueNames.for_connector(self.connector)
        self.queues = self.names.all()
        self.phase_rows: list[list[Any]] = []
        self.phase_notes: list[str] = []
        self.phase_lost = 0
        self.tmp = Path(tempfile.mkdtemp(prefix="junebug-soak-"))
        self.log_path = self.tmp / "soak.log"
        self.stop = threading.Event()
        self.process: subprocess.Popen | None = None
        self.started = time.monotonic()
        self.restarts: list[str] = []
        self.healthy_at = 0.0  # when the service was last seen healthy after a restart
        self.dead: dict[str, set[str]] = {"inbound": set(), "event": set()}
        self.dead_unreadable = 0
        self.publisher: Publisher | None = None
        self.outbound: Outbound | None = None

    def elapsed(self) -> float:
        return time.monotonic() - self.started

    def note(self, text: str) -> None:
        print(f"[{self.elapsed():6.1f} s] {text}", flush=True)

    # -- the service ---------------------------------------------------

    def start_service(self, sink_url: str) -> str:
        port = free_port()
        config = {
            "connector_name": self.connector,
            "http_bind": f"{HOST}:{port}",
            "base_url_path": BASE_PATH,
            "mo_message_url": f"{sink_url}/inbound",
            "default_event_url": f"{sink_url}/event",
            "amqp": {"hostname": HOST, "port": 5672, "username": "guest", "password": "guest"},
            "delivery_retry_delay": 0.05,
            "delivery_retry_max_delay": 1,
            "delivery_max_attempts": 10,
            "worker_concurrency": 20,
            "amqp_heartbeat": 10,
            "shutdown_timeout": 10,
        }
        config_path = self.tmp / "config.yaml"
        config_path.write_text(yaml.safe_dump(config), encoding="utf-8")
        with open(self.tmp / "twistd.out", "wb") as out:
            self.process = subprocess.Popen(
                [
                    twistd(),
                    "-n",
                    "--pidfile=",
                    f"--logfile={self.log_path}",
                    "junebug-api",
                    "--config",
                    str(config_path),
                ],
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                cwd=self.tmp,
            )
        return f"http://{HOST}:{port}"

    def check_alive(self) -> None:
        if self.process is not None and self.process.poll() is not None:
            raise RuntimeError(
                f"the service exited with {self.process.returncode}; see {self.log_path}"
            )

    async def wait_healthy(self, url: str, limit: float) -> float:
        """Seconds until GET /health answered 200; RuntimeError after ``limit``."""
        start = time.monotonic()
        while time.monotonic() - start < limit:
            self.check_alive()
            try:
                response = await treq.get(f"{url}/health", timeout=2)
                await response.content()
                if response.code == 200:
                    return time.monotonic() - start
            except Exception:
                pass
            await sleep(0.1)
        raise RuntimeError(f"the service was not healthy within {limit:g} s")

    def stop_service(self) -> str:
        process = self.process
        if process is None:
            return "not started"
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(10)
                return "killed: it did not stop within 30 s of SIGTERM"
        code = process.returncode
        clean = code in (0, -signal.SIGTERM)
        return f"exit status {code}" + ("" if clean else " (unexpected)")

    # -- the run -------------------------------------------------------

    def progress(self) -> float:
        """The share of all messages (3N) sent so far."""
        sent = len(self.outbound.answered) if self.outbound else 0
        if self.publisher:
            sent += len(self.publisher.confirmed["inbound"])
            sent += len(self.publisher.confirmed["event"])
        return sent / (3 * self.count)

    def sending_done(self) -> bool:
        outbound_done = self.outbound is not None and len(self.outbound.answered) == self.count
        return outbound_done and self.publisher is not None and self.publisher.finished

    async def restart_broker(self, number: int, url: str) -> None:
        deadline = self.started + SEND_LIMIT
        threshold = number / (self.args.restarts + 1)
        while time.monotonic() < deadline and not self.sending_done():
            if self.progress() >= threshold and time.monotonic() - self.healthy_at >= RESTART_GAP:
                break
            await sleep(0.05)
        at, progress = self.elapsed(), self.progress()
        try:
            await deferToThread(rabbitmqctl, "stop_app")
            stopped = self.elapsed()
            await sleep(BROKER_DOWN_SECONDS)
        finally:
            await deferToThread(rabbitmqctl, "start_app")
        started = self.elapsed()
        recovery = await self.wait_healthy(url, HEALTH_LIMIT)
        self.healthy_at = time.monotonic()
        self.restarts.append(
            f"restart {number}: at {at:.1f} s ({progress:.0%} sent), broker stopped by"
            f" {stopped:.1f} s, started by {started:.1f} s, service healthy {recovery:.1f} s later"
        )
        self.note(self.restarts[-1])

    async def restarter(self, url: str) -> None:
        for number in range(1, self.args.restarts + 1):
            await self.restart_broker(number, url)

    async def collect_dead_letters(self) -> None:
        def take(channel: Any) -> dict[str, list[bytes]]:
            return {
                kind: drain(channel, failed_queue(self.names.by_role()[kind]), 10_000)
                for kind in ("inbound", "event")
            }

        for kind, bodies in (await deferToThread(with_channel, take)).items():
            field = "message_id" if kind == "inbound" else "user_message_id"
            for body in bodies:
                try:
                    self.dead[kind].add(json.loads(body)[field])
                except (ValueError, KeyError, TypeError):
                    self.dead_unreadable += 1

    def missing(self, sink: Sink) -> dict[str, set[str]]:
        assert self.publisher is not None
        return {
            kind: self.publisher.confirmed[kind] - set(sink.ok[path]) - self.dead[kind]
            for kind, path in (("inbound", "/inbound"), ("event", "/event"))
        }

    async def soak(self) -> int:
        rng = random.Random(self.args.seed)
        sink = Sink(self.args.fail_rate, rng)
        self.site = CuttableSite(sink)
        listening = reactor.listenTCP(0, self.site, interface=HOST)
        sink_url = f"http://{HOST}:{listening.getHost().port}"
        url = self.start_service(sink_url)
        self.note(f"connector {self.connector}; sink {sink_url}; service {url}; logs in {self.tmp}")
        await self.wait_healthy(url, HEALTH_LIMIT)
        self.note("service healthy; sending")

        deadline = self.started + SEND_LIMIT
        self.outbound = Outbound(f"{url}{BASE_PATH}/messages", self.count, self.run_id, deadline)
        self.publisher = Publisher(self.connector, self.count, self.run_id, deadline, self.stop)
        self.publisher.start()
        restarts = Deferred.fromCoroutine(self.restarter(url))
        await Deferred.fromCoroutine(self.outbound.run())
        self.note(f"outbound done: {len(self.outbound.answered)} answered 201")
        while not self.publisher.finished:
            self.check_alive()
            await sleep(0.1)
        if self.publisher.failure:
            raise RuntimeError(f"the publisher failed:\n{self.publisher.failure}")
        self.note(
            f"publishing done: {len(self.publisher.confirmed['inbound'])} inbound,"
            f" {len(self.publisher.confirmed['event'])} events confirmed"
        )
        await restarts
        sent_at = time.monotonic()

        # Every confirmed inbound message and event at the sink or dead-lettered.
        while time.monotonic() - sent_at < DELIVERY_LIMIT:
            self.check_alive()
            await self.collect_dead_letters()
            if not any(self.missing(sink).values()):
                break
            await sleep(0.5)
        self.note("deliveries done" if not any(self.missing(sink).values()) else "gave up waiting")

        # Every delivery acked: nothing left on the queues (ready or unacked).
        watched = [self.names.inbound, self.names.event]
        settle_start = time.monotonic()
        depths = await deferToThread(queue_depths, watched)
        while any(depths.values()) and time.monotonic() - settle_start < SETTLE_LIMIT:
            await sleep(0.5)
            depths = await deferToThread(queue_depths, watched)
        await self.collect_dead_letters()

        outbound_queue = self.names.outbound
        on_queue = await deferToThread(
            with_channel,
            lambda ch: ch.queue_declare(outbound_queue, durable=True, passive=True),
        )
        bodies = await deferToThread(
            with_channel, lambda ch: drain(ch, outbound_queue, 10 * self.count + 1000)
        )
        sink.fail_rate = 0.0  # the phases below want a RapidPro that is up or down
        if self.args.outage:
            listening = await self.outage_phase(sink, listening)
        if self.args.poison:
            await self.poison_phase(sink)
        await listening.stopListening()
        return self.report(sink, on_queue.method.message_count, bodies, depths)

    # -- the long-outage and poison phases -----------------------------

    async def outage_phase(self, sink: Sink, listening: Any) -> Any:
        """RapidPro refuses connections for ``--outage`` s while N inbound
        messages and N events arrive; then it comes back."""
        port = listening.getHost().port
        await listening.stopListening()
        self.site.cut()  # kept-alive connections too: every try is refused
        self.note(f"outage phase: RapidPro down for {self.args.outage:g} s")
        down_at = time.monotonic()
        rss_before = rss_kb(self.process.pid) if self.process else 0
        publisher = Publisher(
            self.connector, self.count, f"{self.run_id}-outage", down_at + SEND_LIMIT, self.stop
        )
        publisher.start()
        while time.monotonic() - down_at < self.args.outage or not publisher.finished:
            self.check_alive()
            await sleep(0.5)
        if publisher.failure:
            raise RuntimeError(f"the outage publisher failed:\n{publisher.failure}")
        listening = reactor.listenTCP(port, self.site, interface=HOST)
        back = time.monotonic()
        self.note("outage phase: RapidPro is back")

        def missing() -> dict[str, set[str]]:
            return {
                kind: publisher.confirmed[kind] - set(sink.ok[path]) - self.dead[kind]
                for kind, path in (("inbound", "/inbound"), ("event", "/event"))
            }

        while any(missing().values()) and time.monotonic() - back < DELIVERY_LIMIT:
            self.check_alive()
            await self.collect_dead_letters()
            await sleep(0.2)
        took = time.monotonic() - back
        await sleep(2)  # late duplicates
        await self.collect_dead_letters()
        left = missing()
        for kind, path, label in (
            ("inbound", "/inbound", "outage inbound"),
            ("event", "/event", "outage events"),
        ):
            confirmed = publisher.confirmed[kind]
            received = sink.ok[path]
            delivered = len(confirmed & set(received))
            duplicates = sum(received[i] - 1 for i in confirmed if received[i] > 1)
            dead = len(self.dead[kind] & confirmed)
            self.phase_lost += len(left[kind]) + dead
            self.phase_rows.append(
                [label, len(confirmed), delivered, duplicates, dead, "-", len(left[kind])]
            )
        rss_after = rss_kb(self.process.pid) if self.process else 0
        self.phase_notes.append(
            f"outage: RapidPro refused connections for {back - down_at:.0f} s; everything"
            f" delivered {took:.1f} s after its return; service RSS {rss_before / 1024:.1f}"
            f" -> {rss_after / 1024:.1f} MiB"
        )
        return listening

    async def poison_phase(self, sink: Sink) -> None:
        """N of each poison body, and N good messages, on the inbound queue."""
        await self.collect_dead_letters()  # start from an empty .failed queue
        count = self.args.poison
        good = [f"{self.run_id}-good-{i}" for i in range(count)]
        poison = [
            make(inbound_body(self.connector, f"{self.run_id}-poison-{name}-{i}"))
            for i in range(count)
            for name, make in POISON.items()
        ]
        queue = self.names.inbound

        def publish(channel: Any) -> None:
            channel.confirm_delivery()
            for index, body in enumerate(poison):
                channel.basic_publish(EXCHANGE, queue, body, PROPERTIES)
                if index % len(POISON) == 0:
                    message_id = good[index // len(POISON)]
                    channel.basic_publish(
                        EXCHANGE, queue, inbound_body(self.connector, message_id), PROPERTIES
                    )

        self.note(f"poison phase: {len(poison)} poison bodies, {count} good messages")
        started = time.monotonic()
        await deferToThread(with_channel, publish)
        reasons: Counter[str] = Counter()

        def take(channel: Any) -> None:
            while True:
                method, properties, _ = channel.basic_get(failed_queue(queue), auto_ack=True)
                if method is None:
                    return
                reason = (properties.headers or {}).get("x-junebug-reason", "(no reason)")
                reasons[reason.split(":")[0]] += 1

        while time.monotonic() - started < DELIVERY_LIMIT:
            await deferToThread(with_channel, take)
            if reasons.total() >= len(poison) and set(good) <= set(sink.ok["/inbound"]):
                break
            await sleep(0.2)
        took = time.monotonic() - started
        delivered = len(set(good) & set(sink.ok["/inbound"]))
        lost = len(poison) - min(reasons.total(), len(poison)) + count - delivered
        self.phase_lost += lost
        self.phase_rows.append(
            [
                "poison (+ good)",
                f"{len(poison)} (+{count})",
                f"- (+{delivered})",
                "-",
                reasons.total(),
                "-",
                lost,
            ]
        )
        self.phase_notes.append(
            f"poison: all on {failed_queue(queue)} and the good ones delivered within {took:.1f} s;"
            f" reasons: {dict(reasons)}"
        )

    # -- the summary ---------------------------------------------------

    def report(
        self, sink: Sink, outbound_count: int, bodies: list[bytes], depths: dict[str, int]
    ) -> int:
        assert self.outbound is not None and self.publisher is not None
        outbound, publisher = self.outbound, self.publisher
        queued: Counter[str] = Counter()
        by_content: Counter[str] = Counter()
        for body in bodies:
            message = json.loads(body)
            queued[message["message_id"]] += 1
            by_content[message.get("content") or ""] += 1
        answered_ids = set(outbound.answered.values())
        out_delivered = len(answered_ids & set(queued))
        out_lost = len(answered_ids - set(queued))
        out_extra = len(bodies) - out_delivered
        out_refused = len(outbound.refusals)

        rows = [
            [
                "outbound",
                len(outbound.answered),
                out_delivered,
                out_extra,
                "-",
                f"{out_refused} ({outbound.refusals.total()} tries)",
                out_lost,
            ]
        ]
        lost_total = out_lost
        missing = self.missing(sink)
        for kind, path, label in (
            ("inbound", "/inbound", "inbound"),
            ("event", "/event", "events"),
        ):
            confirmed = publisher.confirmed[kind]
            received = sink.ok[path]
            delivered = len(confirmed & set(received))
            duplicates = sum(n - 1 for n in received.values())
            dead = len(self.dead[kind] & confirmed)
            lost = len(missing[kind])
            lost_total += lost
            rows.append([label, len(confirmed), delivered, duplicates, dead, "-", lost])
        rows.extend(self.phase_rows)
        lost_total += self.phase_lost

        header = ["stream", "sent", "delivered", "duplicates", "dead-lettered"]
        header += ["refused-then-retried", "lost"]
        widths = [max(len(str(row[i])) for row in [header, *rows]) for i in range(len(header))]

        def line(cells: list[Any]) -> str:
            return "  ".join(
                f"{cell!s:<{w}}" if i == 0 else f"{cell!s:>{w}}"
                for i, (cell, w) in enumerate(zip(cells, widths, strict=True))
            )

        print()
        print(
            f"junebug-api soak: {self.count} messages per stream, {self.args.restarts} broker"
            f" restart(s), RapidPro failure rate {self.args.fail_rate:g}, seed {self.args.seed}"
        )
        print(line(header))
        print(line(["-" * w for w in widths]))
        for row in rows:
            print(line(row))
        print()
        for text in self.restarts + self.phase_notes:
            print(text)
        unsent = self.count - len(outbound.answered)
        unsent_in = self.count - len(publisher.confirmed["inbound"])
        unsent_ev = self.count - len(publisher.confirmed["event"])
        matches = "equal" if outbound_count == len(outbound.answered) else "NOT equal"
        print(
            f"outbound: {outbound_count} message(s) on {self.names.outbound}, {matches} to"
            f" the {len(outbound.answered)} 201 answer(s); {out_extra} without a 201 (refused"
            f" but published); {sum(1 for n in by_content.values() if n > 1)} content(s)"
            f" queued more than once; refusals by kind: {dict(outbound.kinds)}"
        )
        print(
            f"publisher: {publisher.resent} publish(es) tried again after a broker error;"
            f" errors by kind: {dict(publisher.errors)}"
        )
        print(
            f"sink: {sum(sink.posts.values())} POSTs, {sum(sink.refused.values())} answered 500,"
            f" {sink.unreadable} unreadable;"
            f" ids from outside the main run (phases):"
            f" {len(set(sink.ok['/inbound']) - publisher.confirmed['inbound'])} inbound,"
            f" {len(set(sink.ok['/event']) - publisher.confirmed['event'])} events"
        )
        print(f"left on queues after settling (ready + unacked): {depths}")
        if self.dead_unreadable:
            print(f"dead letters without a readable id: {self.dead_unreadable}")
        log = ""
        if self.log_path.exists():
            log = self.log_path.read_text(encoding="utf-8", errors="replace")
        print(
            f"service log {self.log_path}: {log.count('Traceback')} Traceback,"
            f" {log.count('Unhandled')} Unhandled"
        )
        print(f"elapsed: {self.elapsed():.1f} s")
        problems = []
        if lost_total:
            problems.append(f"{lost_total} LOST")
        if unsent or unsent_in or unsent_ev:
            problems.append(
                f"not everything could be sent ({unsent} outbound, {unsent_in} inbound,"
                f" {unsent_ev} events left)"
            )
        print("RESULT: " + ("; ".join(problems) if problems else "nothing lost"))
        return 1 if problems else 0

    # -- running it ----------------------------------------------------

    def run(self) -> int:
        result: dict[str, int] = {}

        def finished(outcome: Any) -> None:
            if isinstance(outcome, int):
                result["code"] = outcome
            else:
                print(f"soak failed: {outcome.getTraceback()}", file=sys.stderr)
                result["code"] = 1
            reactor.stop()

        def go() -> None:
            Deferred.fromCoroutine(self.soak()).addBoth(finished)

        reactor.callWhenRunning(go)
        reactor.addSystemEventTrigger("before", "shutdown", self.stop.set)
        reactor.run()
        return result.get("code", 130)

    def clean_up(self) -> None:
        """Stop the service, make sure the broker runs, delete the connector's queues."""
        self.stop.set()
        status = "not stopped"
        try:
            status = self.stop_service()
        finally:
            try:
                rabbitmqctl("start_app")
            finally:
                deleted = self.delete_queues()
                print(f"service stopped ({status}); {deleted}; broker running", flush=True)

    def delete_queues(self) -> str:
        deadline = time.monotonic() + 30
        while True:
            try:
                with_channel(lambda ch: [ch.queue_delete(q) for q in self.queues])
                return f"queues of {self.connector} deleted"
            except (pika.exceptions.AMQPError, OSError) as e:
                if time.monotonic() > deadline:
                    return f"queues of {self.connector} NOT deleted ({type(e).__name__})"
                time.sleep(1)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--messages", type=int, default=3000, help="per stream (default 3000)")
    parser.add_argument("--restarts", type=int, default=2, help="broker restarts (default 2)")
    parser.add_argument(
        "--fail-rate", type=float, default=0.2, help="share of sink answers that are 500"
    )
    parser.add_argument("--seed", type=int, default=None, help="for the sink's answers")
    parser.add_argument(
        "--outage",
        type=float,
        default=0,
        help="seconds of a RapidPro outage after the main run (default 0: none; try 600)",
    )
    parser.add_argument(
        "--poison", type=int, default=0, help="poison bodies of each kind (default 0: none)"
    )
    args = parser.parse_args(argv)
    if args.messages < 1 or args.restarts < 0 or not 0 <= args.fail_rate < 1:
        parser.error("--messages must be >= 1, --restarts >= 0 and 0 <= --fail-rate < 1")
    if args.outage < 0 or args.poison < 0:
        parser.error("--outage and --poison must not be negative")
    if args.seed is None:
        args.seed = random.SystemRandom().randrange(2**32)
    return args


def main(argv: list[str] | None = None) -> int:
    soak = Soak(parse_args(argv))
    try:
        return soak.run()
    finally:
        soak.clean_up()


if __name__ == "__main__":
    sys.exit(main())
