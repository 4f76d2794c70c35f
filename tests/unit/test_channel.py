"""A Channel's message paths with a RapidPro served in memory: inbound and
events through the channel's workers, the delivery state and rates they
leave, message status, and the per-channel series on /metrics."""

from __future__ import annotations

import json

from twisted.internet.defer import Deferred
from twisted.internet.task import Clock

from junebug_api.channels.channel import ChannelLog, ChannelMetrics
from junebug_api.delivery.retry_policy import RetryPolicy
from junebug_api.observe.metrics import PrometheusMetrics
from junebug_api.state.cache import EventInfo, InMemoryStateCache
from junebug_api.testing import FakeRapidPro, RecordingAcker, RecordingPublisher

from .helpers import result_of
from .test_channels_api import channel_settings, make_channel, vumi_event

MO = "http://rapidpro.example/c/in"
EVENTS = "http://rapidpro.example/c/events"


class Setup:
    def __init__(self) -> None:
        self.clock = Clock()
        self.clock.advance(1000)
        self.rapidpro = FakeRapidPro()
        self.metrics = PrometheusMetrics("c", self.clock)
        self.cache = InMemoryStateCache(self.clock)
        self.publish = RecordingPublisher()
        (settings,) = channel_settings({"c": {"mo_message_url": MO, "default_event_url": EVENTS}})
        self.channel = make_channel(
            settings,
            self.cache,
            self.rapidpro.delivery(self.clock, self.metrics),
            self.publish,
            self.clock,
            policy=RetryPolicy(max_attempts=1),
            max_logs=5,
            metrics=self.metrics,
        )
        self.metrics.watch_channels(lambda: [self.channel])

    def consume(self, queue: str, message: dict) -> RecordingAcker:
        acker = RecordingAcker()
        self.channel.consumers[queue].handle(json.dumps(message).encode(), acker)
        self.rapidpro.flush()
        self.clock.advance(0)
        return acker

    def series(self, name: str) -> dict[str, float]:
        """The samples of one metric family on /metrics, by their labels."""
        text = self.metrics.render()[0].decode()
        samples = {}
        for line in text.splitlines():
            if line.startswith(name + "{") or line.startswith(name + " "):
                labels, _, value = line.rpartition(" ")
                samples[labels[len(name) :]] = float(value)
        return samples


def inbound(message_id: str) -> dict:
    return {
        "message_version": "20110921",
        "message_type": "user_message",
        "message_id": message_id,
        "timestamp": "2026-01-01 00:00:00.000000",
        "to_addr": "8110",
        "from_addr": "+27820000001",
        "content": "hello",
        "transport_name": "c",
        "transport_type": "ussd",
        "session_event": "new",
        "helper_metadata": {},
        "transport_metadata": {},
        "routing_metadata": {},
        "in_reply_to": None,
    }


def test_an_inbound_reaches_rapidpro_and_counts() -> None:
    s = Setup()
    acker = s.consume("c.inbound", inbound("in-1"))
    assert (acker.acks, acker.rejects) == (1, 0)
    (post,) = s.rapidpro.requests
    assert post.uri == b"/c/in" and json.loads(post.body)["message_id"] == "in-1"
    assert s.channel.mo_delivery.status() == {"health": "ok", "in_flight": 0}
    assert s.channel.last_taken("c.inbound") == 1000
    assert s.channel.in_work("c.inbound") == 0
    assert s.channel.in_work("other.queue") is None
    assert s.channel.last_taken("other.queue") is None
    s.clock.advance(1)
    assert s.channel.status({"health": "ok"})["inbound_message_rate"] == 0.1
    assert s.series("junebug_channel_messages_total")['{channel="c",kind="inbound"}'] == 1
    assert s.series("junebug_delivery_post_seconds_count") == {
        '{status_class="2xx",target="mo"}': 1.0,
        '{status_class="2xx",target="event"}': 0.0,
    }


