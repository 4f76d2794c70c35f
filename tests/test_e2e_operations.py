"""Operating it: /metrics, Sentry, JSON logs, queue depths and stuck queues on /health.

Each test runs the real ``twistd junebug-api`` against the local RabbitMQ,
drives known traffic and reads what an operator would read: the Prometheus
exposition (parsed with prometheus_client's own parser), the envelopes a
local Sentry stand-in received, the service's log file, ``/health``.
"""

from __future__ import annotations

import json
import time
import uuid
from pathlib import Path

import pytest
import pytest_twisted
import treq
from prometheus_client.parser import text_string_to_metric_families
from twisted.internet import reactor
from twisted.internet.protocol import Factory, Protocol

from .operations_support import EXPLODE_ENV, start_sentry_recorder
from .support import event_message, free_port, inbound_message, pause, wait_for

MESSAGES = "/channels/test-channel/messages"
ROOT = Path(__file__).resolve().parent.parent


async def post_message(service, headers=None, **fields):
    body = {"to": "+1", "from": "2", "content": "x", **fields}
    response = await treq.post(
        service.url + MESSAGES, data=json.dumps(body).encode(), headers=headers
    )
    await response.content()
    return response.code


async def scrape(service, path="/metrics", headers=None) -> dict[tuple, float]:
    """The exposition as ``{(sample name, sorted labels): value}``."""
    response = await treq.get(service.url + path, headers=headers)
    text = (await response.content()).decode()
    assert response.code == 200, text
    assert response.headers.getRawHeaders("content-type")[0].startswith("text/plain")
    samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def moved(before: dict, after: dict, name: str, **labels: str) -> float:
    key = (name, tuple(sorted(labels.items())))
    return after.get(key, 0.0) - before.get(key, 0.0)


@pytest_twisted.ensureDeferred
async def test_metrics_count_known_traffic(make_service, broker, connector, sink):
    service = make_service(delivery_max_attempts=3)
    before = await scrape(service)

    # Outbound: three 201s, two 400s.
    codes = [await post_message(service) for _ in range(3)]
    for _ in range(2):
        response = await treq.post(service.url + MESSAGES, data=b'{"to": "+1"}')
        await response.content()
        codes.append(response.code)
    assert codes == [201, 201, 201, 400, 400]

    # Inbound, one at a time so the scripted answers go to the right message:
    # delivered at once; refused with 500, then delivered; refused with 400,
    # so dead-lettered.
    sink.statuses = [200]
    broker.publish(f"{connector}.inbound", inbound_message(connector))
    await wait_for(lambda: len(sink.at("/inbound")) == 1, what="the first inbound")
    sink.statuses = [500, 200]
    broker.publish(f"{connector}.inbound", inbound_message(connector))
    await wait_for(lambda: len(sink.at("/inbound")) == 3, what="the retried inbound")
    sink.statuses = [400]
    broker.publish(f"{connector}.inbound", inbound_message(connector))
    await broker.wait_get(f"{connector}.inbound.failed")
    # An event with no event URL anywhere: dropped.
    broker.publish(f"{connector}.event", event_message(uuid.uuid4().hex, "ack"))
    await wait_for(lambda: "dropped" in service.log(), what="the dropped event")

    # The drop is logged just before the worker counts it: scrape until it shows.
    for _ in range(50):
        after = await scrape(service)
        dropped = moved(
            before, after, "junebug_consumed_messages_total", queue_role="event", outcome="dropped"
        )
        if dropped:
            break
        await pause(0.1)

    def m(name, **labels):
        return moved(before, after, name, **labels)

    assert m("junebug_outbound_requests_total", code="201") == 3
    assert m("junebug_outbound_requests_total", code="400") == 2
    assert m("junebug_consumed_messages_total", queue_role="inbound", outcome="delivered") == 2
    assert m("junebug_consumed_messages_total", queue_role="inbound", outcome="dead_lettered") == 1
    assert m("junebug_consumed_messages_total", queue_role="inbound", outcome="dropped") == 0
    assert m("junebug_consumed_messages_total", queue_role="event", outcome="dropped") == 1
    assert m("junebug_consumed_messages_total", queue_role="event", outcome="delivered") == 0
    assert m("junebug_delivery_retries_total", queue_role="inbound") == 1
    assert m("junebug_delivery_post_seconds_count", target="mo", status_class="2xx") == 2
    assert m("junebug_delivery_post_seconds_count", target="mo", status_class="5xx") == 1
    assert m("junebug_delivery_post_seconds_count", target="mo", status_class="4xx") == 1
    # Three outbound messages and one dead-letter, each confirmed.
    assert m("junebug_publish_confirm_seconds_count") == 4
    assert m("junebug_publish_failures_total") == 0
    for role in ("publish", "consume"):
        assert after[("junebug_amqp_connected", (("connection", role),))] == 1
        assert after[("junebug_amqp_blocked", (("connection", role),))] == 0
        assert after[("junebug_amqp_connections_opened_total", (("connection", role),))] == 1
        assert after[("junebug_amqp_reconnects_total", (("connection", role),))] == 0
        assert after[("junebug_amqp_unconfirmed_publishes", (("connection", role),))] == 0
    assert after[("junebug_messages_in_work", ())] == 0
    # Three inbound messages cached for replies (outbound sent no event_url).
    assert after[("junebug_state_cache_entries", ())] == 3
    assert after[("junebug_state_cache_errors_total", ())] == 0
    assert any(name == "junebug_build_info" for name, _ in after)
    assert ("process_cpu_seconds_total", ()) in after
    # Labels are bounded: only these label names, none holding a message id, address or
    # URL (channel: the configured channels' ids).
    bounded = {
        "code",
        "queue_role",
        "outcome",
        "target",
        "status_class",
        "connection",
        "le",
        "channel",
        "kind",
    }
    for name, labels in after:
        if name.startswith("junebug_") and name != "junebug_build_info":
            assert {label for label, _ in labels} <= bounded, (name, labels)


