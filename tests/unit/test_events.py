"""EventHandler: a vumi event goes to its message's event URL (or the default),
as Junebug JSON, through a fake RapidPro; with nowhere to go it is dropped."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.task import Clock

from junebug_api.delivery.events import EventHandler
from junebug_api.delivery.outcomes import DROPPED
from junebug_api.observe.log import set_log_level
from junebug_api.state.cache import EventInfo
from junebug_api.testing import BreakableStateCache, FakeRapidPro, captured_logs

from .helpers import HandlerRun, result_of

EVENT_URL = "http://ev:secret@rp.example/events/1?token=tok3n&x"
# As a log line shows it: user info and query values masked.
SAFE_EVENT_URL = "http://***@rp.example/events/1?token=***&***"
DEFAULT_URL = "http://rp.example/default-events"


def vumi_event(event_type: str = "ack", **fields: Any) -> dict[str, Any]:
    return {
        "message_type": "event",
        "event_type": event_type,
        "event_id": "ev-1",
        "user_message_id": "out-1",
        "sent_message_id": "out-1",
        "timestamp": "2024-01-02 03:04:05.000006",
        **fields,
    }


def body_of(event: dict[str, Any]) -> bytes:
    return json.dumps(event).encode("utf-8")


class Harness(HandlerRun):
    def __init__(self, code: int = 200, default_url: str | None = None, **options: Any) -> None:
        self.clock = Clock()
        self.cache = BreakableStateCache(self.clock)
        self.rapidpro = FakeRapidPro(code)
        self.seen: list[dict[str, Any]] = []
        self.done: list[dict[str, Any]] = []
        self.handler = EventHandler(
            cache=self.cache,
            delivery=self.rapidpro.delivery(self.clock),
            channel_id="chan",
            default_url=default_url,
            default_auth_token="default-token" if default_url else None,
            timeout=10.0,
            on_done=self.done.append,
            **options,
        )


@pytest.fixture
def debug_logging() -> Iterator[None]:
    set_log_level("debug")
    yield
    set_log_level("info")


def test_an_event_naming_another_channels_message_goes_to_its_own_default_url() -> None:
    h = Harness(default_url=DEFAULT_URL)
    result_of(h.cache.store_event_info("other", "out-1", EventInfo(EVENT_URL, "ev-token")))
    assert result_of(h.handle(body_of(vumi_event()))) is None
    [post] = h.rapidpro.requests
    assert (post.uri, post.header("Authorization")) == (
        b"/default-events",
        [b"Token default-token"],
    )


def test_event_goes_to_the_url_stored_with_its_message() -> None:
    h = Harness(default_url=DEFAULT_URL)
    result_of(h.cache.store_event_info("chan", "out-1", EventInfo(EVENT_URL, "ev-token")))
    assert result_of(h.handle(body_of(vumi_event()))) is None  # delivered
    [post] = h.rapidpro.requests
    assert post.uri == b"/events/1?token=tok3n&x"  # the real URL, query and all
    assert post.header("Authorization") == [b"Token ev-token"]
    assert json.loads(post.body) == {
        "event_type": "submitted",
        "message_id": "out-1",
        "channel_id": "chan",
        "timestamp": "2024-01-02 03:04:05.000006",
        "event_details": {},
    }
    assert [e["event_id"] for e in h.done] == ["ev-1"]


def test_event_without_a_stored_url_goes_to_the_default_url() -> None:
    h = Harness(default_url=DEFAULT_URL)
    result_of(h.handle(body_of(vumi_event("nack", nack_reason="no credit"))))
    [post] = h.rapidpro.requests
    assert post.uri == b"/default-events"
    assert post.header("Authorization") == [b"Token default-token"]
    sent = json.loads(post.body)
    assert (sent["event_type"], sent["event_details"]) == ("rejected", {"reason": "no credit"})


def test_event_with_nowhere_to_go_is_logged_and_dropped() -> None:
    h = Harness(default_url=None)
    with captured_logs() as logged:
        result = result_of(
            h.handle(body_of(vumi_event("delivery_report", delivery_status="failed")))
        )
    assert result == DROPPED
    assert h.rapidpro.requests == []
    [line] = [e for e in logged if e.get("message_id") == "out-1"]
    assert "No event URL" in line["log_format"]
    assert (line["event_type"], line["event_id"], line["channel"]) == (
        "delivery_report",
        "ev-1",
        "chan",
    )
    assert len(h.done) == 1  # counted for the channel's rates all the same


def test_on_event_sees_each_event_before_it_is_delivered() -> None:
    order: list[str] = []

    def on_event(event: dict[str, Any]) -> Deferred[None]:
        order.append(f"status {event['event_type']}")
        return succeed(None)

    h = Harness(default_url=DEFAULT_URL, on_event=on_event)
    h.rapidpro.answer(200)
    result_of(h.handle(body_of(vumi_event())))
    order.append(f"posted {len(h.rapidpro.requests)}")
    assert order == ["status ack", "posted 1"]


def test_a_failing_on_event_is_retried_like_a_cache_failure() -> None:
    h = Harness(default_url=DEFAULT_URL, on_event=lambda e: fail(ConnectionError("down")))
    failure = h.failure(body_of(vumi_event()))
    assert failure.retryable is True
    assert failure.reason == "state cache unavailable: down"
    assert h.rapidpro.requests == []
    assert h.done == []


def test_a_cache_failure_is_retryable_and_posts_nothing() -> None:
    h = Harness(default_url=DEFAULT_URL)
    h.cache.break_with(TimeoutError("Redis did not answer"))
    failure = h.failure(body_of(vumi_event()))
    assert (failure.retryable, failure.message_id) == (True, "out-1")
    assert failure.reason == "state cache unavailable: Redis did not answer"
    assert h.rapidpro.requests == []


def test_a_body_over_the_limit_is_refused_unread() -> None:
    h = Harness(default_url=DEFAULT_URL, max_body_size=50)
    failure = h.refusal(body_of(vumi_event(padding="x" * 100)))
    assert "over the 50 bytes" in failure.reason


@pytest.mark.parametrize(
    ("event", "reason"),
    [
        (vumi_event(message_type="user_message"), "message_type must be event"),
        (vumi_event(event_type="read"), "event_type must be one of"),
        (vumi_event("delivery_report", delivery_status="lost"), "delivery_status must be"),
        (vumi_event(user_message_id=None), "user_message_id must be a non-empty string"),
    ],
)
def test_an_invalid_event_is_a_permanent_failure(event: dict[str, Any], reason: str) -> None:
    h = Harness(default_url=DEFAULT_URL)
    failure = h.refusal(body_of(event))
    assert failure.reason.startswith("invalid event: ")
    assert reason in failure.reason


def test_an_event_that_cannot_be_json_is_a_permanent_failure() -> None:
    h = Harness(default_url=DEFAULT_URL)
    body = body_of(vumi_event("nack", nack_reason="REASON")).replace(b"REASON", b"\\ud800")
    failure = h.failure(body)
    assert (failure.retryable, failure.message_id) == (False, "out-1")
    assert failure.reason.startswith("event cannot be sent on: ")
    assert h.rapidpro.requests == []


@pytest.mark.parametrize(("code", "retryable"), [(502, True), (404, False)])
def test_a_failed_post_names_the_event_type_and_the_url_without_its_secret(
    code: int, retryable: bool
) -> None:
    h = Harness(code)
    result_of(h.cache.store_event_info("chan", "out-1", EventInfo(EVENT_URL, None)))
    failure = h.failure(body_of(vumi_event()))
    assert failure.retryable is retryable
    assert failure.url == SAFE_EVENT_URL
    assert failure.reason == f"POST of ack event to {SAFE_EVENT_URL} failed: HTTP {code}"
    assert h.done == []  # not done: it goes back for another try or to .failed


def test_a_delivered_event_is_logged_at_debug_level(debug_logging: None) -> None:
    h = Harness(default_url=DEFAULT_URL)
    with captured_logs() as logged:
        result_of(h.handle(body_of(vumi_event())))
    [line] = [e for e in logged if e.get("message_id") == "out-1"]
    assert line["log_format"] == "Delivered event for message {message_id}"
