"""Outages: the per-destination tracker, the worker's budgets and delay
queues, and pausing a queue while its destination is down (all on Clock)."""

from __future__ import annotations

import gc
from typing import Any

import pytest
from twisted.internet.defer import Deferred, succeed
from twisted.internet.task import Clock

from junebug_api.amqp.service import PublishFailed
from junebug_api.delivery.consumer import MessageWorker
from junebug_api.delivery.headers import ATTEMPTS_HEADER, FIRST_FAILURE_HEADER, HOLDS_HEADER
from junebug_api.delivery.outages import OutageTracker, describe_destination, destination_of
from junebug_api.delivery.outcomes import HandlingFailed
from junebug_api.delivery.pause_while_down import PauseWhileDown
from junebug_api.delivery.retry_policy import RetryPolicy, pick_delay
from junebug_api.formats.queue_names import delay_queues
from junebug_api.testing import (
    RecordingAcker,
    RecordingPublisher,
    RecordingQueueControl,
    captured_logs,
)

from .helpers import result_of
from .test_consumer import BODY, QUEUE, ScriptedHandler

RAPIDPRO = destination_of("http://rapidpro.example:8000/c/jn/x/receive")
RETRY_QUEUES = delay_queues(QUEUE)


# -- destinations -------------------------------------------------------------


def test_destination_is_scheme_host_port_without_credentials() -> None:
    assert destination_of("https://u:p@Example.org/a?b") == ("https", "example.org", 443)
    assert destination_of("http://example.org/a") == ("http", "example.org", 80)
    assert destination_of("http://127.0.0.1:8000/x") == ("http", "127.0.0.1", 8000)
    assert describe_destination(destination_of("http://[::1]:81/")) == "http://[::1]:81"


# -- OutageTracker ------------------------------------------------------------


def make_tracker() -> tuple[OutageTracker, Clock, list[tuple[Any, bool]]]:
    clock = Clock()
    tracker = OutageTracker(clock, threshold=3, probe_interval=5.0)
    changes: list[tuple[Any, bool]] = []
    tracker.subscribe(lambda dest, down: changes.append((dest, down)))
    return tracker, clock, changes


def test_down_after_threshold_consecutive_failures_only() -> None:
    tracker, clock, changes = make_tracker()
    tracker.failed(RAPIDPRO)
    tracker.failed(RAPIDPRO)
    tracker.succeeded(RAPIDPRO)  # a success in between: not an outage
    tracker.failed(RAPIDPRO)
    tracker.failed(RAPIDPRO)
    assert not tracker.is_down(RAPIDPRO)
    assert changes == []
    clock.advance(100)
    tracker.failed(RAPIDPRO)
    assert tracker.is_down(RAPIDPRO)
    assert changes == [(RAPIDPRO, True)]
    health = tracker.health()
    assert health["health"] == "ok"
    assert health["destinations_down"] == {
        "http://rapidpro.example:8000": {"down_since": "1970-01-01 00:01:40", "failures": 3}
    }


def test_down_destination_admits_one_probe_per_interval() -> None:
    tracker, clock, changes = make_tracker()
    for _ in range(3):
        tracker.failed(RAPIDPRO)
    assert not tracker.admit(RAPIDPRO)
    clock.advance(4.9)
    assert not tracker.admit(RAPIDPRO)
    clock.advance(0.1)
    assert tracker.admit(RAPIDPRO)  # the probe
    assert not tracker.admit(RAPIDPRO)  # only one at a time
    tracker.failed(RAPIDPRO)
    assert tracker.is_down(RAPIDPRO)
    assert not tracker.admit(RAPIDPRO)
    clock.advance(5)
    assert tracker.admit(RAPIDPRO)
    tracker.abandoned(RAPIDPRO)  # cancelled: the next may probe
    assert tracker.admit(RAPIDPRO)
    tracker.succeeded(RAPIDPRO)
    assert not tracker.is_down(RAPIDPRO)
    assert tracker.admit(RAPIDPRO)
    assert changes == [(RAPIDPRO, True), (RAPIDPRO, False)]
    assert tracker.health()["destinations_down"] == {}


def test_other_destinations_are_unaffected() -> None:
    tracker, _, _ = make_tracker()
    other = destination_of("http://events.example/")
    for _ in range(5):
        tracker.failed(RAPIDPRO)
    assert tracker.is_down(RAPIDPRO)
    assert tracker.admit(other)
    assert not tracker.is_down(other)


# -- MessageWorker: delay queues and budgets -----------------------------------


