"""The chaos soak's parts: channels on hostile RapidPros, hostile input, a broker
restart and a SIGKILL, then a count per channel (issue 20 item 7).

Used by ``bench/chaos_soak.py`` (minutes, by hand) and
``tests/test_e2e_chaos.py`` (seconds, in the suite), with other numbers
(:class:`ChaosPlan`). It runs in the Twisted reactor, against a RabbitMQ
(:class:`BrokerControl`: the machine's, 127.0.0.1:5672, by default; the
test gives a node of its own, so that the restart leaves other tests alone)
which it restarts once, Redis (127.0.0.1:6379, the state cache, keys under a
prefix of the run's own that expire in 10 minutes), and the real service
(``twistd -n junebug-api``, SIGKILLed once and started again on the same
config).

The RapidPro stand-ins: channels 0 and 1 share one host that flaps (500 and
200 in turns of ``flap_period`` seconds, for ``flap_for`` seconds from its
first POST); channel 2's host answers 429 with ``Retry-After: 1`` for
``throttle_for`` seconds from its first POST; any other channel's host
answers 200. Every channel has its own paths (``/c/jn/<channel>/receive``,
``/c/jn/<channel>/events``) and its own token. Into each channel go:

- good inbound messages (some with hostile ``x-junebug-*`` headers: values
  no run of the service writes, such as 2**63 attempts or a first failure
  a thousand years ago): each must be POSTed 200 to its channel's URL;
- outbound messages through the HTTP API (a refused POST, a 503 while the
  broker or the service is away, is tried again until a 201), each with an
  ``event_url`` on its channel's host; a stand-in transport takes them off
  ``<channel>.outbound`` and publishes an ack for each on the channel's
  ``.event`` queue, and for every third one a nack on the *next* channel's
  ``.event`` queue naming it: that one must reach the next channel's own
  default event URL with its own token;
- poison bodies (not JSON, JSON of the wrong schema) on ``.inbound`` and
  ``.event``: each must be on ``.failed`` with an ``x-junebug-reason``.

Then it waits until everything is delivered or parked and the queues have
settled, and counts per channel: sent, delivered, duplicates, lost, crossed
(a POST at one channel's URL carrying another channel's message, channel id
or token), good messages on ``.failed``, poison on ``.failed`` with a reason,
and stranded (unacked on the broker, plus ``messages_in_work`` on ``/health``).
"""

from __future__ import annotations

import json
import secrets
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

import attrs
import pika
import pika.exceptions
import treq
from soak import Outbound, event_body, inbound_body, rabbitmqctl, sleep
from twisted.internet import reactor
from twisted.internet.defer import Deferred, DeferredList
from twisted.internet.threads import deferToThread
from twisted.web.resource import Resource
from twisted.web.server import Site

from junebug_api.formats.queue_names import EXCHANGE, QueueNames, failed_queue
from tests.support import AMQP_PARAMS, ServiceProcess, free_port
from tests.test_e2e_hostile_headers import HOSTILE, RawHeaders, field_table
from tests.test_e2e_shared_host import queue_counts

REASON = "x-junebug-reason"
PROPERTIES = pika.BasicProperties(delivery_mode=2, content_type="application/json")


def hostile_properties(n: int) -> pika.BasicProperties:
    """Persistent properties whose headers hold values no run of the service
    writes (issue 20: they once stranded messages), kind ``n`` of several."""
    kinds = list(HOSTILE.values())
    return RawHeaders(field_table(kinds[n % len(kinds)]))


COLUMNS = [
    "channel",
    "rapidpro",
    "sent",
    "delivered",
    "duplicates",
    "lost",
    "crossed",
    "good on .failed",
    "poison on .failed",
    "stranded",
]


@attrs.frozen
class ChaosPlan:
    """The numbers of one run (per channel unless said)."""

    channels: int = 4
    inbound: int = 40
    hostile: int = 8
    outbound: int = 20
    poison: int = 4  # per queue (.inbound, .event), kinds in turn
    rounds: int = 10  # the sending is spread over this many rounds...
    round_gap: float = 2.0  # ...this many seconds apart
    flap_period: float = 2.0
    flap_for: float = 60.0  # seconds; then the shared host answers 200
    throttle_for: float = 20.0
    restart_broker_after: int = 3  # rounds
    kill_service_after: int = 6  # rounds
    drain_limit: float = 180.0
    settle_limit: float = 30.0


