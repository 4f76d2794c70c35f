"""The AMQP connection: reconnection, topology, confirmed publishing, consuming.

:class:`AmqpService` keeps one connection to RabbitMQ open (Twisted's
``ClientService`` reconnects with capped backoff), declares the vumi
exchange and the connector's queues on every connect, publishes on a channel
in confirm mode and consumes on another, with prefetch.

``publish`` answers with a Deferred that fires once the broker confirmed the
message (``basic.ack``), and fails with :class:`PublishFailed` on a nack, an
unroutable message (``mandatory`` + ``basic.return``) or a lost connection.
Consumers get each message as bytes with an :class:`Acker` to call when its
work is done; an acker of a connection that died does nothing, since the
broker has already put that message back on its queue.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import attrs
from twisted.application.internet import ClientService, backoffPolicy
from twisted.application.service import Service
from twisted.internet.defer import Deferred, fail
from twisted.internet.endpoints import HostnameEndpoint
from twisted.python.failure import Failure

from .amqp_protocol import JunebugAMQPClient, JunebugAMQPFactory, body_bytes
from .config import AmqpConfig
from .log import logger
from .vumi_messages import generate_message_id

log = logger(__name__)

EXCHANGE = "vumi"
PUBLISH_CHANNEL = 1
CONSUME_CHANNEL = 2
MAX_RECONNECT_DELAY = 30.0


class PublishFailed(Exception):
    """The broker did not take a message: down, nacked or unroutable."""


@attrs.define(eq=False)
class Acker:
    """Acknowledges one delivery on the connection it came from."""

    _connection: _Connection
    delivery_tag: int
    redelivered: bool
    headers: dict[str, Any] = attrs.field(factory=dict)

    def ack(self) -> None:
        """Tell the broker this message is done (no-op if its connection is gone).

        Acks are gathered for the rest of the reactor turn and sent as few
        ``basic.ack`` frames as possible (``multiple`` for a run of tags).
        """
        if self._connection.alive:
            self._connection.done(self.delivery_tag)

    def reject(self) -> None:
        """Give the message back to its queue now (no-op if the connection is gone)."""
        if self._connection.alive:
            self._connection.unacked.pop(self.delivery_tag, None)
            self._connection.client.reject(CONSUME_CHANNEL, self.delivery_tag, requeue=True)

    @property
    def alive(self) -> bool:
        return self._connection.alive


Consumer = Callable[[bytes, Acker], None]


@attrs.define(eq=False)
class _Connection:
    """One open AMQP connection and the state tied to its life."""

    client: JunebugAMQPClient
    publish_channel: Any
    consume_channel: Any
    opened_at: float
    clock: Any
    alive: bool = True
    next_tag: int = 1
    pending: OrderedDict[int, Deferred] = attrs.field(factory=OrderedDict)
    returned: dict[str, int] = attrs.field(factory=dict)
    failed_tags: dict[int, str] = attrs.field(factory=dict)
    # Deliveries not yet acked, in arrival order; True once their work is done.
    unacked: OrderedDict[int, bool] = attrs.field(factory=OrderedDict)
    _flush_scheduled: bool = False

    def done(self, tag: int) -> None:
        if tag in self.unacked:
            self.unacked[tag] = True
            if not self._flush_scheduled:
                self._flush_scheduled = True
                self.clock.callLater(0, self.flush_acks)

    def flush_acks(self) -> None:
        """Ack the finished deliveries: the leading run with one ``multiple``
        ack, any others one by one."""
        self._flush_scheduled = False
        if not self.alive:
            return
        unacked = self.unacked
        last, count = None, 0
        while unacked:
            tag, finished = next(iter(unacked.items()))
            if not finished:
                break
            unacked.popitem(last=False)
            last, count = tag, count + 1
        if last is not None:
            self.client.ack(CONSUME_CHANNEL, last, multiple=count > 1)
        for tag in [tag for tag, finished in unacked.items() if finished]:
            del unacked[tag]
            self.client.ack(CONSUME_CHANNEL, tag)


@attrs.define(eq=False)
class AmqpService(Service):
    """Keeps the broker connection, publishes with confirms, runs consumers.

    ``queues`` are declared (durable, bound to the vumi exchange by their own
    name) on every connect; ``consumers`` maps a queue name to the callable
    that gets its messages.
    """

    settings: AmqpConfig
    queues: list[str]
    consumers: dict[str, Consumer]
    prefetch: int
    _reactor: Any
    heartbeat: int = 30
    connection_name: str = "junebug-api"
    # Arguments for queues that need them (delay queues: TTL, dead-letter target).
    queue_arguments: dict[str, dict[str, Any]] = attrs.field(factory=dict)
    _paused: set[str] = attrs.field(factory=set, init=False)
    _client_service: ClientService | None = attrs.field(default=None, init=False)
    _connection: _Connection | None = attrs.field(default=None, init=False)
    _last_error: str | None = attrs.field(default=None, init=False)
    _stopping: bool = attrs.field(default=False, init=False)
    _consuming: bool = attrs.field(default=True, init=False)

    def __attrs_post_init__(self) -> None:
        self.name = "amqp"

    # -- lifecycle --------------------------------------------------------

    def startService(self) -> None:
        super().startService()
        self._stopping = False
        self._consuming = True
        endpoint = HostnameEndpoint(
            self._reactor, self.settings.hostname, self.settings.port, timeout=10
        )
        factory = JunebugAMQPFactory(
            self.settings.vhost, self.heartbeat, self._reactor, self.connection_name
        )
        self._client_service = ClientService(
            endpoint,
            factory,
            retryPolicy=backoffPolicy(initialDelay=0.5, maxDelay=MAX_RECONNECT_DELAY),
            clock=self._reactor,
            prepareConnection=self._prepare,
        )
        self._client_service.startService()

    async def _stop(self) -> None:
        self._stopping = True
        self._consuming = False
        connection = self._connection
        if connection is not None and connection.alive:
            connection.flush_acks()  # before connection.close, or the broker drops them
            try:
                await connection.client.close(within=2)
            except Exception:  # the connection may already be gone
                pass
        if self._client_service is not None:
            await self._client_service.stopService()

    def stopService(self) -> Deferred:
        super().stopService()
        return Deferred.fromCoroutine(self._stop())

    async def stop_consuming(self) -> None:
        """Cancel every consumer, so no new message arrives (for shutdown).

        A connection opened after this does not consume either.
        """
        self._consuming = False
        connection = self._connection
        if connection is None or not connection.alive:
            return
        for queue in self.consumers:
            if queue in self._paused:
                continue
            try:
                await connection.consume_channel.basic_cancel(consumer_tag=queue)
            except Exception as e:
                log.warn("Could not cancel consumer {queue}: {error}", queue=queue, error=e)

    # -- connecting -------------------------------------------------------

    def _prepare(self, client: JunebugAMQPClient) -> Deferred:
        return Deferred.fromCoroutine(self._setup(client)).addErrback(self._setup_failed, client)

    def _setup_failed(self, failure: Failure, client: JunebugAMQPClient) -> Failure:
        self._last_error = failure.getErrorMessage() or failure.type.__name__
        log.error(
            "Could not set up the AMQP connection to {host}:{port}: {error}",
            host=self.settings.hostname,
            port=self.settings.port,
            error=self._last_error,
        )
        return failure

    async def _setup(self, client: JunebugAMQPClient) -> None:
        client = client.unwrapped()
        await client.login(self.settings.username, self.settings.password)
        publish_channel = await client.channel(PUBLISH_CHANNEL)
        await publish_channel.channel_open()
        await publish_channel.confirm_select()
        consume_channel = await client.channel(CONSUME_CHANNEL)
        await consume_channel.channel_open()
        # global: the prefetch is shared by all consumers on this channel, so it
        # caps the messages in work at once.
        await consume_channel.basic_qos(prefetch_count=self.prefetch, global_=True)
        await publish_channel.exchange_declare(exchange=EXCHANGE, type="direct", durable=True)
        for queue in self.queues:
            await publish_channel.queue_declare(
                queue=queue, durable=True, arguments=self.queue_arguments.get(queue, {})
            )
            await publish_channel.queue_bind(queue=queue, exchange=EXCHANGE, routing_key=queue)
        connection = _Connection(
            client, publish_channel, consume_channel, opened_at=time.time(), clock=self._reactor
        )
        client.on_confirm = lambda tag, multiple, ok: self._confirmed(connection, tag, multiple, ok)
        client.on_return = lambda msg: self._returned(connection, msg)
        client.on_lost = lambda reason: self._lost(connection, reason)
        client.on_delivery = lambda channel, consumer_tag, tag, redelivered, body, headers: (
            self._deliver(connection, consumer_tag, tag, redelivered, body, headers)
        )
        self._connection = connection
        if self._consuming:
            for queue in self.consumers:
                if queue not in self._paused:
                    await consume_channel.basic_consume(queue=queue, consumer_tag=queue)
        self._last_error = None
        log.info(
            "Connected to AMQP at {host}:{port}, vhost {vhost}, consuming {queues}",
            host=self.settings.hostname,
            port=self.settings.port,
            vhost=self.settings.vhost,
            queues=sorted(q for q in self.consumers if q not in self._paused),
        )

    def _lost(self, connection: _Connection, reason: Failure) -> None:
        connection.alive = False
        if self._connection is connection:
            self._connection = None
        pending = list(connection.pending.values())
        connection.pending.clear()
        for d in pending:
            if not d.called:
                d.errback(PublishFailed("AMQP connection lost before the broker confirmed"))
        if not self._stopping:
            self._last_error = reason.getErrorMessage()
            log.warn("AMQP connection lost ({reason}); reconnecting", reason=self._last_error)

    # -- publishing -------------------------------------------------------

    @property
    def connected(self) -> bool:
        return self._connection is not None and self._connection.alive

    def publish(
        self,
        routing_key: str,
        body: bytes,
        message_id: str | None = None,
        headers: dict[str, str | int] | None = None,
    ) -> Deferred[None]:
        """Publish ``body`` persistently to the vumi exchange; fires on confirm."""
        connection = self._connection
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
        client = connection.client
        try:
            frames = client.encode_publish(PUBLISH_CHANNEL, EXCHANGE, routing_key, body, properties)
        except (TypeError, ValueError) as e:
            return fail(PublishFailed(f"cannot encode the message: {e}"))
        # The tag is the broker's count of publishes on this channel: take it
        # only for frames that are certainly written.
        tag = connection.next_tag
        connection.next_tag += 1
        confirmed: Deferred[None] = Deferred()
        connection.pending[tag] = confirmed
        connection.returned[message_id] = tag
        client.transport.write(frames)
        confirmed.addBoth(self._forget_id, connection, message_id, tag)
        return confirmed

    @staticmethod
    def _forget_id(result: Any, connection: _Connection, message_id: str, tag: int) -> Any:
        if connection.returned.get(message_id) == tag:
            del connection.returned[message_id]
        return result

    def _returned(self, connection: _Connection, message: Any) -> None:
        message_id = message.content.properties.get("message-id")
        tag = connection.returned.get(message_id)
        reason = f"{message.reply_code} {message.reply_text}"
        if tag is None:
            log.error(
                "The broker returned message {message_id} to {routing_key}: {reason}",
                message_id=message_id,
                routing_key=message.routing_key,
                reason=reason,
            )
            return
        connection.failed_tags[tag] = f"unroutable ({reason})"

    def _confirmed(self, connection: _Connection, tag: int, multiple: bool, ok: bool) -> None:
        pending = connection.pending
        if multiple:
            done = []
            while pending:
                first = next(iter(pending))
                if first > tag:
                    break
                done.append(pending.popitem(last=False))
        else:
            d = pending.pop(tag, None)
            done = [] if d is None else [(tag, d)]
        for done_tag, d in done:
            failure = connection.failed_tags.pop(done_tag, None)
            if d.called:
                continue  # cancelled: the API client went away
            if not ok:
                d.errback(PublishFailed("the broker refused the message (basic.nack)"))
            elif failure is not None:
                d.errback(PublishFailed(failure))
            else:
                d.callback(None)

    async def get(self, queue: str) -> tuple[bytes, dict[str, Any], Acker] | None:
        """One message from ``queue`` (``basic.get``), unacked; None if empty."""
        connection = self._connection
        if connection is None or not connection.alive:
            raise PublishFailed("not connected to AMQP")
        channel = connection.consume_channel
        reply = await channel.basic_get(queue=queue, no_ack=False)
        if reply.method.name == "get-empty":
            return None
        connection.unacked[reply.delivery_tag] = False
        properties = dict(reply.content.properties)
        headers = dict(properties.get("headers") or {})
        acker = Acker(connection, reply.delivery_tag, reply.redelivered, headers)
        return body_bytes(reply), properties, acker

    async def count(self, queue: str) -> int:
        """How many ready messages ``queue`` holds."""
        connection = self._connection
        if connection is None or not connection.alive:
            raise PublishFailed("not connected to AMQP")
        reply = await connection.publish_channel.queue_declare(
            queue=queue, durable=True, passive=True
        )
        return reply.message_count

    def when_connected(self, failures: int | None = None) -> Deferred[None]:
        """Fires once connected and set up; fails after ``failures`` attempts."""
        assert self._client_service is not None, "start the service first"
        return self._client_service.whenConnected(failAfterFailures=failures).addCallback(
            lambda _: None
        )

    # -- consuming --------------------------------------------------------

    def _deliver(
        self,
        connection: _Connection,
        consumer_tag: str,
        delivery_tag: int,
        redelivered: bool,
        body: bytes,
        headers: dict[str, Any] | None = None,
    ) -> None:
        connection.unacked[delivery_tag] = False
        acker = Acker(connection, delivery_tag, redelivered, headers or {})
        consumer = self.consumers.get(consumer_tag)
        if consumer is None:
            acker.reject()
            return
        consumer(body, acker)

    async def pause_consumer(self, queue: str) -> None:
        """Stop consuming ``queue`` (``basic.cancel``); its messages stay ready in it.

        Deliveries already received stay with their consumer until acked or
        rejected. A reconnect does not consume a paused queue.
        """
        self._paused.add(queue)
        connection = self._connection
        if connection is None or not connection.alive:
            return
        await connection.consume_channel.basic_cancel(consumer_tag=queue)

    async def resume_consumer(self, queue: str) -> None:
        """Consume ``queue`` again after :meth:`pause_consumer`."""
        if queue not in self._paused:
            return
        self._paused.discard(queue)
        connection = self._connection
        if connection is None or not connection.alive or not self._consuming:
            return
        await connection.consume_channel.basic_consume(queue=queue, consumer_tag=queue)

    # -- health -----------------------------------------------------------

    def health(self) -> dict[str, Any]:
        """The ``amqp`` component of ``/health``: state, broker, last error."""
        connection = self._connection
        status: dict[str, Any] = {
            "health": "ok" if self.connected else "down",
            "state": "open" if self.connected else "closed",
            "host": f"{self.settings.hostname}:{self.settings.port}",
            "vhost": self.settings.vhost,
        }
        if connection is not None and connection.alive:
            status["connected_since"] = time.strftime(
                "%Y-%m-%d %H:%M:%S", time.gmtime(connection.opened_at)
            )
            status["unconfirmed_publishes"] = len(connection.pending)
        elif self._last_error:
            status["error"] = self._last_error
        return status
