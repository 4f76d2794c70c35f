"""The service's two neighbours in the session round trip, in one lean process.

    python bench/roundtrip_peer.py AMQP_PORT HTTP_PORT SERVICE_MESSAGES_URL

Run by bench/roundtrip.py on the core the service does not use. It plays the
vumi transport (publishes inbound messages to ``bench.inbound`` at a fixed
rate and consumes the replies from ``bench.outbound``) and RapidPro (answers
200 to every inbound POST and at once POSTs a reply, ``reply_to``, to the
service), on one Twisted reactor with plain protocols: AMQP 0-9-1 framing
and HTTP/1.1 written here, just what the round trip needs.

Why not pika and twisted.web: at 1,000 sessions/s the earlier driver (pika,
two threads) and stand-in (twisted.web server and Agent) took 0.75 CPU ms
per session between them, and with RabbitMQ's 0.25 that was the whole core
they share: the round trip measured the queue in front of them, not the
service. Here a session costs the peer about a third of that, and every
timestamp comes from one clock in one process. Every socket has TCP_NODELAY,
as RabbitMQ's and twisted.web's have, so Nagle's algorithm never holds back
a publish or a POST of the peer's.

Commands, one per line on stdin: ``RATE SECONDS GRACE``. For each, one JSON
line on stdout: ``published``, ``replied``, ``took`` (seconds publishing
took), ``errors`` and, per inbound
message id, ``times``: when it was due, published, received by RapidPro,
its reply POST sent, the reply's 201 received, the reply consumed
(time.monotonic(), None for what did not happen).
"""

from __future__ import annotations

import json
import struct
import sys
import time
import uuid
from collections import deque
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from twisted.internet import reactor, stdio
from twisted.internet.protocol import ClientFactory, Factory, Protocol
from twisted.protocols.basic import LineReceiver

sys.path.insert(0, str(Path(__file__).parent))
from cache_memory import inbound

EXCHANGE = b"vumi"
INBOUND_QUEUE = b"bench.inbound"
OUTBOUND_QUEUE = b"bench.outbound"
PUBLISH_CHANNEL, CONSUME_CHANNEL = 1, 2
MAX_HTTP_CONNECTIONS = 64
FRAME_END = b"\xce"
# time.monotonic() slots of each message's ``times``.
DUE, SENT, ARRIVED, REPLY_SENT, ANSWERED, GOT = range(6)


# -- AMQP 0-9-1, the few frames the transport side needs ---------------------


def shortstr(value: bytes) -> bytes:
    return bytes([len(value)]) + value


def frame(kind: int, channel: int, payload: bytes) -> bytes:
    return struct.pack(">BHI", kind, channel, len(payload)) + payload + FRAME_END


def method(channel: int, class_id: int, method_id: int, arguments: bytes = b"") -> bytes:
    return frame(1, channel, struct.pack(">HH", class_id, method_id) + arguments)


def publish_frames(body: bytes) -> bytes:
    """basic.publish of a persistent JSON message (content-type, delivery-mode 2)."""
    arguments = b"\x00\x00" + shortstr(EXCHANGE) + shortstr(INBOUND_QUEUE) + b"\x00"
    properties = struct.pack(">HHQH", 60, 0, len(body), 0x8000 | 0x1000)
    properties += shortstr(b"application/json") + b"\x02"
    return (
        method(PUBLISH_CHANNEL, 60, 40, arguments)
        + frame(2, PUBLISH_CHANNEL, properties)
        + frame(3, PUBLISH_CHANNEL, body)
    )


