"""Helpers shared by the unit tests."""

from __future__ import annotations

import inspect
from collections.abc import Callable, Coroutine
from random import Random
from typing import Any

import pytest
from twisted.internet.defer import Deferred
from twisted.internet.protocol import Factory, Protocol
from twisted.python.failure import Failure

from junebug_api.amqp.service import Acker, AmqpService
from junebug_api.config.model import AmqpConfig, AmqpConnectionSettings
from junebug_api.delivery.outcomes import HandlingFailed
from junebug_api.testing import FakeRapidPro


def result_of(d: Deferred) -> Any:
    """The result of a Deferred that has already fired; raises its failure."""
    results: list[Any] = []
    d.addBoth(results.append)
    assert results, "the Deferred has not fired"
    if isinstance(results[0], Failure):
        results[0].raiseException()
    return results[0]


class ServerFactory(Factory):
    """Builds ``protocol(server)`` for each connection a fake server accepts."""

    def __init__(self, protocol: Callable[[Any], Protocol], server: Any) -> None:
        self.make = protocol
        self.server = server

    def buildProtocol(self, addr: Any) -> Protocol:
        return self.make(self.server)


# -- an in-memory network: MemoryReactorClock + iosim pumps --------------------


class FakeNetwork:
    """A MemoryReactorClock whose outgoing TCP connections reach in-memory
    servers (``listen``), with the bytes carried by ``twisted.test.iosim``.

    ``flush()`` connects every pending client to the server listening on its
    port, then moves bytes both ways (and runs ``callLater(0)`` calls) until
    nothing moves. A client whose port has no server stays pending:
    ``refuse()`` fails it.
    """

    def __init__(self) -> None:
        from twisted.internet.testing import MemoryReactorClock
        from twisted.test.iosim import ConnectionCompleter

        self.reactor = MemoryReactorClock()
        self._completer = ConnectionCompleter(self.reactor)
        self.pumps: list[Any] = []

    def listen(self, port: int, factory: Any) -> None:
        self.reactor.listenTCP(port, factory)

    def flush(self) -> None:
        for _ in range(100):
            moved = False
            while True:
                pump = self._completer.succeedOnce()
                if pump is None:
                    break
                self.pumps.append(pump)
                moved = True
            for pump in list(self.pumps):
                if pump.flush():
                    moved = True
                if pump.clientIO.disconnected and pump.serverIO.disconnected:
                    self.pumps.remove(pump)
            self.reactor.advance(0)
            if not moved:
                return
        raise AssertionError("the network never went quiet")

    def pump(self) -> None:
        """Move the bytes already written both ways without running the
        clock, so nothing scheduled for the end of the reactor turn
        (``callLater(0)``) runs; ``flush()`` does both."""
        for pump in self.pumps:
            pump.flush(advanceClock=False)

    def refuse(self) -> None:
        """Fail the oldest pending connection attempt (connection refused)."""
        from twisted.internet.error import ConnectionRefusedError

        self._completer.failOnce(Failure(ConnectionRefusedError()))

    def advance(self, seconds: float) -> None:
        self.reactor.advance(seconds)
        self.flush()

    def advance_until(self, condition: Any, limit: float, step: float = 0.1) -> float:
        """Advance the clock ``step`` at a time until ``condition()`` holds
        (for timers with random jitter); the seconds it took."""
        start = self.reactor.seconds()
        self.flush()
        while not condition():
            if self.reactor.seconds() - start >= limit:
                raise AssertionError(f"not within {limit} s of (fake) time")
            self.advance(step)
        return self.reactor.seconds() - start


# -- a broker that speaks enough AMQP 0-9-1 for AmqpService -------------------

_DEFAULTS = {"bit": False, "shortstr": "", "longstr": "", "table": {}}


def amqp_method(channel: int, klass: str, method: str, **args: Any) -> bytes:
    """One method frame as a broker sends it (``args`` by field name, with
    ``_`` for ``-``; fields left out are zero or empty)."""
    import struct
    from io import BytesIO

    from junebug_api.amqp.frames import FieldCodec, load_spec

    spec_method = load_spec().classes.byname[klass].methods.byname[method]
    buffer = BytesIO()
    codec = FieldCodec(buffer)
    codec.encode_short(spec_method.klass.id)
    codec.encode_short(spec_method.id)
    for field in spec_method.fields:
        value = args.get(field.name.replace("-", "_"), _DEFAULTS.get(field.type, 0))
        codec.encode(field.type, value)
    codec.flush()
    payload = buffer.getvalue()
    return struct.pack("!BHI", 1, channel, len(payload)) + payload + b"\xce"


