"""txAMQP, made fit for this service: spec, codec fixes, delegate hooks, and
the interface the client reports through.

txAMQP 0.8.2 has three problems this module mends, in our subclasses only:

- its wheel carries no AMQP spec XML: ours is package data, with RabbitMQ's
  ``confirm`` class and ``basic.nack``;
- its frame decoder turns bodies into ``str`` where they are valid UTF-8 and
  then counts characters against the byte size, so a non-ASCII body never
  arrives; and it knows only four of RabbitMQ's field-table types, so a
  header such as ``x-death`` kills the connection. Our client decodes frames
  itself: bodies stay bytes, tables take every 0-9-1 type;
- its stock delegate has no handler for the broker's ``basic.ack``/``nack``
  (publisher confirms), and its per-frame Deferred machinery is slow: our
  client handles deliveries, acks and nacks itself and writes publishes and
  acks as bytes.

Publishing non-ASCII ``str`` corrupts frames in txAMQP; callers publish bytes.

The client reports to the owner of its connection through one interface,
:class:`ConnectionEvents`, given to it at construction.
"""

from __future__ import annotations

import struct
import warnings
from collections.abc import Callable
from decimal import Decimal
from functools import cache
from importlib.resources import files
from io import BytesIO
from typing import Any, Protocol, runtime_checkable

from twisted.internet.defer import Deferred, succeed
from twisted.internet.protocol import Factory
from twisted.python.failure import Failure

from junebug_api.observe.log import logger

# txAMQP still calls Twisted's deprecated returnValue; hide that one warning,
# for txAMQP's own modules only, before they are imported.
warnings.filterwarnings(
    "ignore",
    message=r"twisted\.internet\.defer\.returnValue was deprecated",
    category=DeprecationWarning,
    module=r"txamqp(\.|$)",
)

from txamqp import spec as txamqp_spec  # noqa: E402
from txamqp.client import TwistedDelegate  # noqa: E402
from txamqp.codec import Codec  # noqa: E402
from txamqp.connection import Body, Frame, Header, Heartbeat, Method  # noqa: E402
from txamqp.message import Message  # noqa: E402
from txamqp.protocol import AMQClient, GarbageException  # noqa: E402

log = logger(__name__)

SPEC_FILE = "amqp0-9-1.xml"
_FRAME_END = 206
_FRAME_METHOD, _FRAME_HEADER, _FRAME_BODY, _FRAME_HEARTBEAT = 1, 2, 3, 8


@cache
def load_spec() -> Any:
    """The AMQP 0-9-1 spec (with RabbitMQ's extensions), loaded once."""
    text = (files("junebug_api.amqp") / SPEC_FILE).read_text(encoding="utf-8")
    return txamqp_spec.load_string(text, specfilename=SPEC_FILE)


class FieldCodec(Codec):
    """txAMQP's codec with every AMQP 0-9-1 field-table type RabbitMQ sends,
    and writing strings and tables right: lengths in bytes (txAMQP counts
    characters, so a non-ASCII queue name or vhost broke the frame), booleans
    as booleans and integers as 64-bit (txAMQP sent both as 32-bit unsigned,
    so ``x-single-active-consumer: true`` was refused)."""

    def enc_str(self, fmt: str, s: str | bytes) -> None:
        data = s if isinstance(s, bytes) else s.encode("utf-8")
        self.pack(fmt, len(data))
        self.write(data)

    def encode_table(self, tbl: dict) -> None:
        self.write(encode_table(tbl or {}))

    def _value(self) -> Any:
        kind = self.read(1)
        reader = _TABLE_READERS.get(kind)
        if reader is None:
            raise ValueError(f"unknown field table type {kind!r}")
        return reader(self)

    def decode_table(self) -> dict:
        size = self.decode_long()
        start = self.nread
        result = {}
        while self.nread - start < size:
            key = self.decode_shortstr()
            result[key] = self._value()
        return result

    def decode_array(self) -> list:
        size = self.decode_long()
        start = self.nread
        values = []
        while self.nread - start < size:
            values.append(self._value())
        return values

    def decode_longstr(self) -> str | bytes:
        data = self.dec_bytes("!L")
        try:
            return data.decode("utf-8")
        except UnicodeDecodeError:
            return data