class AmqpTransport(Protocol):
    """One connection: publishes on channel 1, consumes bench.outbound (no-ack)
    on channel 2. Any close from the broker ends the process."""

    def __init__(self, peer: Peer) -> None:
        self.peer = peer
        self.buffer = b""
        self.frame_max = 131072
        self.expect_body: int | None = None  # body size of the delivery being read
        self.body: list[bytes] = []
        self.got = 0

    def connectionMade(self) -> None:
        self.transport.setTcpNoDelay(True)
        self.transport.write(b"AMQP\x00\x00\x09\x01")

    def dataReceived(self, data: bytes) -> None:
        self.buffer += data
        buffer, offset = self.buffer, 0
        while len(buffer) - offset >= 7:
            kind, channel, size = struct.unpack_from(">BHI", buffer, offset)
            end = offset + 7 + size
            if len(buffer) < end + 1:
                break
            payload = buffer[offset + 7 : end]
            offset = end + 1
            if kind == 1:
                self.method(channel, payload)
            elif kind == 2:
                (self.expect_body,) = struct.unpack_from(">Q", payload, 4)
                self.body = []
                if self.expect_body == 0:
                    self.delivered(b"")
            elif kind == 3:
                self.body.append(payload)
                self.expect_body -= len(payload)
                if self.expect_body <= 0:
                    self.delivered(b"".join(self.body))
        self.buffer = buffer[offset:]

    def method(self, channel: int, payload: bytes) -> None:
        class_id, method_id = struct.unpack_from(">HH", payload)
        write = self.transport.write
        if (class_id, method_id) == (10, 10):  # connection.start
            response = b"\x00guest\x00guest"
            write(
                method(
                    0,
                    10,
                    11,
                    b"\x00\x00\x00\x00"
                    + shortstr(b"PLAIN")
                    + struct.pack(">I", len(response))
                    + response
                    + shortstr(b"en_US"),
                )
            )
        elif (class_id, method_id) == (10, 30):  # connection.tune: no heartbeats
            channel_max, frame_max, _ = struct.unpack_from(">HIH", payload, 4)
            self.frame_max = frame_max or self.frame_max
            write(method(0, 10, 31, struct.pack(">HIH", channel_max, self.frame_max, 0)))
            write(method(0, 10, 40, shortstr(b"/") + b"\x00\x00"))
        elif (class_id, method_id) == (10, 41):  # connection.open-ok
            write(method(PUBLISH_CHANNEL, 20, 10, b"\x00"))
            write(method(CONSUME_CHANNEL, 20, 10, b"\x00"))
        elif (class_id, method_id) == (20, 11) and channel == CONSUME_CHANNEL:
            arguments = b"\x00\x00" + shortstr(OUTBOUND_QUEUE) + shortstr(b"peer")
            write(method(CONSUME_CHANNEL, 60, 20, arguments + b"\x02" + b"\x00\x00\x00\x00"))
        elif (class_id, method_id) == (60, 21):  # basic.consume-ok
            self.peer.amqp_ready(self)
        elif (class_id, method_id) in ((10, 50), (20, 40)):  # connection/channel.close
            code = struct.unpack_from(">H", payload, 4)[0]
            text = payload[7 : 7 + payload[6]].decode(errors="replace")
            self.peer.fatal(f"the broker closed the AMQP {class_id}: {code} {text}")

    def publish(self, body: bytes) -> None:
        if len(body) > self.frame_max - 8:
            raise ValueError("inbound body larger than one frame")
        self.transport.write(publish_frames(body))

    def delivered(self, body: bytes) -> None:
        self.expect_body = None
        self.peer.reply_consumed(body, time.monotonic())

    def connectionLost(self, reason: Any = None) -> None:
        self.peer.fatal(f"the AMQP connection was lost: {reason.getErrorMessage()}")


# -- HTTP/1.1: RapidPro's side, server and client ------------------------------


def parse_http(buffer: bytes) -> tuple[bytes, bytes, int] | None:
    """(start line, body, bytes used) of the first complete request or
    response in ``buffer`` (Content-Length or chunked), None if incomplete."""
    end = buffer.find(b"\r\n\r\n")
    if end < 0:
        return None
    head = buffer[:end].split(b"\r\n")
    headers = {}
    for line in head[1:]:
        name, _, value = line.partition(b":")
        headers[name.strip().lower()] = value.strip()
    start = end + 4
    if headers.get(b"transfer-encoding", b"").lower() == b"chunked":
        chunks, offset = [], start
        while True:
            line_end = buffer.find(b"\r\n", offset)
            if line_end < 0:
                return None
            size = int(buffer[offset:line_end].split(b";")[0], 16)
            if size == 0:
                trailer_end = buffer.find(b"\r\n\r\n", line_end)
                if trailer_end < 0 and buffer[line_end : line_end + 4] != b"\r\n\r\n":
                    return None
                used = line_end + 4 if trailer_end < 0 else trailer_end + 4
                return head[0], b"".join(chunks), used
            if len(buffer) < line_end + 2 + size + 2:
                return None
            chunks.append(buffer[line_end + 2 : line_end + 2 + size])
            offset = line_end + 2 + size + 2
    length = int(headers.get(b"content-length", b"0"))
    if len(buffer) < start + length:
        return None
    return head[0], buffer[start : start + length], start + length


