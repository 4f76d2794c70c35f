"""The vumi exchange and the service's queues: declared on every connection
as it opens, and at once on the open ones when queues are added at run time.

Each queue is durable and bound to the vumi exchange by its own name, with
``settings.queue_arguments`` under its own arguments (a delay queue's TTL and
dead-letter routing). With ``declare: passive`` the exchange and queues are
only checked. A removed queue is no longer declared; nothing is ever deleted
on the broker.
"""

from __future__ import annotations

from collections.abc import Coroutine, Iterable, Mapping
from typing import Any

import attrs
from twisted.internet.defer import Deferred, DeferredList
from twisted.internet.error import ConnectionDone, ConnectionLost
from txamqp.client import Closed

from junebug_api.amqp.connect import SetupFailed, explain_channel_close
from junebug_api.amqp.connection import AmqpConnection, PublishFailed
from junebug_api.config.model import AmqpConnectionSettings
from junebug_api.formats.queue_names import EXCHANGE

DECLARE_LANES = 8  # at most this many channels declare queues at once at set-up
DECLARE_LANE_SIZE = 20  # queues per lane at least (so one connector's declare serially)

#: What a declare fails with when its connection goes meanwhile (it is
#: declared again on the next one).
CONNECTION_GONE = (Closed, PublishFailed, ConnectionDone, ConnectionLost)


@attrs.define(eq=False)
class Topology:
    """The queues to declare (name -> arguments) and the connections that
    declare them."""

    settings: AmqpConnectionSettings
    queues: dict[str, dict[str, Any]] = attrs.field(factory=dict)
    # Connections past the start of their declarations: queues added later
    # are declared on them at once.
    _declaring: list[AmqpConnection] = attrs.field(factory=list)

    @property
    def passive(self) -> bool:
        return self.settings.declare == "passive"

    async def declare_all(self, connection: AmqpConnection) -> None:
        """Declare the exchange and every queue on a new ``connection``;
        SetupFailed if the broker refuses one."""
        self._declaring[:] = [c for c in self._declaring if c.alive]
        self._declaring.append(connection)
        items = list(self.queues.items())
        await connection.query(self._declare_exchange)
        if len(items) <= DECLARE_LANE_SIZE:
            await self._declare_on(connection, items)
            return
        # Many queues (many channels): declared over several AMQP channels at
        # once, since each declare of a durable queue waits for the broker
        # (100 channels' 500 queues: 12 s one after another on a loaded
        # machine, 3 s over eight lanes). The lanes close again afterwards.
        count = min(DECLARE_LANES, len(items) // DECLARE_LANE_SIZE)
        lanes = [await connection.open_channel() for _ in range(count - 1)]

        async def on_lane(lane: Any, share: list[tuple[str, dict[str, Any]]]) -> None:
            for queue, arguments in share:
                await self.declare_queue(lane, queue, arguments)

        shares = [items[i::count] for i in range(count)]
        await run_all(
            [self._declare_on(connection, shares[0])]
            + [on_lane(lane, share) for lane, share in zip(lanes, shares[1:], strict=True)]
        )
        for lane in lanes:
            await connection.close_channel(lane)

    async def add(self, queues: Mapping[str, Mapping[str, Any]]) -> None:
        """Declare ``queues`` from now on, and at once on the connections
        that are open or opening. A queue the broker refuses (other
        arguments; missing, with ``declare: passive``) is not kept:
        SetupFailed names it."""
        new = {queue: dict(arguments) for queue, arguments in queues.items()}
        self.queues.update(new)
        self._declaring[:] = [c for c in self._declaring if c.alive]
        refused: dict[str, str] = {}
        await run_all([self._add_on(c, new, refused) for c in self._declaring])
        for queue in refused:
            self.queues.pop(queue, None)
        if refused:
            raise SetupFailed("; ".join(refused.values()))

    def remove(self, names: Iterable[str]) -> None:
        """Declare these queues no more (they stay on the broker, messages and all)."""
        for name in names:
            self.queues.pop(name, None)

    async def _add_on(
        self,
        connection: AmqpConnection,
        queues: dict[str, dict[str, Any]],
        refused: dict[str, str],
    ) -> None:
        for queue, arguments in queues.items():
            if queue in refused:
                continue
            try:
                await connection.query(
                    lambda channel, q=queue, a=arguments: self.declare_queue(channel, q, a)
                )
            except SetupFailed as e:
                refused[queue] = str(e)
            except CONNECTION_GONE:
                return  # declared on the next connection

    async def _declare_on(
        self, connection: AmqpConnection, items: list[tuple[str, dict[str, Any]]]
    ) -> None:
        for queue, arguments in items:
            await connection.query(
                lambda channel, q=queue, a=arguments: self.declare_queue(channel, q, a)
            )

    async def _declare_exchange(self, channel: Any) -> None:
        try:
            await channel.exchange_declare(
                exchange=EXCHANGE, type="direct", durable=True, passive=self.passive
            )
        except Exception as e:
            if type(e).__name__ == "ChannelClosed":
                raise SetupFailed(
                    explain_channel_close(e, EXCHANGE, self.passive, "exchange")
                ) from None
            raise

    async def declare_queue(self, channel: Any, queue: str, arguments: dict[str, Any]) -> None:
        """Declare (or check) one queue on ``channel``; SetupFailed if refused."""
        try:
            if self.passive:
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
                raise SetupFailed(explain_channel_close(e, queue, self.passive)) from None
            raise


async def run_all(coroutines: list[Coroutine[Any, Any, Any]]) -> None:
    """Run coroutines at once; the first failure (unwrapped) once all are done."""
    results = await DeferredList(
        [Deferred.fromCoroutine(c) for c in coroutines], consumeErrors=True
    )
    for ok, result in results:
        if not ok:
            result.raiseException()
