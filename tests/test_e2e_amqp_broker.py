"""A production broker's behaviour, on a RabbitMQ node of the test's own:
a memory alarm (blocked publishing), quorum queues, passive declaration and
a queue declared with other arguments.
"""

from __future__ import annotations

import json
import time

import pytest
import pytest_twisted
import treq
from twisted.internet.error import ConnectionRefusedError

from junebug_api.formats.queue_names import QueueNames

from .rabbit_node import RabbitNode
from .support import Broker, event_message, health, inbound_message, pause, wait_for

MESSAGES = "/channels/test-channel/messages"
SUFFIXES = ("outbound", "inbound", "event", "inbound.failed", "event.failed")


@pytest.fixture(scope="module")
def node():
    node = RabbitNode().start()
    yield node
    node.destroy()


@pytest.fixture
def node_broker(node):
    broker = node.broker()
    yield broker
    broker.close()


async def wait_health(service, predicate, timeout: float = 30.0, what: str = "health") -> dict:
    deadline = time.monotonic() + timeout
    last = None
    while True:
        assert service.process.poll() is None, service.log()
        try:
            code, body = await health(service)
        except ConnectionRefusedError:
            pass
        else:
            last = (code, body)
            if predicate(code, body["components"]["amqp"]):
                return body["components"]["amqp"]
        assert time.monotonic() < deadline, f"{what}: {last}"
        await pause(0.1)


def post(service, content: str):
    body = {"to": "+27820000001", "from": "8110", "content": content}
    return treq.post(service.url + MESSAGES, data=json.dumps(body).encode())


def queue_counts(node: RabbitNode) -> dict[str, tuple[int, int, str]]:
    """name -> (ready, unacked, type), from rabbitmqctl."""
    result = node.ctl(
        "list_queues",
        "name",
        "messages_ready",
        "messages_unacknowledged",
        "type",
        "-q",
        "--no-table-headers",
    )
    counts = {}
    for line in result.stdout.splitlines():
        parts = line.split("\t")
        if len(parts) == 4:
            counts[parts[0]] = (int(parts[1]), int(parts[2]), parts[3])
    return counts


def drain(broker: Broker, queue: str) -> list[dict]:
    bodies = []
    while (got := broker.get(queue)) is not None:
        bodies.append(json.loads(got[1]))
    return bodies


def assert_clean(log: str) -> None:
    for bad in ("Traceback", "Unhandled Error", "Unhandled error", "NoTransition"):
        assert bad not in log, log


def alarm_active(node: RabbitNode) -> bool:
    return "memory" in node.ctl("eval", "rabbit_alarm:get_alarms().").stdout


@pytest_twisted.ensureDeferred
async def test_memory_alarm_blocks_publishing_not_consuming(
    make_service, node, node_broker, connector, sink
):
    inbound_queue = f"{connector}.inbound"
    node_broker.declare(inbound_queue)
    preloaded = [inbound_message(connector) for _ in range(20)]
    for message in preloaded:
        node_broker.publish(inbound_queue, message)
    node_broker.close()
    node.ctl("set_vm_memory_high_watermark", "0")
    try:
        await wait_for(lambda: alarm_active(node), timeout=20, what="the memory alarm")
        service = make_service(amqp_url=node.url, worker_concurrency=5)
        # Consuming goes on during the alarm: every pre-loaded message is delivered and acked.
        await wait_for(lambda: len(sink.at("/inbound")) >= 20, timeout=20, what="deliveries")
        assert {r["json"]["message_id"] for r in sink.at("/inbound")} == {
            m["message_id"] for m in preloaded
        }
        await wait_for(
            lambda: queue_counts(node).get(inbound_queue, (1, 1, ""))[:2] == (0, 0),
            timeout=20,
            what="the pre-loaded messages acked",
        )
        # The first publish during the alarm makes the broker say blocked; it waits.
        first = post(service, "first, written during the alarm")
        first_answered: list = []
        first.addBoth(lambda r: first_answered.append(r) or r)
        amqp = await wait_health(
            service, lambda code, a: code == 503 and a["state"] == "blocked", what="blocked"
        )
        assert amqp["connections"]["publish"]["state"] == "blocked"
        assert amqp["connections"]["consume"]["state"] == "open"
        refused = []
        for i in range(5):
            started = time.monotonic()
            response = await post(service, f"refused {i}")
            answer = json.loads(await response.text())
            assert response.code == 503, answer
            assert time.monotonic() - started < 1.0
            assert int(response.headers.getRawHeaders(b"Retry-After")[0]) > 0
            assert "blocks publishing" in answer["result"]["errors"][0]["message"]
            refused.append(f"refused {i}")
        assert first_answered == []  # written: it waits for its confirm
    finally:
        node.ctl("set_vm_memory_high_watermark", "0.4")
    response = await first
    assert response.code == 201, await response.text()
    await wait_health(service, lambda code, a: code == 200, what="unblocked")
    response = await post(service, "after the alarm")
    assert response.code == 201
    fresh = node.broker()
    try:
        contents = [m["content"] for m in drain(fresh, f"{connector}.outbound")]
    finally:
        fresh.close()
    # Exactly the 201s are on .outbound, once each; none of the 503s.
    assert sorted(contents) == ["after the alarm", "first, written during the alarm"]
    log = service.log()
    assert "blocks publishing" in log and "unblocked publishing" in log
    assert_clean(log)


