"""The broker's side of an AMQP connection, for unit tests of the AMQP layer.

:class:`FakeBroker` feeds frames to a client over a ``StringTransport``
(whole, or split wherever the test likes) and reads what it wrote; the
``*_frame(s)`` builders make those frames; :class:`RecordingConnectionEvents`
hears what the client reports. Nothing here touches the network.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable
from typing import Any

from twisted.internet.interfaces import IProtocol, IReactorTime
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure

from junebug_api.amqp.frames import encode_table

FRAME_METHOD, FRAME_HEADER, FRAME_BODY, FRAME_HEARTBEAT = 1, 2, 3, 8
BASIC = 60
BASIC_DELIVER, BASIC_ACK, BASIC_NACK = 60, 80, 120


def frame(frame_type: int, channel: int, payload: bytes) -> bytes:
    """One AMQP frame: type, channel, size, ``payload`` and the frame end octet."""
    return struct.pack("!BHI", frame_type, channel, len(payload)) + payload + b"\xce"


def _shortstr(text: str) -> bytes:
    data = text.encode("utf-8")
    return bytes((len(data),)) + data


def method_frame(channel: int, class_id: int, method_id: int, arguments: bytes = b"") -> bytes:
    """A method frame with its arguments already encoded."""
    return frame(FRAME_METHOD, channel, struct.pack("!HH", class_id, method_id) + arguments)


def delivery_frames(
    channel: int,
    consumer_tag: str,
    delivery_tag: int,
    body: bytes,
    *,
    redelivered: bool = False,
    headers: dict[str, Any] | None = None,
    exchange: str = "vumi",
    routing_key: str = "",
    frame_max: int = 131072,
) -> bytes:
    """What a broker sends for one delivery: ``basic.deliver``, the content
    header (with ``headers`` if given) and the body in frames of at most
    ``frame_max`` bytes."""
    deliver = method_frame(
        channel,
        BASIC,
        BASIC_DELIVER,
        _shortstr(consumer_tag)
        + struct.pack("!QB", delivery_tag, 1 if redelivered else 0)
        + _shortstr(exchange)
        + _shortstr(routing_key),
    )
    flags = 0x2000 if headers else 0
    properties = encode_table(headers) if headers else b""
    header = frame(
        FRAME_HEADER, channel, struct.pack("!HHQH", BASIC, 0, len(body), flags) + properties
    )
    chunk = frame_max - 8
    bodies = [frame(FRAME_BODY, channel, body[i : i + chunk]) for i in range(0, len(body), chunk)]
    return b"".join([deliver, header, *bodies])


def confirm_frame(
    delivery_tag: int, *, multiple: bool = False, ok: bool = True, channel: int = 1
) -> bytes:
    """A publisher confirm: ``basic.ack`` (``ok``) or ``basic.nack``."""
    method = BASIC_ACK if ok else BASIC_NACK
    return method_frame(
        channel, BASIC, method, struct.pack("!QB", delivery_tag, 1 if multiple else 0)
    )


def heartbeat_frame() -> bytes:
    """A heartbeat frame (channel 0, no payload)."""
    return frame(FRAME_HEARTBEAT, 0, b"")


def split_frames(data: bytes) -> list[tuple[int, int, bytes]]:
    """``(type, channel, payload)`` of every whole frame in ``data``."""
    out, offset = [], 0
    while offset + 7 <= len(data):
        kind, channel, size = struct.unpack_from("!BHI", data, offset)
        out.append((kind, channel, data[offset + 7 : offset + 7 + size]))
        offset += 8 + size
    return out


class RecordingConnectionEvents:
    """A :class:`~junebug_api.amqp.protocol.ConnectionEvents` listener that
    records each event as ``(name, args)`` in ``events``, in order."""

    def __init__(self) -> None:
        self.events: list[tuple[str, tuple[Any, ...]]] = []

    def named(self, name: str) -> list[tuple[Any, ...]]:
        """The arguments of each event called ``name``."""
        return [args for event, args in self.events if event == name]

    def connection_made(self, client: Any) -> None:
        self.events.append(("connection_made", (client,)))

    def message_delivered(
        self,
        channel: int,
        consumer_tag: str,
        delivery_tag: int,
        redelivered: bool,
        body: bytes,
        headers: dict[str, Any],
    ) -> None:
        self.events.append(
            ("message_delivered", (channel, consumer_tag, delivery_tag, redelivered, body, headers))
        )

    def publish_confirmed(self, delivery_tag: int, multiple: bool, ok: bool) -> None:
        self.events.append(("publish_confirmed", (delivery_tag, multiple, ok)))

    def message_returned(self, message: Any) -> None:
        self.events.append(("message_returned", (message,)))

    def broker_blocked(self, reason: str) -> None:
        self.events.append(("broker_blocked", (reason,)))

    def broker_unblocked(self) -> None:
        self.events.append(("broker_unblocked", ()))

    def channel_closed(self, channel: int, reason: Failure) -> None:
        self.events.append(("channel_closed", (channel, reason)))

    def connection_lost(self, reason: Failure) -> None:
        self.events.append(("connection_lost", (reason,)))


class FakeBroker:
    """The broker's end of a client's connection, in memory.

    Connects ``client`` (an AMQP client protocol; by default a
    ``JunebugAMQPClient`` reporting to a :class:`RecordingConnectionEvents`,
    kept in ``events``) to a ``StringTransport``; :meth:`feed` hands it bytes
    as the broker would send them, whole or cut at the given offsets (a
    stream can arrive in any pieces); :meth:`written` is what the client
    sent since the last :meth:`clear`.
    """

    def __init__(self, client: IProtocol | None = None, clock: IReactorTime | None = None) -> None:
        self.events = RecordingConnectionEvents()
        if client is None:
            from junebug_api.amqp.protocol import JunebugAMQPFactory

            factory = JunebugAMQPFactory("/", 0, clock or Clock(), self.events)
            client = factory.buildProtocol(None)
        self.client = client
        self.transport = StringTransport()
        client.makeConnection(self.transport)

    def feed(self, data: bytes, cuts: Iterable[int] = ()) -> None:
        """Give ``data`` to the client, in pieces cut at the offsets ``cuts``."""
        start = 0
        for cut in sorted(set(cuts)):
            if 0 < cut < len(data):
                self.client.dataReceived(data[start:cut])
                start = cut
        if start < len(data):
            self.client.dataReceived(data[start:])

    def feed_bytewise(self, data: bytes) -> None:
        """Give ``data`` to the client one byte at a time."""
        self.feed(data, range(1, len(data)))

    def written(self) -> bytes:
        """The bytes the client wrote since the last :meth:`clear`."""
        return self.transport.value()

    def written_frames(self) -> list[tuple[int, int, bytes]]:
        """``(type, channel, payload)`` of every frame the client wrote."""
        return split_frames(self.written())

    def clear(self) -> None:
        self.transport.clear()


# -- log events -------------------------------------------------------------