def make_worker(
    handler: Any, publish: Any = None, gate: Any = None, **policy: Any
) -> tuple[MessageWorker, Clock, RecordingPublisher]:
    clock = Clock()
    clock.advance(1_000_000)
    publish = publish if publish is not None else RecordingPublisher()
    policy = {"delay": 1.0, "max_delay": 60.0, "max_attempts": 5, **policy}
    worker = MessageWorker(
        QUEUE,
        handler,
        publish,
        RetryPolicy(**policy),
        clock,
        retry_queues=RETRY_QUEUES,
        hold_gate=gate,
    )
    return worker, clock, publish


def failing(reason: str = "HTTP 503", held: bool = False) -> HandlingFailed:
    return HandlingFailed(reason, retryable=True, message_id="m-1", held=held)


def test_pick_delay() -> None:
    delays = [5, 20, 60, 300]
    assert pick_delay(delays, 0.1) == 5
    assert pick_delay(delays, 19.9) == 5
    assert pick_delay(delays, 20) == 20
    assert pick_delay(delays, 59) == 20
    assert pick_delay(delays, 1000) == 300


def test_short_retries_wait_in_process() -> None:
    handler = ScriptedHandler(failing(), failing(), None)
    worker, clock, publish = make_worker(handler, delay=1.0)
    acker = RecordingAcker()
    worker(BODY, acker)
    clock.advance(1)  # backoff 0.5-1 s: in the process
    clock.advance(2)  # 1-2 s
    assert handler.calls == 3
    assert publish.published == []
    assert acker.acks == 1


def test_longer_retries_wait_on_a_delay_queue() -> None:
    """A backoff of a few seconds or more (here 5-10 s) goes to the delay
    queue not longer than it, with its attempt count; the delivery is acked."""
    handler = ScriptedHandler(failing())
    worker, clock, publish = make_worker(handler, delay=10.0)
    acker = RecordingAcker()
    worker(BODY, acker)
    sent = publish.published[0]
    assert sent.routing_key == f"{QUEUE}.retry.5"
    assert sent.body == BODY
    headers = sent.headers
    assert headers[ATTEMPTS_HEADER] == 1
    assert headers[FIRST_FAILURE_HEADER] == 1_000_000
    assert headers[HOLDS_HEADER] == 0
    assert headers["x-junebug-reason"] == "HTTP 503"
    assert acker.acks == 1
    assert worker.in_flight == 0
    assert clock.getDelayedCalls() == []


def test_attempts_continue_from_the_headers() -> None:
    """A restart (or a trip through a delay queue) resets nothing."""
    handler = ScriptedHandler(failing())
    worker, _clock, publish = make_worker(handler, max_attempts=5)
    acker = RecordingAcker()
    acker.headers = {ATTEMPTS_HEADER: 4, FIRST_FAILURE_HEADER: 999_000}
    worker(BODY, acker)
    sent = publish.published[0]
    assert sent.routing_key == f"{QUEUE}.failed"
    assert sent.headers[ATTEMPTS_HEADER] == 5
    assert sent.headers[FIRST_FAILURE_HEADER] == 999_000
    assert acker.acks == 1


def test_max_age_dead_letters_without_an_attempt() -> None:
    handler = ScriptedHandler(None)
    worker, _clock, publish = make_worker(handler, max_age=3600)
    acker = RecordingAcker()
    acker.headers = {ATTEMPTS_HEADER: 1, FIRST_FAILURE_HEADER: 1_000_000 - 3600}
    worker(BODY, acker)
    assert handler.calls == 0
    sent = publish.published[0]
    assert sent.routing_key == f"{QUEUE}.failed"
    assert "delivery_max_age" in sent.headers["x-junebug-reason"]
    assert acker.acks == 1


def test_young_enough_message_is_tried() -> None:
    handler = ScriptedHandler(None)
    worker, _, publish = make_worker(handler, max_age=3600)
    acker = RecordingAcker()
    acker.headers = {ATTEMPTS_HEADER: 1, FIRST_FAILURE_HEADER: 1_000_000 - 3599}
    worker(BODY, acker)
    assert handler.calls == 1
    assert publish.published == []
    assert acker.acks == 1


def test_held_messages_spend_no_attempts_and_wait_on_delay_queues() -> None:
    handler = ScriptedHandler(failing("down", held=True))
    worker, _, publish = make_worker(handler, max_attempts=1)
    acker = RecordingAcker()
    worker(BODY, acker)
    sent = publish.published[0]
    assert sent.routing_key == f"{QUEUE}.retry.5"
    assert sent.headers[ATTEMPTS_HEADER] == 0
    assert sent.headers[HOLDS_HEADER] == 1
    assert acker.acks == 1
    # Held again: the longer wait.
    handler = ScriptedHandler(failing("down", held=True))
    worker, _, publish = make_worker(handler, max_attempts=1)
    acker = RecordingAcker()
    acker.headers = sent.headers
    worker(BODY, acker)
    sent = publish.published[0]
    assert sent.routing_key == f"{QUEUE}.retry.20"
    assert sent.headers[ATTEMPTS_HEADER] == 0
    assert sent.headers[HOLDS_HEADER] == 2