@pytest_twisted.ensureDeferred
async def test_quorum_queues_by_queue_arguments(make_service, node, node_broker, connector, sink):
    service = make_service(amqp_url=node.url, amqp_queue_arguments={"x-queue-type": "quorum"})
    counts = queue_counts(node)
    for suffix in SUFFIXES:
        assert counts[f"{connector}.{suffix}"][2] == "quorum", counts
    response = await post(service, "to a quorum queue")
    assert response.code == 201, await response.text()
    assert (await node_broker.wait_json(f"{connector}.outbound"))["content"] == "to a quorum queue"
    message = inbound_message(connector)
    node_broker.publish(f"{connector}.inbound", message)
    await wait_for(lambda: sink.at("/inbound"), what="inbound from a quorum queue")
    await wait_for(lambda: queue_counts(node)[f"{connector}.inbound"][:2] == (0, 0), what="acked")
    assert_clean(service.log())


@pytest_twisted.ensureDeferred
async def test_passive_declare_of_missing_queues_recovers_once_they_exist(
    make_service, node, node_broker, connector
):
    service = make_service(wait=False, amqp_url=node.url, amqp_declare="passive")
    amqp = await wait_health(service, lambda code, a: "error" in a, what="an error")
    assert amqp["error"].startswith(
        f"queue {connector}.outbound does not exist (amqp_declare: passive): NOT_FOUND"
    ), amqp
    for suffix in SUFFIXES:
        node_broker.declare(f"{connector}.{suffix}")
    # The delay queues too: in passive mode the operator declares every queue.
    for queue, arguments in QueueNames.for_connector(connector).delay_queue_arguments().items():
        node_broker.channel.queue_declare(queue, durable=True, arguments=arguments)
        node_broker.channel.queue_bind(queue, "vumi", routing_key=queue)
    await wait_health(service, lambda code, a: code == 200, timeout=40, what="recovery")
    response = await post(service, "passive")
    assert response.code == 201
    assert_clean(service.log())


@pytest_twisted.ensureDeferred
async def test_inequivalent_queue_is_reported_then_fixed_without_restart(
    make_service, node, node_broker, connector
):
    queue = f"{connector}.inbound"
    node_broker.channel.queue_declare(queue, durable=True, arguments={"x-max-length": 10})
    service = make_service(wait=False, amqp_url=node.url)
    amqp = await wait_health(service, lambda code, a: "error" in a, what="an error")
    assert amqp["error"].startswith(
        f"queue {queue} exists with other arguments: PRECONDITION_FAILED"
    )
    assert "x-max-length" in amqp["error"]
    await wait_for(
        lambda: f"failed: queue {queue} exists with other arguments" in service.log(),
        what="the log line",
    )
    node_broker.delete(queue)
    await wait_health(service, lambda code, a: code == 200, timeout=40, what="recovery")
    counts = queue_counts(node)
    assert queue in counts
    assert service.process.poll() is None
    assert_clean(service.log())