def amqp_content(
    channel: int, body: bytes, headers: dict | None = None, message_id: str | None = None
) -> bytes:
    """The content header frame (with ``headers`` and ``message-id`` if given)
    and one body frame of a message."""
    import struct

    from junebug_api.amqp.frames import encode_table

    flags, properties = 0, b""
    if headers:
        flags |= 0x2000
        properties += encode_table(headers)
    if message_id is not None:
        flags |= 0x0080
        properties += bytes((len(message_id),)) + message_id.encode("ascii")
    header = struct.pack("!HHQH", 60, 0, len(body), flags) + properties
    frames = struct.pack("!BHI", 2, channel, len(header)) + header + b"\xce"
    if body:
        frames += struct.pack("!BHI", 3, channel, len(body)) + body + b"\xce"
    return frames


class BrokerServer:
    """A whole broker, in memory, for the AMQP service's connections (where
    ``junebug_api.amqp.testing.FakeBroker`` feeds one client frames): answers the handshake
    and the channel, exchange, queue and basic methods; records what clients
    publish, ack and reject; delivers on demand.

    ``queues`` maps a queue name to its ready messages (bodies); a passive
    declare of a queue not in it closes the channel with 404. ``confirm``
    says how a publish is answered: ``"ack"``, ``"nack"``, ``"return"``
    (unroutable, then ack) or ``None`` (no answer yet).
    """

    def __init__(self, refuse_login: bool = False) -> None:
        self.refuse_login = refuse_login
        self.connections: list[BrokerServerConnection] = []
        self.queues: dict[str, list[bytes]] = {}
        self.bindings: list[tuple[str, str]] = []
        self.published: list[tuple[str, bytes, dict]] = []
        self.confirm: str | None = "ack"
        self.exchange_error: tuple[int, str] | None = None
        # A synchronous method that came on a channel whose previous one was
        # not yet answered (AMQP 0-9-1 allows one): (channel, waiting, new).
        self.overlaps: list[tuple[int, str, str]] = []
        # While True, everything the broker sends waits for release().
        self.holding = False

    def factory(self) -> ServerFactory:
        """The factory to listen with; each connection is kept in ``connections``."""
        return ServerFactory(BrokerServerConnection, self)

    @property
    def open_connections(self) -> list[BrokerServerConnection]:
        return [c for c in self.connections if c.opened and not c.closed]

    def consumer(self, queue: str) -> BrokerServerConnection:
        """The open connection consuming ``queue``."""
        for connection in self.open_connections:
            if queue in connection.consumers:
                return connection
        raise AssertionError(f"nobody consumes {queue}")