def rapidpro_kind(index: int) -> str:
    return {0: "flapping, shared", 1: "flapping, shared", 2: "429 then 200"}.get(index, "200")


@attrs.frozen
class Post:
    channel: str  # the one its path names
    kind: str  # receive or events
    authorization: str | None
    body_channel: str | None
    message_id: str | None
    event_type: str | None
    status: int


Answer = Callable[[float], tuple[int, dict[bytes, bytes]]]


class Host(Resource):
    """One RapidPro host: answers with ``answer(seconds since its first
    POST)`` and records every POST."""

    isLeaf = True

    def __init__(self, answer: Answer) -> None:
        super().__init__()
        self.answer = answer
        self.posts: list[Post] = []
        self.first: float | None = None

    def render_POST(self, request: Any) -> bytes:
        parts = request.path.decode("utf-8", "replace").strip("/").split("/")
        try:
            body = json.loads(request.content.read())
        except ValueError:
            body = {}
        if self.first is None:
            self.first = time.monotonic()
        status, headers = self.answer(time.monotonic() - self.first)
        self.posts.append(
            Post(
                parts[2] if len(parts) == 4 else "?",
                parts[-1],
                request.getHeader("authorization"),
                body.get("channel_id"),
                body.get("message_id"),
                body.get("event_type"),
                status,
            )
        )
        request.setResponseCode(status)
        for name, value in headers.items():
            request.setHeader(name, value)
        return b"{}"


def flapping(period: float, seconds: float) -> Answer:
    def answer(elapsed: float) -> tuple[int, dict]:
        return (500 if elapsed < seconds and int(elapsed / period) % 2 == 0 else 200), {}

    return answer


def throttling(seconds: float) -> Answer:
    def answer(elapsed: float) -> tuple[int, dict]:
        if elapsed < seconds:
            return 429, {b"Retry-After": b"1"}
        return 200, {}

    return answer


class BrokerControl(Protocol):
    """The RabbitMQ a run uses: where it listens, how it restarts, what its
    queues hold."""

    port: int
    params: pika.ConnectionParameters

    def restart(self) -> None:
        """Stop and start it (every connection drops; queues stay)."""

    def queue_counts(self, names: list[str]) -> dict[str, tuple[int, int]]:
        """name -> (ready, unacked) of its queues ``names``."""


class LocalBroker:
    """The machine's RabbitMQ (127.0.0.1:5672, guest), through ``rabbitmqctl``."""

    port = 5672
    params = AMQP_PARAMS

    def restart(self) -> None:
        try:
            rabbitmqctl("stop_app")
            time.sleep(1.5)
        finally:
            rabbitmqctl("start_app")

    def queue_counts(self, names: list[str]) -> dict[str, tuple[int, int]]:
        return queue_counts(names)


class Transport:
    """A vumi transport stand-in on the machine's broker: publishes with
    confirms (reconnecting and trying again through a broker restart) and
    takes what the service publishes to ``.outbound``. One connection, used
    from reactor threads one call at a time."""

    def __init__(self, params: pika.ConnectionParameters) -> None:
        self._params = params
        self._lock = threading.Lock()
        self._connection: Any = None
        self._channel: Any = None
        self.retried = 0

    def _open(self) -> Any:
        if self._connection is None or not self._connection.is_open:
            self._connection = pika.BlockingConnection(self._params)
            self._channel = self._connection.channel()
            self._channel.confirm_delivery()
        return self._channel

    def _reset(self) -> None:
        try:
            if self._connection is not None and self._connection.is_open:
                self._connection.close()
        except Exception:
            pass
        self._connection = self._channel = None

    def _retrying(self, work: Callable[[Any], Any], limit: float = 120.0) -> Any:
        deadline = time.monotonic() + limit
        with self._lock:
            while True:
                try:
                    return work(self._open())
                except (pika.exceptions.AMQPError, OSError):
                    if time.monotonic() > deadline:
                        raise
                    self.retried += 1
                    self._reset()
                    time.sleep(0.5)

    def publish(
        self, queue: str, body: bytes, properties: pika.BasicProperties = PROPERTIES
    ) -> None:
        self._retrying(lambda ch: ch.basic_publish(EXCHANGE, queue, body, properties))

    def take_all(self, queue: str) -> list[tuple[dict, bytes]]:
        """Every message now on ``queue`` (acked): (headers, body) each."""

        def take(channel: Any) -> list[tuple[dict, bytes]]:
            taken = []
            while True:
                method, properties, body = channel.basic_get(queue, auto_ack=True)
                if method is None:
                    return taken
                taken.append((properties.headers or {}, body))

        return self._retrying(take)

    def delete(self, names: list[str]) -> None:
        self._retrying(lambda ch: [ch.queue_delete(name) for name in names])

    def close(self) -> None:
        with self._lock:
            self._reset()


