"""The AMQP service: two connections, confirmed publishing, consumers and
queues that come and go while it runs.

:class:`AmqpService` keeps two connections to RabbitMQ, as RabbitMQ advises:
one publishes (outbound and dead-letter messages, with publisher confirms),
the other consumes (deliveries and their acks), so a publisher the broker
blocks during a resource alarm never holds back the consumers' acks. Each
connection reconnects on its own (:mod:`junebug_api.amqp.links`: failover,
backoff, the connect timeout).

Both connections declare the vumi exchange and the service's queues (or
only check them, ``declare: passive``) on every connect
(:mod:`junebug_api.amqp.topology`). Each consumer has a channel of its own
on the consuming connection with its own prefetch, and can be paused and
resumed on its own (:mod:`junebug_api.amqp.consumers`). Queues and consumers
are added and removed at any time, before the start or while running; what
is added is set up at once on the open connections and again on every new
one (:meth:`AmqpService.add_queues`, :meth:`AmqpService.add_consumer`).

Every channel carries one synchronous method at a time (AMQP 0-9-1's rule,
kept by :class:`~junebug_api.amqp.channel.JunebugChannel`): queries
(``get``, ``queue_status``) and declarations share each connection's control
channel and take their turns on it.

``publish`` answers with a Deferred that fires once the broker confirmed the
message (``basic.ack``), and fails with :class:`PublishFailed` on a nack, an
unroutable message (``mandatory`` + ``basic.return``) or a lost connection.
While the broker blocks the publishing connection (``connection.blocked``),
or ``max_unconfirmed`` publishes wait for their confirm, nothing new is
written: a publish with ``refuse_if_busy=True`` (an API request) fails at
once with :class:`PublishRefused`; any other waits, unwritten, until the
broker unblocks (or its connection is lost).

Consumers get each message as bytes with an :class:`Acker` to call when its
work is done; an acker of a channel or connection that is gone does
nothing, since the broker has already put that message back on its queue.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any, TypeVar

import attrs
from twisted.application.service import Service
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.task import deferLater
from twisted.python.failure import Failure

from junebug_api.amqp.connect import TlsMaterial
from junebug_api.amqp.connection import (
    PUBLISH_CHANNEL,
    Acker,
    AmqpConnection,
    Consumer,
    PublishFailed,
    PublishRefused,
)
from junebug_api.amqp.consumers import Consuming
from junebug_api.amqp.frames import body_bytes
from junebug_api.amqp.links import Link, LinkStatus
from junebug_api.amqp.topology import Topology, run_all
from junebug_api.config.model import AmqpConfig, AmqpConnectionSettings
from junebug_api.formats.message_ids import generate_message_id
from junebug_api.formats.queue_names import EXCHANGE
from junebug_api.observe.log import logger
from junebug_api.observe.metrics import NO_METRICS, Metrics

log = logger(__name__)

__all__ = [
    "Acker",
    "AmqpService",
    "Consumer",
    "LinkStatus",
    "PublishFailed",
    "PublishRefused",
]

T = TypeVar("T")

BLOCKED_RETRY_AFTER = 5
BUSY_RETRY_AFTER = 1


@attrs.define(eq=False)
class AmqpService(Service):
    """Keeps the publishing and consuming connections, publishes with
    confirms, runs consumers, declares queues.

    Consumers (:meth:`add_consumer`) get their queue's messages, each with
    ``prefetch`` messages in work at most unless given its own; queues
    (:meth:`add_queues`) are declared on every connect. Both can be added
    and removed before the start and while running.

    ``settings`` may be a single :class:`AmqpConfig` (one plain broker, the
    other settings at their defaults).
    """

    settings: AmqpConnectionSettings | AmqpConfig
    prefetch: int
    _reactor: Any
    heartbeat: int | None = None
    connection_name: str = "junebug-api"
    metrics: Metrics = NO_METRICS
    _random: random.Random = attrs.field(factory=random.Random)
    _topology: Topology = attrs.field(init=False)
    # Queue -> its consumer and prefetch; _paused: queues not to consume now.
    _consumers: dict[str, tuple[Consumer, int]] = attrs.field(factory=dict, init=False)
    _paused: set[str] = attrs.field(factory=set, init=False)
    _consuming_stopped: bool = attrs.field(default=False, init=False)
    # The consumers of the newest consuming connection (open or being set up).
    _consuming: Consuming | None = attrs.field(default=None, init=False)
    _publisher: Link = attrs.field(init=False)
    _consumer: Link = attrs.field(init=False)

    def __attrs_post_init__(self) -> None:
        self.name = "amqp"
        if isinstance(self.settings, AmqpConfig):
            self.settings = AmqpConnectionSettings(brokers=(self.settings,))
        if self.heartbeat is not None:
            self.settings = attrs.evolve(self.settings, heartbeat=self.heartbeat)
        self._topology = Topology(self.settings)
        tls = TlsMaterial(self.settings) if any(b.tls for b in self.settings.brokers) else None
        self._publisher, self._consumer = (
            Link(
                role,
                self.settings,
                self._reactor,
                set_up,
                publishing=role == "publish",
                tls=tls,
                random=self._random,
                metrics=self.metrics,
                connection_name=self.connection_name,
            )
            for role, set_up in (
                ("publish", self._set_up_publishing),
                ("consume", self._set_up_consuming),
            )
        )

    @property
    def links(self) -> tuple[LinkStatus, LinkStatus]:
        """The two connection loops, ``publish`` then ``consume``, as they
        stand now (read-only copies: read it again to see them move on)."""
        return self._publisher.status(), self._consumer.status()

    @property
    def _links(self) -> tuple[Link, Link]:
        return self._publisher, self._consumer

    @property
    def queues(self) -> dict[str, dict[str, Any]]:
        """The queues declared on every connect, with their arguments (a copy)."""
        return {queue: dict(arguments) for queue, arguments in self._topology.queues.items()}

    # -- lifecycle --------------------------------------------------------

    def startService(self) -> None:
        super().startService()
        if not self.settings.tls_verify and any(b.tls for b in self.settings.brokers):
            log.warn(
                "amqp_tls_verify is false: the broker's certificate is not checked,"
                " so anyone in the path can read and change the traffic"
            )
        for link in self._links:
            link.start()

    async def _stop(self) -> None:
        for link in self._links:
            link.stopping = True
        for link in self._links:
            await link.close()
        for link in self._links:
            await link.halt()
        # Finish in a reactor turn of our own, never inside a protocol's
        # dataReceived: the reactor's shutdown disconnects every transport as
        # soon as this Deferred fires, and TLS cannot take that mid-read.
        await deferLater(self._reactor, 0, lambda: None)

    def stopService(self) -> Deferred:
        super().stopService()
        return Deferred.fromCoroutine(self._stop())

    async def _set_up_publishing(self, connection: AmqpConnection) -> str:
        channel = await connection.open_channel(PUBLISH_CHANNEL)
        assert channel.id == PUBLISH_CHANNEL, "the first channel of a new connection"
        await channel.confirm_select()
        await self._topology.declare_all(connection)
        return ""

    async def _set_up_consuming(self, connection: AmqpConnection) -> str:
        await self._topology.declare_all(connection)
        # From here on, consumers added or removed are so on this connection.
        consuming = self._consuming = Consuming(connection)
        # Each consumer on a channel of its own, so all at once: with many
        # channels (issue 14) one after another cost three round trips each.
        await run_all(
            [
                consuming.start(queue, consumer, prefetch, queue in self._paused)
                for queue, (consumer, prefetch) in list(self._consumers.items())
            ]
        )
        return _consuming(set(self._consumers) - self._paused)

    def _live_consuming(self) -> Consuming | None:
        consuming = self._consuming
        return consuming if consuming is not None and consuming.connection.alive else None

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
        except Exception as e:  # struct.error, OverflowError, ...: never unhandled
            return fail(PublishFailed(f"cannot encode the message: {type(e).__name__}: {e}"))
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

    def add_queues(self, queues: Mapping[str, Mapping[str, Any]]) -> Deferred[None]:
        """Declare ``queues`` (name -> declare arguments) on every connect
        from now on, and at once on the connections open (or opening).

        Each is durable and bound to the vumi exchange by its name;
        ``arguments`` (e.g. a delay queue's ``x-message-ttl``,
        ``x-dead-letter-exchange``, ``x-dead-letter-routing-key``) add to and
        override ``settings.queue_arguments``; with ``declare: passive`` each
        is only checked. Fires once declared on the open connections (at
        once when none is open). A queue the broker refuses is not kept:
        fails with SetupFailed naming it.
        """
        return Deferred.fromCoroutine(self._topology.add(queues))

    def remove_queues(self, names: Iterable[str]) -> None:
        """Declare these queues no more; they stay on the broker as they are."""
        self._topology.remove(names)

    async def get(self, queue: str) -> tuple[bytes, dict[str, Any], Acker] | None:
        """One message from ``queue`` (``basic.get`` on the consuming
        connection), unacked; None if empty."""
        connection = self._consumer.open_connection()

        async def basic_get(channel: Any) -> tuple[bytes, dict[str, Any], Acker] | None:
            reply = await channel.basic_get(queue=queue, no_ack=False)
            if reply.method.name == "get-empty":
                return None
            properties = dict(reply.content.properties)
            headers = dict(properties.get("headers") or {})
            acker = connection.track(channel, reply.delivery_tag, reply.redelivered, headers)
            return body_bytes(reply), properties, acker

        # A caller that stops waiting leaves the get to finish: a message it
        # took then goes back to its queue at once, not unacked until the
        # channel closes.
        return await _shielded(
            Deferred.fromCoroutine(connection.query(basic_get)),
            lambda got: got is not None and got[2].reject(),
        )

    async def queue_status(self, queue: str) -> tuple[int, int]:
        """``(ready messages, consumers)`` of ``queue``: a passive declare on
        the publishing connection. PublishFailed when not connected; the
        broker's ChannelClosed (404) when the queue does not exist."""
        connection = self._publisher.open_connection()
        reply = await connection.query(
            lambda channel: channel.queue_declare(queue=queue, passive=True)
        )
        return reply.message_count, reply.consumer_count

    async def queue_info(self, queue: str) -> tuple[int, int]:
        """The same as :meth:`queue_status` (the name /health's queue monitor uses)."""
        return await self.queue_status(queue)

    async def count(self, queue: str) -> int:
        """How many ready messages ``queue`` holds."""
        ready, _ = await self.queue_status(queue)
        return ready

    # -- consuming --------------------------------------------------------

    def add_consumer(self, queue: str, consumer: Consumer, prefetch: int | None = None) -> None:
        """Consume ``queue`` with ``consumer``, ``prefetch`` messages in work
        at most (the service's ``prefetch`` if None), on an AMQP channel of
        its own: at once if connected, and on every connect. Before or after
        the start; ValueError if ``queue`` has a consumer already."""
        if queue in self._consumers:
            raise ValueError(f"{queue} has a consumer already")
        prefetch = self.prefetch if prefetch is None else prefetch
        self._consumers[queue] = (consumer, prefetch)
        if self._consuming_stopped:
            self._paused.add(queue)
        consuming = self._live_consuming()
        if consuming is not None:
            started = consuming.start(queue, consumer, prefetch, queue in self._paused)
            Deferred.fromCoroutine(started).addErrback(_start_failed, queue)

    def remove_consumer(self, queue: str) -> Deferred[None]:
        """Stop consuming ``queue`` (``basic.cancel``), here and on later
        connects. Fires once the broker confirmed (``cancel-ok``), or at
        once when not connected: from then on the consumer gets nothing
        more. The deliveries it has stay ackable; once all are acked or
        rejected, its channel closes. Never deletes or purges the queue."""
        self._consumers.pop(queue, None)
        self._paused.discard(queue)
        consuming = self._live_consuming()
        if consuming is None:
            return succeed(None)
        return Deferred.fromCoroutine(consuming.stop(queue))

    async def pause_consumer(self, queue: str) -> None:
        """Stop taking messages from ``queue`` (``basic.cancel``); messages in
        work stay ackable. Stays paused across reconnects until resumed. A
        queue with no consumer: nothing to do."""
        if queue not in self._consumers:
            return
        self._paused.add(queue)
        consuming = self._live_consuming()
        if consuming is not None:
            await consuming.pause(queue)

    async def resume_consumer(self, queue: str) -> None:
        """Take messages from ``queue`` again (``basic.consume``)."""
        if queue not in self._paused:
            return
        self._paused.discard(queue)
        consuming = self._live_consuming()
        if consuming is not None:
            await consuming.resume(queue)

    async def stop_consuming(self) -> None:
        """Cancel every consumer, so no new message arrives (for shutdown).

        A connection opened after this does not consume either, nor does a
        consumer added after it.
        """
        self._consuming_stopped = True
        await run_all([self.pause_consumer(queue) for queue in list(self._consumers)])

    # -- waiting and health -------------------------------------------------

    def when_connected(self, failures: int | None = None) -> Deferred[None]:
        """Fires once both connections are open and set up; fails (PublishFailed,
        with the reason) once either failed ``failures`` attempts in a row."""

        async def wait() -> None:
            for link in self._links:
                await link.wait_open(failures)

        return Deferred.fromCoroutine(wait())

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


def _shielded(d: Deferred[T], abandoned: Callable[[T], object]) -> Deferred[T]:
    """``d``'s result; cancelling it stops only the wait: ``d`` goes on, and
    its result, when it comes, goes to ``abandoned``."""
    result: Deferred[T] = Deferred()

    def forward(outcome: Any) -> None:
        if not result.called:
            if isinstance(outcome, Failure):
                result.errback(outcome)
            else:
                result.callback(outcome)
        elif not isinstance(outcome, Failure):
            abandoned(outcome)

    d.addBoth(forward)
    return result


def _start_failed(failure: Any, queue: str) -> None:
    log.warn(
        "Could not start consuming {queue}: {error}; it starts with the next connection",
        queue=queue,
        error=failure.getErrorMessage(),
    )


def _consuming(queues: set[str]) -> str:
    """The consumed queues for the connection's log line (a count when many)."""
    if len(queues) > 10:
        return f", consuming {len(queues)} queues"
    return f", consuming {sorted(queues)}"