def _decimal(codec: FieldCodec) -> Decimal:
    scale = codec.decode_octet()
    return Decimal(codec.unpack("!i")).scaleb(-scale)


_TABLE_READERS: dict[bytes, Callable[[FieldCodec], Any]] = {
    b"t": lambda c: c.decode_octet() != 0,
    b"b": lambda c: c.unpack("!b"),
    b"B": lambda c: c.unpack("!B"),
    b"s": lambda c: c.unpack("!h"),
    b"u": lambda c: c.unpack("!H"),
    b"I": lambda c: c.unpack("!i"),
    b"i": lambda c: c.unpack("!I"),
    b"l": lambda c: c.unpack("!q"),
    b"L": lambda c: c.unpack("!Q"),
    b"f": lambda c: c.unpack("!f"),
    b"d": lambda c: c.unpack("!d"),
    b"D": _decimal,
    b"S": FieldCodec.decode_longstr,
    b"x": lambda c: c.dec_bytes("!L"),
    b"A": FieldCodec.decode_array,
    b"T": lambda c: c.unpack("!Q"),
    b"F": FieldCodec.decode_table,
    b"V": lambda c: None,
}


def decode_frame(amqp_spec: Any, data: bytes) -> Frame:
    """One whole frame (header, payload, end octet) as a txAMQP Frame.

    Body payloads stay bytes; methods and headers decode with FieldCodec.
    """
    frame_type = data[0]
    channel, size = struct.unpack_from("!HI", data, 1)
    payload = data[7 : 7 + size]
    if data[7 + size] != _FRAME_END:
        raise GarbageException(f"frame error: expected frame end, got {data[7 + size]!r}")
    if frame_type == _FRAME_BODY:
        return Frame(channel, Body(payload))
    if frame_type == _FRAME_HEARTBEAT:
        return Frame(channel, Heartbeat())
    codec = FieldCodec(BytesIO(payload))
    klass = amqp_spec.classes.byid[codec.decode_short()]
    if frame_type == _FRAME_METHOD:
        method = klass.methods.byid[codec.decode_short()]
        args = tuple(codec.decode(field.type) for field in method.fields)
        return Frame(channel, Method(method, *args))
    if frame_type == _FRAME_HEADER:
        weight = codec.decode_short()
        body_size = codec.decode_longlong()
        present = []
        while True:
            flags = codec.decode_short()
            present.extend(bool(flags >> bit & 1) for bit in range(15, 0, -1))
            if not flags & 1:
                break
        properties = {
            str(field.name): codec.decode(field.type)
            for is_set, field in zip(present, klass.fields, strict=False)
            if is_set
        }
        return Frame(channel, Header(klass, weight, body_size, **properties))
    raise GarbageException(f"unknown frame type {frame_type}")


class JunebugDelegate(TwistedDelegate):
    """txAMQP's delegate, for the methods the client's fast path leaves to it.

    ``basic.deliver``, ``basic.ack`` and ``basic.nack`` never get here (see
    :meth:`JunebugAMQPClient._frame_received`).
    """

    def connection_start(self, channel: Any, message: Message) -> None:
        # Written by hand: txAMQP encodes booleans in tables as integers, and
        # the broker only honours capabilities given as booleans.
        properties = {
            "product": "junebug-api",
            "connection_name": self.client.connection_name,
            "capabilities": {
                "publisher_confirms": True,
                "basic.nack": True,
                "consumer_cancel_notify": True,
                # connection.blocked/unblocked frames during resource alarms.
                "connection.blocked": True,
                # A wrong password gets connection.close 403, not a dropped socket.
                "authentication_failure_close": True,
            },
        }
        response = self.client.response
        if isinstance(response, str):
            response = response.encode("utf-8")
        payload = (
            struct.pack("!HH", 10, 11)
            + encode_table(properties)
            + _shortstr(self.client.mechanism)
            + struct.pack("!I", len(response))
            + response
            + _shortstr(self.client.locale)
        )
        self.client.transport.write(_frame(_FRAME_METHOD, 0, payload))

    def connection_close(self, channel: Any, message: Message) -> None:
        # Remember why, so the owner can say it (a refused login, a forced close).
        self.client.close_reason = message
        super().connection_close(channel, message)

    def connection_blocked(self, channel: Any, message: Message) -> None:
        self.client.events.broker_blocked(message.reason or "resource alarm")

    def connection_unblocked(self, channel: Any, message: Message) -> None:
        self.client.events.broker_unblocked()

    def basic_return_(self, channel: Any, message: Message) -> None:
        self.client.events.message_returned(message)

    def basic_cancel(self, channel: Any, message: Message) -> None:
        # The broker cancels a consumer whose queue was deleted: start over.
        log.warn("The broker cancelled consumer {tag}", tag=message.consumer_tag)
        self.client.transport.loseConnection()


