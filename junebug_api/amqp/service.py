"""The AMQP connections: reconnection, topology, confirmed publishing, consuming.

:class:`AmqpService` keeps two connections to RabbitMQ, as RabbitMQ advises:
one publishes (outbound and dead-letter messages, with publisher confirms),
the other consumes (deliveries and their acks), so a publisher the broker
blocks during a resource alarm never holds back the consumers' acks. Each
connection reconnects on its own: every attempt goes to the next broker of
``settings.brokers`` (in order, or shuffled per round), and the capped
backoff applies only once a whole round of brokers failed. Every attempt,
TLS handshake and AMQP handshake included, must finish within
``settings.connect_timeout``; a failed one is logged as one sentence (see
:mod:`junebug_api.amqp.connect`) that ``/health`` shows too.

Both connections declare the vumi exchange and the service's queues (or
only check them, ``declare: passive``) on every connect. Each consumer has a
channel of its own on the consuming connection with its own prefetch
(``basic.qos`` per consumer, as quorum queues need), and can be paused and
resumed on its own.

``publish`` answers with a Deferred that fires once the broker confirmed the
message (``basic.ack``), and fails with :class:`PublishFailed` on a nack, an
unroutable message (``mandatory`` + ``basic.return``) or a lost connection.
While the broker blocks the publishing connection (``connection.blocked``),
or ``max_unconfirmed`` publishes wait for their confirm, nothing new is
written: a publish with ``refuse_if_busy=True`` (an API request) fails at
once with :class:`PublishRefused`; any other waits, unwritten, until the
broker unblocks (or its connection is lost).

Consumers get each message as bytes with an :class:`Acker` to call when its
work is done; an acker of a connection that died does nothing, since the
broker has already put that message back on its queue.
"""

from __future__ import annotations

import random
import time
from collections import OrderedDict, deque
from collections.abc import Callable
from typing import Any

import attrs
from twisted.application.service import Service
from twisted.internet.defer import CancelledError, Deferred, DeferredList, fail
from twisted.internet.task import deferLater
from twisted.python.failure import Failure

from junebug_api.amqp.connect import (
    SetupFailed,
    TlsMaterial,
    broker_endpoint,
    explain,
    explain_channel_close,
)
from junebug_api.amqp.protocol import JunebugAMQPClient, JunebugAMQPFactory, body_bytes
from junebug_api.config.model import AmqpConfig, AmqpConnectionSettings
from junebug_api.formats.message_ids import generate_message_id
from junebug_api.formats.queue_names import EXCHANGE
from junebug_api.observe.log import logger
from junebug_api.observe.metrics import NO_METRICS, Metrics

log = logger(__name__)

PUBLISH_CHANNEL = 1  # publishing connection: confirm mode
CONTROL_CHANNEL = 2  # either connection: declarations, basic.get, queue queries
FIRST_CONSUMER_CHANNEL = 3  # consuming connection: one channel per consumer
DECLARE_LANES = 8  # at most this many channels declare queues at once at set-up
DECLARE_LANE_SIZE = 20  # queues per lane at least (so one connector's declare serially)
INITIAL_RECONNECT_DELAY = 0.5
MAX_RECONNECT_DELAY = 30.0
QUICK_DROP = 5.0  # seconds: a connection lost sooner counts as a failed round
BLOCKED_RETRY_AFTER = 5
BUSY_RETRY_AFTER = 1


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
    _channel: int
    delivery_tag: int
    redelivered: bool
    # The message's AMQP headers (retries carry their attempt count there).
    headers: dict[str, Any] = attrs.field(factory=dict)

    def ack(self) -> None:
        """Tell the broker this message is done (no-op if its connection is gone).

        Acks are gathered for the rest of the reactor turn and sent as few
        ``basic.ack`` frames as possible (``multiple`` for a run of tags).
        """
        self._connection.ack(self._channel, self.delivery_tag)

    def reject(self) -> None:
        """Give the message back to its queue now (no-op if the connection is gone)."""
        self._connection.reject(self._channel, self.delivery_tag)

    @property
    def alive(self) -> bool:
        return self._connection.alive


