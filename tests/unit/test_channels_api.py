"""Old Junebug's channel routes over StubTreq: real Channels, a fake publish, a Clock."""

from __future__ import annotations

import json
from typing import Any

from treq.testing import StubTreq
from twisted.internet.task import Clock
from twisted.logger import LogLevel, globalLogPublisher
from twisted.python.failure import Failure

from junebug_api.channels.channel import Channel, ChannelLog, ChannelLogRouter, RateMeter
from junebug_api.channels.message_status import message_status, status_event
from junebug_api.config.channels import resolve_channels
from junebug_api.config.model import load_config
from junebug_api.delivery.http_delivery import HttpDelivery
from junebug_api.delivery.outages import OutageTracker
from junebug_api.delivery.retry_policy import RetryPolicy
from junebug_api.formats.queue_names import QueueNames
from junebug_api.http.api import ApiCredentials, JunebugApi
from junebug_api.observe.log import logger
from junebug_api.observe.metrics import NO_METRICS, Metrics
from junebug_api.state.memory_cache import InMemoryStateCache
from junebug_api.testing import FixedChannels, RecordingPublisher

from .helpers import result_of

BASE = "http://junebug.example"
MO = "http://rapidpro.example/in"
B_EVENTS = (
    "https://ev:pw@rp.example:8443/c/jn/4a8e2c1e-63d5-4b1f-9b0e-2d5c8f7a1b23/event?token=tok3n&v=2"
)
RATES = {
    "inbound_message_rate",
    "outbound_message_rate",
    "submitted_event_rate",
    "rejected_event_rate",
    "delivery_succeeded_rate",
    "delivery_failed_rate",
    "delivery_pending_rate",
}


def vumi_event(message_id: str, event_type: str, timestamp: str, **fields: Any) -> dict:
    return {
        "message_type": "event",
        "event_type": event_type,
        "user_message_id": message_id,
        "event_id": f"{event_type}-{timestamp}",
        "timestamp": timestamp,
        "sent_message_id": message_id,
        **fields,
    }


class NoQueueControl:
    """The consumer controls a channel's pause gate needs; unused here."""

    async def pause_consumer(self, queue: str) -> None:
        raise AssertionError("not paused in these tests")

    async def resume_consumer(self, queue: str) -> None:
        raise AssertionError("not resumed in these tests")

    async def get(self, queue: str) -> Any:
        raise AssertionError("no probes in these tests")


def channel_settings(channels: dict[str, dict], **options: Any) -> list[Any]:
    """The ChannelSettings of a config with ``channels`` and top-level ``options``."""
    cli = {"http_bind": "127.0.0.1:1", "channels": json.dumps(channels), **options}
    return resolve_channels(load_config(None, environ={}, cli=cli))


def make_channel(
    settings: Any,
    cache: Any,
    delivery: HttpDelivery,
    publish: Any,
    clock: Clock,
    policy: RetryPolicy | None = None,
    max_logs: int = 3,
    metrics: Metrics = NO_METRICS,
    other_connectors: frozenset[str] = frozenset(),
) -> Channel:
    """A Channel with queues named after it, no retry queues, no pausing."""
    return Channel(
        settings,
        queues=QueueNames.for_connector(settings.id, retry_delays=()),
        cache=cache,
        delivery=delivery,
        publish=publish,
        inbound_policy=policy or RetryPolicy(),
        event_policy=policy or RetryPolicy(),
        outages=OutageTracker(clock),
        control=NoQueueControl(),
        probe_interval=5,
        max_body_size=1 << 20,
        clock=clock,
        mo_message_url_timeout=1,
        event_url_timeout=1,
        metric_window=10,
        max_logs=max_logs,
        store_message_events=True,
        metrics=metrics,
        other_connectors=other_connectors,
    )