OK_200 = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 2\r\n\r\n{}"


class RapidProServer(Protocol):
    """Answers 200 to every request; an inbound POST gets its reply POSTed."""

    def __init__(self, peer: Peer) -> None:
        self.peer = peer
        self.buffer = b""

    def connectionMade(self) -> None:
        self.transport.setTcpNoDelay(True)

    def dataReceived(self, data: bytes) -> None:
        self.buffer += data
        while True:
            parsed = parse_http(self.buffer)
            if parsed is None:
                return
            start, body, used = parsed
            self.buffer = self.buffer[used:]
            self.transport.write(OK_200)
            if start.startswith(b"POST"):
                self.peer.inbound_arrived(body, time.monotonic())


class ServiceClient(Protocol):
    """One persistent connection to the service: one request at a time."""

    def __init__(self, pool: ServicePool) -> None:
        self.pool = pool
        self.buffer = b""
        self.waiting: Any = None  # the callback of the request in flight

    def connectionMade(self) -> None:
        self.transport.setTcpNoDelay(True)
        self.pool.ready(self)

    def send(self, request: bytes, answered: Any) -> None:
        self.waiting = answered
        self.transport.write(request)

    def dataReceived(self, data: bytes) -> None:
        self.buffer += data
        parsed = parse_http(self.buffer)
        if parsed is None:
            return
        start, _, used = parsed
        self.buffer = self.buffer[used:]
        answered, self.waiting = self.waiting, None
        answered(int(start.split()[1]))
        self.pool.ready(self)

    def connectionLost(self, reason: Any = None) -> None:
        self.pool.lost(self, reason.getErrorMessage())


class ServicePool:
    """Up to MAX_HTTP_CONNECTIONS persistent connections to the service;
    requests wait for a free one."""

    def __init__(self, peer: Peer, url: str) -> None:
        parts = urlsplit(url)
        self.peer = peer
        self.host, self.port = parts.hostname, parts.port
        self.prefix = (
            f"POST {parts.path} HTTP/1.1\r\nHost: {parts.netloc}\r\n"
            "Content-Type: application/json\r\nContent-Length: "
        ).encode()
        self.idle: deque[ServiceClient] = deque()
        self.queued: deque[tuple[bytes, Any]] = deque()
        self.connections = 0

    def post(self, body: bytes, answered: Any) -> None:
        request = self.prefix + b"%d\r\n\r\n" % len(body) + body
        if self.idle:
            self.idle.popleft().send(request, answered)
            return
        self.queued.append((request, answered))
        if self.connections < MAX_HTTP_CONNECTIONS:
            self.connections += 1
            factory = ClientFactory.forProtocol(lambda: ServiceClient(self))
            factory.noisy = False
            reactor.connectTCP(self.host, self.port, factory)

    def ready(self, client: ServiceClient) -> None:
        if self.queued:
            client.send(*self.queued.popleft())
        else:
            self.idle.append(client)

    def lost(self, client: ServiceClient, why: str) -> None:
        self.connections -= 1
        if client in self.idle:
            self.idle.remove(client)
        if client.waiting is not None:
            client.waiting(None)
            self.peer.error(f"reply POST failed: {why}")


# -- the peer --------------------------------------------------------------------