class BrokerServerConnection(Protocol):
    """One client connection to :class:`BrokerServer`."""

    def __init__(self, broker: BrokerServer) -> None:
        self.broker = broker
        broker.connections.append(self)
        self.buffer = b""
        self.greeted = False
        self.opened = False
        self.closed = False
        self.channels: set[int] = set()
        self.confirming: set[int] = set()
        self.consumers: dict[str, int] = {}  # queue -> channel
        self.prefetch: dict[int, int] = {}
        self.publish_tags: dict[int, int] = {}
        self.delivery_tags: dict[int, int] = {}
        self.publishing: dict[int, dict] = {}
        self.acks: list[tuple[int, int, bool]] = []
        self.rejects: list[tuple[int, int, bool]] = []
        self.methods: list[tuple[int, str]] = []  # (channel, "class.method") received
        self.unanswered: dict[int, str] = {}  # channel -> its synchronous method in flight
        self.gotten: dict[tuple[int, int], bytes] = {}  # (channel, tag) -> body, basic.get
        self.held: list[bytes] = []

    # -- input ----------------------------------------------------------------

    def connectionLost(self, reason: Any = None) -> None:
        self.closed = True

    def dataReceived(self, data: bytes) -> None:
        import struct

        from junebug_api.amqp.frames import decode_frame, load_spec

        self.buffer += data
        if not self.greeted:
            if len(self.buffer) < 8:
                return
            assert self.buffer[:4] == b"AMQP", self.buffer[:8]
            self.buffer = self.buffer[8:]
            self.greeted = True
            self.send(
                amqp_method(
                    0,
                    "connection",
                    "start",
                    version_major=0,
                    version_minor=9,
                    mechanisms="PLAIN EXTERNAL",
                    locales="en_US",
                )
            )
        while len(self.buffer) >= 8 and not self.closed:
            (size,) = struct.unpack_from("!I", self.buffer, 3)
            if len(self.buffer) < size + 8:
                return
            frame, self.buffer = self.buffer[: size + 8], self.buffer[size + 8 :]
            self.frame(decode_frame(load_spec(), frame))

    def frame(self, frame: Any) -> None:
        payload = frame.payload
        channel = frame.channel
        kind = type(payload).__name__
        if kind == "Method":
            name = f"{payload.method.klass.name}.{payload.method.name}"
            args = {
                f.name.replace("-", "_"): a
                for f, a in zip(payload.method.fields, payload.args, strict=True)
            }
            self.methods.append((channel, name))
            if payload.method.responses and not args.get("nowait"):
                waiting = self.unanswered.get(channel)
                if waiting is not None:
                    self.broker.overlaps.append((channel, waiting, name))
                self.unanswered[channel] = name
            self.method(channel, name, args)
        elif kind == "Header":
            self.publishing[channel]["properties"] = dict(payload.properties)
            self.publishing[channel]["size"] = payload.size
            if payload.size == 0:
                self.published(channel)
        elif kind == "Body":
            publish = self.publishing[channel]
            publish["body"] += payload.content
            if len(publish["body"]) >= publish["size"]:
                self.published(channel)

    def method(self, channel: int, name: str, args: dict) -> None:
        reply = {
            "connection.tune-ok": None,
            "channel.open": "open-ok",
            "channel.close-ok": None,
            "connection.close-ok": None,
            "confirm.select": "select-ok",
            "queue.bind": "bind-ok",
            "basic.qos": "qos-ok",
        }
        if name in reply:
            if name == "channel.open":
                self.channels.add(channel)
                self.delivery_tags.pop(channel, None)  # tags count per channel
            if name == "confirm.select":
                self.confirming.add(channel)
            if name == "basic.qos":
                self.prefetch[channel] = args["prefetch_count"]
            if reply[name] is not None:
                self.send(amqp_method(channel, name.split(".")[0], reply[name]))
            return
        handler = getattr(self, "on_" + name.replace(".", "_").replace("-", "_"))
        handler(channel, args)

    def on_connection_start_ok(self, channel: int, args: dict) -> None:
        self.client_properties = args["client_properties"]
        self.login = (args["mechanism"], args["response"])
        if self.broker.refuse_login:
            self.send(
                amqp_method(
                    0,
                    "connection",
                    "close",
                    reply_code=403,
                    reply_text="ACCESS_REFUSED - Login was refused using authentication"
                    " mechanism PLAIN.",
                )
            )
            self.transport.loseConnection()
            return
        self.send(amqp_method(0, "connection", "tune", channel_max=0, frame_max=131072))

    def on_connection_open(self, channel: int, args: dict) -> None:
        self.vhost = args["virtual_host"]
        self.opened = True
        self.send(amqp_method(0, "connection", "open-ok"))

    def on_connection_close(self, channel: int, args: dict) -> None:
        self.send(amqp_method(0, "connection", "close-ok"))
        self.transport.loseConnection()

    def on_channel_close(self, channel: int, args: dict) -> None:
        self.channels.discard(channel)
        self.send(amqp_method(channel, "channel", "close-ok"))

    def on_exchange_declare(self, channel: int, args: dict) -> None:
        if self.broker.exchange_error is not None:
            code, text = self.broker.exchange_error
            self.close_channel(channel, code, text)
            return
        self.send(amqp_method(channel, "exchange", "declare-ok"))

    def on_queue_declare(self, channel: int, args: dict) -> None:
        queue = args["queue"]
        if queue not in self.broker.queues:
            if args["passive"]:
                self.close_channel(channel, 404, f"NOT_FOUND - no queue '{queue}'")
                return
            self.broker.queues[queue] = []
        consumers = sum(queue in c.consumers for c in self.broker.open_connections)
        self.send(
            amqp_method(
                channel,
                "queue",
                "declare-ok",
                queue=queue,
                message_count=len(self.broker.queues[queue]),
                consumer_count=consumers,
            )
        )

    def on_basic_consume(self, channel: int, args: dict) -> None:
        self.consumers[args["queue"]] = channel
        self.send(amqp_method(channel, "basic", "consume-ok", consumer_tag=args["consumer_tag"]))

    def on_basic_cancel(self, channel: int, args: dict) -> None:
        self.consumers.pop(args["consumer_tag"], None)
        self.send(amqp_method(channel, "basic", "cancel-ok", consumer_tag=args["consumer_tag"]))

    def on_basic_publish(self, channel: int, args: dict) -> None:
        self.publishing[channel] = {**args, "body": b"", "size": None}

    def on_basic_ack(self, channel: int, args: dict) -> None:
        self.acks.append((channel, args["delivery_tag"], args["multiple"]))

    def on_basic_reject(self, channel: int, args: dict) -> None:
        self.rejects.append((channel, args["delivery_tag"], args["requeue"]))

    def on_basic_get(self, channel: int, args: dict) -> None:
        ready = self.broker.queues.get(args["queue"]) or []
        if not ready:
            self.send(amqp_method(channel, "basic", "get-empty"))
            return
        body = ready.pop(0)
        tag = self.delivery_tags[channel] = self.delivery_tags.get(channel, 0) + 1
        self.gotten[(channel, tag)] = body
        self.send(
            amqp_method(channel, "basic", "get-ok", delivery_tag=tag, routing_key=args["queue"])
            + amqp_content(channel, body, {"attempt": 2})
        )

    def published(self, channel: int) -> None:
        publish = self.publishing.pop(channel)
        self.broker.published.append(
            (publish["routing_key"], publish["body"], publish["properties"])
        )
        self.broker.queues.setdefault(publish["routing_key"], []).append(publish["body"])
        if channel not in self.confirming:
            return
        tag = self.publish_tags[channel] = self.publish_tags.get(channel, 0) + 1
        confirm = self.broker.confirm
        if confirm == "return":
            self.send(
                amqp_method(
                    channel,
                    "basic",
                    "return",
                    reply_code=312,
                    reply_text="NO_ROUTE",
                    exchange=publish["exchange"],
                    routing_key=publish["routing_key"],
                )
                + amqp_content(
                    channel, publish["body"], message_id=publish["properties"].get("message-id")
                )
            )
            confirm = "ack"
        if confirm is not None:
            self.send(amqp_method(channel, "basic", confirm, delivery_tag=tag))

    # -- output ---------------------------------------------------------------

    def send(self, data: bytes) -> None:
        """Write ``data`` (frames), or keep it for :meth:`release` while the
        broker holds its answers."""
        if self.broker.holding:
            self.held.append(data)
            return
        self._write(data)

    def release(self) -> bool:
        """Send everything held, in one write (the client reads it in one
        go); whether there was anything."""
        held, self.held = self.held, []
        if held and not self.closed:
            self._write(b"".join(held))
        return bool(held)

    def _write(self, data: bytes) -> None:
        """Write frames; an answer to a synchronous method (or a
        channel.close) ends that method's turn on its channel."""
        import struct

        from junebug_api.amqp.frames import load_spec

        offset = 0
        while offset < len(data):
            (channel, size) = struct.unpack_from("!HI", data, offset + 1)
            if data[offset] == 1:
                class_id, method_id = struct.unpack_from("!HH", data, offset + 7)
                method = load_spec().classes.byid[class_id].methods.byid[method_id]
                if method.response or (class_id, method_id) == (20, 40):
                    self.unanswered.pop(channel, None)
            offset += size + 8
        self.transport.write(data)

    def close_channel(self, channel: int, code: int, text: str) -> None:
        self.channels.discard(channel)
        self.send(amqp_method(channel, "channel", "close", reply_code=code, reply_text=text))

    def deliver(
        self,
        queue: str,
        body: bytes,
        headers: dict | None = None,
        redelivered: bool = False,
        consumer_tag: str | None = None,
    ) -> int:
        """Deliver ``body`` to the consumer of ``queue``; its delivery tag."""
        channel = self.consumers[queue]
        tag = self.delivery_tags[channel] = self.delivery_tags.get(channel, 0) + 1
        self.send(
            amqp_method(
                channel,
                "basic",
                "deliver",
                consumer_tag=consumer_tag or queue,
                delivery_tag=tag,
                redelivered=redelivered,
                exchange="vumi",
                routing_key=queue,
            )
            + amqp_content(channel, body, headers)
        )
        return tag

    def block(self, reason: str) -> None:
        self.send(amqp_method(0, "connection", "blocked", reason=reason))

    def unblock(self) -> None:
        self.send(amqp_method(0, "connection", "unblocked"))

    def cancel_consumer(self, queue: str) -> None:
        channel = self.consumers.pop(queue)
        self.send(amqp_method(channel, "basic", "cancel", consumer_tag=queue))

    def drop(self) -> None:
        """The socket closes under the client (a broker restart)."""
        self.transport.loseConnection()