_BASIC = 60
_BASIC_PUBLISH, _BASIC_DELIVER, _BASIC_ACK, _BASIC_REJECT, _BASIC_NACK = 40, 60, 80, 90, 120
_HEADERS_FLAG = 0x2000
_HEADER_FLAGS = {
    "content-type": 0x8000,
    "headers": 0x2000,
    "delivery-mode": 0x1000,
    "message-id": 0x0080,
}


def _shortstr(text: str) -> bytes:
    data = text.encode("utf-8")
    if len(data) > 255:
        raise ValueError(f"AMQP short string too long: {text[:40]!r}...")
    return bytes((len(data),)) + data


def encode_table(table: dict[str, Any]) -> bytes:
    """An AMQP field table of strings, integers, booleans and tables, with
    lengths counted in bytes (txAMQP counts characters)."""
    parts = []
    for key, value in table.items():
        if isinstance(value, bool):
            parts.append(_shortstr(key) + b"t" + bytes((1 if value else 0,)))
        elif isinstance(value, int):
            parts.append(_shortstr(key) + b"l" + struct.pack("!q", value))
        elif isinstance(value, str):
            data = value.encode("utf-8")
            parts.append(_shortstr(key) + b"S" + struct.pack("!I", len(data)) + data)
        elif isinstance(value, dict):
            parts.append(_shortstr(key) + b"F" + encode_table(value))
        else:
            raise TypeError(f"field {key!r}: {type(value).__name__} values are not supported")
    payload = b"".join(parts)
    return struct.pack("!I", len(payload)) + payload


def _frame(frame_type: int, channel: int, payload: bytes) -> bytes:
    return struct.pack("!BHI", frame_type, channel, len(payload)) + payload + b"\xce"


def _read_shortstr(data: bytes, offset: int) -> tuple[str, int]:
    size = data[offset]
    end = offset + 1 + size
    return data[offset + 1 : end].decode("utf-8", "replace"), end


class _IncomingDelivery:
    """A basic.deliver whose content frames are still arriving."""

    __slots__ = (
        "chunks",
        "consumer_tag",
        "delivery_tag",
        "headers",
        "received",
        "redelivered",
        "size",
    )

    def __init__(self, consumer_tag: str, delivery_tag: int, redelivered: bool) -> None:
        self.consumer_tag = consumer_tag
        self.delivery_tag = delivery_tag
        self.redelivered = redelivered
        self.size: int | None = None
        self.received = 0
        self.chunks: list[bytes] = []
        self.headers: dict[str, Any] = {}