@pytest_twisted.ensureDeferred
async def test_dead_letter_during_an_alarm_waits_unacked_for_the_unblock(
    make_service, node, node_broker, connector, sink
):
    inbound_queue = f"{connector}.inbound"
    node_broker.declare(inbound_queue)
    node_broker.publish(inbound_queue, b"not a vumi message")
    good = inbound_message(connector)
    node_broker.publish(inbound_queue, good)
    node_broker.close()
    node.ctl("set_vm_memory_high_watermark", "0")
    try:
        await wait_for(lambda: alarm_active(node), timeout=20, what="the memory alarm")
        # Not waiting for a healthy service: the dead letter may block it first.
        service = make_service(wait=False, amqp_url=node.url)
        await wait_for(lambda: sink.at("/inbound"), what="the good message")
        # The garbage is to be dead-lettered: that publish makes the broker block
        # the publishing connection, and the message stays unacked meanwhile.
        await wait_health(
            service, lambda code, a: a["state"] == "blocked", what="blocked by the dead letter"
        )
        await wait_for(
            lambda: queue_counts(node).get(inbound_queue, (9, 9, ""))[:2] == (0, 1),
            what="the garbage unacked, the good one acked",
        )
        response = await post(service, "refused")
        assert response.code == 503
        await response.text()
    finally:
        node.ctl("set_vm_memory_high_watermark", "0.4")
    await wait_health(service, lambda code, a: code == 200, what="unblocked")
    await wait_for(
        lambda: (
            queue_counts(node).get(f"{connector}.inbound.failed", (0, 0, ""))[0] == 1
            and queue_counts(node)[inbound_queue][:2] == (0, 0)
        ),
        what="dead-lettered and acked after the unblock",
    )
    fresh = node.broker()
    try:
        _, body = fresh.get(f"{connector}.inbound.failed")
        assert body == b"not a vumi message"
        assert fresh.count(f"{connector}.outbound") == 0
    finally:
        fresh.close()
    assert_clean(service.log())


async def post_message_to(service, **fields):
    body = {"to": "+1", "from": "2", "content": "x", **fields}
    response = await treq.post(service.url + MESSAGES, data=json.dumps(body).encode())
    return response.code, json.loads(await response.text())


@pytest_twisted.ensureDeferred
async def test_broker_restart(make_service, node, connector, sink):
    # On a node of its own: the machine's broker serves the other tests
    # running at the same time (pytest -n 2).
    service = make_service(amqp_url=node.url, default_event_url=f"{sink.url}/event")
    code, _ = await post_message_to(service, content="before")
    assert code == 201
    stopped = node.ctl("stop_app", timeout=120)
    assert stopped.returncode == 0, stopped.stdout
    try:

        async def health_code() -> int:
            response = await treq.get(service.url + "/health")
            await response.text()
            return response.code

        codes = []

        async def poll():
            codes.append(await health_code())
            return codes[-1] == 503

        deadline = time.monotonic() + 15
        while not await poll():
            assert time.monotonic() < deadline, codes
        code, answer = await post_message_to(service, content="during outage")
        assert code == 503
        assert answer["description"] == "service unavailable"
    finally:
        started = node.ctl("start_app", timeout=120)
        assert started.returncode == 0, started.stdout
    deadline = time.monotonic() + 40
    while (await treq.get(service.url + "/health")).code != 200:
        assert time.monotonic() < deadline, "service did not reconnect"
        await pause()
    fresh = node.broker()
    try:
        code, answer = await post_message_to(service, content="after")
        assert code == 201, answer
        contents = []
        while (got := fresh.get(f"{connector}.outbound")) is not None:
            contents.append(json.loads(got[1])["content"])
        assert contents == ["before", "after"]
        inbound = inbound_message(connector)
        fresh.publish(f"{connector}.inbound", inbound)
        await wait_for(lambda: sink.at("/inbound"), what="inbound after the restart")
        fresh.publish(f"{connector}.event", event_message(answer["result"]["message_id"], "ack"))
        await wait_for(lambda: sink.at("/event"), what="event after the restart")
    finally:
        fresh.close()
