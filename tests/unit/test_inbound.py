"""InboundHandler: an inbound vumi message is cached, then POSTed to a fake RapidPro."""

from __future__ import annotations

import json
from typing import Any

import pytest
from twisted.internet.task import Clock

from junebug_api.delivery.inbound import InboundHandler
from junebug_api.delivery.outages import OutageTracker
from junebug_api.observe.log import set_log_level
from junebug_api.observe.metrics import Metrics
from junebug_api.testing import BreakableStateCache, FakeRapidPro, captured_logs

from .helpers import HandlerRun, result_of

URL = "http://user:secret@rp.example/c/jn/4a8e2c1e-63d5-4b1f-9b0e-2d5c8f7a1b23/receive?t=tok3n"
# As a log line shows it: user info, the channel's UUID and query values masked.
SAFE_URL = "http://***@rp.example/c/jn/***/receive?t=***"
UNICODE_TEXT = "Sawubona, ngiyabonga 👋 ñ 漢字"


def inbound(**fields: Any) -> dict[str, Any]:
    return {
        "message_type": "user_message",
        "message_id": "in-1",
        "transport_name": "conn",
        "to_addr": "8110",
        "from_addr": "+27820000001",
        "content": UNICODE_TEXT,
        "session_event": "new",
        "helper_metadata": {"k": 1},
        "timestamp": "2024-01-02 03:04:05.000006",
        **fields,
    }


def body_of(message: dict[str, Any] | str) -> bytes:
    return (message if isinstance(message, str) else json.dumps(message)).encode("utf-8")


class CountingMetrics(Metrics):
    def __init__(self) -> None:
        self.cache_errors = 0

    def cache_error(self) -> None:
        self.cache_errors += 1


class Harness(HandlerRun):
    def __init__(self, code: int = 200, **options: Any) -> None:
        self.clock = Clock()
        self.cache = BreakableStateCache(self.clock)
        self.rapidpro = FakeRapidPro(code)
        self.metrics = CountingMetrics()
        self.outages = OutageTracker(self.clock, threshold=2)
        self.handler = InboundHandler(
            cache=self.cache,
            delivery=self.rapidpro.delivery(self.clock, outages=self.outages),
            url=URL,
            auth_token=options.pop("auth_token", "tok"),
            timeout=10.0,
            metrics=self.metrics,
            **options,
        )


def test_message_is_cached_then_posted_as_junebug_json() -> None:
    h = Harness()
    result_of(h.handle(body_of(inbound())))
    cached = result_of(h.cache.fetch_inbound("in-1"))
    assert (cached["from_addr"], cached["to_addr"]) == ("+27820000001", "8110")  # for replies
    [post] = h.rapidpro.requests
    assert post.uri == b"/c/jn/4a8e2c1e-63d5-4b1f-9b0e-2d5c8f7a1b23/receive?t=tok3n"
    assert post.header("Authorization") == [b"Token tok"]
    assert json.loads(post.body) == {
        "to": "8110",
        "from": "+27820000001",
        "group": None,
        "message_id": "in-1",
        "channel_id": "conn",
        "timestamp": "2024-01-02 03:04:05.000006",
        "reply_to": None,
        "content": UNICODE_TEXT,
        "channel_data": {"k": 1, "session_event": "new"},
    }
    assert UNICODE_TEXT.encode("utf-8") in post.body  # UTF-8, not \u escapes


def test_without_a_token_the_url_credentials_are_basic_auth() -> None:
    h = Harness(auth_token=None)
    result_of(h.handle(body_of(inbound())))
    [post] = h.rapidpro.requests
    assert post.header("Authorization")[0].startswith(b"Basic ")


def test_a_body_over_the_limit_is_refused_unread() -> None:
    h = Harness(max_body_size=100)
    failure = h.refusal(body_of(inbound(content="x" * 200)))
    assert "over the 100 bytes" in failure.reason
    assert result_of(h.cache.fetch_inbound("in-1")) is None


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        ("not json", "body is not JSON"),
        ('["a list"]', "not a JSON object"),
        (json.dumps(inbound(message_type="event")), "message_type must be user_message"),
        (json.dumps(inbound(message_id="")), "message_id must be a non-empty string"),
    ],
)
def test_an_invalid_message_is_a_permanent_failure(body: str, reason: str) -> None:
    h = Harness()
    failure = h.refusal(body_of(body))
    assert failure.reason.startswith("invalid inbound message: ")
    assert reason in failure.reason


def test_a_cache_failure_is_retryable_and_counted_and_nothing_is_posted() -> None:
    h = Harness()
    h.cache.break_with(ConnectionError("Redis went away"))
    failure = h.failure(body_of(inbound()))
    assert failure.retryable is True
    assert failure.message_id == "in-1"
    assert failure.reason == "state cache unavailable: Redis went away"
    assert h.metrics.cache_errors == 1
    assert h.rapidpro.requests == []
    h.cache.mend()
    result_of(h.handle(body_of(inbound())))
    assert len(h.rapidpro.requests) == 1


def test_a_message_that_cannot_be_json_is_a_permanent_failure() -> None:
    h = Harness()
    # A lone surrogate parses, but no strict UTF-8 JSON can carry it on.
    failure = h.refusal(body_of(inbound()).replace(b"Sawubona", b"\\ud800"))
    assert failure.message_id == "in-1"
    assert failure.reason.startswith("inbound message cannot be sent on: ")


@pytest.mark.parametrize(("code", "retryable"), [(503, True), (408, True), (400, False)])
def test_a_failed_post_says_whether_to_retry_without_the_url_secret(
    code: int, retryable: bool
) -> None:
    h = Harness(code)
    failure = h.failure(body_of(inbound()))
    assert failure.retryable is retryable
    assert failure.held is False
    assert failure.message_id == "in-1"
    assert failure.url == SAFE_URL
    assert failure.reason == f"POST to {SAFE_URL} failed: HTTP {code}"
    assert "secret" not in failure.reason


def test_a_post_to_a_destination_that_is_down_is_held() -> None:
    h = Harness(503)
    assert h.failure(body_of(inbound())).held is False
    assert h.failure(body_of(inbound())).held is True  # the second 503 in a row: down
    failure = h.failure(body_of(inbound(message_id="in-2")))
    assert failure.held is True
    assert failure.retryable is True
    assert "rp.example:80 is down" in failure.reason
    assert len(h.rapidpro.requests) == 2  # no POST for the held one


def test_a_delivery_is_logged_at_debug_level_only() -> None:
    h = Harness()
    with captured_logs() as quiet:
        result_of(h.handle(body_of(inbound())))
    set_log_level("debug")
    try:
        with captured_logs() as verbose:
            result_of(h.handle(body_of(inbound(message_id="in-2"))))
    finally:
        set_log_level("info")
    assert [e for e in quiet if e.get("message_id")] == []
    [line] = [e for e in verbose if e.get("message_id") == "in-2"]
    assert line["log_format"] == "Delivered inbound message {message_id}"