# -- an AmqpService connected to BrokerServer over FakeNetwork ------------------

QUEUES = ["c.inbound", "c.event", "c.outbound"]


def as_deferred(d: Any) -> Deferred:
    return Deferred.fromCoroutine(d) if inspect.iscoroutine(d) else d


class AmqpSetup:
    """An AmqpService, the in-memory broker it connects to and the network
    between them: the service is connected the way it connects to RabbitMQ,
    and the test acts as the broker (``connection(role)``). ``settings`` go
    to :class:`~junebug_api.config.model.AmqpConnectionSettings` (``heartbeat`` 0
    unless given)."""

    def __init__(
        self,
        queues: list[str] = QUEUES,
        consumed: tuple[str, ...] = ("c.inbound", "c.event"),
        brokers: tuple[AmqpConfig, ...] = (AmqpConfig(),),
        listen: tuple[int, ...] = (5672,),
        prefetch: dict[str, int] | None = None,
        random: Random | None = None,
        **settings: Any,
    ) -> None:
        self.net = FakeNetwork()
        self.broker = BrokerServer()
        for port in listen:
            self.net.listen(port, self.broker.factory())
        self.received: list[tuple[str, bytes, Acker]] = []
        settings.setdefault("heartbeat", 0)
        self.service = AmqpService(
            AmqpConnectionSettings(brokers=brokers, **settings),
            7,
            self.net.reactor,
            connection_name="unit",
            random=random or Random(),
        )
        self.service.add_queues({queue: {} for queue in queues})
        for queue in consumed:
            self.service.add_consumer(queue, self._consumer(queue), (prefetch or {}).get(queue))

    def _consumer(self, queue: str) -> Any:
        return lambda body, acker: self.received.append((queue, body, acker))

    def start(self) -> AmqpSetup:
        self.service.startService()
        self.net.flush()
        return self

    def wait(self, d: Any) -> Any:
        """The result of ``d`` (a Deferred or a coroutine) once the network is quiet."""
        d = as_deferred(d)
        self.net.flush()
        return result_of(d)

    def answer_held(self, rounds: int = 100) -> None:
        """While the broker holds its answers: send them, a batch per
        connection at a time, until no more come (each answer may let the
        client send its next method)."""
        for _ in range(rounds):
            self.net.flush()
            if not any([c.release() for c in self.broker.connections]):
                return
        raise AssertionError("the answers never ended")

    def connection(self, role: str) -> BrokerServerConnection:
        """The broker side of the service's ``publish`` or ``consume`` connection."""
        for connection in self.broker.open_connections:
            if connection.client_properties["connection_name"] == f"unit ({role})":
                return connection
        raise AssertionError(f"no open {role} connection")

    def drop_all(self) -> None:
        """The broker closes every connection (a restart)."""
        for connection in self.broker.open_connections:
            connection.drop()
        self.net.flush()

    def stop(self) -> Any:
        stopped = self.service.stopService()
        self.net.flush()
        self.net.advance(3)
        return stopped


