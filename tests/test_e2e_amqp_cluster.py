"""Several brokers (``amqp_urls``): two independent RabbitMQ nodes of the
test's own; the first stops under steady outbound traffic."""

from __future__ import annotations

import json
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import pytest_twisted
import treq
from twisted.internet.defer import Deferred
from twisted.internet.threads import deferToThread

from .rabbit_node import RabbitNode
from .support import inbound_message, pause, wait_for

MESSAGES = "/channels/test-channel/messages"


@pytest.fixture(scope="module")
def nodes():
    pair = [RabbitNode(), RabbitNode()]
    with ThreadPoolExecutor(2) as pool:
        list(pool.map(RabbitNode.start, pair))
    yield pair
    for node in pair:
        node.destroy()


async def amqp_health(service) -> dict:
    response = await treq.get(service.url + "/health")
    return json.loads(await response.text())["components"]["amqp"]


@pytest.mark.slow
@pytest_twisted.ensureDeferred
async def test_failover_to_the_second_broker_under_traffic(nodes, make_service, connector, sink):
    first, second = nodes
    service = make_service(amqp_urls=[first.url, second.url])
    amqp = await amqp_health(service)
    assert amqp["connections"]["publish"]["broker"] == f"127.0.0.1:{first.port}"
    assert amqp["connections"]["consume"]["broker"] == f"127.0.0.1:{first.port}"

    answers: list[tuple[float, str, int]] = []
    running = True

    async def sender(lane: int) -> None:
        n = 0
        while running:
            n += 1
            content = f"lane {lane} message {n}"
            body = json.dumps({"to": "+1", "from": "2", "content": content}).encode()
            try:
                response = await treq.post(service.url + MESSAGES, data=body)
                await response.text()
                code = response.code
            except Exception:
                code = 0
            answers.append((time.monotonic(), content, code))

    lanes = [Deferred.fromCoroutine(sender(i)) for i in range(4)]
    await wait_for(lambda: sum(code == 201 for _, _, code in answers) >= 50, what="traffic")
    stopped_at = time.monotonic()
    await deferToThread(first.stop)
    await wait_for(
        lambda: (
            any(t > stopped_at and code == 201 for t, _, code in answers[-20:])
            and (answers[-1][0] - stopped_at) > 1
        ),
        timeout=30,
        what="201s again",
    )
    await pause(1.0)
    running = False
    for lane in lanes:
        await lane
    failures = [(t, code) for t, _, code in answers if code != 201]
    # Publishing resumed on the second broker within 5 s of the first failure.
    if failures:
        first_failure = failures[0][0]
        resumed = min(t for t, _, code in answers if code == 201 and t > first_failure)
        assert resumed - first_failure < 5.0, (resumed - first_failure, failures[:5])
    assert all(code in (201, 503) for _, _, code in answers), failures[:5]
    amqp = await amqp_health(service)
    assert amqp["health"] == "ok"
    assert amqp["connections"]["publish"]["broker"] == f"127.0.0.1:{second.port}"
    assert amqp["connections"]["consume"]["broker"] == f"127.0.0.1:{second.port}"

    # Inbound published to the second broker is delivered.
    on_second = second.broker()
    message = inbound_message(connector)
    on_second.publish(f"{connector}.inbound", message)
    await wait_for(
        lambda: any(r["json"]["message_id"] == message["message_id"] for r in sink.at("/inbound")),
        what="inbound from the second broker",
    )

    # Every 201 is on some node's .outbound, exactly once.
    await deferToThread(first.start)
    on_first = first.broker()
    contents = []
    for broker in (on_first, on_second):
        while (got := broker.get(f"{connector}.outbound")) is not None:
            contents.append(json.loads(got[1])["content"])
        broker.close()
    created = [content for _, content, code in answers if code == 201]
    assert len(contents) == len(set(contents)), "a message is on .outbound twice"
    assert set(created) <= set(contents)
    # Only 503s whose publish was written before the connection died may be extra.
    assert len(set(contents) - set(created)) <= sum(code == 503 for _, _, code in answers)
    log = service.log()
    assert "Traceback" not in log and "Unhandled" not in log