class ChannelOutbound(Outbound):
    """The soak's outbound sender, for one channel, each message with an
    ``event_url`` on its channel's host and the channel's token."""

    def __init__(self, url: str, count: int, run_id: str, event_url: str, token: str) -> None:
        super().__init__(url, count, run_id, time.monotonic() + 300)
        self.event_url = event_url
        self.token = token

    def body(self, index: int) -> dict[str, Any]:
        return {**super().body(index), "event_url": self.event_url, "event_auth_token": self.token}


def poison_bodies(kind: str, marker: str) -> list[bytes]:
    """The poison kinds for ``.inbound`` or ``.event``, each marked as the run's."""
    wrong_schema = (
        {"message_type": "user_message", "marker": marker, "to_addr": ["not", "a", "string"]}
        if kind == "inbound"
        else {"message_type": "event", "marker": marker, "event_type": "ack"}
    )
    return [b"not JSON \xff " + marker.encode(), json.dumps(wrong_schema).encode()]


@attrs.define
class ChannelCount:
    """What one channel was sent, and what became of it."""

    id: str
    index: int
    token: str
    base: str = ""  # its RapidPro host's URL
    inbound: list[str] = attrs.field(factory=list)  # good inbound ids
    outbound: dict[str, None] = attrs.field(factory=dict)  # ids answered 201
    taken: set[str] = attrs.field(factory=set)  # outbound ids seen on .outbound
    events: set[tuple[str, str]] = attrs.field(factory=set)  # (message id, event type)
    poison: set[bytes] = attrs.field(factory=set)
    failed: list[tuple[dict, bytes]] = attrs.field(factory=list)

    def expected(self) -> set[tuple[str, str, str | None]]:
        """(kind, message id, event type) of each delivery wanted at its URL."""
        wanted = {("receive", m, None) for m in self.inbound}
        return wanted | {("events", m, t) for m, t in self.events}


