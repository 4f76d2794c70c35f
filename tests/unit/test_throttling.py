"""Throttling is not failure: a 429 (or a 503 with Retry-After) holds the
destination like an outage, spends no attempt, and its Retry-After is
honoured within [MIN_RETRY_AFTER, MAX_RETRY_AFTER] (all on Clock)."""

from __future__ import annotations

import json
from email.utils import formatdate
from typing import Any

import pytest
from twisted.internet.defer import Deferred, succeed
from twisted.internet.task import Clock
from twisted.web.http_headers import Headers

from junebug_api.delivery.consumer import MessageWorker
from junebug_api.delivery.headers import ATTEMPTS_HEADER, HOLDS_HEADER
from junebug_api.delivery.http_delivery import (
    MAX_RETRY_AFTER,
    MIN_RETRY_AFTER,
    DeliveryFailed,
    answer_failure,
    retry_after_seconds,
)
from junebug_api.delivery.inbound import InboundHandler
from junebug_api.delivery.outages import OutageTracker, destination_of
from junebug_api.delivery.outcomes import HandlingFailed
from junebug_api.delivery.pause_while_down import PauseWhileDown
from junebug_api.delivery.retry_policy import RetryPolicy
from junebug_api.formats.queue_names import delay_queues
from junebug_api.testing import (
    BreakableStateCache,
    FakeRapidPro,
    RecordingAcker,
    RecordingPublisher,
    RecordingQueueControl,
    captured_logs,
)

from .helpers import result_of
from .test_consumer import BODY, QUEUE, ScriptedHandler
from .test_inbound import body_of, inbound

NOW = 1_700_000_000.0
URL = "http://rp.example/c/jn/uuid/receive"
RAPIDPRO = destination_of(URL)


# -- reading Retry-After -------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "wait"),
    [
        (b"120", 120.0),
        (b" 7 ", 7.0),
        (b"0", MIN_RETRY_AFTER),
        (b"86400", MAX_RETRY_AFTER),
        (b"9" * 400, MAX_RETRY_AFTER),
        (formatdate(NOW + 90, usegmt=True).encode(), 90.0),  # IMF-fixdate
        (b"Tuesday, 14-Nov-23 22:13:50 GMT", 30.0),  # RFC 850
        (b"Tue Nov 14 22:13:50 2023", 30.0),  # asctime
        (formatdate(NOW - 3600, usegmt=True).encode(), MIN_RETRY_AFTER),  # past
        (formatdate(NOW + 10 * 86400, usegmt=True).encode(), MAX_RETRY_AFTER),
        (b"-5", None),
        (b"1.5", None),
        (b"+5", None),
        (b"soon", None),
        (b"", None),
        (b"\xff\xfe", None),
        (b"Tue, 99 Foo 2023 25:61:61 GMT", None),
        ("٣".encode(), None),  # a digit, but not an ASCII one
    ],
)
def test_retry_after_is_read_and_clamped(value: bytes, wait: float | None) -> None:
    assert retry_after_seconds([value], NOW) == wait


def test_no_retry_after_is_none() -> None:
    assert retry_after_seconds(None, NOW) is None
    assert retry_after_seconds([], NOW) is None


def failure_for(code: int, retry_after: str | None = None) -> DeliveryFailed:
    headers = Headers()
    if retry_after is not None:
        headers.setRawHeaders(b"Retry-After", [retry_after.encode()])
    return answer_failure(code, headers, NOW)


def test_429_is_throttling_with_or_without_retry_after() -> None:
    bare = failure_for(429)
    assert (bare.throttled, bare.held, bare.retryable, bare.outage) == (True, True, True, False)
    assert bare.retry_after is None
    assert bare.reason == "HTTP 429 (throttled)"
    timed = failure_for(429, "30")
    assert timed.retry_after == 30.0
    assert timed.reason == "HTTP 429 (throttled, Retry-After 30 s)"
    assert timed.status_class == "4xx"


def test_503_is_throttling_only_with_a_readable_retry_after() -> None:
    assert failure_for(503, "10").throttled
    for failure in (failure_for(503), failure_for(503, "whenever")):
        assert not failure.throttled and failure.outage and not failure.held
        assert failure.reason == "HTTP 503"


@pytest.mark.parametrize("code", [400, 408, 500, 502])
def test_other_answers_ignore_retry_after(code: int) -> None:
    assert not failure_for(code, "10").throttled


# -- the tracker -----------------------------------------------------------------------


def make_tracker() -> tuple[OutageTracker, Clock, list[tuple[Any, bool]]]:
    clock = Clock()
    clock.advance(NOW)
    tracker = OutageTracker(clock, threshold=5, probe_interval=5.0)
    changes: list[tuple[Any, bool]] = []
    tracker.subscribe(lambda dest, down: changes.append((dest, down)))
    return tracker, clock, changes