@runtime_checkable
class ConnectionEvents(Protocol):
    """What a :class:`JunebugAMQPClient` tells the owner of its connection.

    The client is given one at construction (through
    :class:`JunebugAMQPFactory`) and calls nothing else of its owner;
    ``tests/unit/test_connection_events.py`` checks that the service's
    implementation has every method, with these parameters.
    """

    def connection_made(self, client: JunebugAMQPClient) -> None:
        """The transport is connected; ``client`` is the connection's client
        (as Twisted hands a protocol its transport)."""

    def message_delivered(
        self,
        channel: int,
        consumer_tag: str,
        delivery_tag: int,
        redelivered: bool,
        body: bytes,
        headers: dict[str, Any],
    ) -> None:
        """A ``basic.deliver`` arrived with all of its content."""

    def publish_confirmed(self, delivery_tag: int, multiple: bool, ok: bool) -> None:
        """The broker's ``basic.ack`` (``ok``) or ``basic.nack`` of a publish."""

    def message_returned(self, message: Message) -> None:
        """The broker returned an unroutable ``mandatory`` publish (``basic.return``)."""

    def broker_blocked(self, reason: str) -> None:
        """The broker blocks publishing (``connection.blocked``)."""

    def broker_unblocked(self) -> None:
        """The broker takes publishes again (``connection.unblocked``)."""

    def channel_closed(self, channel: int, reason: Failure) -> None:
        """The broker closed one channel; the connection is still open."""

    def connection_lost(self, reason: Failure) -> None:
        """The transport closed (after txAMQP's own clean-up)."""