class Harness:
    def __init__(self) -> None:
        self.clock = Clock()
        self.clock.advance(1_000_000)
        self.cache = InMemoryStateCache(self.clock)
        self.publish = RecordingPublisher()
        settings = channel_settings(
            {
                "a": {"character_limit": 5, "label": "A", "metadata": {"k": "v"}},
                "b": {
                    "api_auth_token": "b-secret",
                    "mo_url_auth_token": "mo-secret",
                    "default_event_url": B_EVENTS,
                },
            },
            mo_message_url=MO,
            default_from_addr="8110",
        )
        delivery = HttpDelivery.create(self.clock, 1)
        connectors = {s.connector_name for s in settings}
        self.channels = {
            s.id: make_channel(
                s,
                self.cache,
                delivery,
                self.publish,
                self.clock,
                other_connectors=frozenset(connectors - {s.connector_name}),
            )
            for s in settings
        }
        self.health = {"health": "ok", "components": {"amqp": {"health": "ok"}}}
        self.api = JunebugApi(
            FixedChannels(self.channels.values()),
            lambda: self.health,
            30,
            self.clock,
            credentials=ApiCredentials(token="list-secret"),
        )
        self.http = StubTreq(self.api.resource())

    def call(
        self, method: str, path: str, body: Any = None, token: str | None = None
    ) -> tuple[int, dict]:
        headers = {"Authorization": f"Token {token}"} if token else {}
        data = None if body is None else json.dumps(body).encode()
        d = self.http.request(method, BASE + path, data=data, headers=headers)
        self.http.flush()
        response = result_of(d)
        raw = result_of(self.http.content(response))
        return response.code, json.loads(raw)


def test_list_channels_sorted() -> None:
    h = Harness()
    assert h.call("GET", "/channels/")[0] == 401
    code, data = h.call("GET", "/channels/", token="list-secret")
    assert (code, data["description"], data["result"]) == (200, "channels listed", ["a", "b"])
    code, data = h.call("GET", "/channels", token="list-secret")
    assert data["result"] == ["a", "b"]


def test_unknown_channel_is_404_channel_not_found() -> None:
    h = Harness()
    for method, path in [
        ("GET", "/channels/zz"),
        ("POST", "/channels/zz/messages"),
        ("POST", "/channels/zz/messages/"),
        ("GET", "/channels/zz/messages/m1"),
        ("GET", "/channels/zz/logs"),
    ]:
        code, data = h.call(method, path, {"to": "1", "content": "x"} if method == "POST" else None)
        assert code == 404, path
        assert data["description"] == "channel not found"
        assert data["result"]["errors"][0]["type"] == "ChannelNotFound"
    assert h.publish.published == []


def test_post_with_and_without_slash_goes_to_the_channels_queue() -> None:
    h = Harness()
    for path in ("/channels/a/messages", "/channels/a/messages/"):
        code, data = h.call("POST", path, {"to": "+2782", "content": "hi"})
        assert (code, data["description"]) == (201, "message submitted")
        assert data["result"]["channel_id"] == "a"
    assert [p.routing_key for p in h.publish.published] == ["a.outbound", "a.outbound"]


def test_a_reply_only_on_the_channel_its_inbound_came_from() -> None:
    """One state cache serves every channel; old Junebug kept inbound messages
    per channel, so a reply to another channel's message is not found."""
    h = Harness()
    inbound = {
        "message_type": "user_message",
        "message_id": "in-a",
        "to_addr": "*120#",
        "from_addr": "+2782",
        "transport_name": "a",
        "transport_type": "ussd",
        "session_event": "new",
    }
    result_of(h.cache.store_inbound(inbound))
    code, data = h.call(
        "POST", "/channels/b/messages", {"reply_to": "in-a", "content": "hi"}, token="b-secret"
    )
    assert code == 400
    assert data["result"]["errors"][0]["type"] == "MessageNotFound"
    assert h.publish.published == []
    code, data = h.call("POST", "/channels/a/messages", {"reply_to": "in-a", "content": "hi"})
    assert code == 201
    assert data["result"]["reply_to"] == "in-a"
    [published] = h.publish.published
    assert published.routing_key == "a.outbound"
    assert json.loads(published.body)["in_reply_to"] == "in-a"


def test_content_over_character_limit_is_400_message_too_long() -> None:
    h = Harness()
    code, data = h.call("POST", "/channels/a/messages", {"to": "+2782", "content": "123456"})
    assert code == 400
    assert data["description"] == "message too long"
    assert data["result"]["errors"][0]["type"] == "MessageTooLong"
    code, _ = h.call("POST", "/channels/a/messages", {"to": "+2782", "content": "12345"})
    assert code == 201
    assert len(h.publish.published) == 1