def test_a_failing_rapidpro_degrades_the_channel_until_a_post_succeeds() -> None:
    s = Setup()
    s.rapidpro.code = 500
    acker = s.consume("c.inbound", inbound("in-1"))  # one attempt: dead-lettered
    assert (acker.acks, acker.rejects) == (1, 0)
    assert [p.routing_key for p in s.publish.published] == ["c.inbound.failed"]
    assert s.channel.mo_delivery.status() == {
        "health": "degraded",
        "in_flight": 0,
        # /health is open: the URL as scheme://host:port only.
        "error": "POST to http://rapidpro.example:80 failed: HTTP 500",
    }
    health = s.channel.health({"health": "ok"})
    assert health["health"] == "degraded"
    assert s.series("junebug_channel_delivery_failing")['{channel="c",target="mo"}'] == 1
    s.clock.advance(1)
    s.rapidpro.code = 200
    s.consume("c.inbound", inbound("in-2"))
    assert s.channel.mo_delivery.status() == {"health": "ok", "in_flight": 0}
    assert s.channel.health({"health": "down"})["health"] == "down"


def test_events_go_to_their_url_count_by_kind_and_make_the_message_status() -> None:
    s = Setup()
    result_of(s.cache.store_event_info("c", "out-1", EventInfo("http://rapidpro.example/own", "t")))
    events = [
        vumi_event("out-1", "ack", "2026-01-01 00:00:01", transport_name="c"),
        vumi_event(
            "out-1",
            "delivery_report",
            "2026-01-01 00:00:02",
            transport_name="c",
            delivery_status="delivered",
        ),
        vumi_event("out-2", "nack", "2026-01-01 00:00:03", transport_name="c", nack_reason="no"),
    ]
    for event in events:
        assert s.consume("c.event", event).acks == 1
    assert [r.uri for r in s.rapidpro.requests] == [b"/own", b"/own", b"/c/events"]
    totals = s.channel.rates.totals
    assert (totals["submitted"], totals["delivery_succeeded"], totals["rejected"]) == (1, 1, 1)
    status = result_of(Deferred.fromCoroutine(s.channel.message_status("out-1")))
    assert status["last_event_type"] == "delivery_succeeded"
    assert [e["event_type"] for e in status["events"]] == ["submitted", "delivery_succeeded"]
    assert s.channel.event_delivery.status()["health"] == "ok"


def test_channel_metrics_label_queue_gauges_with_the_channel() -> None:
    s = Setup()
    ChannelMetrics(s.metrics, "c").queue_depth("inbound", 12, 1, True)
    assert s.series("junebug_queue_messages_ready") == {'{channel="c",queue_role="inbound"}': 12}
    assert s.series("junebug_queue_stuck") == {'{channel="c",queue_role="inbound"}': 1}


def test_a_channel_log_record_of_a_failure_without_a_traceback() -> None:
    from twisted.logger import LogLevel
    from twisted.python.failure import Failure

    log = ChannelLog("c", 2)
    failure = Failure(ValueError("bad"))  # made, not raised: no traceback object
    log.add({"log_format": "oops", "log_level": LogLevel.error, "log_failure": failure})
    (record,) = log.newest(5)
    assert record["exception"]["class"] == "ValueError"
    assert record["exception"]["instance"] == "bad"
    assert isinstance(record["exception"]["stack"], list)


def test_a_channel_log_record_shows_urls_as_log_lines_do() -> None:
    from twisted.logger import LogLevel
    from twisted.python.failure import Failure

    url = "http://rp.example/c/jn/0b9e6b6c-5b7a-4e39-9a4c-7d1c1f0a2b3c/receive?token=t0k3n"
    log = ChannelLog("c", 2)
    failure = Failure(ValueError(f"no answer from {url}"))
    log.add({"log_format": "at {url}", "url": url, "log_level": LogLevel.warn})
    log.add({"log_format": "oops", "log_level": LogLevel.error, "log_failure": failure})
    failed, logged = log.newest(2)
    assert logged["message"] == "at http://rp.example/c/jn/***/receive?token=***"
    assert failed["exception"]["instance"] == (
        "no answer from http://rp.example/c/jn/***/receive?token=***"
    )
