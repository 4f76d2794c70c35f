"""Nothing lost: retries, dead-letter queues, replay, broker restarts, SIGTERM."""

from __future__ import annotations

import json
import signal
import subprocess
import time
from pathlib import Path

import pytest_twisted
import treq
from twisted.internet import reactor
from twisted.web.server import Site

from .support import TWISTD, free_port, inbound_message, wait_for

MESSAGES = "/channels/test-channel/messages"


async def post_message(service, **fields):
    body = {"to": "+1", "from": "2", "content": "x", **fields}
    response = await treq.post(service.url + MESSAGES, data=json.dumps(body).encode())
    return response.code, json.loads(await response.text())


@pytest_twisted.ensureDeferred
async def test_rapidpro_500_three_times_then_200(make_service, broker, connector, sink):
    make_service()
    sink.statuses = [500, 500, 500]
    inbound = inbound_message(connector)
    broker.publish(f"{connector}.inbound", inbound)
    await wait_for(lambda: len(sink.at("/inbound")) == 4, what="four attempts")
    assert {r["json"]["message_id"] for r in sink.at("/inbound")} == {inbound["message_id"]}
    await wait_for(lambda: broker.count(f"{connector}.inbound") == 0, what="the ack")
    assert broker.count(f"{connector}.inbound.failed") == 0


@pytest_twisted.ensureDeferred
async def test_rapidpro_refusing_connections_for_a_while(make_service, broker, connector, sink):
    port = free_port()
    service = make_service(
        mo_message_url=f"http://127.0.0.1:{port}/inbound", delivery_max_attempts=100
    )
    inbound = inbound_message(connector)
    broker.publish(f"{connector}.inbound", inbound)
    await wait_for(lambda: "connection failed" in service.log(), what="a failed attempt")
    assert broker.count(f"{connector}.inbound.failed") == 0
    listening = reactor.listenTCP(port, Site(sink), interface="127.0.0.1")
    try:
        await wait_for(lambda: sink.at("/inbound"), timeout=15, what="delivery after recovery")
        assert sink.at("/inbound")[0]["json"]["message_id"] == inbound["message_id"]
        await wait_for(lambda: broker.count(f"{connector}.inbound") == 0, what="the ack")
    finally:
        await listening.stopListening()


@pytest_twisted.ensureDeferred
async def test_permanent_failures_and_garbage_are_dead_lettered(
    make_service, broker, connector, sink
):
    service = make_service()
    sink.statuses = [400]
    refused = inbound_message(connector)
    broker.publish(f"{connector}.inbound", refused)
    props, body = await broker.wait_get(f"{connector}.inbound.failed")
    assert json.loads(body) == refused
    assert props.delivery_mode == 2
    assert props.headers["x-junebug-attempts"] == 1
    assert "HTTP 400" in props.headers["x-junebug-reason"]
    assert props.headers["x-junebug-source-queue"] == f"{connector}.inbound"
    assert len(sink.at("/inbound")) == 1

    garbage = b"\xff\xfe not json \x00"
    broker.publish(f"{connector}.inbound", garbage)
    props, body = await broker.wait_get(f"{connector}.inbound.failed")
    assert body == garbage
    assert "invalid inbound message" in props.headers["x-junebug-reason"]
    broker.publish(f"{connector}.inbound", {"message_id": "m1"})  # missing fields
    _, body = await broker.wait_get(f"{connector}.inbound.failed")
    assert json.loads(body) == {"message_id": "m1"}

    later = inbound_message(connector)
    broker.publish(f"{connector}.inbound", later)
    await wait_for(
        lambda: any(r["json"]["message_id"] == later["message_id"] for r in sink.at("/inbound")),
        what="a later message still flowing",
    )
    log = service.log()
    assert refused["message_id"] in log
    assert "moved to" in log

    broker.publish(f"{connector}.event", b"[]")
    _, body = await broker.wait_get(f"{connector}.event.failed")
    assert body == b"[]"