@pytest_twisted.ensureDeferred
async def test_metrics_auth_path_and_off(make_service, connector):
    service = make_service(
        metrics_path="/internal/metrics", metrics_auth=True, api_auth_token="tok-metrics-1"
    )
    response = await treq.get(service.url + "/internal/metrics")
    assert response.code == 401
    body = json.loads(await response.content())
    assert body["status"] == 401
    samples = await scrape(
        service, "/internal/metrics", headers={"Authorization": "Token tok-metrics-1"}
    )
    assert ("junebug_messages_in_work", ()) in samples
    response = await treq.get(service.url + "/metrics")
    assert response.code == 404
    await response.content()
    service.stop()

    service = make_service(metrics_enabled=False)
    response = await treq.get(service.url + "/metrics")
    assert response.code == 404
    await response.content()


SECRETS = ("urlpass-9f3k2", "motoken-7x1q9", "apitoken-4b8z0", "eventtoken-2m5n6")


@pytest_twisted.ensureDeferred
async def test_sentry_gets_each_error_once_tagged_and_scrubbed(
    make_service, broker, connector, sink, tmp_path
):
    recorder, port, dsn = start_sentry_recorder()
    explode = tmp_path / "explode"
    try:
        mo_url = sink.url.replace("http://", f"http://rpuser:{SECRETS[0]}@") + "/inbound"
        service = make_service(
            sentry_dsn=dsn,
            sentry_environment="test-env",
            mo_message_url=mo_url,
            mo_message_url_auth_token=SECRETS[1],
            api_auth_token=SECRETS[2],
            state_cache_class="tests.operations_support.ExplodingHealthCache",
            env={"PYTHONPATH": str(ROOT), EXPLODE_ENV: str(explode)},
            allow_log_errors=True,  # the exploding /health is an unhandled error on purpose
        )
        # An outbound message with an event token, so that secret is in play too.
        code = await post_message(
            service,
            headers={"Authorization": f"Token {SECRETS[2]}"},
            event_url=f"{sink.url}/event",
            event_auth_token=SECRETS[3],
        )
        assert code == 201
        # A delivery that ends on .failed.
        sink.statuses = [400]
        refused = inbound_message(connector)
        broker.publish(f"{connector}.inbound", refused)
        await broker.wait_get(f"{connector}.inbound.failed")
        # An unhandled error: /health raises, with a URL with credentials in the error.
        explode.write_text(f"http://rpuser:{SECRETS[0]}@rapidpro.example/", encoding="utf-8")
        response = await treq.get(service.url + "/health")
        assert response.code == 500
        await response.content()
        await wait_for(lambda: len(recorder.events()) >= 2, timeout=15, what="two Sentry events")
        service.stop()  # stopping flushes whatever is still queued
    finally:
        await port.stopListening()

    events = recorder.events()
    assert len(events) == 2, events
    by_kind = {("exception" in e): e for e in events}
    dead_letter, unhandled = by_kind[False], by_kind[True]
    assert dead_letter["level"] == "error"
    assert dead_letter["tags"]["connector_name"] == connector
    assert dead_letter["tags"]["message_id"] == refused["message_id"]
    assert dead_letter["tags"]["queue"] == f"{connector}.inbound"
    assert dead_letter["release"] == "junebug-api@0.1.0"
    assert dead_letter["environment"] == "test-env"
    assert "moved to" in json.dumps(dead_letter)
    assert unhandled["tags"]["connector_name"] == connector
    [exception] = unhandled["exception"]["values"]
    assert exception["type"] == "RuntimeError"
    assert "health exploded" in exception["value"]
    sent = recorder.raw()
    for secret in SECRETS:
        assert secret not in sent
    assert "rpuser:" not in sent


