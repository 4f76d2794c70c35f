"""txAMQP, made fit for this service: the client, its channels, its delegate,
and the interface the client reports through.

txAMQP 0.8.2 has four problems this module mends, in our subclasses only:

- its wheel carries no AMQP spec XML, its frame decoder breaks non-ASCII
  bodies and most field-table types: our client decodes frames with
  :mod:`junebug_api.amqp.frames`;
- its stock delegate has no handler for the broker's ``basic.ack``/``nack``
  (publisher confirms), and its per-frame Deferred machinery is slow: our
  client handles deliveries, acks and nacks itself and writes publishes and
  acks as bytes;
- its channel lets a second synchronous method go out while the first waits
  for its reply, and the replies then go to whichever caller waits first
  (two ``basic.get`` at once took each other's messages): our channel keeps
  AMQP's rule, one synchronous method in flight per channel, the next
  waiting its turn (:class:`JunebugChannel`);
- it keeps a closed channel's number taken: our client frees it once the
  channel is closed, for the next channel to use.

Publishing non-ASCII ``str`` corrupts frames in txAMQP; callers publish bytes.

The client reports to the owner of its connection through one interface,
:class:`ConnectionEvents`, given to it at construction.
"""

from __future__ import annotations

import struct
from typing import Any, Protocol, runtime_checkable

from twisted.internet.defer import Deferred, succeed
from twisted.internet.protocol import Factory
from twisted.python.failure import Failure
from txamqp.client import TwistedDelegate
from txamqp.connection import Frame
from txamqp.message import Message
from txamqp.protocol import AMQClient

from junebug_api.amqp.channel import ChannelGone, JunebugChannel
from junebug_api.amqp.frames import (
    BASIC,
    BASIC_ACK,
    BASIC_DELIVER,
    BASIC_NACK,
    BASIC_PUBLISH,
    BASIC_REJECT,
    FRAME_BODY,
    FRAME_END,
    FRAME_HEADER,
    FRAME_HEARTBEAT,
    FRAME_METHOD,
    HEADERS_FLAG,
    content_frames,
    decode_frame,
    encode_frame,
    encode_table,
    frame_bytes,
    load_spec,
    read_shortstr,
    shortstr,
)
from junebug_api.observe.log import logger

log = logger(__name__)