class ChaosRun:
    """One run of a :class:`ChaosPlan`; :meth:`run` returns the table rows."""

    def __init__(
        self,
        plan: ChaosPlan,
        tmp: Path,
        note: Callable[[str], None] = print,
        broker: BrokerControl | None = None,
    ) -> None:
        self.plan = plan
        self.broker = broker if broker is not None else LocalBroker()
        self.tmp = tmp
        self.note_out = note
        self.run_id = secrets.token_hex(3)
        self.started = time.monotonic()
        self.channels = [
            ChannelCount(f"chaos-{self.run_id}-{i}", i, f"tok-{i}-{secrets.token_hex(6)}")
            for i in range(plan.channels)
        ]
        self.by_id = {c.id: c for c in self.channels}
        self.hosts: list[Host] = []
        self.ports: list[Any] = []
        self.transport = Transport(self.broker.params)
        self.service: ServiceProcess | None = None
        self.chaos_notes: list[str] = []
        self.stranded: dict[str, int] = {}

    def note(self, text: str) -> None:
        self.note_out(f"[{time.monotonic() - self.started:6.1f} s] {text}")

    # -- set-up --------------------------------------------------------

    def _listen(self, answer: Answer) -> str:
        host = Host(answer)
        port = reactor.listenTCP(0, Site(host), interface="127.0.0.1")
        self.hosts.append(host)
        self.ports.append(port)
        return f"http://127.0.0.1:{port.getHost().port}"

    def _config(self) -> dict[str, Any]:
        plan = self.plan
        shared = self._listen(flapping(plan.flap_period, plan.flap_for))
        throttled = self._listen(throttling(plan.throttle_for))
        steady = self._listen(lambda _: (200, {}))
        channels = {}
        for c in self.channels:
            base = {0: shared, 1: shared, 2: throttled}.get(c.index, steady)
            c.base = base
            channels[c.id] = {
                "mo_url": f"{base}/c/jn/{c.id}/receive",
                "mo_url_auth_token": c.token,
                "default_event_url": f"{base}/c/jn/{c.id}/events",
                "default_event_auth_token": c.token,
            }
        return {
            "http_bind": f"127.0.0.1:{free_port()}",
            "amqp": {"hostname": "127.0.0.1", "port": self.broker.port},
            "amqp_heartbeat": 10,
            "delivery_retry_delay": 0.2,
            "delivery_retry_max_delay": 1,
            "delivery_probe_interval": 1,
            "delivery_max_attempts": 50,
            "shutdown_timeout": 5,
            "state_cache_class": "junebug_api.state_cache.RedisStateCache",
            "state_cache_config": {
                "url": "redis://127.0.0.1:6379/0",
                "key_prefix": f"jbchaos:{self.run_id}:",
                "timeout": 600,
            },
            "channels": channels,
        }

    def queues(self) -> list[str]:
        return [q for c in self.channels for q in QueueNames.for_connector(c.id).all()]

    # -- sending -------------------------------------------------------

    async def _send_round(self, number: int) -> None:
        plan = self.plan
        work = []
        for c in self.channels:
            work.append(deferToThread(self._publish_round, c, number))
            count = _share(plan.outbound, plan.rounds, number)
            if count:
                sender = ChannelOutbound(
                    f"{self.service.url}/channels/{c.id}/messages",
                    count,
                    f"{self.run_id}-{number}",
                    f"{c.base}/c/jn/{c.id}/events?via=event_url",
                    c.token,
                )
                work.append(
                    Deferred.fromCoroutine(sender.run()).addCallback(
                        lambda _, c=c, s=sender: c.outbound.update(
                            dict.fromkeys(s.answered.values())
                        )
                    )
                )
        await DeferredList(work, fireOnOneErrback=True, consumeErrors=True)

    def _publish_round(self, c: ChannelCount, number: int) -> None:
        """This round's inbound (good, hostile) and poison for channel ``c``
        (in a thread: pika blocks)."""
        plan = self.plan
        names = QueueNames.for_connector(c.id)
        for i in range(_share(plan.inbound, plan.rounds, number)):
            message_id = uuid.uuid4().hex
            c.inbound.append(message_id)
            properties = PROPERTIES
            if i < _share(plan.hostile, plan.rounds, number):
                properties = hostile_properties(number + i)
            self.transport.publish(names.inbound, inbound_body(c.id, message_id), properties)
        for i in range(_share(plan.poison, plan.rounds, number)):
            for kind, queue in (("inbound", names.inbound), ("event", names.event)):
                options = poison_bodies(kind, f"{self.run_id}-{c.id}-{number}-{i}")
                body = options[i % len(options)]
                c.poison.add(body)
                # Every other one with hostile headers as well.
                hostile = hostile_properties(number + i) if i % 2 else PROPERTIES
                self.transport.publish(queue, body, hostile)

    async def transport_loop(self, stop: list[bool]) -> None:
        """Take ``.outbound``; ack each message on its channel's ``.event``,
        and every third one also on the next channel's (a nack naming it)."""
        while not stop:
            await deferToThread(self._transport_once)
            await sleep(0.3)
        await deferToThread(self._transport_once)

    def _transport_once(self) -> None:
        for c in self.channels:
            taken = self.transport.take_all(QueueNames.for_connector(c.id).outbound)
            for _, body in taken:
                message_id = json.loads(body)["message_id"]
                if message_id in c.taken:
                    continue  # published twice (a 201 lost to a restart): one ack
                c.taken.add(message_id)
                self.transport.publish(f"{c.id}.event", event_body(message_id))
                c.events.add((message_id, "submitted"))
                if len(c.taken) % 3 == 0:
                    other = self.channels[(c.index + 1) % len(self.channels)]
                    nack = json.loads(event_body(message_id))
                    nack.update(event_type="nack", nack_reason="chaos")
                    self.transport.publish(f"{other.id}.event", json.dumps(nack).encode())
                    other.events.add((message_id, "rejected"))

    # -- chaos ---------------------------------------------------------

    async def restart_broker(self) -> None:
        self.note("broker: restarting")
        at = time.monotonic()
        await deferToThread(self.broker.restart)
        await deferToThread(self.service.wait_healthy, 90)
        took = time.monotonic() - at
        self.chaos_notes.append(f"broker restarted; service healthy again {took:.1f} s later")
        self.note(self.chaos_notes[-1])

    async def kill_service(self) -> None:
        self.note("service: SIGKILL")
        at = time.monotonic()
        self.service.process.kill()
        await deferToThread(self.service.process.wait)
        self.service.start()
        await deferToThread(self.service.wait_healthy, 90)
        took = time.monotonic() - at
        self.chaos_notes.append(f"service SIGKILLed and started again; healthy {took:.1f} s later")
        self.note(self.chaos_notes[-1])

    # -- counting ------------------------------------------------------

    def answers(self) -> str:
        """How each RapidPro host answered: status -> POSTs."""
        kinds = ["channels 0-1 (flapping)", "channel 2 (throttling)", "the others"]
        return "; ".join(
            f"{kind}: {dict(sorted(Counter(p.status for p in host.posts).items()))}"
            for kind, host in zip(kinds, self.hosts, strict=True)
        )

    def posts(self) -> list[Post]:
        return [p for host in self.hosts for p in host.posts]

    def delivered(self) -> dict[str, Counter]:
        """Per channel: (kind, message id, event type) -> POSTs answered 200."""
        ok: dict[str, Counter] = {c.id: Counter() for c in self.channels}
        for p in self.posts():
            if p.status == 200 and p.channel in ok:
                event_type = p.event_type if p.kind == "events" else None
                ok[p.channel][(p.kind, p.message_id, event_type)] += 1
        return ok

    async def collect_failed(self) -> None:
        for c in self.channels:
            names = QueueNames.for_connector(c.id)
            for queue in (names.inbound, names.event):
                c.failed += await deferToThread(self.transport.take_all, failed_queue(queue))

    def missing(self) -> dict[str, Counter[str]]:
        """Per channel, by kind: what is neither delivered nor parked yet."""
        delivered = self.delivered()
        parked = {body for c in self.channels for _, body in c.failed}
        missing: dict[str, Counter[str]] = {}
        for c in self.channels:
            left = Counter(kind for kind, _, _ in c.expected() - set(delivered[c.id]))
            left["poison"] = len(c.poison - parked)
            left["outbound"] = len(set(c.outbound) - c.taken)
            if +left:
                missing[c.id] = +left
        return missing

    async def settle(self) -> None:
        """Wait until nothing is ready or unacked on the channels' queues and
        ``/health`` counts nothing in work; keep what is left as stranded."""
        watched = [
            q
            for c in self.channels
            for q in (QueueNames.for_connector(c.id).inbound, QueueNames.for_connector(c.id).event)
        ]
        deadline = time.monotonic() + self.plan.settle_limit
        while True:
            counts = await deferToThread(self.broker.queue_counts, watched)
            in_work = await messages_in_work(self.service.url, watched)
            self.stranded = {
                c.id: sum(
                    counts.get(q, (0, 0))[1] + in_work.get(q, 0)
                    for q in watched
                    if q.startswith(c.id + ".")
                )
                for c in self.channels
            }
            ready = sum(r for r, _ in counts.values())
            if (not any(self.stranded.values()) and not ready) or time.monotonic() > deadline:
                return
            await sleep(0.5)

    def rows(self) -> list[list[Any]]:
        delivered = self.delivered()
        crossed: Counter[str] = Counter()
        tokens = {f"Token {c.token}": c.id for c in self.channels}
        owner = {m: c.id for c in self.channels for m in [*c.inbound, *c.outbound]}
        for p in self.posts():
            wrong_token = tokens.get(p.authorization or "") != p.channel
            wrong_body = p.body_channel != p.channel
            wrong_message = p.kind == "receive" and owner.get(p.message_id) != p.channel
            if wrong_token or wrong_body or wrong_message:
                crossed[p.channel] += 1
        rows = []
        for c in self.channels:
            expected = c.expected()
            got = delivered[c.id]
            parked_bodies = {body: headers for headers, body in c.failed}
            good_failed = sum(1 for _, body in c.failed if body not in c.poison)
            poison_ok = sum(1 for b in c.poison if parked_bodies.get(b, {}).get(REASON))
            lost_out = len(set(c.outbound) - c.taken)
            rows.append(
                [
                    c.id.rsplit("-", 1)[1],
                    rapidpro_kind(c.index),
                    f"{len(c.inbound)} in + {len(c.outbound)} out + {len(c.events)} ev",
                    sum(1 for k in expected if got[k]) + len(set(c.outbound) & c.taken),
                    sum(n - 1 for k, n in got.items() if k in expected and n > 1),
                    len(expected - set(got)) + lost_out,
                    crossed[c.id],
                    good_failed,
                    f"{poison_ok}/{len(c.poison)}",
                    self.stranded.get(c.id, "?"),
                ]
            )
        return rows

    # -- the run -------------------------------------------------------

    async def run(self) -> list[list[Any]]:
        plan = self.plan
        config = self._config()
        self.service = ServiceProcess(self.tmp, config).start()
        await deferToThread(self.service.wait_healthy, 60)
        self.note(f"{len(self.channels)} channels; service {self.service.url}")
        stop: list[bool] = []
        transport = Deferred.fromCoroutine(self.transport_loop(stop))
        chaos = None
        for number in range(plan.rounds):
            if number == plan.restart_broker_after:
                chaos = Deferred.fromCoroutine(self.restart_broker())
            if number == plan.kill_service_after:
                if chaos is not None:
                    await chaos
                chaos = Deferred.fromCoroutine(self.kill_service())
            await self._send_round(number)
            self.note(f"round {number + 1} of {plan.rounds} sent")
            await sleep(plan.round_gap)
        if chaos is not None:
            await chaos
        deadline = time.monotonic() + plan.drain_limit
        while time.monotonic() < deadline:
            await self.collect_failed()
            if not self.missing():
                break
            await sleep(0.5)
        stop.append(True)
        await transport
        if self.missing():
            depths = await deferToThread(self.broker.queue_counts, self.queues())
            self.chaos_notes.append(
                f"not delivered within {plan.drain_limit:g} s: {self.missing()};"
                f" queues (ready, unacked): { {q: n for q, n in depths.items() if any(n)} }"
            )
            self.note(self.chaos_notes[-1])
        self.note("drained; settling")
        await self.settle()
        await self.collect_failed()
        return self.rows()

    def close(self) -> list[str]:
        """Stop the service and the RapidPros, delete the queues; the service
        log's unhandled errors (none expected)."""
        errors: list[str] = []
        if self.service is not None:
            try:
                self.service.stop()
            except AssertionError as e:
                errors.append(str(e))
        for port in self.ports:
            port.stopListening()
        try:
            self.transport.delete(self.queues())
        finally:
            self.transport.close()
        return errors


