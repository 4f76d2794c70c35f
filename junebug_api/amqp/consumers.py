"""The consumers of one consuming connection, each on an AMQP channel of its
own with its own prefetch (``basic.qos`` per consumer, as quorum queues need).

:class:`Consuming` starts, pauses, resumes and stops them on its connection;
the steps for one queue (open, qos, consume; cancel; consume again) run one
after another, in the order asked, so a stop asked while the start is under
way cancels what the start set up. A stopped consumer's channel stays open
until every delivery it had is acked or rejected, then closes.
"""

from __future__ import annotations

from collections.abc import Callable, Coroutine
from typing import Any

import attrs
from twisted.internet.defer import DeferredLock

from junebug_api.amqp.connection import FIRST_FREE_CHANNEL, AmqpConnection, Consumer
from junebug_api.observe.log import logger

log = logger(__name__)


@attrs.define(eq=False)
class ConsumerChannel:
    """One queue's consumer on the connection: its channel and whether it
    consumes now; ``lock`` keeps its steps in order."""

    queue: str
    channel: Any
    consuming: bool = False
    lock: DeferredLock = attrs.field(factory=DeferredLock)


@attrs.define(eq=False)
class Consuming:
    """The consumers of ``connection`` by queue (the consumer tag is the queue's name)."""

    connection: AmqpConnection
    on: dict[str, ConsumerChannel] = attrs.field(factory=dict)

    async def start(self, queue: str, consumer: Consumer, prefetch: int, paused: bool) -> None:
        """Consume ``queue`` on a new channel, ``prefetch`` messages in work at
        most; only open the channel and set its prefetch if ``paused``."""
        channel = self.connection.client.new_channel(FIRST_FREE_CHANNEL)
        record = self.on[queue] = ConsumerChannel(queue, channel)
        self.connection.consumers[channel.id] = (channel, consumer)
        async with record.lock:
            await channel.channel_open()
            self.connection.channels[channel.id] = channel
            await channel.basic_qos(prefetch_count=prefetch, global_=False)
            if not paused:
                await channel.basic_consume(queue=queue, consumer_tag=queue)
                record.consuming = True

    async def pause(self, queue: str) -> None:
        """No new messages from ``queue`` (``basic.cancel``); those in work stay ackable."""
        await self._in_turn(queue, _cancel)

    async def resume(self, queue: str) -> None:
        """Messages from ``queue`` again (``basic.consume``)."""
        await self._in_turn(queue, _consume)

    async def stop(self, queue: str) -> None:
        """Cancel ``queue``'s consumer for good; returns once the broker
        confirmed (no delivery comes after). Its channel closes once the
        deliveries already handed out are settled."""
        record = self.on.pop(queue, None)
        if record is None:
            return
        await self._in_turn(queue, _cancel, record)
        self.connection.retire(record.channel)

    async def _in_turn(
        self,
        queue: str,
        step: Callable[[ConsumerChannel], Coroutine[Any, Any, None]],
        record: ConsumerChannel | None = None,
    ) -> None:
        record = record or self.on.get(queue)
        if record is None:
            return
        async with record.lock:
            if record.channel.closed or not self.connection.alive:
                return  # gone with its connection: nothing is consumed
            try:
                await step(record)
            except Exception as e:
                log.warn(
                    "Could not {step} consumer {queue}: {error}",
                    step=step.__name__.strip("_"),
                    queue=queue,
                    error=e,
                )


async def _cancel(record: ConsumerChannel) -> None:
    if record.consuming:
        await record.channel.basic_cancel(consumer_tag=record.queue)
        record.consuming = False


async def _consume(record: ConsumerChannel) -> None:
    if not record.consuming:
        await record.channel.basic_consume(queue=record.queue, consumer_tag=record.queue)
        record.consuming = True
