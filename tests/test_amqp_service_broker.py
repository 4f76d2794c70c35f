"""AmqpService's public surface against the real broker, in-process: queue
queries, extra queues with arguments (a delay queue), pausing and resuming
one consumer. Other modules build on these (outage handling, /health queue
depths)."""

from __future__ import annotations

import json
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.defer import Deferred

from junebug_api.amqp.service import AmqpService, PublishFailed
from junebug_api.config.model import AmqpConfig
from junebug_api.formats.queue_names import QueueNames

from .support import pause, wait_for


@pytest.fixture
def queues(connector):
    names = QueueNames.for_connector(connector, retry_delays=(1,))
    return {
        "outbound": names.outbound,
        "inbound": names.inbound,
        "retry": names.delay_queues("inbound")[1],
        "unicode": f"{connector}.ünïcödé",  # no queue of the service's: any name AMQP takes
    }


def acking_consumer() -> tuple[list[bytes], Any]:
    """A consumer that acks each message at once, and the bodies it got."""
    received: list[bytes] = []

    def consume(body: bytes, acker: Any) -> None:
        received.append(body)
        acker.ack()

    return received, consume


@pytest_twisted.ensureDeferred
async def test_queries_delay_queues_and_pausing_one_consumer(broker, queues):
    amqp = AmqpService(
        AmqpConfig(), prefetch=5, reactor=reactor, connection_name="junebug-api test"
    )
    received, consume = acking_consumer()
    amqp.add_queues({queues["outbound"]: {}, queues["inbound"]: {}})
    amqp.add_consumer(queues["inbound"], consume)
    amqp.startService()
    try:
        await amqp.when_connected(failures=3)
        assert await amqp.queue_status(queues["inbound"]) == (0, 1)
        with pytest.raises(Exception, match="NOT_FOUND"):
            await amqp.queue_status(f"{queues['inbound']}.missing")
        # The query channel the broker closed is replaced; the connection stays.
        assert await amqp.queue_status(queues["outbound"]) == (0, 0)
        assert amqp.connected

        # A delay queue: messages expire back onto .inbound after its TTL.
        await amqp.add_queues(
            {
                queues["retry"]: {
                    "x-message-ttl": 200,
                    "x-dead-letter-exchange": "vumi",
                    "x-dead-letter-routing-key": queues["inbound"],
                }
            }
        )
        await amqp.publish(queues["retry"], b'{"n": 1}', message_id="m1")
        await wait_for(lambda: received, what="the delayed message")
        assert json.loads(received[0]) == {"n": 1}

        await amqp.pause_consumer(queues["inbound"])
        assert await amqp.queue_status(queues["inbound"]) == (0, 0)
        broker.publish(queues["inbound"], {"n": 2})
        await pause(0.5)
        assert len(received) == 1
        assert await amqp.count(queues["inbound"]) == 1
        await amqp.resume_consumer(queues["inbound"])
        await wait_for(lambda: len(received) == 2, what="delivery after resume")
        assert (await amqp.queue_status(queues["inbound"]))[1] == 1

        # Names count in bytes and boolean arguments stay booleans.
        await amqp.add_queues({queues["unicode"]: {"x-single-active-consumer": True}})
        assert await amqp.queue_status(queues["unicode"]) == (0, 0)
        broker.channel.queue_declare(
            queues["unicode"], durable=True, arguments={"x-single-active-consumer": True}
        )  # equivalent, or the broker would close pika's channel
        await amqp.publish(queues["unicode"], "Sawubona 👋".encode(), message_id="u1")
        assert broker.get(queues["unicode"])[1] == "Sawubona 👋".encode()
    finally:
        await amqp.stopService()
        broker.delete(queues["retry"])
        broker.delete(queues["unicode"])
    with pytest.raises(PublishFailed):
        await amqp.publish(queues["outbound"], b"{}")


@pytest_twisted.ensureDeferred
async def test_consumers_and_queues_added_and_removed_while_running(broker, queues):
    """Against RabbitMQ: a queue and a consumer added after the start work at
    once; gets raced on one connection each take their own message; a
    removed consumer gets nothing more and its queue keeps what comes."""
    amqp = AmqpService(
        AmqpConfig(), prefetch=5, reactor=reactor, connection_name="junebug-api test"
    )
    received, consume = acking_consumer()
    amqp.startService()
    try:
        await amqp.when_connected(failures=3)
        await amqp.add_queues({queues["inbound"]: {}, queues["outbound"]: {}})
        amqp.add_consumer(queues["inbound"], consume)
        broker.publish(queues["inbound"], {"n": 1})
        await wait_for(lambda: received, what="a delivery to the added consumer")

        for n in range(20):
            broker.publish(queues["outbound"], {"n": n})
        await wait_for(lambda: broker.count(queues["outbound"]) == 20, what="20 ready")
        gets = [Deferred.fromCoroutine(amqp.get(queues["outbound"])) for _ in range(20)]
        got = [await d for d in gets]
        assert sorted(json.loads(body)["n"] for body, _, _ in got) == list(range(20))
        assert len({acker.delivery_tag for _, _, acker in got}) == 20
        for _, _, acker in got:
            acker.ack()
        await wait_for(lambda: broker.count(queues["outbound"]) == 0, what="the gets acked")

        await amqp.remove_consumer(queues["inbound"])
        assert await amqp.queue_status(queues["inbound"]) == (0, 0)
        broker.publish(queues["inbound"], {"n": 2})
        await pause(0.5)
        assert len(received) == 1
        assert await amqp.count(queues["inbound"]) == 1  # kept, not consumed
    finally:
        await amqp.stopService()