Consumer = Callable[[bytes, Acker], None]


@attrs.define(eq=False)
class AmqpConnection:
    """One AMQP connection and the state tied to its life; the
    :class:`~junebug_api.amqp.protocol.ConnectionEvents` its client reports to.
    Public as the seam's implementation: unit tests drive it event by event.

    Made before its client, which is given it at construction and hands
    itself over in ``connection_made`` (as Twisted hands a protocol its
    transport). A ``publishing`` connection keeps track of confirms, returns
    and blocking, with at most ``max_unconfirmed`` publishes unconfirmed; a
    consuming one (``consumer_for`` given) hands each delivery to the
    consumer of its queue.
    """

    broker: AmqpConfig
    clock: Any
    max_unconfirmed: int
    publishing: bool = False
    consumer_for: Callable[[str], Consumer | None] | None = None
    client: JunebugAMQPClient = attrs.field(init=False)
    opened_at: float = attrs.field(default=0.0, init=False)
    channels: dict[int, Any] = attrs.field(factory=dict)
    # The channel for declarations and queries; None once the broker closed it.
    control: Any = None
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
    # Per channel: deliveries not yet acked, in arrival order; True once done.
    unacked: dict[int, OrderedDict[int, bool]] = attrs.field(factory=dict)
    next_channel: int = 100
    _flush_scheduled: bool = False

    # -- deliveries and their acks ------------------------------------------

    def _unacked_on(self, channel: int) -> OrderedDict[int, bool]:
        tags = self.unacked.get(channel)
        if tags is None:
            tags = self.unacked[channel] = OrderedDict()
        return tags

    def track(
        self, channel: int, delivery_tag: int, redelivered: bool, headers: dict[str, Any]
    ) -> Acker:
        """Count a delivery (or a ``basic.get`` reply) as unacked; its Acker."""
        self._unacked_on(channel)[delivery_tag] = False
        return Acker(self, channel, delivery_tag, redelivered, headers)

    def ack(self, channel: int, delivery_tag: int) -> None:
        """Mark a delivery done; its ack goes out at the end of the reactor
        turn (:meth:`flush_acks`). No-op once the connection is gone."""
        if not self.alive:
            return
        tags = self.unacked.get(channel)
        if tags is not None and delivery_tag in tags:
            tags[delivery_tag] = True
            if not self._flush_scheduled:
                self._flush_scheduled = True
                self.clock.callLater(0, self.flush_acks)

    def reject(self, channel: int, delivery_tag: int) -> None:
        """Give a delivery back to its queue now (``basic.reject``, requeued).
        No-op once the connection is gone."""
        if not self.alive:
            return
        self._unacked_on(channel).pop(delivery_tag, None)
        self.client.reject(channel, delivery_tag, requeue=True)

    def flush_acks(self) -> None:
        """Ack the finished deliveries of each channel: the leading run with
        one ``multiple`` ack, any others one by one."""
        self._flush_scheduled = False
        if not self.alive:
            return
        for channel, unacked in self.unacked.items():
            last, count = None, 0
            while unacked:
                tag, finished = next(iter(unacked.items()))
                if not finished:
                    break
                unacked.popitem(last=False)
                last, count = tag, count + 1
            if last is not None:
                self.client.ack(channel, last, multiple=count > 1)
            for tag in [tag for tag, finished in unacked.items() if finished]:
                del unacked[tag]
                self.client.ack(channel, tag)

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
        if self.consumer_for is None:
            return
        acker = self.track(channel, delivery_tag, redelivered, headers or {})
        consumer = self.consumer_for(consumer_tag)
        if consumer is None:
            acker.reject()
            return
        consumer(body, acker)

    def publish_confirmed(self, delivery_tag: int, multiple: bool, ok: bool) -> None:
        if not self.publishing:
            return
        pending = self.pending
        if multiple:
            done = []
            while pending:
                first = next(iter(pending))
                if first > delivery_tag:
                    break
                done.append(pending.popitem(last=False))
        else:
            d = pending.pop(delivery_tag, None)
            done = [] if d is None else [(delivery_tag, d)]
        for done_tag, d in done:
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
        """A query channel is reopened when next needed; any other closed
        channel means the connection starts over."""
        self.channels.pop(channel, None)
        if self.control is not None and self.control.id == channel:
            self.control = None
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