# -- a Redis that speaks enough RESP for RedisStateCache ------------------------


class FakeRedis:
    """A Redis server in memory: strings with expiry, hashes (``HVALS``), the
    state cache's two Lua scripts (recognised by what they call), ``WAIT``, ``AUTH``,
    ``SELECT``, ``ROLE``, and ``SENTINEL get-master-addr-by-name``.

    ``commands`` records every command received (as lists of bytes).
    ``silent`` makes it read and never answer; ``role`` is what ``ROLE``
    says; ``replicas`` what ``WAIT`` answers; ``masters`` (for a Sentinel)
    maps a service name to ``(host, port)``; ``password`` requires AUTH.
    """

    def __init__(self, clock: Any, password: str | None = None) -> None:
        self.clock = clock
        self.password = password
        self.data: dict[bytes, Any] = {}
        self.expires: dict[bytes, float] = {}
        self.commands: list[list[bytes]] = []
        self.silent = False
        self.readonly = False
        self.role = b"master"
        self.replicas = 0
        self.masters: dict[bytes, tuple[str, int]] = {}
        self.connections: list[FakeRedisConnection] = []

    def factory(self) -> ServerFactory:
        """The factory to listen with; each connection is kept in ``connections``."""
        return ServerFactory(FakeRedisConnection, self)

    def ttl(self, key: bytes) -> float | None:
        self._expire(key)
        if key not in self.expires:
            return None
        return self.expires[key] - self.clock.seconds()

    def _expire(self, key: bytes) -> None:
        if key in self.expires and self.expires[key] <= self.clock.seconds():
            del self.expires[key]
            self.data.pop(key, None)

    def execute(self, args: list[bytes]) -> Any:
        """The reply to one command: bytes, int, str (a simple string), list,
        None, or an Exception (an error reply)."""
        name = args[0].upper()
        for key in self.data.copy():
            self._expire(key)
        read = self._reads().get(name)
        if read is not None:
            return read(args)
        if self.readonly:
            return ValueError("READONLY You can't write against a read only replica.")
        if name in _HASH_COMMANDS:
            return _HASH_COMMANDS[name](self.data.setdefault(args[1], {}), args[2:])
        write = self._writes().get(name)
        if write is not None:
            return write(args)
        return ValueError(f"ERR unknown command {name!r}")

    def _reads(self) -> dict[bytes, Callable[[list[bytes]], Any]]:
        """The commands a read-only replica answers too, by name."""
        return {
            b"AUTH": lambda args: (
                "OK" if args[-1].decode() == self.password else ValueError("WRONGPASS")
            ),
            b"SELECT": lambda args: "OK",
            b"PING": lambda args: "PONG",
            b"ROLE": lambda args: [self.role, 0, []],
            b"SENTINEL": self._sentinel,
            b"GET": lambda args: self.data.get(args[1]),
            b"MGET": lambda args: [self.data.get(key) for key in args[1:]],
            b"DEL": self._delete,
            b"HVALS": lambda args: list(self.data.get(args[1], {}).values()),
            b"WAIT": lambda args: self.replicas,
        }

    def _writes(self) -> dict[bytes, Callable[[list[bytes]], Any]]:
        return {b"INCR": self._incr, b"SET": self._set, b"EVAL": self._eval}

    def _sentinel(self, args: list[bytes]) -> Any:
        address = self.masters.get(args[2])
        return None if address is None else [address[0].encode(), str(address[1]).encode()]

    def _delete(self, args: list[bytes]) -> int:
        found = [key for key in args[1:] if key in self.data]
        for key in found:
            del self.data[key]
            self.expires.pop(key, None)
        return len(found)

    def _incr(self, args: list[bytes]) -> int:
        self.data[args[1]] = b"%d" % (int(self.data.get(args[1], b"0")) + 1)
        return int(self.data[args[1]])

    def _set(self, args: list[bytes]) -> str:
        key, value = args[1], args[2]
        self.data[key] = value
        self.expires.pop(key, None)
        if len(args) == 5 and args[3].upper() == b"EX":
            self.expires[key] = self.clock.seconds() + int(args[4])
        return "OK"

    def _eval(self, args: list[bytes]) -> Any:
        """The state cache's two scripts, recognised by what they call."""
        script, key, rest = args[1], args[3], args[4:]
        if b"HSET" in script:  # field, value, seconds
            self.data.setdefault(key, {})[rest[0]] = rest[1]
            self.expires[key] = self.clock.seconds() + int(rest[2])
            return 1
        if b"HVALS" in script:  # seconds
            values = list(self.data.get(key, {}).values())
            if values:
                self.expires[key] = self.clock.seconds() + int(rest[0])
            return values
        return ValueError("ERR unknown script")