class JunebugAMQPClient(AMQClient):
    """An AMQClient with correct frame decoding and fast paths for the hot frames.

    txAMQP handles every frame through Deferred queues and inlineCallbacks and
    copies its whole input buffer per frame. This client parses its input once;
    ``basic.deliver`` (with its content), ``basic.ack`` and ``basic.nack`` go
    straight to the callbacks below, and publishes and acks are written as
    ready-made bytes (:meth:`encode_publish`, :meth:`ack`). Everything else
    (connection set-up, channel methods, ``basic.return``, ``basic.get``)
    still takes txAMQP's path.

    ``events`` (the connection's owner, a :class:`ConnectionEvents`) hears
    of the connection's start and end, deliveries, confirms, returns,
    blocking and closed channels.

    ``lost_reason`` (why the transport closed), ``close_reason`` (the
    broker's ``connection.close``, if it sent one) and ``received`` (the
    first bytes the peer sent) let the owner say what went wrong in a
    failed set-up.
    """

    def __init__(
        self,
        *args: Any,
        events: ConnectionEvents,
        connection_name: str = "junebug-api",
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        self.events = events
        self.connection_name = connection_name
        self.lost_reason: Failure | None = None
        self.close_reason: Message | None = None
        self.received = b""
        self._input = bytearray()
        self._incoming: dict[int, _IncomingDelivery] = {}
        self._publish_methods: dict[tuple[int, str, str], bytes] = {}
        self._last_input = self.clock.seconds()

    def channel(self, id: int) -> Deferred:
        ch = self.channels.get(id)
        if ch is not None:
            return succeed(ch)
        return super().channel(id)

    # -- input --------------------------------------------------------------

    def dataReceived(self, data: bytes) -> None:
        buffer = self._input
        if len(self.received) < 16:
            self.received += data[: 16 - len(self.received)]
        buffer += data
        self._last_input = self.clock.seconds()
        offset = 0
        available = len(buffer)
        while available - offset >= 8:
            (size,) = struct.unpack_from("!I", buffer, offset + 3)
            end = offset + 7 + size
            if end >= available:
                break
            frame = bytes(buffer[offset : end + 1])
            offset = end + 1
            if frame[-1] != _FRAME_END:
                log.error("AMQP framing error from the broker; closing the connection")
                self.transport.loseConnection()
                del buffer[:]
                return
            self._frame_received(frame)
            if self.transport is None or self.transport.disconnecting:
                break
        del buffer[:offset]

    def _frame_received(self, frame: bytes) -> None:
        frame_type = frame[0]
        (channel,) = struct.unpack_from("!H", frame, 1)
        if frame_type == _FRAME_METHOD:
            class_id, method_id = struct.unpack_from("!HH", frame, 7)
            if class_id == _BASIC:
                if method_id == _BASIC_ACK or method_id == _BASIC_NACK:
                    tag, bits = struct.unpack_from("!QB", frame, 11)
                    self.events.publish_confirmed(tag, bool(bits & 1), method_id == _BASIC_ACK)
                    return
                if method_id == _BASIC_DELIVER:
                    consumer_tag, at = _read_shortstr(frame, 11)
                    tag, redelivered = struct.unpack_from("!QB", frame, at)
                    self._incoming[channel] = _IncomingDelivery(
                        consumer_tag, tag, bool(redelivered & 1)
                    )
                    return
        elif frame_type == _FRAME_HEADER:
            delivery = self._incoming.get(channel)
            if delivery is not None:
                (delivery.size,) = struct.unpack_from("!Q", frame, 11)
                (flags,) = struct.unpack_from("!H", frame, 19)
                if flags & _HEADERS_FLAG:
                    # Only messages with headers (retries carry their
                    # attempt count there) take the slow decoder.
                    header = decode_frame(self.spec, frame).payload
                    delivery.headers = dict(header.properties.get("headers") or {})
                if delivery.size == 0:
                    self._delivered(channel)
                return
        elif frame_type == _FRAME_BODY:
            delivery = self._incoming.get(channel)
            if delivery is not None:
                body = frame[7:-1]
                delivery.chunks.append(body)
                delivery.received += len(body)
                if delivery.received >= (delivery.size or 0):
                    self._delivered(channel)
                return
        elif frame_type == _FRAME_HEARTBEAT:
            return
        self.frame_received(decode_frame(self.spec, frame))

    def _delivered(self, channel: int) -> None:
        delivery = self._incoming.pop(channel)
        body = b"".join(delivery.chunks)
        self.events.message_delivered(
            channel,
            delivery.consumer_tag,
            delivery.delivery_tag,
            delivery.redelivered,
            body,
            delivery.headers,
        )

    # -- frames txAMQP sends -------------------------------------------------

    def send_frame(self, frame: Frame) -> None:
        """Write a frame of txAMQP's (set-up, channel methods, heartbeats), as
        ``AMQClient.send_frame`` does, encoded by :meth:`encode_frame`."""
        if frame.payload.type != Frame.HEARTBEAT:
            self.reschedule_send_heartbeat()
        self.transport.write(self.encode_frame(frame))

    def encode_frame(self, frame: Frame) -> bytes:
        """Method frames through FieldCodec (see there); other payloads encode
        themselves, as in txAMQP."""
        payload = frame.payload
        buffer = BytesIO()
        if isinstance(payload, Method):
            codec = FieldCodec(buffer)
            codec.encode_short(payload.method.klass.id)
            codec.encode_short(payload.method.id)
            for field, arg in zip(payload.method.fields, payload.args, strict=True):
                codec.encode(field.type, arg)
            codec.flush()
            return _frame(_FRAME_METHOD, frame.channel, buffer.getvalue())
        codec = Codec(buffer)
        codec.encode_octet(self.spec.constants.bypyname[payload.type].id)
        codec.encode_short(frame.channel)
        payload.encode(codec)
        codec.encode_octet(_FRAME_END)
        codec.flush()
        return buffer.getvalue()

    # -- heartbeats without a timer reset per frame -------------------------

    def reschedule_send_heartbeat(self) -> None:
        # Heartbeats go out every interval whatever else is sent: cheaper than
        # restarting the timer for every frame, and just as valid.
        if self.heartbeatInterval > 0 and not self.sendHB.running:
            self.sendHB.start(self.heartbeatInterval, now=False)

    def reschedule_check_heartbeat(self) -> None:
        self._last_input = self.clock.seconds()

    def check_heartbeat(self) -> None:
        limit = self.heartbeatInterval * self.MAX_UNSEEN_HEARTBEAT
        silent = self.clock.seconds() - self._last_input
        if silent < limit:
            self.checkHB = self.clock.callLater(limit - silent, self.check_heartbeat)
            return
        log.warn("No AMQP traffic for {seconds:.0f} s; dropping the connection", seconds=silent)
        super().check_heartbeat()

    # -- output -------------------------------------------------------------

    def encode_publish(
        self,
        channel: int,
        exchange: str,
        routing_key: str,
        body: bytes,
        properties: dict[str, Any],
        mandatory: bool = True,
    ) -> bytes:
        """The frames of one ``basic.publish`` with its content; ValueError or
        TypeError for properties AMQP cannot carry."""
        key = (channel, exchange, routing_key)
        method = self._publish_methods.get(key)
        if method is None:
            payload = (
                struct.pack("!HHH", _BASIC, _BASIC_PUBLISH, 0)
                + _shortstr(exchange)
                + _shortstr(routing_key)
                + bytes((1 if mandatory else 0,))
            )
            method = self._publish_methods[key] = _frame(_FRAME_METHOD, channel, payload)
        flags = 0
        encoded = []
        if "content-type" in properties:
            flags |= 0x8000
            encoded.append(_shortstr(properties["content-type"]))
        if "headers" in properties:
            flags |= 0x2000
            encoded.append(encode_table(properties["headers"]))
        if "delivery-mode" in properties:
            flags |= 0x1000
            encoded.append(bytes((properties["delivery-mode"],)))
        if "message-id" in properties:
            flags |= 0x0080
            encoded.append(_shortstr(properties["message-id"]))
        header = _frame(
            _FRAME_HEADER,
            channel,
            struct.pack("!HHQH", _BASIC, 0, len(body), flags) + b"".join(encoded),
        )
        # frame_max 0 means no limit; a body frame then carries the whole body.
        chunk = self.MAX_LENGTH - 8 if self.MAX_LENGTH > 8 else max(len(body), 1)
        bodies = [
            _frame(_FRAME_BODY, channel, body[i : i + chunk]) for i in range(0, len(body), chunk)
        ]
        return b"".join([method, header, *bodies])

    def ack(self, channel: int, delivery_tag: int, multiple: bool = False) -> None:
        """Write a ``basic.ack``."""
        payload = struct.pack("!HHQB", _BASIC, _BASIC_ACK, delivery_tag, 1 if multiple else 0)
        self.transport.write(_frame(_FRAME_METHOD, channel, payload))

    def reject(self, channel: int, delivery_tag: int, requeue: bool = True) -> None:
        """Write a ``basic.reject``."""
        payload = struct.pack("!HHQB", _BASIC, _BASIC_REJECT, delivery_tag, 1 if requeue else 0)
        self.transport.write(_frame(_FRAME_METHOD, channel, payload))

    # -- the rest -----------------------------------------------------------

    def channel_failed(self, channel: Any, reason: Failure) -> None:
        self.events.channel_closed(channel.id, reason)

    def connectionMade(self) -> None:
        super().connectionMade()
        self.events.connection_made(self)

    def connectionLost(self, reason: Failure) -> None:
        self.lost_reason = reason
        super().connectionLost(reason)
        self.events.connection_lost(reason)

    def login(self, username: str, password: str, mechanism: str = "PLAIN") -> Deferred:
        """Authenticate with SASL PLAIN (bytes, so any password encodes right),
        or EXTERNAL (the TLS client certificate is the identity)."""
        if mechanism == "EXTERNAL":
            return self.start(b"", mechanism="EXTERNAL")
        response = b"\0" + username.encode("utf-8") + b"\0" + password.encode("utf-8")
        return self.start(response, mechanism="PLAIN")


class JunebugAMQPFactory(Factory):
    """Builds :class:`JunebugAMQPClient` for one vhost, reporting to ``events``."""

    noisy = False

    def __init__(
        self,
        vhost: str,
        heartbeat: int,
        clock: Any,
        events: ConnectionEvents,
        connection_name: str = "junebug-api",
    ) -> None:
        self.vhost = vhost
        self.heartbeat = heartbeat
        self.clock = clock
        self.events = events
        self.connection_name = connection_name

    def buildProtocol(self, addr: Any) -> JunebugAMQPClient:
        return JunebugAMQPClient(
            JunebugDelegate(),
            self.vhost,
            load_spec(),
            heartbeat=self.heartbeat,
            clock=self.clock,
            events=self.events,
            connection_name=self.connection_name,
        )


def body_bytes(message: Message) -> bytes:
    """A delivered message's body as bytes (txAMQP gives ``""`` when empty)."""
    body = message.content.body
    return body.encode("utf-8") if isinstance(body, str) else body