@pytest_twisted.ensureDeferred
async def test_last_attempt_dead_letters_then_replay(
    make_service, broker, connector, sink, tmp_path
):
    service = make_service(delivery_max_attempts=3)
    # 408: retryable, but no outage (a run of 5xx would make RapidPro "down",
    # and attempts while down are not counted; a 429 is throttling, no attempt).
    sink.statuses = [408] * 6
    first, second = inbound_message(connector), inbound_message(connector)
    broker.publish(f"{connector}.inbound", first)
    broker.publish(f"{connector}.inbound", second)
    await wait_for(lambda: broker.count(f"{connector}.inbound.failed") == 2, what="dead letters")
    assert len(sink.at("/inbound")) == 6
    assert broker.count(f"{connector}.inbound") == 0

    def replay(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [
                str(Path(TWISTD).with_name("junebug-api-replay")),
                "--config",
                str(service.config_path),
                "inbound",
                *args,
            ],
            capture_output=True,
            text=True,
            timeout=60,
        )

    result = replay("--limit", "1")
    assert result.returncode == 0, result.stderr
    assert f"moved 1 message(s) from {connector}.inbound.failed to {connector}.inbound; 1 left" in (
        result.stdout
    )
    await wait_for(lambda: len(sink.at("/inbound")) == 7, what="the replayed delivery")
    result = replay()
    assert result.returncode == 0, result.stderr
    assert "moved 1 message(s)" in result.stdout
    assert "0 left" in result.stdout
    await wait_for(lambda: len(sink.at("/inbound")) == 8, what="the second replayed delivery")
    delivered = [r["json"]["message_id"] for r in sink.at("/inbound")[-2:]]
    assert sorted(delivered) == sorted([first["message_id"], second["message_id"]])
    assert broker.count(f"{connector}.inbound.failed") == 0


@pytest_twisted.ensureDeferred
async def test_unroutable_outbound_is_503(make_service, broker, connector):
    service = make_service()
    broker.delete(f"{connector}.outbound")
    code, answer = await post_message(service)
    assert code == 503
    assert answer["description"] == "service unavailable"
    assert "unroutable" in answer["result"]["errors"][0]["message"]


@pytest_twisted.ensureDeferred
async def test_sigterm_with_deliveries_in_flight(make_service, broker, connector, sink):
    service = make_service(worker_concurrency=4, shutdown_timeout=30)
    sink.delay = 1.0
    messages = [inbound_message(connector) for _ in range(12)]
    for message in messages:
        broker.publish(f"{connector}.inbound", message)
    await wait_for(lambda: len(sink.requests) >= 4, what="deliveries in flight")
    started = time.monotonic()
    service.signal(signal.SIGTERM)
    await wait_for(lambda: service.process.poll() is not None, timeout=30, what="the exit")
    # twistd re-raises the signal it stopped on once it has shut down cleanly.
    assert service.process.returncode in (0, -signal.SIGTERM)
    assert time.monotonic() - started < 10
    assert "junebug-api stopped" in service.log()
    # What was in flight finished (the sink answered), the rest went back.
    assert broker.count(f"{connector}.inbound") >= 12 - len(sink.requests)
    sink.delay = 0
    make_service()
    expected = {m["message_id"] for m in messages}
    await wait_for(
        lambda: expected <= {r["json"]["message_id"] for r in sink.requests},
        timeout=20,
        what="every message delivered at least once",
    )
    await wait_for(lambda: broker.count(f"{connector}.inbound") == 0, what="all acked")
    # What finished during the drain was acked before the connection closed:
    # nothing is delivered twice.
    delivered = [r["json"]["message_id"] for r in sink.requests]
    assert len(delivered) == len(set(delivered)) == 12


@pytest_twisted.ensureDeferred
async def test_deleted_inbound_queue_is_redeclared_and_consumed(
    make_service, broker, connector, sink
):
    """The broker's basic.cancel (consumer_cancel_notify) makes the service start over."""
    service = make_service()
    broker.delete(f"{connector}.inbound")
    await wait_for(lambda: "cancelled consumer" in service.log(), what="the cancel notice")
    await wait_for(
        lambda: service.log().count("AMQP consume connection open") == 2, what="the reconnect"
    )
    inbound = inbound_message(connector)
    broker.publish(f"{connector}.inbound", inbound)
    [request] = await wait_for(lambda: sink.at("/inbound"), what="the inbound POST")
    assert request["json"]["message_id"] == inbound["message_id"]