def test_in_process_wait_respects_max_hold() -> None:
    """A retry that would keep the delivery unacked past max_hold goes to a
    delay queue even when it is short."""
    handler = ScriptedHandler(failing(), failing())
    worker, _clock, publish = make_worker(handler, delay=4.0, max_hold=12, attempt_timeout=10)
    acker = RecordingAcker()
    worker(BODY, acker)
    # 2-4 s + 10 s for the next attempt > 12 s
    assert publish.published[0].routing_key == f"{QUEUE}.retry.5"
    assert acker.acks == 1


class FakeGate:
    def __init__(self) -> None:
        self.waiting: list[Deferred[None]] = []

    def wait_paused(self) -> Deferred[None]:
        d: Deferred[None] = Deferred()
        self.waiting.append(d)
        return d


def test_held_message_of_a_pausing_queue_goes_back_once_paused() -> None:
    gate = FakeGate()
    handler = ScriptedHandler(failing("down", held=True))
    worker, _, publish = make_worker(handler, gate=gate)
    acker = RecordingAcker()
    worker(BODY, acker)
    assert acker.rejects == 0
    gate.waiting[0].callback(None)
    assert acker.rejects == 1
    assert acker.acks == 0
    assert publish.published == []


# -- PauseWhileDown -------------------------------------------------------------


def test_pause_while_down_probes_then_resumes() -> None:
    clock = Clock()
    tracker = OutageTracker(clock, threshold=2, probe_interval=5.0)
    control = RecordingQueueControl()
    control.ready = [b"first", b"second"]
    outcomes = ["fail", "ok"]
    probes: list[bytes] = []

    def probe(body: bytes, acker: Any) -> Deferred[None]:
        probes.append(body)
        assert tracker.admit(RAPIDPRO)
        if outcomes.pop(0) == "ok":
            tracker.succeeded(RAPIDPRO)
        else:
            tracker.failed(RAPIDPRO)
        return succeed(None)

    gate = PauseWhileDown(QUEUE, RAPIDPRO, tracker, control, probe, clock, probe_interval=5.0)
    tracker.failed(destination_of("http://elsewhere/"))
    tracker.failed(destination_of("http://elsewhere/"))
    assert control.calls == []  # another destination: not ours
    tracker.failed(RAPIDPRO)
    tracker.failed(RAPIDPRO)
    assert gate.paused
    assert control.calls == [f"pause {QUEUE}"]
    assert gate.wait_paused().called
    clock.advance(4.9)
    assert probes == []
    clock.advance(0.1)
    assert probes == [b"first"]  # failed: still paused
    assert gate.paused
    clock.advance(5)
    assert probes == [b"first", b"second"]
    assert not gate.paused
    assert control.calls == [f"pause {QUEUE}", f"get {QUEUE}", f"get {QUEUE}", f"resume {QUEUE}"]
    assert clock.getDelayedCalls() == []


def test_a_stopped_gate_follows_its_destination_no_more() -> None:
    """Its channel stopped or changed: the queue may have a new consumer,
    which the old gate must neither pause nor resume."""
    clock = Clock()
    tracker = OutageTracker(clock, threshold=1, probe_interval=5.0)
    control = RecordingQueueControl()
    gate = PauseWhileDown(
        QUEUE, RAPIDPRO, tracker, control, lambda b, a: succeed(None), clock, probe_interval=5.0
    )
    gate.stop()
    tracker.failed(RAPIDPRO)
    clock.advance(10)
    tracker.succeeded(RAPIDPRO)
    assert control.calls == []


def test_pause_keeps_polling_an_empty_queue_and_stops_on_shutdown() -> None:
    clock = Clock()
    tracker = OutageTracker(clock, threshold=1, probe_interval=5.0)
    control = RecordingQueueControl()
    gate = PauseWhileDown(
        QUEUE, RAPIDPRO, tracker, control, lambda b, a: succeed(None), clock, probe_interval=5.0
    )
    tracker.failed(RAPIDPRO)
    clock.advance(5)
    clock.advance(5)
    assert control.calls == [f"pause {QUEUE}", f"get {QUEUE}", f"get {QUEUE}"]
    gate.stop()
    assert clock.getDelayedCalls() == []