@pytest.mark.parametrize("sentry", ["refusing", "silent"])
@pytest_twisted.ensureDeferred
async def test_sentry_down_or_slow_changes_nothing(make_service, broker, connector, sink, sentry):
    """A Sentry that refuses connections, or accepts and never answers: errors
    are still dead-lettered and logged, requests answered at once, shutdown prompt."""
    silent = None
    if sentry == "silent":
        silent = reactor.listenTCP(0, Factory.forProtocol(Protocol), interface="127.0.0.1")
        port = silent.getHost().port
    else:
        port = free_port()
    try:
        service = make_service(sentry_dsn=f"http://key@127.0.0.1:{port}/1")
        sink.statuses = [400] * 5
        for _ in range(5):
            broker.publish(f"{connector}.inbound", inbound_message(connector))
        for _ in range(5):
            await broker.wait_get(f"{connector}.inbound.failed")
        for _ in range(5):
            started = time.monotonic()
            assert await post_message(service) == 201
            assert time.monotonic() - started < 1.0
        assert service.log().count("moved to") == 5
        started = time.monotonic()
        service.stop()
        assert time.monotonic() - started < 10
    finally:
        if silent is not None:
            await silent.stopListening()


@pytest_twisted.ensureDeferred
async def test_json_logs_parse_and_hold_no_secrets(make_service, broker, connector, sink):
    mo_url = sink.url.replace("http://", f"http://rpuser:{SECRETS[0]}@") + "/inbound"
    service = make_service(
        log_format="json",
        mo_message_url=mo_url,
        mo_message_url_auth_token=SECRETS[1],
        api_auth_token=SECRETS[2],
        delivery_max_attempts=2,
    )
    code = await post_message(
        service,
        headers={"Authorization": f"Token {SECRETS[2]}"},
        event_url=f"{sink.url.replace('http://', 'http://evuser:' + SECRETS[3] + '@')}/event",
        event_auth_token=SECRETS[3],
    )
    assert code == 201
    sink.statuses = [500, 500]
    refused = inbound_message(connector)
    broker.publish(f"{connector}.inbound", refused)
    await broker.wait_get(f"{connector}.inbound.failed")
    service.stop()

    text = service.log()
    records = [json.loads(line) for line in text.splitlines()]  # each line one JSON object
    assert len(records) > 5
    for record in records:
        assert {"time", "level", "logger", "message", "connector"} <= set(record)
        assert record["connector"] == connector
    for secret in SECRETS:
        assert secret not in text
    about = [r for r in records if refused["message_id"] in r["message"]]
    assert len(about) == 2  # the retry and the dead-letter
    for record in about:
        assert record["message_id"] == refused["message_id"]
        assert record["queue"] == f"{connector}.inbound"
    [retry] = [r for r in about if r["level"] == "warn"]
    assert retry["attempt"] == 1
    assert "HTTP 500" in retry["reason"]
    assert retry["error"] == retry["reason"]
    # Credentials masked, as every log line shows a callback URL (docs/security.rst: Callback URLs).
    shown = sink.url.replace("http://", "http://***@") + "/inbound"
    assert retry["url"] == shown
    [dead] = [r for r in about if r["level"] == "error"]
    assert dead["url"] == shown
    assert dead["attempts"] == 2
    assert "HTTP 500" in dead["error"]


