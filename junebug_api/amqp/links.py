"""One connection to RabbitMQ over its life: connect, set up, stay, reconnect.

Every attempt goes to the next broker of ``settings.brokers`` (in order, or
shuffled per round), and the capped backoff applies only once a whole round
of brokers failed; a connection the broker drops within seconds of opening
counts as a failed round too, so such a broker is not hammered. Every
attempt, TLS handshake, AMQP handshake and the owner's set-up included, must
finish within ``settings.connect_timeout``; a failed one is logged as one
sentence (see :mod:`junebug_api.amqp.connect`) that ``/health`` shows too.
"""

from __future__ import annotations

import random
import time
from collections.abc import Awaitable, Callable
from typing import Any

import attrs
from twisted.internet.defer import CancelledError, Deferred

from junebug_api.amqp.connect import SetupFailed, TlsMaterial, broker_endpoint, explain
from junebug_api.amqp.connection import AmqpConnection, PublishFailed
from junebug_api.amqp.protocol import JunebugAMQPFactory
from junebug_api.config.model import AmqpConfig, AmqpConnectionSettings
from junebug_api.observe.log import logger
from junebug_api.observe.metrics import NO_METRICS, Metrics

log = logger(__name__)

INITIAL_RECONNECT_DELAY = 0.5
MAX_RECONNECT_DELAY = 30.0
QUICK_DROP = 5.0  # seconds: a connection lost sooner counts as a failed round

