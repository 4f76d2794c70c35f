"""One AMQP connection's state: its channels, deliveries and their acks,
publishes and their confirms; the :class:`ConnectionEvents` its client
reports to.

:class:`AmqpConnection` is made before its client, which is given it at
construction and hands itself over in ``connection_made`` (as Twisted hands
a protocol its transport). A ``publishing`` connection keeps track of
confirms, returns and blocking, with at most ``max_unconfirmed`` publishes
unconfirmed; a consuming one hands each delivery to the consumer registered
for the channel it came on (``consumers``).

Channels: the publishing channel (1, confirm mode), a control channel for
declarations and queries (``query``: one method at a time on it, as
:class:`~junebug_api.amqp.channel.JunebugChannel` has every channel), and
one channel per consumer. A closed channel's number is used again, so an
:class:`Acker` holds its channel itself, not its number: an acker of a
channel (or connection) that is gone does nothing, since the broker has
already put that message back on its queue.
"""

from __future__ import annotations

from collections import OrderedDict, deque
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import attrs
from twisted.internet.defer import Deferred, DeferredLock
from twisted.python.failure import Failure

from junebug_api.amqp.channel import ChannelGone
from junebug_api.amqp.protocol import JunebugAMQPClient
from junebug_api.config.model import AmqpConfig
from junebug_api.observe.log import logger

log = logger(__name__)

PUBLISH_CHANNEL = 1  # publishing connection: confirm mode
CONTROL_CHANNEL = 2  # either connection: declarations, basic.get, queue queries
FIRST_FREE_CHANNEL = 3  # consumers (one channel each), declare lanes

T = TypeVar("T")


class PublishFailed(Exception):
    """The broker did not take a message: down, nacked or unroutable."""


class PublishRefused(PublishFailed):
    """Not written at all: the broker blocks publishing, or too many publishes
    wait for their confirm. Worth another try after ``retry_after`` seconds."""

    def __init__(self, reason: str, retry_after: int) -> None:
        super().__init__(reason)
        self.retry_after = retry_after


@attrs.define(eq=False)
class Acker:
    """Acknowledges one delivery on the connection and channel it came from."""

    _connection: AmqpConnection
    _channel: Any
    delivery_tag: int
    redelivered: bool
    # The message's AMQP headers (retries carry their attempt count there).
    headers: dict[str, Any] = attrs.field(factory=dict)

    def ack(self) -> None:
        """Tell the broker this message is done (no-op if its channel is gone).

        Acks are gathered for the rest of the reactor turn and sent as few
        ``basic.ack`` frames as possible (``multiple`` for a run of tags).
        """
        self._connection.ack(self._channel, self.delivery_tag)

    def reject(self) -> None:
        """Give the message back to its queue now (no-op if its channel is gone)."""
        self._connection.reject(self._channel, self.delivery_tag)

    @property
    def alive(self) -> bool:
        """Its channel is open: False once the broker has taken the message back."""
        return self._connection.alive and not self._channel.closed


Consumer = Callable[[bytes, Acker], None]