@pytest_twisted.ensureDeferred
async def test_health_reports_depths_and_stuck_queue(make_service, broker, connector):
    """RapidPro unreachable: it is soon down, so the inbound consumer is
    paused and the messages wait ready in the queue; the queue is stuck all
    the same, and health stays 200."""
    nowhere = f"http://127.0.0.1:{free_port()}/inbound"
    service = make_service(
        mo_message_url=nowhere,
        delivery_max_attempts=1000,
        delivery_retry_delay=0.5,
        health_stuck_after=2,
        # No probe (a basic.get) during the test: a message taken as a probe
        # lowers the ready count for a moment, which reads as progress.
        delivery_probe_interval=600,
    )
    for _ in range(3):
        broker.publish(f"{connector}.inbound", inbound_message(connector))

    async def health():
        response = await treq.get(service.url + "/health")
        return response.code, json.loads(await response.content())

    result = None
    for _ in range(200):
        code, body = await health()
        inbound = body["components"]["amqp"]["queues"].get(f"{connector}.inbound", {})
        if body["components"]["amqp"]["stuck"] and inbound.get("messages_ready") == 3:
            result = code, body
            break
        await pause(0.1)
    assert result is not None, "the inbound queue was never reported stuck"
    code, body = result
    assert code == 200
    assert body["health"] == "ok"
    queues = body["components"]["amqp"]["queues"]
    inbound = queues[f"{connector}.inbound"]
    assert inbound == {
        "messages_ready": 3,
        "messages_in_work": 0,
        "consumers": 0,
        "stuck": True,
    }
    assert "is down after 5 failures" in service.log()
    assert queues[f"{connector}.event"] == {
        "messages_ready": 0,
        "messages_in_work": 0,
        "consumers": 1,
        "stuck": False,
    }
    assert queues[f"{connector}.outbound"] == {
        "messages_ready": 0,
        "consumers": 0,
        "stuck": False,
    }
    assert "is stuck" in service.log()
    samples = await scrape(service)
    channel = ("channel", connector)
    assert samples[("junebug_queue_stuck", (channel, ("queue_role", "inbound")))] == 1
    assert samples[("junebug_queue_stuck", (channel, ("queue_role", "event")))] == 0
    # paused
    assert samples[("junebug_queue_consumers", (channel, ("queue_role", "inbound")))] == 0

    # A queue with messages ready that nothing consumes (no transport): stuck too.
    for _ in range(2):
        assert await post_message(service) == 201
    result = None
    for _ in range(200):
        code, body = await health()
        if body["components"]["amqp"]["queues"][f"{connector}.outbound"]["stuck"]:
            result = code, body
            break
        await pause(0.1)
    assert result is not None, "the outbound queue was never reported stuck"
    code, body = result
    assert code == 200
    assert body["components"]["amqp"]["queues"][f"{connector}.outbound"] == {
        "messages_ready": 2,
        "consumers": 0,
        "stuck": True,
    }