__all__ = [
    "ChannelGone",
    "ConnectionEvents",
    "JunebugAMQPClient",
    "JunebugAMQPFactory",
    "load_spec",
]


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
            + shortstr(self.client.mechanism)
            + struct.pack("!I", len(response))
            + response
            + shortstr(self.client.locale)
        )
        self.client.transport.write(frame_bytes(FRAME_METHOD, 0, payload))

    def connection_tune(self, channel: Any, message: Message) -> None:
        self.client.channel_max = message.channel_max
        super().connection_tune(channel, message)

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

    channelClass = JunebugChannel

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
        # The broker's channel_max (connection.tune); 0 until then, or no limit.
        self.channel_max = 0

    def channel(self, id: int) -> Deferred:
        """Channel ``id``, made (not opened) if new: at once, so that a number
        taken is taken before the caller's next line."""
        ch = self.channels.get(id)
        if ch is None:
            ch = self.channels[id] = self.channelFactory(id, self.outgoing, self)
        return succeed(ch)

    def new_channel(self, first: int = 1) -> Any:
        """A new channel (not yet opened) on the lowest number from ``first``
        on that no channel has (open, opening or closing); ValueError when
        all up to the broker's ``channel_max`` are taken."""
        limit = self.channel_max or 65535
        for number in range(first, limit + 1):
            if number not in self.channels:
                ch = self.channels[number] = self.channelFactory(number, self.outgoing, self)
                return ch
        raise ValueError(f"all {limit} AMQP channels of the connection are in use")

    async def close_channel(self, id: int) -> None:
        """Close channel ``id`` (``channel.close``, after the method in flight
        on it, if any) and free its number once the broker's ``close-ok`` came."""
        ch = self.channels.get(id)
        if ch is None or ch.closed:
            self.channels.pop(id, None)
            return
        try:
            await ch.channel_close()
        finally:
            ch.close(ChannelGone(f"AMQP channel {id} closed"))
            if self.channels.get(id) is ch:
                del self.channels[id]

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
            if frame[-1] != FRAME_END:
                log.error("AMQP framing error from the broker; closing the connection")
                self.transport.loseConnection()
                del buffer[:]
                return
            self._frame_received(frame)
            if self.transport is None or self.transport.disconnecting:
                break
        del buffer[:offset]

    def _frame_received(self, frame: bytes) -> None:
        """One frame: the hot ones here, the rest through txAMQP."""
        frame_type = frame[0]
        (channel,) = struct.unpack_from("!H", frame, 1)
        if frame_type == FRAME_METHOD:
            handled = self._basic_method(channel, frame)
        elif frame_type == FRAME_HEADER or frame_type == FRAME_BODY:
            handled = self._content(channel, frame_type, frame)
        else:
            handled = frame_type == FRAME_HEARTBEAT
        if not handled:
            self.frame_received(decode_frame(self.spec, frame))

    def _basic_method(self, channel: int, frame: bytes) -> bool:
        """``basic.ack``/``nack`` (confirms) and ``basic.deliver``; False for others."""
        class_id, method_id = struct.unpack_from("!HH", frame, 7)
        if class_id != BASIC:
            return False
        if method_id == BASIC_ACK or method_id == BASIC_NACK:
            tag, bits = struct.unpack_from("!QB", frame, 11)
            self.events.publish_confirmed(tag, bool(bits & 1), method_id == BASIC_ACK)
            return True
        if method_id == BASIC_DELIVER:
            consumer_tag, at = read_shortstr(frame, 11)
            tag, redelivered = struct.unpack_from("!QB", frame, at)
            self._incoming[channel] = _IncomingDelivery(consumer_tag, tag, bool(redelivered & 1))
            return True
        return False

    def _content(self, channel: int, frame_type: int, frame: bytes) -> bool:
        """A content frame of a ``basic.deliver``; False for others' (``basic.get``)."""
        delivery = self._incoming.get(channel)
        if delivery is None:
            return False
        if frame_type == FRAME_HEADER:
            (delivery.size,) = struct.unpack_from("!Q", frame, 11)
            (flags,) = struct.unpack_from("!H", frame, 19)
            if flags & HEADERS_FLAG:
                # Only messages with headers (retries carry their attempt
                # count there) take the slow decoder.
                header = decode_frame(self.spec, frame).payload
                delivery.headers = dict(header.properties.get("headers") or {})
        else:
            body = frame[7:-1]
            delivery.chunks.append(body)
            delivery.received += len(body)
        if delivery.received >= (delivery.size or 0):
            self._delivered(channel)
        return True

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
        """A frame of txAMQP's as bytes (see :func:`~junebug_api.amqp.frames.encode_frame`)."""
        return encode_frame(self.spec, frame)

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
                struct.pack("!HHH", BASIC, BASIC_PUBLISH, 0)
                + shortstr(exchange)
                + shortstr(routing_key)
                + bytes((1 if mandatory else 0,))
            )
            method = self._publish_methods[key] = frame_bytes(FRAME_METHOD, channel, payload)
        return method + content_frames(channel, body, properties, self.MAX_LENGTH)

    def ack(self, channel: int, delivery_tag: int, multiple: bool = False) -> None:
        """Write a ``basic.ack``."""
        payload = struct.pack("!HHQB", BASIC, BASIC_ACK, delivery_tag, 1 if multiple else 0)
        self.transport.write(frame_bytes(FRAME_METHOD, channel, payload))

    def reject(self, channel: int, delivery_tag: int, requeue: bool = True) -> None:
        """Write a ``basic.reject``."""
        payload = struct.pack("!HHQB", BASIC, BASIC_REJECT, delivery_tag, 1 if requeue else 0)
        self.transport.write(frame_bytes(FRAME_METHOD, channel, payload))

    # -- the rest -----------------------------------------------------------

    def channel_failed(self, channel: Any, reason: Failure) -> None:
        # The broker closed it (txAMQP answered close-ok): its number is free.
        if self.channels.get(channel.id) is channel:
            del self.channels[channel.id]
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