@attrs.frozen
class LinkStatus:
    """One of the service's two connection loops (``publish`` or ``consume``)
    as it stands at the moment it was read: a read-only copy, so that what
    reads it (tests, diagnostics) cannot change the loop.

    ``broker`` is the broker of the latest attempt (None before the first),
    ``attempts`` counts every attempt since the start, ``failures`` those
    failed in a row, ``error`` says why the latest failed or the connection
    was lost, and ``open`` whether a connection is open now.
    """

    role: str
    broker: AmqpConfig | None
    attempts: int
    failures: int
    error: str | None
    open: bool


@attrs.define(eq=False)
class _Link:
    """One of the two connections (``publish`` or ``consume``) over its life:
    the connection open now, if any, and why the last attempt failed. The
    connection loop's own state; others see a :class:`LinkStatus`."""

    role: str
    connection: AmqpConnection | None = None
    broker: AmqpConfig | None = None
    error: str | None = None
    attempts: int = 0
    failures: int = 0
    waiters: list[tuple[Deferred, int | None]] = attrs.field(factory=list)
    running: Deferred | None = None
    sleeping: Deferred | None = None
    order: list[AmqpConfig] = attrs.field(factory=list)

    @property
    def open(self) -> bool:
        return self.connection is not None and self.connection.alive

    def status(self) -> LinkStatus:
        return LinkStatus(
            self.role, self.broker, self.attempts, self.failures, self.error, self.open
        )

    def health(self) -> dict[str, Any]:
        connection = self.connection
        status: dict[str, Any] = {}
        if connection is not None and connection.alive:
            status["state"] = "blocked" if connection.blocked else "open"
            status["broker"] = connection.broker.address
            status["connected_since"] = time.strftime(
                "%Y-%m-%d %H:%M:%S", time.gmtime(connection.opened_at)
            )
            if connection.blocked:
                status["blocked"] = connection.blocked
        else:
            status["state"] = "closed"
            if self.broker is not None:
                status["broker"] = self.broker.address
            if self.error:
                status["error"] = self.error
        return status