def test_channel_credentials_are_the_channels_own() -> None:
    h = Harness()
    body = {"to": "+2782", "content": "hi"}
    assert h.call("POST", "/channels/b/messages", body)[0] == 401
    assert h.call("POST", "/channels/b/messages", body, token="list-secret")[0] == 401
    assert h.call("POST", "/channels/b/messages", body, token="b-secret")[0] == 201
    assert h.call("GET", "/channels/b")[0] == 401
    assert h.call("GET", "/channels/b/messages/m1")[0] == 401
    assert h.call("GET", "/channels/b/logs")[0] == 401
    assert h.call("GET", "/channels/b", token="b-secret")[0] == 200


def test_channel_found_has_settings_without_secrets_and_status() -> None:
    h = Harness()
    code, data = h.call("GET", "/channels/b", token="b-secret")
    assert (code, data["description"]) == (200, "channel found")
    text = json.dumps(data)
    assert "b-secret" not in text and "mo-secret" not in text
    result = data["result"]
    assert result["id"] == "b"
    assert result["mo_url"] == MO
    # The channel's own credentials see the path; user info and query values never.
    assert result["default_event_url"] == (
        "https://***@rp.example:8443/c/jn/4a8e2c1e-63d5-4b1f-9b0e-2d5c8f7a1b23/event?token=***&v=***"
    )
    assert "tok3n" not in text and ":pw@" not in text
    status = result["status"]
    assert status["status"] == "ok"
    assert set(status["components"]) == {"amqp", "mo_message_url", "event_url"}
    assert RATES <= set(status)
    _, data = h.call("GET", "/channels/a")
    assert (data["result"]["label"], data["result"]["metadata"]) == ("A", {"k": "v"})
    assert data["result"]["character_limit"] == 5


def test_status_is_down_with_amqp_down() -> None:
    h = Harness()
    h.health = {"health": "down", "components": {"amqp": {"health": "down"}}}
    _, data = h.call("GET", "/channels/a")
    assert data["result"]["status"]["status"] == "down"


def test_outbound_rate_over_the_metric_window() -> None:
    h = Harness()
    for _ in range(20):
        h.call("POST", "/channels/a/messages", {"to": "+2782", "content": "hi"})
    _, data = h.call("GET", "/channels/a")
    assert data["result"]["status"]["outbound_message_rate"] == 0.0  # this second is not over
    h.clock.advance(1)
    _, data = h.call("GET", "/channels/a")
    assert data["result"]["status"]["outbound_message_rate"] == 2.0  # 20 over 10 s
    h.clock.advance(10)
    _, data = h.call("GET", "/channels/a")
    assert data["result"]["status"]["outbound_message_rate"] == 0.0


def test_message_status_lists_events_sorted_as_old_junebug() -> None:
    h = Harness()
    ack = vumi_event("m1", "ack", "2026-11-26 13:23:18.500000")
    dr = vumi_event(
        "m1", "delivery_report", "2026-11-26 13:23:19.000000", delivery_status="delivered"
    )
    # Stored out of order: the answer sorts by timestamp.
    result_of(h.cache.store_message_event("a", "m1", dr["event_id"], status_event(dr, "a")))
    result_of(h.cache.store_message_event("a", "m1", ack["event_id"], status_event(ack, "a")))
    code, data = h.call("GET", "/channels/a/messages/m1")
    assert (code, data["description"]) == (200, "message status")
    assert data["result"] == {
        "id": "m1",
        "last_event_type": "delivery_succeeded",
        "last_event_timestamp": "2026-11-26 13:23:19.000000",
        "events": [
            {
                "channel_id": "a",
                "message_id": "m1",
                "timestamp": "2026-11-26 13:23:18.500000",
                "event_type": "submitted",
                "event_details": {},
            },
            {
                "channel_id": "a",
                "message_id": "m1",
                "timestamp": "2026-11-26 13:23:19.000000",
                "event_type": "delivery_succeeded",
                "event_details": {},
            },
        ],
    }


def test_unknown_message_status_is_200_with_nulls() -> None:
    h = Harness()
    code, data = h.call("GET", "/channels/a/messages/nope")
    assert code == 200
    assert data["result"] == {
        "id": "nope",
        "last_event_type": None,
        "last_event_timestamp": None,
        "events": [],
    }