def test_throttling_holds_at_once_until_the_wait_is_over() -> None:
    tracker, clock, changes = make_tracker()
    with captured_logs() as logged:
        assert tracker.throttled(RAPIDPRO, 30.0) == 30.0
        assert tracker.throttled(RAPIDPRO, 10.0) == 30.0  # a shorter wait does not shorten it
    assert changes == [(RAPIDPRO, True)]
    assert len([e for e in logged if "asks to wait" in e["log_format"]]) == 1
    assert tracker.is_down(RAPIDPRO)
    assert tracker.next_probe_in(RAPIDPRO) == 30.0
    entry = tracker.health()["destinations_down"]["http://rp.example:80"]
    assert entry["throttled_until"] == "2023-11-14 22:13:50"
    assert entry["failures"] == 0
    clock.advance(29.9)
    assert not tracker.admit(RAPIDPRO)
    clock.advance(0.1)
    assert tracker.next_probe_in(RAPIDPRO) == 0.0
    assert tracker.admit(RAPIDPRO)  # the probe
    assert not tracker.admit(RAPIDPRO)
    assert tracker.throttled(RAPIDPRO, 60.0) == 60.0  # still throttling: longer
    assert not tracker.admit(RAPIDPRO)
    clock.advance(60)
    assert tracker.admit(RAPIDPRO)
    with captured_logs() as logged:
        tracker.succeeded(RAPIDPRO)
    assert changes == [(RAPIDPRO, True), (RAPIDPRO, False)]
    [back] = logged
    assert back["how"] == "throttled"
    assert tracker.next_probe_in(RAPIDPRO) == 0.0


def test_without_retry_after_it_waits_the_probe_interval() -> None:
    tracker, _, _ = make_tracker()
    assert tracker.throttled(RAPIDPRO, None) == 5.0


def test_a_throttled_destination_that_then_fails_is_down() -> None:
    tracker, clock, _ = make_tracker()
    tracker.throttled(RAPIDPRO, 2.0)
    clock.advance(2)
    assert tracker.admit(RAPIDPRO)
    tracker.failed(RAPIDPRO)  # a 5xx from the probe
    entry = tracker.health()["destinations_down"]["http://rp.example:80"]
    assert "throttled_until" not in entry
    assert tracker.next_probe_in(RAPIDPRO) == 5.0


# -- HttpDelivery with a tracker ------------------------------------------------------


def post(delivery: Any, rapidpro: FakeRapidPro) -> DeliveryFailed | int:
    d = Deferred.fromCoroutine(delivery.post_json(URL, b"{}", None, 10.0))
    rapidpro.flush()
    try:
        return result_of(d)
    except DeliveryFailed as e:
        return e


def test_a_429_holds_the_destination_for_its_retry_after() -> None:
    clock = Clock()
    clock.advance(NOW)
    rapidpro = FakeRapidPro(429)
    rapidpro.response_headers = {"Retry-After": "30"}
    outages = OutageTracker(clock, threshold=5, probe_interval=5.0)
    delivery = rapidpro.delivery(clock, outages=outages)
    first = post(delivery, rapidpro)
    assert isinstance(first, DeliveryFailed)
    assert first.held and first.throttled and first.retry_after == 30.0
    assert outages.is_down(RAPIDPRO)
    clock.advance(10)
    held = post(delivery, rapidpro)
    assert isinstance(held, DeliveryFailed)
    assert held.held and held.retry_after == 20.0
    assert len(rapidpro.requests) == 1  # not hammered
    clock.advance(20)
    rapidpro.code = 200
    assert post(delivery, rapidpro) == 200  # the probe
    assert not outages.is_down(RAPIDPRO)
    assert len(rapidpro.requests) == 2


def test_the_inbound_handler_says_held_and_how_long() -> None:
    clock = Clock()
    rapidpro = FakeRapidPro(503)
    rapidpro.response_headers = {"Retry-After": "45"}
    handler = InboundHandler(
        BreakableStateCache(clock),
        rapidpro.delivery(clock, outages=OutageTracker(clock)),
        URL,
        None,
        10.0,
    )
    d = Deferred.fromCoroutine(handler(body_of(inbound())))
    rapidpro.flush()
    with pytest.raises(HandlingFailed) as info:
        result_of(d)
    assert info.value.held and info.value.retryable
    assert info.value.wait == 45.0
    assert info.value.reason.endswith("HTTP 503 (throttled, Retry-After 45 s)")


# -- the worker: no attempt spent, the wait honoured ------------------------------------


