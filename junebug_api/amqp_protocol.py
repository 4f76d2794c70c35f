"""txAMQP, made fit for this service: spec, codec fixes, delegate hooks.

txAMQP 0.8.2 has three problems this module mends, in our subclasses only:

- its wheel carries no AMQP spec XML: ours is package data, with RabbitMQ's
  ``confirm`` class and ``basic.nack``;
- its frame decoder turns bodies into ``str`` where they are valid UTF-8 and
  then counts characters against the byte size, so a non-ASCII body never
  arrives; and it knows only four of RabbitMQ's field-table types, so a
  header such as ``x-death`` kills the connection. Our client decodes frames
  itself: bodies stay bytes, tables take every 0-9-1 type;
- its stock delegate has no handler for the broker's ``basic.ack``/``nack``
  (publisher confirms) and queues deliveries instead of handing them over.

Publishing non-ASCII ``str`` corrupts frames in txAMQP; callers publish bytes.
"""

from __future__ import annotations

import struct
import warnings
from collections.abc import Callable
from decimal import Decimal
from functools import cache
from importlib.resources import files
from io import BytesIO
from typing import Any

from twisted.internet.defer import Deferred, succeed
from twisted.internet.protocol import Factory
from twisted.python.failure import Failure

from .log import logger

# txAMQP still calls Twisted's deprecated returnValue; hide that warning for
# txAMQP's own modules only, before they are imported.
warnings.filterwarnings("ignore", category=DeprecationWarning, module=r"txamqp(\.|$)")

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
    text = (files("junebug_api") / SPEC_FILE).read_text(encoding="utf-8")
    return txamqp_spec.load_string(text, specfilename=SPEC_FILE)


class FieldCodec(Codec):
    """txAMQP's codec with every AMQP 0-9-1 field-table type RabbitMQ sends."""

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
    """Hands deliveries, confirms and returns to the client's callbacks."""

    def basic_deliver(self, channel: Any, message: Message) -> None:
        self.client.deliver(channel, message)

    def basic_ack(self, channel: Any, message: Message) -> None:
        self.client.confirmed(channel, message.delivery_tag, message.multiple, True)

    def basic_nack(self, channel: Any, message: Message) -> None:
        self.client.confirmed(channel, message.delivery_tag, message.multiple, False)

    def basic_return_(self, channel: Any, message: Message) -> None:
        self.client.returned(channel, message)

    def basic_cancel(self, channel: Any, message: Message) -> None:
        # The broker cancels a consumer whose queue was deleted: start over.
        log.warn("The broker cancelled consumer {tag}", tag=message.consumer_tag)
        self.client.transport.loseConnection()


class JunebugAMQPClient(AMQClient):
    """An AMQClient that decodes frames correctly and reports events.

    ``on_deliver(channel, message)``, ``on_confirm(channel, tag, multiple,
    ok)``, ``on_return(channel, message)`` and ``on_lost(reason)`` are set by
    the connection's owner.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.on_deliver: Callable[[Any, Message], None] = lambda ch, msg: None
        self.on_confirm: Callable[[Any, int, bool, bool], None] = lambda *a: None
        self.on_return: Callable[[Any, Message], None] = lambda ch, msg: None
        self.on_lost: Callable[[Failure], None] = lambda reason: None

    def unwrapped(self) -> JunebugAMQPClient:
        """This client itself, also when called through ClientService's proxy
        (which forwards reads but keeps attribute writes to itself)."""
        return self

    def _unpack_frame(self, data: bytes) -> Frame:
        return decode_frame(self.spec, data)

    def channel(self, id: int) -> Deferred:
        ch = self.channels.get(id)
        if ch is not None:
            return succeed(ch)
        return super().channel(id)

    def deliver(self, channel: Any, message: Message) -> None:
        self.on_deliver(channel, message)

    def confirmed(self, channel: Any, tag: int, multiple: bool, ok: bool) -> None:
        self.on_confirm(channel, tag, multiple, ok)

    def returned(self, channel: Any, message: Message) -> None:
        self.on_return(channel, message)

    def channel_failed(self, channel: Any, reason: Failure) -> None:
        log.error(
            "AMQP channel {channel} closed by the broker: {reason}; reconnecting",
            channel=channel.id,
            reason=reason.getErrorMessage(),
        )
        if self.transport is not None:
            self.transport.loseConnection()

    def connectionLost(self, reason: Failure) -> None:
        super().connectionLost(reason)
        self.on_lost(reason)

    def login(self, username: str, password: str) -> Deferred:
        """Authenticate with SASL PLAIN; bytes, so any password encodes right."""
        response = b"\0" + username.encode("utf-8") + b"\0" + password.encode("utf-8")
        return self.start(response, mechanism="PLAIN")


class JunebugAMQPFactory(Factory):
    """Builds :class:`JunebugAMQPClient` for one vhost."""

    noisy = False

    def __init__(self, vhost: str, heartbeat: int, clock: Any) -> None:
        self.vhost = vhost
        self.heartbeat = heartbeat
        self.clock = clock

    def buildProtocol(self, addr: Any) -> JunebugAMQPClient:
        return JunebugAMQPClient(
            JunebugDelegate(),
            self.vhost,
            load_spec(),
            heartbeat=self.heartbeat,
            clock=self.clock,
        )


def body_bytes(message: Message) -> bytes:
    """A delivered message's body as bytes (txAMQP gives ``""`` when empty)."""
    body = message.content.body
    return body.encode("utf-8") if isinstance(body, str) else body