class Peer:
    """Runs one rate at a time (see the module docstring)."""

    def __init__(self, service_url: str) -> None:
        self.pool = ServicePool(self, service_url)
        self.amqp: AmqpTransport | None = None
        self.commands: deque[tuple[float, float, float]] = deque()
        self.running = False
        self.times: dict[str, list[float | None]] = {}
        self.pending: set[str] = set()
        self.errors: dict[str, Any] = {"not_201": 0, "failed": 0, "unexpected": 0, "last": ""}
        self.output: LineReceiver | None = None  # stdout, through the reactor
        self.stopping = False
        self.exit_status = 0

    # commands

    def command(self, line: bytes) -> None:
        rate, seconds, grace = (float(word) for word in line.split())
        self.commands.append((rate, seconds, grace))
        self.next_command()

    def amqp_ready(self, amqp: AmqpTransport) -> None:
        self.amqp = amqp
        self.next_command()

    def next_command(self) -> None:
        if self.running or self.amqp is None or not self.commands:
            return
        self.running = True
        self.rate, seconds, self.grace = self.commands.popleft()
        self.total = int(self.rate * seconds)
        self.times, self.pending = {}, set()
        self.errors = {"not_201": 0, "failed": 0, "unexpected": 0, "last": ""}
        self.published = 0
        self.start = time.monotonic()
        self.end = self.start + seconds
        self.tick()

    def tick(self) -> None:
        """Publish every message now due, then sleep until the next one is."""
        now = time.monotonic()
        while self.published < self.total:
            due = self.start + self.published / self.rate
            if due > now:
                reactor.callLater(due - now, self.tick)
                return
            if now > self.end:
                break  # cannot keep the rate: what it managed is reported
            message_id = uuid.uuid4().hex
            body = json.dumps(inbound(message_id, transport_name="bench")).encode()
            self.times[message_id] = [due, time.monotonic(), None, None, None, None]
            self.pending.add(message_id)
            self.amqp.publish(body)
            self.published += 1
        self.took = time.monotonic() - self.start
        self.deadline = time.monotonic() + self.grace
        self.wait_for_replies()

    def wait_for_replies(self) -> None:
        if self.pending and time.monotonic() < self.deadline:
            reactor.callLater(0.02, self.wait_for_replies)
            return
        result = {
            "published": self.published,
            "replied": sum(1 for t in self.times.values() if t[GOT] is not None),
            "took": self.took,
            "errors": self.errors,
            "times": self.times,
        }
        self.output.sendLine(json.dumps(result).encode())
        self.running = False
        self.next_command()

    # the message path

    def inbound_arrived(self, body: bytes, now: float) -> None:
        message_id = json.loads(body).get("message_id")
        times = self.times.get(message_id)
        if times is None:
            self.errors["unexpected"] += 1
            return
        times[ARRIVED] = now
        reply = json.dumps({"reply_to": message_id, "content": "next menu"}).encode()
        times[REPLY_SENT] = time.monotonic()
        self.pool.post(reply, lambda code: self.answered(times, code))

    def answered(self, times: list[float | None], code: int | None) -> None:
        if code is None:
            self.errors["failed"] += 1
            return
        times[ANSWERED] = time.monotonic()
        if code != 201:
            self.errors["not_201"] += 1
            self.errors["last"] = str(code)

    def reply_consumed(self, body: bytes, now: float) -> None:
        message_id = json.loads(body).get("in_reply_to")
        times = self.times.get(message_id)
        if times is None or times[GOT] is not None:
            self.errors["unexpected"] += 1
            return
        times[GOT] = now
        self.pending.discard(message_id)

    def error(self, text: str) -> None:
        self.errors["last"] = text[:200]

    def fatal(self, text: str) -> None:
        if self.stopping:
            return
        self.stopping = True
        sys.stderr.write(f"roundtrip_peer: {text}\n")
        self.exit_status = 1
        reactor.stop()


class Commands(LineReceiver):
    """Commands from stdin; results to stdout."""

    delimiter = b"\n"
    MAX_LENGTH = 1 << 30

    def __init__(self, peer: Peer) -> None:
        self.peer = peer

    def lineReceived(self, line: bytes) -> None:
        if line.strip():
            self.peer.command(line)

    def connectionMade(self) -> None:
        self.peer.output = self

    def connectionLost(self, reason: Any = None) -> None:
        if not self.peer.stopping:  # stdin closed: the benchmark is done
            self.peer.stopping = True
            reactor.stop()


def main() -> None:
    amqp_port, http_port, service_url = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
    peer = Peer(service_url)
    server = Factory.forProtocol(lambda: RapidProServer(peer))
    server.noisy = False
    reactor.listenTCP(http_port, server, backlog=1024, interface="127.0.0.1")
    amqp = ClientFactory.forProtocol(lambda: AmqpTransport(peer))
    amqp.noisy = False
    reactor.connectTCP("127.0.0.1", amqp_port, amqp)
    stdio.StandardIO(Commands(peer))
    reactor.run()
    sys.exit(peer.exit_status)


if __name__ == "__main__":
    main()