def _share(total: int, rounds: int, number: int) -> int:
    """Round ``number``'s share of ``total`` spread over ``rounds``."""
    return total * (number + 1) // rounds - total * number // rounds


async def messages_in_work(url: str, queues: list[str]) -> dict[str, int]:
    """``messages_in_work`` of ``queues`` on the service's ``/health``."""
    response = await treq.get(url + "/health", timeout=5)
    status = json.loads(await response.content())["components"]["amqp"]["queues"]
    return {q: status[q].get("messages_in_work", 0) for q in queues if q in status}


def render(rows: list[list[Any]]) -> str:
    """The rows as a plain text table under :data:`COLUMNS`."""
    table = [COLUMNS, *rows]
    widths = [max(len(str(row[i])) for row in table) for i in range(len(COLUMNS))]
    lines = []
    for n, row in enumerate(table):
        lines.append("  ".join(f"{cell!s:<{w}}" for cell, w in zip(row, widths, strict=True)))
        if n == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(line.rstrip() for line in lines)


def zeros(rows: list[list[Any]]) -> list[str]:
    """What is wrong in ``rows``: every lost, crossed, good-on-.failed and
    stranded count must be 0, and every poison body on .failed with a reason."""
    wrong = []
    for row in rows:
        named = dict(zip(COLUMNS, row, strict=True))
        for column in ("lost", "crossed", "good on .failed", "stranded"):
            if named[column] != 0:
                wrong.append(f"channel {named['channel']}: {column} {named[column]}")
        parked, poison = str(named["poison on .failed"]).split("/")
        if parked != poison:
            wrong.append(f"channel {named['channel']}: poison on .failed {parked} of {poison}")
    return wrong