@attrs.define(eq=False)
class AmqpConnection:
    """One AMQP connection and the state tied to its life. Public as the
    seam's implementation: unit tests drive it event by event."""

    broker: AmqpConfig
    clock: Any
    max_unconfirmed: int
    publishing: bool = False
    client: JunebugAMQPClient = attrs.field(init=False)
    opened_at: float = attrs.field(default=0.0, init=False)
    # The channels opened on it and kept open, by number.
    channels: dict[int, Any] = attrs.field(factory=dict)
    # The channel for declarations and queries; None or closed: opened when next needed.
    control: Any = None
    control_lock: DeferredLock = attrs.field(factory=DeferredLock)
    alive: bool = True
    blocked: str | None = None
    # Fires (with None) once the connection is lost; lost_reason says why.
    lost: Deferred = attrs.field(factory=Deferred)
    lost_reason: Failure | None = None
    next_tag: int = 1
    pending: OrderedDict[int, Deferred] = attrs.field(factory=OrderedDict)
    returned: dict[str, int] = attrs.field(factory=dict)
    failed_tags: dict[int, str] = attrs.field(factory=dict)
    # Publishes not yet written (blocked, or too many unconfirmed).
    held: deque = attrs.field(factory=deque)
    # Per channel (the channel itself): deliveries not yet acked, in arrival
    # order; True once done.
    unacked: dict[Any, OrderedDict[int, bool]] = attrs.field(factory=dict)
    # Per channel number: the channel and the consumer of its deliveries.
    consumers: dict[int, tuple[Any, Consumer]] = attrs.field(factory=dict)
    # Channels whose consumer was cancelled: closed once their deliveries are settled.
    draining: set[Any] = attrs.field(factory=set)
    _flush_scheduled: bool = False

    # -- channels -----------------------------------------------------------

    async def open_channel(self, first: int = FIRST_FREE_CHANNEL) -> Any:
        """A new channel, opened: the lowest free number from ``first`` on."""
        channel = self.client.new_channel(first)
        await channel.channel_open()
        self.channels[channel.id] = channel
        return channel

    async def close_channel(self, channel: Any) -> None:
        """Close ``channel`` (its number is free again once the broker confirmed)."""
        if self.channels.get(channel.id) is channel:
            del self.channels[channel.id]
        self.unacked.pop(channel, None)
        await self.client.close_channel(channel.id)

    async def control_channel(self) -> Any:
        """The channel for declarations and queries, opened if need be (the
        broker closes it for a passive declare of a missing queue)."""
        if not self.alive:
            raise PublishFailed("not connected to AMQP")
        async with self.control_lock:
            if self.control is None or self.control.closed:
                self.control = await self.open_channel(CONTROL_CHANNEL)
        return self.control

    async def query(self, call: Callable[[Any], Awaitable[T]]) -> T:
        """``call(channel)`` on the control channel, after the callers before
        it. If the broker closed that channel for another caller's method
        while this one waited its turn (:class:`ChannelGone`: never sent),
        once more on a new control channel."""
        channel = await self.control_channel()
        try:
            return await call(channel)
        except ChannelGone:
            channel = await self.control_channel()
            return await call(channel)

    def retire(self, channel: Any) -> None:
        """``channel``'s consumer was cancelled: close the channel once every
        delivery it had is acked or rejected (closing sooner would put them
        back on their queue while they are being worked on)."""
        self.draining.add(channel)
        self._close_drained()

    def _close_drained(self) -> None:
        for channel in [c for c in self.draining if not self.unacked.get(c)]:
            self.draining.discard(channel)
            if self.consumers.get(channel.id, (None,))[0] is channel:
                del self.consumers[channel.id]
            if self.alive and not channel.closed:
                closed = Deferred.fromCoroutine(self.close_channel(channel))
                closed.addErrback(lambda _: None)  # the connection went: nothing to close

    # -- deliveries and their acks ------------------------------------------

    def track(
        self, channel: Any, delivery_tag: int, redelivered: bool, headers: dict[str, Any]
    ) -> Acker:
        """Count a delivery (or a ``basic.get`` reply) on ``channel`` as unacked; its Acker."""
        tags = self.unacked.get(channel)
        if tags is None:
            tags = self.unacked[channel] = OrderedDict()
        tags[delivery_tag] = False
        return Acker(self, channel, delivery_tag, redelivered, headers)

    def ack(self, channel: Any, delivery_tag: int) -> None:
        """Mark a delivery done; its ack goes out at the end of the reactor
        turn (:meth:`flush_acks`). No-op once its channel is gone."""
        tags = self.unacked.get(channel)
        if not self.alive or tags is None or delivery_tag not in tags:
            return
        tags[delivery_tag] = True
        if not self._flush_scheduled:
            self._flush_scheduled = True
            self.clock.callLater(0, self.flush_acks)

    def reject(self, channel: Any, delivery_tag: int) -> None:
        """Give a delivery back to its queue now (``basic.reject``, requeued).
        No-op once its channel is gone."""
        tags = self.unacked.get(channel)
        if not self.alive or tags is None or tags.pop(delivery_tag, None) is None:
            return
        self.client.reject(channel.id, delivery_tag, requeue=True)
        if self.draining:
            self._close_drained()

    def flush_acks(self) -> None:
        """Ack the finished deliveries of each channel: the leading run with
        one ``multiple`` ack, any others one by one."""
        self._flush_scheduled = False
        if not self.alive:
            return
        for channel, unacked in self.unacked.items():
            _flush(self.client, channel.id, unacked)
        if self.draining:
            self._close_drained()

    # -- publishing ---------------------------------------------------------

    def write(self, frames: bytes, message_id: str) -> Deferred[None]:
        """Write one encoded publish; fires once the broker confirms it."""
        # The tag is the broker's count of publishes on this channel: take it
        # only for frames that are certainly written.
        tag = self.next_tag
        self.next_tag += 1
        confirmed: Deferred[None] = Deferred()
        self.pending[tag] = confirmed
        self.returned[message_id] = tag
        self.client.transport.write(frames)
        confirmed.addBoth(self._forget_id, message_id, tag)
        return confirmed

    def write_held(self) -> None:
        """Write waiting publishes while the connection takes them."""
        while (
            self.held
            and self.alive
            and self.blocked is None
            and len(self.pending) < self.max_unconfirmed
        ):
            (frames, message_id), held = self.held.popleft()
            if held.called:
                continue  # cancelled meanwhile
            self.write(frames, message_id).chainDeferred(held)

    def _forget_id(self, result: Any, message_id: str, tag: int) -> Any:
        if self.returned.get(message_id) == tag:
            del self.returned[message_id]
        return result

    def _confirmed(self, delivery_tag: int, multiple: bool) -> list[tuple[int, Deferred]]:
        """The pending publishes a confirm of ``delivery_tag`` settles."""
        pending = self.pending
        if not multiple:
            d = pending.pop(delivery_tag, None)
            return [] if d is None else [(delivery_tag, d)]
        done = []
        while pending and next(iter(pending)) <= delivery_tag:
            done.append(pending.popitem(last=False))
        return done

    # -- ConnectionEvents ---------------------------------------------------

    def connection_made(self, client: JunebugAMQPClient) -> None:
        self.client = client
        self.opened_at = self.clock.seconds()

    def message_delivered(
        self,
        channel: int,
        consumer_tag: str,
        delivery_tag: int,
        redelivered: bool,
        body: bytes,
        headers: dict[str, Any],
    ) -> None:
        entry = self.consumers.get(channel)
        if entry is None:
            self.client.reject(channel, delivery_tag, requeue=True)
            return
        on, consumer = entry
        consumer(body, self.track(on, delivery_tag, redelivered, headers or {}))

    def publish_confirmed(self, delivery_tag: int, multiple: bool, ok: bool) -> None:
        if not self.publishing:
            return
        for done_tag, d in self._confirmed(delivery_tag, multiple):
            failure = self.failed_tags.pop(done_tag, None)
            if d.called:
                continue  # cancelled: the API client went away
            if not ok:
                d.errback(PublishFailed("the broker refused the message (basic.nack)"))
            elif failure is not None:
                d.errback(PublishFailed(failure))
            else:
                d.callback(None)
        if self.held:
            self.write_held()

    def message_returned(self, message: Any) -> None:
        if not self.publishing:
            return
        message_id = message.content.properties.get("message-id")
        tag = self.returned.get(message_id)
        reason = f"{message.reply_code} {message.reply_text}"
        if tag is None:
            log.error(
                "The broker returned message {message_id} to {routing_key}: {reason}",
                message_id=message_id,
                routing_key=message.routing_key,
                reason=reason,
            )
            return
        self.failed_tags[tag] = f"unroutable ({reason})"

    def broker_blocked(self, reason: str) -> None:
        if not self.publishing:
            return
        self.blocked = reason or "resource alarm"
        log.warn(
            "The broker {broker} blocks publishing ({reason}): outbound requests get 503"
            " until it unblocks",
            broker=self.broker.address,
            reason=self.blocked,
        )

    def broker_unblocked(self) -> None:
        if not self.publishing:
            return
        self.blocked = None
        log.info("The broker {broker} unblocked publishing", broker=self.broker.address)
        self.write_held()

    def channel_closed(self, channel: int, reason: Failure) -> None:
        """The control channel is reopened when next needed (its deliveries
        from ``basic.get`` are back on their queues); any other closed
        channel means the connection starts over."""
        self.channels.pop(channel, None)
        for gone in [c for c in self.unacked if c.id == channel and c.closed]:
            del self.unacked[gone]
        if self.control is not None and self.control.id == channel:
            return
        log.error(
            "AMQP channel {channel} closed by the broker: {reason}; reconnecting",
            channel=channel,
            reason=reason.getErrorMessage(),
        )
        if self.client.transport is not None:
            self.client.transport.loseConnection()

    def connection_lost(self, reason: Failure) -> None:
        self.alive = False
        pending = list(self.pending.values())
        self.pending.clear()
        held = list(self.held)
        self.held.clear()
        for d in pending:
            if not d.called:
                d.errback(PublishFailed("AMQP connection lost before the broker confirmed"))
        for _, d in held:
            if not d.called:
                d.errback(PublishFailed("AMQP connection lost before the message was sent"))
        self.lost_reason = reason
        if not self.lost.called:
            self.lost.callback(None)


def _flush(client: JunebugAMQPClient, channel: int, unacked: OrderedDict[int, bool]) -> None:
    """Ack one channel's finished deliveries: the leading run with one
    ``multiple`` ack, any others one by one."""
    last, count = None, 0
    while unacked:
        tag, finished = next(iter(unacked.items()))
        if not finished:
            break
        unacked.popitem(last=False)
        last, count = tag, count + 1
    if last is not None:
        client.ack(channel, last, multiple=count > 1)
    for tag in [tag for tag, finished in unacked.items() if finished]:
        del unacked[tag]
        client.ack(channel, tag)