@pytest.mark.parametrize("down", [True, False])
def test_wait_paused_pauses_only_while_down(down: bool) -> None:
    clock = Clock()
    tracker = OutageTracker(clock, threshold=1)
    control = RecordingQueueControl()
    gate = PauseWhileDown(QUEUE, RAPIDPRO, tracker, control, lambda b, a: succeed(None), clock)
    if down:
        tracker.failed(RAPIDPRO)
    assert gate.wait_paused().called
    assert control.calls == ([f"pause {QUEUE}"] if down else [])
    assert gate.paused == down


def test_held_messages_leave_no_cyclic_garbage() -> None:
    """During an outage every event is held again and again: each one must be
    freed at once, not left in a cycle (frame -> failure -> traceback ->
    frame) for the collector, whose full runs are rare (service.py)."""

    class DownHandler:
        async def __call__(self, body: bytes) -> None:
            try:
                raise ConnectionRefusedError("down")
            except ConnectionRefusedError:
                raise failing("down", held=True) from None

    worker, _, publish = make_worker(DownHandler())
    worker(BODY, RecordingAcker())  # warm up
    gc.collect()
    gc.disable()
    try:
        for _ in range(100):
            worker(BODY, RecordingAcker())
        garbage = gc.collect()
    finally:
        gc.enable()
    assert len(publish.published) == 101
    assert garbage < 100


def test_a_delay_queue_that_refuses_the_message_releases_it_after_a_backoff() -> None:
    """The longer retry branch: the move to the delay queue is not confirmed,
    so the delivery goes back to its queue (after 0.5 s), unacked, not lost."""
    handler = ScriptedHandler(failing())
    publish = RecordingPublisher()
    publish.fail_next(PublishFailed("nacked"))
    worker, clock, _ = make_worker(handler, publish, delay=10.0)
    acker = RecordingAcker()
    with captured_logs() as logged:
        worker(BODY, acker)
        assert [p.routing_key for p in publish.published] == [f"{QUEUE}.retry.5"]
        assert (acker.acks, acker.rejects) == (0, 0)
        clock.advance(0.5)
    assert (acker.acks, acker.rejects) == (0, 1)
    assert worker.in_flight == 0
    [line] = [e for e in logged if e.get("why")]
    assert line["why"] == f"Could not move it to {QUEUE}.retry.5 (nacked)"


def test_a_release_waiting_out_its_backoff_is_released_at_once_by_drain() -> None:
    handler = ScriptedHandler(failing())
    publish = RecordingPublisher()
    publish.fail_next(PublishFailed("nacked"))
    worker, clock, _ = make_worker(handler, publish, delay=10.0)
    acker = RecordingAcker()
    worker(BODY, acker)
    assert result_of(Deferred.fromCoroutine(worker.drain(5))) == 1
    assert (acker.acks, acker.rejects) == (0, 1)  # back to its queue now
    assert clock.getDelayedCalls() == []


def test_a_held_message_without_delay_queues_or_gate_goes_back_at_once() -> None:
    handler = ScriptedHandler(failing("down", held=True))
    publish = RecordingPublisher()
    worker = MessageWorker(QUEUE, handler, publish, RetryPolicy(max_attempts=1), Clock())
    acker = RecordingAcker()
    worker(BODY, acker)
    assert (acker.acks, acker.rejects) == (0, 1)
    assert publish.published == []  # no attempt spent, nothing dead-lettered


class SlowGetControl(RecordingQueueControl):
    """Answers each ``get`` once told to (``answer``), as a broker far away does."""

    def __init__(self) -> None:
        super().__init__()
        self.gets: list[Deferred[Any]] = []

    async def get(self, queue: str) -> Any:
        self.calls.append(f"get {queue}")
        d: Deferred[Any] = Deferred()
        self.gets.append(d)
        return await d


def test_a_probe_taken_after_its_gate_stopped_goes_back_to_its_queue() -> None:
    """The channel stopped or changed while its probe's ``basic.get`` was on
    its way: the message it took is not delivered with the old settings by
    a worker already drained (nothing would release it if that failed, until
    the watchdog), but goes back to its queue for the channel's next consumer."""
    clock = Clock()
    tracker = OutageTracker(clock, threshold=1, probe_interval=5.0)
    control = SlowGetControl()
    probes: list[bytes] = []

    def probe(body: bytes, acker: Any) -> Deferred[None]:
        probes.append(body)
        return succeed(None)

    gate = PauseWhileDown(QUEUE, RAPIDPRO, tracker, control, probe, clock, probe_interval=5.0)
    tracker.failed(RAPIDPRO)
    clock.advance(5)
    assert control.calls == [f"pause {QUEUE}", f"get {QUEUE}"]
    gate.stop()
    acker = RecordingAcker()
    control.gets[0].callback((b"taken late", {}, acker))
    assert probes == []
    assert (acker.acks, acker.rejects) == (0, 1)
    assert clock.getDelayedCalls() == []