def _hdel(hash_: dict[bytes, bytes], fields: list[bytes]) -> int:
    return sum(hash_.pop(field, None) is not None for field in fields)


def _hset(hash_: dict[bytes, bytes], pairs: list[bytes]) -> int:
    added = sum(field not in hash_ for field in pairs[::2])
    hash_.update(zip(pairs[::2], pairs[1::2], strict=True))
    return added


#: The hash commands (the channel store's), by name: (hash, arguments) -> reply.
_HASH_COMMANDS: dict[bytes, Callable[[dict[bytes, bytes], list[bytes]], Any]] = {
    b"HGET": lambda hash_, args: hash_.get(args[0]),
    b"HGETALL": lambda hash_, args: [part for item in hash_.items() for part in item],
    b"HDEL": _hdel,
    b"HSET": _hset,
}


def resp(reply: Any) -> bytes:
    """A reply in RESP2."""
    if reply is None:
        return b"$-1\r\n"
    if isinstance(reply, Exception):
        return b"-" + str(reply).encode() + b"\r\n"
    if isinstance(reply, str):
        return b"+" + reply.encode() + b"\r\n"
    if isinstance(reply, int):
        return b":%d\r\n" % reply
    if isinstance(reply, bytes):
        return b"$%d\r\n%s\r\n" % (len(reply), reply)
    return b"*%d\r\n" % len(reply) + b"".join(resp(item) for item in reply)