def test_a_message_id_of_another_channel_is_unknown() -> None:
    h = Harness()
    ack = vumi_event("m1", "ack", "2026-11-26 13:23:18.500000")
    result_of(h.cache.store_message_event("a", "m1", ack["event_id"], status_event(ack, "a")))
    code, data = h.call("GET", "/channels/b/messages/m1", token="b-secret")
    assert (code, data["description"]) == (200, "message status")
    assert data["result"] == {
        "id": "m1",
        "last_event_type": None,
        "last_event_timestamp": None,
        "events": [],
    }
    _, data = h.call("GET", "/channels/a/messages/m1")
    assert data["result"]["last_event_type"] == "submitted"


def test_status_event_mapping() -> None:
    nack = vumi_event("m", "nack", "2026-11-26 13:23:18.000000", nack_reason="no credit")
    pending = vumi_event(
        "m", "delivery_report", "2026-11-26 13:23:19.000000", delivery_status="pending"
    )
    failed = vumi_event(
        "m", "delivery_report", "2026-11-26 13:23:20.000000", delivery_status="failed"
    )
    status = message_status("m", [status_event(e, "c") for e in (failed, nack, pending)])
    assert [(e["event_type"], e["event_details"]) for e in status["events"]] == [
        ("rejected", {"reason": "no credit"}),
        ("delivery_pending", {}),
        ("delivery_failed", {}),
    ]
    assert status["last_event_type"] == "delivery_failed"


def test_create_modify_delete_restart_are_405() -> None:
    h = Harness()
    for method, path in [
        ("POST", "/channels/"),
        ("POST", "/channels/a"),
        ("PUT", "/channels/a"),
        ("DELETE", "/channels/a"),
        ("POST", "/channels/a/restart"),
    ]:
        code, data = h.call(method, path, {})
        assert code == 405, (method, path)
        assert data["description"] == "method not allowed"
        assert "set in the config file" in data["result"]["errors"][0]["message"]


def test_logs_per_channel_newest_first() -> None:
    h = Harness()
    router = ChannelLogRouter(h.channels.values())
    log = logger("junebug_api.test")
    globalLogPublisher.addObserver(router)
    try:
        for i in range(5):
            log.warn("about a {i}", i=i, channel="a")
        log.error("about b", queue="b.inbound")
        log.info("about nobody")
        try:
            raise ZeroDivisionError("division by zero")
        except ZeroDivisionError:
            log.failure("failed for a", Failure(), channel="a")
    finally:
        globalLogPublisher.removeObserver(router)
    code, data = h.call("GET", "/channels/a/logs?n=2")
    assert (code, data["description"]) == (200, "logs retrieved")
    first, second = data["result"]
    assert first["logger"] == "a"
    assert first["level"] == 50  # log.failure is critical
    assert first["message"] == "failed for a"
    assert first["exception"]["class"] == "ZeroDivisionError"
    assert first["exception"]["stack"]
    assert (second["message"], second["level"]) == ("about a 4", 30)
    assert isinstance(second["timestamp"], float)
    _, data = h.call("GET", "/channels/a/logs")
    assert [r["message"] for r in data["result"]] == ["failed for a", "about a 4", "about a 3"]
    _, data = h.call("GET", "/channels/b/logs", token="b-secret")
    assert [(r["message"], r["level"]) for r in data["result"]] == [("about b", 40)]
    code, data = h.call("GET", "/channels/a/logs?n=x")
    assert code == 400


def test_rate_meter_counts_whole_seconds_in_the_window() -> None:
    clock = Clock()
    meter = RateMeter(clock, 4, ["x"])
    meter.hit("x", 8)
    clock.advance(1)
    meter.hit("x", 4)
    assert meter.rate("x") == 2.0  # 8 over 4 s; the current second is not counted
    clock.advance(1)
    assert meter.rate("x") == 3.0
    clock.advance(4)
    assert meter.rate("x") == 0.0


def test_channel_log_keeps_the_last_records() -> None:
    log = ChannelLog("c", 2)
    for i in range(3):
        log.add({"log_format": "r{i}", "i": i, "log_level": LogLevel.info, "log_time": 1.0})
    assert [r["message"] for r in log.newest(10)] == ["r2", "r1"]
    assert log.newest(0) == []
