"""Inbound messages and events: published on AMQP, POSTed to the RapidPro stand-in."""

from __future__ import annotations

import base64
import json

import pytest_twisted
import treq

from .support import UNICODE_TEXT, event_message, inbound_message, wait_for

MESSAGES = "/channels/test-channel/messages"


@pytest_twisted.ensureDeferred
async def test_inbound_is_posted_as_junebug_json(make_service, broker, connector, sink):
    make_service()
    inbound = inbound_message(connector, content=UNICODE_TEXT)
    broker.publish(f"{connector}.inbound", inbound)
    [request] = await wait_for(lambda: sink.at("/inbound"), what="the inbound POST")
    assert request["headers"]["content-type"].startswith("application/json")
    assert "authorization" not in request["headers"]
    assert request["json"] == {
        "to": "8110",
        "from": "+27820000001",
        "group": None,
        "message_id": inbound["message_id"],
        "channel_id": connector,
        "timestamp": "2026-11-26 13:23:18.965428",
        "reply_to": None,
        "content": UNICODE_TEXT,
        "channel_data": {"session_id": "abc", "session_event": "new"},
    }
    await wait_for(lambda: broker.count(f"{connector}.inbound") == 0, what="the ack")


@pytest_twisted.ensureDeferred
async def test_inbound_basic_auth_from_url(make_service, broker, connector, sink):
    make_service(mo_message_url=sink.url.replace("http://", "http://user:p%40ss@") + "/inbound")
    broker.publish(f"{connector}.inbound", inbound_message(connector))
    [request] = await wait_for(lambda: sink.at("/inbound"), what="the inbound POST")
    expected = "Basic " + base64.b64encode(b"user:p@ss").decode()
    assert request["headers"]["authorization"] == expected


@pytest_twisted.ensureDeferred
async def test_inbound_token_auth(make_service, broker, connector, sink):
    make_service(mo_message_url_auth_token="s3cret")
    broker.publish(f"{connector}.inbound", inbound_message(connector))
    [request] = await wait_for(lambda: sink.at("/inbound"), what="the inbound POST")
    assert request["headers"]["authorization"] == "Token s3cret"


@pytest_twisted.ensureDeferred
async def test_inbound_timestamps_and_vumi06_fields(make_service, broker, connector, sink):
    """Timestamps without a fraction or with a Z; a vumi 0.6 message lacking newer fields."""
    make_service()
    old = inbound_message(connector, timestamp="2026-11-26 13:23:18Z", extra_field=[1])
    for key in ("provider", "group", "to_addr_type", "from_addr_type", "session_event"):
        del old[key]
    broker.publish(f"{connector}.inbound", old)
    [request] = await wait_for(lambda: sink.at("/inbound"), what="the inbound POST")
    assert request["json"]["timestamp"] == "2026-11-26 13:23:18.000000"
    assert request["json"]["group"] is None
    assert request["json"]["channel_data"] == {"session_id": "abc"}


@pytest_twisted.ensureDeferred
async def test_events_go_to_their_event_url_mapped(make_service, broker, connector, sink):
    service = make_service()
    response = await treq.post(
        service.url + MESSAGES,
        data=json.dumps(
            {
                "to": "+1",
                "from": "2",
                "content": "x",
                "event_url": f"{sink.url}/event",
                "event_auth_token": "tok",
            }
        ).encode(),
    )
    assert response.code == 201
    message_id = json.loads(await response.text())["result"]["message_id"]
    events = [
        (event_message(message_id, "ack", sent_message_id="smsc-1"), "submitted", {}),
        (
            event_message(message_id, "nack", nack_reason="no credit"),
            "rejected",
            {"reason": "no credit"},
        ),
        (
            event_message(message_id, "delivery_report", delivery_status="pending"),
            "delivery_pending",
            {},
        ),
        (
            event_message(message_id, "delivery_report", delivery_status="failed"),
            "delivery_failed",
            {},
        ),
        (
            event_message(message_id, "delivery_report", delivery_status="delivered"),
            "delivery_succeeded",
            {},
        ),
    ]
    for vumi_event, _, _ in events:
        broker.publish(f"{connector}.event", vumi_event)
    await wait_for(lambda: len(sink.at("/event")) == len(events), what="all event POSTs")
    received = {r["json"]["event_type"]: r for r in sink.at("/event")}
    for _, name, details in events:
        request = received[name]
        assert request["headers"]["authorization"] == "Token tok"
        assert request["json"] == {
            "event_type": name,
            "message_id": message_id,
            "channel_id": connector,
            "timestamp": "2026-11-26 13:23:18.966336",
            "event_details": details,
        }


@pytest_twisted.ensureDeferred
async def test_events_without_info_go_to_default_event_url(make_service, broker, connector, sink):
    make_service(default_event_url=f"{sink.url}/default-event", default_event_auth_token="dt")
    broker.publish(f"{connector}.event", event_message("unknown-id", "ack"))
    [request] = await wait_for(lambda: sink.at("/default-event"), what="the event POST")
    assert request["headers"]["authorization"] == "Token dt"
    assert request["json"]["message_id"] == "unknown-id"
    assert request["json"]["event_type"] == "submitted"


@pytest_twisted.ensureDeferred
async def test_event_with_nowhere_to_go_is_logged(make_service, broker, connector, sink):
    service = make_service()
    broker.publish(f"{connector}.event", event_message("lost-id", "ack"))
    await wait_for(lambda: "lost-id" in service.log(), what="the log line")
    assert "No event URL" in service.log()
    await wait_for(lambda: broker.count(f"{connector}.event") == 0, what="the ack")
    assert sink.requests == []


@pytest_twisted.ensureDeferred
async def test_store_event_info_false_uses_default_url(make_service, broker, connector, sink):
    service = make_service(
        default_event_url=f"{sink.url}/default-event",
        state_cache_config={"store_event_info": False},
    )
    response = await treq.post(
        service.url + MESSAGES,
        data=json.dumps(
            {"to": "+1", "from": "2", "content": "x", "event_url": f"{sink.url}/event"}
        ).encode(),
    )
    message_id = json.loads(await response.text())["result"]["message_id"]
    broker.publish(f"{connector}.event", event_message(message_id, "ack"))
    await wait_for(lambda: sink.at("/default-event"), what="the event POST")
    assert sink.at("/event") == []


@pytest_twisted.ensureDeferred
async def test_vumi2_state_cache_alias(make_service, broker, connector, sink):
    service = make_service(
        state_cache_class=(
            "vumi2.applications.junebug_message_api.junebug_state_cache.InMemorySmppCache"
        ),
        state_cache_config={"timeout": 3600},
    )
    inbound = inbound_message(connector)
    broker.publish(f"{connector}.inbound", inbound)
    await wait_for(lambda: sink.at("/inbound"), what="the inbound POST")
    response = await treq.post(
        service.url + MESSAGES,
        data=json.dumps({"reply_to": inbound["message_id"], "content": "r"}).encode(),
    )
    assert response.code == 201