@attrs.define(eq=False)
class AmqpService(Service):
    """Keeps the publishing and consuming connections, publishes with
    confirms, runs consumers.

    ``queues`` are declared (durable, with ``settings.queue_arguments``,
    bound to the vumi exchange by their own name) on every connect;
    ``consumers`` maps a queue name to the callable that gets its messages,
    each with ``prefetch`` messages in work at most. Consumers built after
    the service (they need its ``publish``) are added with
    :meth:`add_consumer` before it starts.

    ``settings`` may be a single :class:`AmqpConfig` (one plain broker, the
    other settings at their defaults).
    """

    settings: AmqpConnectionSettings | AmqpConfig
    queues: list[str]
    _consumers: dict[str, Consumer] = attrs.field(converter=dict)
    prefetch: int
    _reactor: Any
    heartbeat: int | None = None
    connection_name: str = "junebug-api"
    metrics: Metrics = NO_METRICS
    _random: random.Random = attrs.field(factory=random.Random)
    _extra_queues: dict[str, dict[str, Any]] = attrs.field(factory=dict, init=False)
    _prefetches: dict[str, int] = attrs.field(factory=dict, init=False)
    _paused: set[str] = attrs.field(factory=set, init=False)
    _publisher: _Link = attrs.field(factory=lambda: _Link("publish"), init=False)
    _consumer: _Link = attrs.field(factory=lambda: _Link("consume"), init=False)
    _tls: TlsMaterial | None = attrs.field(default=None, init=False)
    _stopping: bool = attrs.field(default=False, init=False)

    def __attrs_post_init__(self) -> None:
        self.name = "amqp"
        if isinstance(self.settings, AmqpConfig):
            self.settings = AmqpConnectionSettings(brokers=(self.settings,))
        if self.heartbeat is not None:
            self.settings = attrs.evolve(self.settings, heartbeat=self.heartbeat)
        if any(broker.tls for broker in self.settings.brokers):
            self._tls = TlsMaterial(self.settings)

    @property
    def links(self) -> tuple[LinkStatus, LinkStatus]:
        """The two connection loops, ``publish`` then ``consume``, as they
        stand now (read-only copies: read it again to see them move on)."""
        return self._publisher.status(), self._consumer.status()

    @property
    def _links(self) -> tuple[_Link, _Link]:
        return self._publisher, self._consumer

    # -- lifecycle --------------------------------------------------------

    def startService(self) -> None:
        super().startService()
        self._stopping = False
        if not self.settings.tls_verify and self._tls is not None:
            log.warn(
                "amqp_tls_verify is false: the broker's certificate is not checked,"
                " so anyone in the path can read and change the traffic"
            )
        for link in self._links:
            link.running = Deferred.fromCoroutine(self._keep(link))

    async def _stop(self) -> None:
        self._stopping = True
        for link in self._links:
            if link.sleeping is not None:
                link.sleeping.cancel()
            connection = link.connection
            if connection is not None and connection.alive:
                connection.flush_acks()  # before connection.close, or the broker drops them
                try:
                    await connection.client.close(within=2)
                except Exception:  # the connection may already be gone
                    pass
                if connection.client.transport is not None:
                    connection.client.transport.loseConnection()
                # Wait for the socket to close (TLS sends its close_notify first).
                if not connection.lost.called:
                    timer = self._reactor.callLater(2, connection.lost.cancel)
                    try:
                        await connection.lost
                    except CancelledError:
                        pass
                    if timer.active():
                        timer.cancel()
        for link in self._links:
            if link.running is not None:
                running, link.running = link.running, None
                running.cancel()
                try:
                    await running
                except Exception:
                    pass
            for waiter, _ in link.waiters:
                waiter.errback(PublishFailed("the AMQP service stopped"))
            link.waiters.clear()
        # Finish in a reactor turn of our own, never inside a protocol's
        # dataReceived: the reactor's shutdown disconnects every transport as
        # soon as this Deferred fires, and TLS cannot take that mid-read.
        await deferLater(self._reactor, 0, lambda: None)

    def stopService(self) -> Deferred:
        super().stopService()
        return Deferred.fromCoroutine(self._stop())

    async def stop_consuming(self) -> None:
        """Cancel every consumer, so no new message arrives (for shutdown).

        A connection opened after this does not consume either.
        """
        for queue in list(self._consumers):
            await self.pause_consumer(queue)

    # -- the connection loop ----------------------------------------------

    def _next_broker(self, link: _Link) -> AmqpConfig:
        if not link.order:
            link.order = list(self.settings.brokers)
            if self.settings.failover == "shuffle":
                self._random.shuffle(link.order)
        return link.order.pop(0)

    async def _keep(self, link: _Link) -> None:
        """Connect, stay connected, reconnect: the life of one connection.

        A failed attempt moves on to the next broker at once; only after a
        whole round failed does the backoff (doubling, capped) apply. A
        connection the broker drops within seconds of opening counts as a
        failed round too, so such a broker is not hammered.
        """
        brokers = len(self.settings.brokers)
        failed_rounds = 0
        try:
            while not self._stopping:
                broker = self._next_broker(link)
                link.broker = broker
                link.attempts += 1
                try:
                    connection = await self._attempt(link, broker)
                except CancelledError:
                    return
                except SetupFailed as e:
                    if self._stopping:
                        return  # the attempt was cut short by the stop: no failure
                    link.error = str(e)
                    link.failures += 1
                    log.error(
                        "AMQP {role} connection to {broker} failed: {error}",
                        role=link.role,
                        broker=broker.address,
                        error=link.error,
                    )
                    self._fail_waiters(link)
                    if link.failures % brokers == 0:
                        await self._back_off(link, failed_rounds)
                        failed_rounds += 1
                    continue
                link.failures = 0
                link.error = None
                link.connection = connection
                self.metrics.amqp_connected(link.role)
                waiters, link.waiters = link.waiters, []
                for waiter, _ in waiters:
                    waiter.callback(None)
                await connection.lost
                reason = connection.lost_reason
                if link.connection is connection:
                    link.connection = None
                if self._stopping:
                    return
                link.error = explain(
                    reason, broker, self.settings, connection.client, established=True
                )
                log.warn(
                    "AMQP {role} connection to {broker} lost ({reason}); reconnecting",
                    role=link.role,
                    broker=broker.address,
                    reason=link.error,
                )
                if self._reactor.seconds() - connection.opened_at < QUICK_DROP:
                    await self._back_off(link, failed_rounds)
                    failed_rounds += 1
                else:
                    failed_rounds = 0
        except CancelledError:
            return

    async def _back_off(self, link: _Link, failed_rounds: int) -> None:
        """Wait before the next round: 0.5 s doubling per failed round up to
        30 s, with jitter. CancelledError when the service stops meanwhile."""
        if self._stopping:
            raise CancelledError()
        delay = min(MAX_RECONNECT_DELAY, INITIAL_RECONNECT_DELAY * 2**failed_rounds)
        delay *= self._random.uniform(0.8, 1.2)
        link.sleeping = Deferred()
        timer = self._reactor.callLater(delay, link.sleeping.callback, None)
        try:
            await link.sleeping
        finally:
            link.sleeping = None
            if timer.active():
                timer.cancel()

    async def _attempt(self, link: _Link, broker: AmqpConfig) -> AmqpConnection:
        """One connection attempt, set-up included; SetupFailed says why not."""
        timeout = self.settings.connect_timeout
        connection = AmqpConnection(
            broker,
            self._reactor,
            self.settings.max_unconfirmed,
            publishing=link is self._publisher,
            consumer_for=self._consumers.get if link is self._consumer else None,
        )
        factory = JunebugAMQPFactory(
            broker.vhost,
            self.settings.heartbeat,
            self._reactor,
            connection,
            f"{self.connection_name} ({link.role})",
        )
        endpoint = broker_endpoint(self._reactor, broker, timeout, self._tls)
        try:
            client = await endpoint.connect(factory)
        except CancelledError:
            raise
        except Exception as e:
            raise SetupFailed(explain(e, broker, self.settings)) from None
        timed_out = False

        def give_up() -> None:
            nonlocal timed_out
            timed_out = True
            if client.transport is not None:
                client.transport.abortConnection()

        timer = self._reactor.callLater(timeout, give_up)
        try:
            return await self._setup(link, connection)
        except CancelledError:
            if client.transport is not None:
                client.transport.abortConnection()
            raise
        except Exception as e:
            if client.transport is not None and not client.transport.disconnecting:
                client.transport.abortConnection()
            raise SetupFailed(
                explain(e, broker, self.settings, client, timed_out=timed_out)
            ) from None
        finally:
            if timer.active():
                timer.cancel()

    async def _setup(self, link: _Link, connection: AmqpConnection) -> AmqpConnection:
        client, broker = connection.client, connection.broker
        await client.login(broker.username, broker.password, self.settings.auth_mechanism)
        if link is self._publisher:
            publish_channel = await self._open_channel(connection, PUBLISH_CHANNEL)
            await publish_channel.confirm_select()
        control = connection.control = await self._open_channel(connection, CONTROL_CHANNEL)
        await self._declare_topology(control, connection)
        if link is self._consumer:

            async def start(queue: str) -> None:
                channel = await self._open_channel(connection, self._consumer_channel(queue))
                await channel.basic_qos(prefetch_count=self._prefetch(queue), global_=False)
                if queue not in self._paused:
                    await channel.basic_consume(queue=queue, consumer_tag=queue)

            # Each consumer on a channel of its own, so all at once: with many
            # channels (issue 14) one after another cost three round trips each.
            await _all([start(queue) for queue in list(self._consumers)])
        log.info(
            "AMQP {role} connection open to {broker}, vhost {vhost}{consuming}",
            role=link.role,
            broker=broker.address,
            vhost=broker.vhost,
            consuming=(
                _consuming(set(self._consumers) - self._paused) if link is self._consumer else ""
            ),
        )
        return connection

    async def _open_channel(self, connection: AmqpConnection, channel_id: int) -> Any:
        channel = await connection.client.channel(channel_id)
        await channel.channel_open()
        connection.channels[channel_id] = channel
        return channel

    async def _declare_topology(self, channel: Any, connection: AmqpConnection) -> None:
        passive = self.settings.declare == "passive"
        try:
            await channel.exchange_declare(
                exchange=EXCHANGE, type="direct", durable=True, passive=passive
            )
        except Exception as e:
            if type(e).__name__ == "ChannelClosed":
                raise SetupFailed(explain_channel_close(e, EXCHANGE, passive, "exchange")) from None
            raise
        queues = {queue: {} for queue in self.queues}
        queues.update(self._extra_queues)
        items = list(queues.items())
        if len(items) <= DECLARE_LANE_SIZE:
            for queue, arguments in items:
                await self._declare_queue(channel, queue, arguments)
            return
        # Many queues (many channels): declared over several AMQP channels at
        # once, since each declare of a durable queue waits for the broker
        # (100 channels' 500 queues: 12 s one after another on a loaded
        # machine, 3 s over eight lanes). The lanes close again afterwards.
        first = FIRST_CONSUMER_CHANNEL + len(self._consumers)
        count = min(DECLARE_LANES, len(items) // DECLARE_LANE_SIZE)
        lanes = [channel] + [
            await self._open_channel(connection, number)
            for number in range(first, first + count - 1)
        ]

        async def declare(lane: Any, share: list[tuple[str, dict[str, Any]]]) -> None:
            for queue, arguments in share:
                await self._declare_queue(lane, queue, arguments)

        await _all([declare(lane, items[i :: len(lanes)]) for i, lane in enumerate(lanes)])
        for lane in lanes[1:]:
            connection.channels.pop(lane.id, None)
            await lane.channel_close()

    async def _declare_queue(self, channel: Any, queue: str, arguments: dict[str, Any]) -> None:
        passive = self.settings.declare == "passive"
        try:
            if passive:
                await channel.queue_declare(queue=queue, passive=True)
            else:
                await channel.queue_declare(
                    queue=queue,
                    durable=True,
                    arguments={**self.settings.queue_arguments, **arguments},
                )
                await channel.queue_bind(queue=queue, exchange=EXCHANGE, routing_key=queue)
        except Exception as e:
            if type(e).__name__ == "ChannelClosed":
                raise SetupFailed(explain_channel_close(e, queue, passive)) from None
            raise

    def _consumer_channel(self, queue: str) -> int:
        return FIRST_CONSUMER_CHANNEL + list(self._consumers).index(queue)

    def _prefetch(self, queue: str) -> int:
        return self._prefetches.get(queue, self.prefetch)

    def _fail_waiters(self, link: _Link) -> None:
        keep = []
        for waiter, failures in link.waiters:
            if failures is not None and link.failures >= failures:
                waiter.errback(PublishFailed(link.error or "cannot connect to AMQP"))
            else:
                keep.append((waiter, failures))
        link.waiters[:] = keep

    # -- publishing -------------------------------------------------------

    @property
    def connected(self) -> bool:
        """Both connections are open."""
        return self._publisher.open and self._consumer.open

    @property
    def blocked(self) -> bool:
        connection = self._publisher.connection
        return connection is not None and connection.alive and connection.blocked is not None

    def publish(
        self,
        routing_key: str,
        body: bytes,
        message_id: str | None = None,
        headers: dict[str, str | int] | None = None,
        *,
        refuse_if_busy: bool = False,
    ) -> Deferred[None]:
        """Publish ``body`` persistently to the vumi exchange; fires on confirm.

        While the broker blocks publishing or ``max_unconfirmed`` publishes
        wait for confirms, a publish with ``refuse_if_busy`` fails at once
        with :class:`PublishRefused`; others wait, unwritten, their turn.
        """
        connection = self._publisher.connection
        if connection is None or not connection.alive:
            return fail(PublishFailed("not connected to AMQP"))
        # The message-id property tells a basic.return which publish it is
        # about; a peer's id too long for an AMQP short string is replaced.
        if message_id is None or len(message_id.encode("utf-8")) > 255:
            message_id = generate_message_id()
        properties: dict[str, Any] = {
            "content-type": "application/json",
            "delivery-mode": 2,
            "message-id": message_id,
        }
        if headers:
            properties["headers"] = headers
        try:
            frames = connection.client.encode_publish(
                PUBLISH_CHANNEL, EXCHANGE, routing_key, body, properties
            )
        except (TypeError, ValueError) as e:
            return fail(PublishFailed(f"cannot encode the message: {e}"))
        busy = self._busy(connection)
        if busy is not None:
            if refuse_if_busy:
                return fail(busy)
            held: Deferred[None] = Deferred()
            connection.held.append(((frames, message_id), held))
            return held
        return connection.write(frames, message_id)

    def _busy(self, connection: AmqpConnection) -> PublishRefused | None:
        if connection.blocked is not None:
            return PublishRefused(
                f"the broker blocks publishing ({connection.blocked})", BLOCKED_RETRY_AFTER
            )
        if connection.held or len(connection.pending) >= self.settings.max_unconfirmed:
            return PublishRefused(
                f"{len(connection.pending)} publishes wait for the broker's confirm"
                f" (amqp_max_unconfirmed {self.settings.max_unconfirmed})",
                BUSY_RETRY_AFTER,
            )
        return None

    # -- queues -----------------------------------------------------------

    async def _control(self, link: _Link) -> tuple[AmqpConnection, Any]:
        """The open connection of ``link`` and a channel for queries on it."""
        connection = link.connection
        if connection is None or not connection.alive:
            raise PublishFailed("not connected to AMQP")
        if connection.control is None or connection.control.closed:
            # The broker closed it (a passive declare of a missing queue):
            # a fresh channel number, since the old one may still be closing.
            connection.next_channel += 1
            connection.control = await self._open_channel(connection, connection.next_channel)
        return connection, connection.control

    async def get(self, queue: str) -> tuple[bytes, dict[str, Any], Acker] | None:
        """One message from ``queue`` (``basic.get`` on the consuming
        connection), unacked; None if empty."""
        connection, channel = await self._control(self._consumer)
        reply = await channel.basic_get(queue=queue, no_ack=False)
        if reply.method.name == "get-empty":
            return None
        properties = dict(reply.content.properties)
        headers = dict(properties.get("headers") or {})
        acker = connection.track(channel.id, reply.delivery_tag, reply.redelivered, headers)
        return body_bytes(reply), properties, acker

    async def queue_status(self, queue: str) -> tuple[int, int]:
        """``(ready messages, consumers)`` of ``queue``: a passive declare on
        the publishing connection. PublishFailed when not connected; the
        broker's ChannelClosed (404) when the queue does not exist."""
        _, channel = await self._control(self._publisher)
        reply = await channel.queue_declare(queue=queue, passive=True)
        return reply.message_count, reply.consumer_count

    async def queue_info(self, queue: str) -> tuple[int, int]:
        """The same as :meth:`queue_status` (the name /health's queue monitor uses)."""
        return await self.queue_status(queue)

    def connection_metrics(self) -> dict[str, dict[str, int]]:
        """Per connection (``publish``, ``consume``): ``up``, ``blocked``,
        ``unconfirmed`` publishes (for /metrics)."""
        metrics = {}
        for link in self._links:
            connection = link.connection
            up = connection is not None and connection.alive
            metrics[link.role] = {
                "up": int(up),
                "blocked": int(up and connection.blocked is not None),
                "unconfirmed": len(connection.pending) if up else 0,
            }
        return metrics

    async def count(self, queue: str) -> int:
        """How many ready messages ``queue`` holds."""
        ready, _ = await self.queue_status(queue)
        return ready

    async def declare_queue(self, queue: str, arguments: dict[str, Any] | None = None) -> None:
        """Declare one more queue (durable, bound to the vumi exchange by its
        name), now if connected and on every later connect.

        ``arguments`` (e.g. ``x-message-ttl``, ``x-dead-letter-exchange``,
        ``x-dead-letter-routing-key`` for a delay queue) add to and override
        ``settings.queue_arguments``. With ``declare: passive`` the queue is
        only checked, like the others. SetupFailed if the broker refuses.
        """
        self._extra_queues[queue] = dict(arguments or {})
        for link in self._links:
            if link.open:
                _, channel = await self._control(link)
                await self._declare_queue(channel, queue, self._extra_queues[queue])

    # -- consuming --------------------------------------------------------

    def add_consumer(self, queue: str, consumer: Consumer, prefetch: int | None = None) -> None:
        """Consume ``queue`` with ``consumer``, ``prefetch`` messages in work
        at most (the service's ``prefetch`` if None). Only before the service
        starts: consumers are set up as its connections open."""
        if self.running:
            raise RuntimeError(f"consumer for {queue} added after the AMQP service started")
        self._consumers[queue] = consumer
        if prefetch is not None:
            self._prefetches[queue] = prefetch

    async def pause_consumer(self, queue: str) -> None:
        """Stop taking messages from ``queue`` (``basic.cancel``); messages in
        work stay ackable. Stays paused across reconnects until resumed."""
        self._paused.add(queue)
        connection = self._consumer.connection
        if connection is None or not connection.alive:
            return
        channel = connection.channels.get(self._consumer_channel(queue))
        if channel is None:
            return
        try:
            await channel.basic_cancel(consumer_tag=queue)
        except Exception as e:
            log.warn("Could not cancel consumer {queue}: {error}", queue=queue, error=e)

    async def resume_consumer(self, queue: str) -> None:
        """Take messages from ``queue`` again (``basic.consume``)."""
        if queue not in self._paused:
            return
        self._paused.discard(queue)
        connection = self._consumer.connection
        if connection is None or not connection.alive:
            return
        channel = connection.channels.get(self._consumer_channel(queue))
        if channel is not None:
            await channel.basic_consume(queue=queue, consumer_tag=queue)

    # -- waiting and health -------------------------------------------------

    def when_connected(self, failures: int | None = None) -> Deferred[None]:
        """Fires once both connections are open and set up; fails (PublishFailed,
        with the reason) once either failed ``failures`` attempts in a row."""

        async def wait() -> None:
            for link in self._links:
                if link.open:
                    continue
                if failures is not None and link.failures >= failures:
                    raise PublishFailed(link.error or "cannot connect to AMQP")
                d: Deferred[None] = Deferred()
                link.waiters.append((d, failures))
                await d

        return Deferred.fromCoroutine(wait())

    def health(self) -> dict[str, Any]:
        """The ``amqp`` component of ``/health``: state, broker, errors, and
        each connection's own state."""
        publisher, consumer = self._links
        connection = publisher.connection
        blocked = self.blocked
        ok = self.connected and not blocked
        broker = (connection.broker if publisher.open else publisher.broker) or (
            self.settings.brokers[0]
        )
        status: dict[str, Any] = {
            "health": "ok" if ok else "down",
            "state": "blocked" if blocked else ("open" if self.connected else "closed"),
            "host": broker.address,
            "vhost": broker.vhost,
            "connections": {"publish": publisher.health(), "consume": consumer.health()},
        }
        if connection is not None and connection.alive:
            status["connected_since"] = time.strftime(
                "%Y-%m-%d %H:%M:%S", time.gmtime(connection.opened_at)
            )
            status["unconfirmed_publishes"] = len(connection.pending)
        if blocked:
            status["error"] = f"the broker blocks publishing ({connection.blocked})"
        else:
            errors = [link.error for link in self._links if not link.open and link.error]
            if errors:
                status["error"] = errors[0]
        return status


async def _all(coroutines: list[Any]) -> None:
    """Run coroutines at once; the first failure (unwrapped) once all are done."""
    results = await DeferredList(
        [Deferred.fromCoroutine(c) for c in coroutines], consumeErrors=True
    )
    for ok, result in results:
        if not ok:
            result.raiseException()


def _consuming(queues: set[str]) -> str:
    """The consumed queues for the connection's log line (a count when many)."""
    if len(queues) > 10:
        return f", consuming {len(queues)} queues"
    return f", consuming {sorted(queues)}"