#: The owner's set-up of a new connection (logged in already): channels,
#: declarations, consumers. What it returns ends the "connection open" log line.
SetUp = Callable[[AmqpConnection], Awaitable[str]]


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
class Link:
    """The loop that keeps one connection (``role``: ``publish`` or
    ``consume``) open; ``set_up`` readies each new connection. ``connection``
    is the open one (set up), if any; others see a :class:`LinkStatus`."""

    role: str
    settings: AmqpConnectionSettings
    reactor: Any
    set_up: SetUp
    publishing: bool = False
    tls: TlsMaterial | None = None
    random: random.Random = attrs.field(factory=random.Random)
    metrics: Metrics = NO_METRICS
    connection_name: str = "junebug-api"
    connection: AmqpConnection | None = None
    broker: AmqpConfig | None = None
    error: str | None = None
    attempts: int = 0
    failures: int = 0
    waiters: list[tuple[Deferred, int | None]] = attrs.field(factory=list)
    running: Deferred | None = None
    sleeping: Deferred | None = None
    order: list[AmqpConfig] = attrs.field(factory=list)
    stopping: bool = False

    @property
    def open(self) -> bool:
        return self.connection is not None and self.connection.alive

    def open_connection(self) -> AmqpConnection:
        """The open connection; PublishFailed if there is none."""
        connection = self.connection
        if connection is None or not connection.alive:
            raise PublishFailed("not connected to AMQP")
        return connection

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

    # -- start, stop, waiting -------------------------------------------------

    def start(self) -> None:
        self.stopping = False
        self.running = Deferred.fromCoroutine(self._keep())

    async def close(self) -> None:
        """Stop reconnecting; close the open connection (pending acks first),
        waiting up to 2 s for the socket to close."""
        self.stopping = True
        if self.sleeping is not None:
            self.sleeping.cancel()
        connection = self.connection
        if connection is None or not connection.alive:
            return
        connection.flush_acks()  # before connection.close, or the broker drops them
        try:
            await connection.client.close(within=2)
        except Exception:  # the connection may already be gone
            pass
        if connection.client.transport is not None:
            connection.client.transport.loseConnection()
        # Wait for the socket to close (TLS sends its close_notify first).
        if not connection.lost.called:
            timer = self.reactor.callLater(2, connection.lost.cancel)
            try:
                await connection.lost
            except CancelledError:
                pass
            if timer.active():
                timer.cancel()

    async def halt(self) -> None:
        """End the loop (after :meth:`close`) and fail whoever waits for it."""
        if self.running is not None:
            running, self.running = self.running, None
            running.cancel()
            try:
                await running
            except Exception:
                pass
        for waiter, _ in self.waiters:
            waiter.errback(PublishFailed("the AMQP service stopped"))
        self.waiters.clear()

    async def wait_open(self, failures: int | None = None) -> None:
        """Returns once a connection is open; PublishFailed once ``failures``
        attempts in a row failed."""
        if self.open:
            return
        if failures is not None and self.failures >= failures:
            raise PublishFailed(self.error or "cannot connect to AMQP")
        d: Deferred[None] = Deferred()
        self.waiters.append((d, failures))
        await d

    def _fail_waiters(self) -> None:
        keep = []
        for waiter, failures in self.waiters:
            if failures is not None and self.failures >= failures:
                waiter.errback(PublishFailed(self.error or "cannot connect to AMQP"))
            else:
                keep.append((waiter, failures))
        self.waiters[:] = keep

    # -- the loop -----------------------------------------------------------

    def _next_broker(self) -> AmqpConfig:
        if not self.order:
            self.order = list(self.settings.brokers)
            if self.settings.failover == "shuffle":
                self.random.shuffle(self.order)
        return self.order.pop(0)

    async def _keep(self) -> None:
        """Connect, stay connected, reconnect: the life of the connection."""
        failed_rounds = 0
        try:
            while not self.stopping:
                connection = await self._try_next()
                if connection is None:
                    if self.failures % len(self.settings.brokers) == 0:
                        await self._back_off(failed_rounds)
                        failed_rounds += 1
                    continue
                if not await self._stay(connection):
                    return
                if self.reactor.seconds() - connection.opened_at < QUICK_DROP:
                    await self._back_off(failed_rounds)
                    failed_rounds += 1
                else:
                    failed_rounds = 0
        except CancelledError:
            return

    async def _try_next(self) -> AmqpConnection | None:
        """One attempt on the next broker: the connection, or None (failed)."""
        broker = self.broker = self._next_broker()
        self.attempts += 1
        try:
            return await self._attempt(broker)
        except SetupFailed as e:
            if self.stopping:
                raise CancelledError() from None  # cut short by the stop: no failure
            self.error = str(e)
            self.failures += 1
            log.error(
                "AMQP {role} connection to {broker} failed: {error}",
                role=self.role,
                broker=broker.address,
                error=self.error,
            )
            self._fail_waiters()
            return None

    async def _stay(self, connection: AmqpConnection) -> bool:
        """Keep ``connection`` until it is lost; False if the service stops."""
        self.failures = 0
        self.error = None
        self.connection = connection
        self.metrics.amqp_connected(self.role)
        waiters, self.waiters = self.waiters, []
        for waiter, _ in waiters:
            waiter.callback(None)
        await connection.lost
        if self.connection is connection:
            self.connection = None
        if self.stopping:
            return False
        self.error = explain(
            connection.lost_reason,
            connection.broker,
            self.settings,
            connection.client,
            established=True,
        )
        log.warn(
            "AMQP {role} connection to {broker} lost ({reason}); reconnecting",
            role=self.role,
            broker=connection.broker.address,
            reason=self.error,
        )
        return True

    async def _back_off(self, failed_rounds: int) -> None:
        """Wait before the next round: 0.5 s doubling per failed round up to
        30 s, with jitter. CancelledError when the service stops meanwhile."""
        if self.stopping:
            raise CancelledError()
        delay = min(MAX_RECONNECT_DELAY, INITIAL_RECONNECT_DELAY * 2**failed_rounds)
        delay *= self.random.uniform(0.8, 1.2)
        self.sleeping = Deferred()
        timer = self.reactor.callLater(delay, self.sleeping.callback, None)
        try:
            await self.sleeping
        finally:
            self.sleeping = None
            if timer.active():
                timer.cancel()

    async def _attempt(self, broker: AmqpConfig) -> AmqpConnection:
        """One connection attempt, set-up included; SetupFailed says why not."""
        timeout = self.settings.connect_timeout
        connection = AmqpConnection(
            broker, self.reactor, self.settings.max_unconfirmed, publishing=self.publishing
        )
        factory = JunebugAMQPFactory(
            broker.vhost,
            self.settings.heartbeat,
            self.reactor,
            connection,
            f"{self.connection_name} ({self.role})",
        )
        endpoint = broker_endpoint(self.reactor, broker, timeout, self.tls)
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

        timer = self.reactor.callLater(timeout, give_up)
        try:
            await self._set_up(connection)
            return connection
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

    async def _set_up(self, connection: AmqpConnection) -> None:
        client, broker = connection.client, connection.broker
        await client.login(broker.username, broker.password, self.settings.auth_mechanism)
        details = await self.set_up(connection)
        log.info(
            "AMQP {role} connection open to {broker}, vhost {vhost}{consuming}",
            role=self.role,
            broker=broker.address,
            vhost=broker.vhost,
            consuming=details,
        )