class FakeRedisConnection(Protocol):
    """One client connection to :class:`FakeRedis`."""

    def __init__(self, server: FakeRedis) -> None:
        self.server = server
        server.connections.append(self)
        self.buffer = b""
        self.closed = False
        #: The commands since MULTI (None: not in a transaction).
        self.queued: list[list[bytes]] | None = None

    def connectionLost(self, reason: Any = None) -> None:
        self.closed = True

    def dataReceived(self, data: bytes) -> None:
        self.buffer += data
        while True:
            args = self._command()
            if args is None:
                return
            self.server.commands.append(args)
            if not self.server.silent:
                self.transport.write(resp(self._reply(args)))

    def _reply(self, args: list[bytes]) -> Any:
        """A command's reply; between MULTI and EXEC, QUEUED (EXEC: their replies)."""
        name = args[0].upper()
        if name == b"MULTI":
            self.queued = []
            return "OK"
        queued = self.queued
        if queued is None:
            return self.server.execute(args)
        if name != b"EXEC":
            queued.append(args)
            return "QUEUED"
        self.queued = None
        return [self.server.execute(command) for command in queued]

    def _command(self) -> list[bytes] | None:
        """One whole command off the buffer (an array of bulk strings), or None."""
        buf = self.buffer
        end = buf.find(b"\r\n")
        if end < 0:
            return None
        count, pos, args = int(buf[1:end]), end + 2, []
        for _ in range(count):
            end = buf.find(b"\r\n", pos)
            if end < 0:
                return None
            size = int(buf[pos + 1 : end])
            if len(buf) < end + 2 + size + 2:
                return None
            args.append(buf[end + 2 : end + 2 + size])
            pos = end + 2 + size + 2
        self.buffer = buf[pos:]
        return args


class HandlerRun:
    """Runs a consumer's handler (``handler``) against a fake RapidPro
    (``rapidpro``), both set by the subclass."""

    handler: Callable[[bytes], Coroutine[Any, Any, Any]]
    rapidpro: FakeRapidPro

    def handle(self, body: bytes) -> Deferred[Any]:
        """The handler's outcome for ``body``, its POST answered."""
        d = Deferred.fromCoroutine(self.handler(body))
        self.rapidpro.flush()
        return d

    def failure(self, body: bytes) -> HandlingFailed:
        """The HandlingFailed the handler raises for ``body``."""
        with pytest.raises(HandlingFailed) as info:
            result_of(self.handle(body))
        return info.value

    def refusal(self, body: bytes) -> HandlingFailed:
        """The permanent HandlingFailed for ``body``, with no POST made."""
        failure = self.failure(body)
        assert failure.retryable is False
        assert self.rapidpro.requests == []
        return failure