def throttled(wait: float | None = None) -> HandlingFailed:
    return HandlingFailed(
        "HTTP 429 (throttled)", retryable=True, message_id="m-1", held=True, wait=wait
    )


def make_worker(handler: Any) -> tuple[MessageWorker, Clock, RecordingPublisher]:
    clock = Clock()
    clock.advance(NOW)
    publish = RecordingPublisher()
    worker = MessageWorker(
        QUEUE,
        handler,
        publish,
        RetryPolicy(max_attempts=3),
        clock,
        retry_queues=delay_queues(QUEUE),
    )
    return worker, clock, publish


def test_throttled_deliveries_spend_no_attempt() -> None:
    worker, _, publish = make_worker(ScriptedHandler(*[throttled() for _ in range(10)]))
    headers: dict[str, Any] = {}
    for _ in range(10):
        worker(BODY, RecordingAcker(headers=headers))
        headers = publish.published[-1].headers
    assert all(p.routing_key.startswith(f"{QUEUE}.retry.") for p in publish.published)
    assert headers[ATTEMPTS_HEADER] == 0
    assert headers[HOLDS_HEADER] == 10


@pytest.mark.parametrize(("wait", "queue"), [(None, 5), (3.0, 5), (60.0, 60), (300.0, 300)])
def test_a_held_event_waits_at_least_as_long_as_asked(wait: float | None, queue: int) -> None:
    worker, _, publish = make_worker(ScriptedHandler(throttled(wait)))
    worker(BODY, RecordingAcker())
    assert publish.published[0].routing_key == f"{QUEUE}.retry.{queue}"


def test_a_paused_queue_is_probed_after_the_retry_after() -> None:
    clock = Clock()
    tracker = OutageTracker(clock, probe_interval=5.0)
    control = RecordingQueueControl(b"one", b"two")
    PauseWhileDown(
        QUEUE, RAPIDPRO, tracker, control, lambda b, a: succeed(None), clock, probe_interval=5.0
    )
    tracker.throttled(RAPIDPRO, 40.0)
    assert control.calls == [f"pause {QUEUE}"]
    clock.advance(39.9)
    assert control.calls == [f"pause {QUEUE}"]
    clock.advance(0.1)
    assert control.calls == [f"pause {QUEUE}", f"get {QUEUE}"]
    clock.advance(5)  # the probe did not answer: probe_interval again
    assert control.calls[-1] == f"get {QUEUE}" and len(control.calls) == 3


# -- 429 for a while with a small budget, end to end on Clock -------------------------------


def test_a_throttling_spell_dead_letters_nothing_and_is_not_hammered() -> None:
    """RapidPro answers 429 (Retry-After 3) for 15 s, then 200; with
    delivery_max_attempts 3 every message is delivered, none dead-lettered,
    and RapidPro sees one request per Retry-After at most."""
    clock = Clock()
    clock.advance(NOW)
    rapidpro = FakeRapidPro(429)
    rapidpro.response_headers = {"Retry-After": "3"}
    outages = OutageTracker(clock, probe_interval=1.0)
    handler = InboundHandler(
        BreakableStateCache(clock), rapidpro.delivery(clock, outages=outages), URL, None, 10.0
    )
    publish = RecordingPublisher()
    worker = MessageWorker(
        QUEUE,
        handler,
        publish,
        RetryPolicy(delay=0.1, max_delay=0.5, max_attempts=3),
        clock,
        retry_queues=delay_queues(QUEUE),
    )
    due: list[tuple[float, bytes, dict[str, Any]]] = []

    def deliver(body: bytes, headers: dict[str, Any]) -> None:
        worker(body, RecordingAcker(headers=headers))
        rapidpro.flush()

    ids = [f"in-{n}" for n in range(10)]
    for message_id in ids:
        deliver(body_of(inbound(message_id=message_id)), {})
    seen = 0
    for tick in range(600):  # 60 s in steps of 0.1 s
        if tick == 150:
            rapidpro.code = 200
            rapidpro.response_headers = {}
        for publication in publish.published[seen:]:
            delay = int(publication.routing_key.rsplit(".", 1)[1])
            due.append((clock.seconds() + delay, publication.body, publication.headers or {}))
        seen = len(publish.published)
        clock.advance(0.1)
        for item in [d for d in due if d[0] <= clock.seconds()]:
            due.remove(item)
            deliver(item[1], item[2])
    delivered = [json.loads(r.body)["message_id"] for r in rapidpro.requests[-10:]]
    assert sorted(delivered) == ids
    assert not any(p.routing_key.endswith(".failed") for p in publish.published)
    # The first burst (all ten in flight at once), then one probe per 3 s.
    throttled_requests = len(rapidpro.requests) - 10
    assert throttled_requests <= 10 + 15 / 3 + 1
    assert worker.in_flight == 0
