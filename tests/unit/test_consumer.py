"""consumer: RetryPolicy backoff and MessageWorker retry/dead-letter/ack logic."""

from __future__ import annotations

from typing import Any

import pytest
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock

from junebug_api.amqp.service import PublishFailed
from junebug_api.delivery.consumer import MessageWorker
from junebug_api.delivery.outcomes import HandlingFailed
from junebug_api.delivery.retry_policy import RetryPolicy
from junebug_api.testing import RecordingAcker, RecordingPublisher, captured_logs

from .helpers import result_of

QUEUE = "conn.inbound"
BODY = '{"message_id": "m-1", "content": "Sawubona 👋 ñ 漢字"}'.encode()


# -- RetryPolicy ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("attempt", "low", "high"),
    [(1, 1.0, 2.0), (2, 2.0, 4.0), (3, 4.0, 8.0), (4, 8.0, 16.0), (5, 10.0, 20.0), (30, 10, 20)],
)
def test_backoff_bounds(attempt: int, low: float, high: float) -> None:
    policy = RetryPolicy(delay=2.0, max_delay=20.0, max_attempts=10)
    assert policy.backoff(attempt, rand=lambda: 0) == low
    assert policy.backoff(attempt, rand=lambda: 1) == high
    assert low < policy.backoff(attempt, rand=lambda: 0.5) < high


def test_backoff_default_random_stays_in_bounds() -> None:
    policy = RetryPolicy(delay=1.0, max_delay=60.0)
    for attempt in range(1, 12):
        ceiling = min(60.0, 2 ** (attempt - 1))
        for _ in range(20):
            assert ceiling / 2 <= policy.backoff(attempt) <= ceiling


def test_backoff_defaults() -> None:
    policy = RetryPolicy()
    assert (policy.delay, policy.max_delay, policy.max_attempts) == (1.0, 60.0, 10)
    assert policy.backoff(1, rand=lambda: 1) == 1.0
    assert policy.backoff(100, rand=lambda: 1) == 60.0


# -- MessageWorker ------------------------------------------------------------------


class ScriptedHandler:
    """Runs the next step per call: an exception to raise, a Deferred, or None."""

    def __init__(self, *steps: Any) -> None:
        self.steps = list(steps)
        self.bodies: list[bytes] = []

    async def __call__(self, body: bytes) -> None:
        self.bodies.append(body)
        step = self.steps.pop(0) if self.steps else None
        if isinstance(step, BaseException):
            raise step
        if isinstance(step, Deferred):
            await step

    @property
    def calls(self) -> int:
        return len(self.bodies)


def make_worker(
    handler: Any, publish: Any = None, **policy: Any
) -> tuple[MessageWorker, Clock, RecordingPublisher]:
    clock = Clock()
    publish = publish if publish is not None else RecordingPublisher()
    policy = {"delay": 1.0, "max_delay": 60.0, "max_attempts": 5, **policy}
    worker = MessageWorker(QUEUE, handler, publish, RetryPolicy(**policy), clock)
    return worker, clock, publish


def retryable(reason: str = "rapidpro down") -> HandlingFailed:
    return HandlingFailed(reason, retryable=True, message_id="m-1")


def test_success_acks_once() -> None:
    handler = ScriptedHandler(None)
    worker, clock, publish = make_worker(handler)
    acker = RecordingAcker()
    worker(BODY, acker)
    assert handler.bodies == [BODY]
    assert acker.acks == 1
    assert acker.rejects == 0
    assert publish.published == []
    assert worker.in_flight == 0
    assert clock.getDelayedCalls() == []


def test_ack_waits_for_the_handler() -> None:
    pending: Deferred[None] = Deferred()
    handler = ScriptedHandler(pending)
    worker, _, _ = make_worker(handler)
    acker = RecordingAcker()
    worker(BODY, acker)
    assert acker.acks == 0
    assert worker.in_flight == 1
    pending.callback(None)
    assert acker.acks == 1
    assert worker.in_flight == 0


def test_retries_then_success_acks_after_backoffs() -> None:
    handler = ScriptedHandler(retryable(), retryable(), None)
    worker, clock, publish = make_worker(handler, delay=1.0)
    acker = RecordingAcker()
    worker(BODY, acker)
    assert handler.calls == 1
    # First wait is between 0.5 and 1 s.
    clock.advance(0.49)
    assert handler.calls == 1
    assert acker.acks == 0
    clock.advance(0.51)
    assert handler.calls == 2
    assert acker.acks == 0
    # Second wait is between 1 and 2 s.
    clock.advance(0.99)
    assert handler.calls == 2
    assert acker.acks == 0
    clock.advance(1.01)
    assert handler.calls == 3
    assert acker.acks == 1
    assert acker.rejects == 0
    assert publish.published == []
    assert handler.bodies == [BODY] * 3
    assert worker.in_flight == 0
    assert clock.getDelayedCalls() == []


def test_unexpected_exception_is_retried() -> None:
    handler = ScriptedHandler(KeyError("boom"), None)
    worker, clock, publish = make_worker(handler)
    acker = RecordingAcker()
    worker(BODY, acker)
    assert acker.acks == 0
    clock.advance(1)
    assert handler.calls == 2
    assert acker.acks == 1
    assert publish.published == []


def test_permanent_failure_dead_letters_then_acks() -> None:
    publish = RecordingPublisher(auto_confirm=False)
    reason = "RapidPro said 400: ñ 漢字 👋"
    handler = ScriptedHandler(HandlingFailed(reason, retryable=False, message_id="m-1"))
    worker, clock, _ = make_worker(handler, publish)
    acker = RecordingAcker()
    worker(BODY, acker)
    assert handler.calls == 1
    assert len(publish.published) == 1
    sent = publish.published[0]
    assert sent.routing_key == "conn.inbound.failed"
    assert sent.routing_key == worker.failed_queue
    assert sent.body == BODY
    assert sent.message_id == "m-1"
    headers = sent.headers
    assert headers["x-junebug-reason"].isascii()
    assert headers["x-junebug-reason"] == reason.encode("ascii", "backslashreplace").decode()
    assert headers["x-junebug-reason"].startswith("RapidPro said 400: \\xf1 \\u6f22")
    assert headers["x-junebug-attempts"] == 1
    assert headers["x-junebug-source-queue"] == QUEUE
    assert isinstance(headers["x-junebug-failed-at"], str)
    # Acked only once the dead letter is confirmed.
    assert acker.acks == 0
    publish.confirm()
    assert acker.acks == 1
    assert acker.rejects == 0
    assert clock.getDelayedCalls() == []
    assert worker.in_flight == 0


def test_long_reason_is_truncated() -> None:
    handler = ScriptedHandler(HandlingFailed("x" * 5000, retryable=False))
    worker, _, publish = make_worker(handler)
    worker(BODY, RecordingAcker())
    assert len(publish.published[0].headers["x-junebug-reason"]) == 1000


def test_dead_letter_without_message_id_gets_one() -> None:
    handler = ScriptedHandler(HandlingFailed("bad", retryable=False))
    worker, _, publish = make_worker(handler)
    worker(b'{"no": "id"}', RecordingAcker())
    message_id = publish.published[0].message_id
    assert isinstance(message_id, str)
    assert len(message_id) == 32


def test_dead_letter_of_a_body_its_handler_refused_keeps_the_body_id() -> None:
    handler = ScriptedHandler(HandlingFailed("invalid inbound message", retryable=False))
    worker, _, publish = make_worker(handler)
    worker(BODY, RecordingAcker())
    assert publish.published[0].message_id == "m-1"


def test_max_attempts_exhausted_dead_letters() -> None:
    handler = ScriptedHandler(*[retryable("try again") for _ in range(10)])
    worker, clock, publish = make_worker(handler, max_attempts=3, delay=1.0)
    acker = RecordingAcker()
    worker(BODY, acker)
    clock.advance(1)  # wait after attempt 1: <= 1 s
    assert handler.calls == 2
    assert publish.published == []
    clock.advance(2)  # wait after attempt 2: <= 2 s
    assert handler.calls == 3
    assert len(publish.published) == 1
    sent = publish.published[0]
    assert sent.routing_key == "conn.inbound.failed"
    assert sent.body == BODY
    assert sent.headers["x-junebug-attempts"] == 3
    assert sent.headers["x-junebug-reason"] == "try again"
    assert acker.acks == 1
    assert clock.getDelayedCalls() == []


def test_max_attempts_one_means_no_retry() -> None:
    handler = ScriptedHandler(retryable())
    worker, clock, publish = make_worker(handler, max_attempts=1)
    acker = RecordingAcker()
    worker(BODY, acker)
    assert handler.calls == 1
    assert publish.published[0].headers["x-junebug-attempts"] == 1
    assert acker.acks == 1
    assert clock.getDelayedCalls() == []


def test_dead_letter_publish_failed_rejects_after_a_growing_backoff() -> None:
    """A .failed queue that refuses messages is no hot loop: each release
    waits, longer for each failure in a row, and a success resets it."""
    publish = RecordingPublisher()
    publish.fail_next(*[PublishFailed("nacked")] * 3)
    handler = ScriptedHandler(*[HandlingFailed("bad", retryable=False) for _ in range(4)])
    worker, clock, _ = make_worker(handler, publish)
    waits = []
    for _ in range(3):
        acker = RecordingAcker()
        worker(BODY, acker)
        assert acker.rejects == 0
        waited = 0.0
        while not acker.rejects:
            clock.advance(0.25)
            waited += 0.25
        waits.append(waited)
        assert acker.acks == 0
    assert waits == [0.5, 1.0, 2.0]
    acker = RecordingAcker()
    worker(BODY, acker)  # the fourth publish succeeds
    assert acker.acks == 1
    assert worker.in_flight == 0


def test_connection_lost_during_handling_neither_acks_nor_dead_letters() -> None:
    acker = RecordingAcker()

    async def handler(body: bytes) -> None:
        acker.alive = False
        raise HandlingFailed("bad", retryable=False)

    worker, clock, publish = make_worker(handler)
    worker(BODY, acker)
    assert acker.acks == 0
    assert acker.rejects == 0
    assert publish.published == []
    assert clock.getDelayedCalls() == []
    assert worker.in_flight == 0


def test_connection_lost_during_retryable_failure_stops_retrying() -> None:
    acker = RecordingAcker()
    calls = []

    async def handler(body: bytes) -> None:
        calls.append(body)
        acker.alive = False
        raise retryable()

    worker, clock, publish = make_worker(handler)
    worker(BODY, acker)
    assert clock.getDelayedCalls() == []
    clock.advance(100)
    assert len(calls) == 1
    assert (acker.acks, acker.rejects, publish.published) == (0, 0, [])


def test_messages_are_independent() -> None:
    first: Deferred[None] = Deferred()
    handler = ScriptedHandler(first, None)
    worker, _, _ = make_worker(handler)
    a, b = RecordingAcker(), RecordingAcker()
    worker(b"one", a)
    worker(b"two", b)
    assert (a.acks, b.acks) == (0, 1)
    assert worker.in_flight == 1
    first.callback(None)
    assert a.acks == 1


# -- drain --------------------------------------------------------------------------


def test_drain_nothing_in_flight() -> None:
    worker, clock, _ = make_worker(ScriptedHandler())
    assert result_of(Deferred.fromCoroutine(worker.drain(5))) == 0
    assert clock.getDelayedCalls() == []


def test_drain_gives_up_a_retry_wait() -> None:
    handler = ScriptedHandler(retryable())
    worker, clock, publish = make_worker(handler, delay=100.0, max_delay=100.0)
    acker = RecordingAcker()
    worker(BODY, acker)
    assert worker.in_flight == 1
    # A retry wait is given up at once, without waiting for the timeout.
    assert result_of(Deferred.fromCoroutine(worker.drain(5))) == 1
    assert worker.in_flight == 0
    clock.advance(1000)
    assert handler.calls == 1
    assert (acker.acks, acker.rejects, publish.published) == (0, 0, [])
    assert clock.getDelayedCalls() == []


def test_drain_waits_for_work_that_finishes_in_time() -> None:
    pending: Deferred[None] = Deferred()
    worker, clock, _ = make_worker(ScriptedHandler(pending))
    acker = RecordingAcker()
    worker(BODY, acker)
    d = Deferred.fromCoroutine(worker.drain(5))
    clock.advance(4)
    assert not d.called
    pending.callback(None)
    assert result_of(d) == 0
    assert acker.acks == 1
    assert clock.getDelayedCalls() == []


def _drain_with_stuck_handler(
    timeout: float,
) -> tuple[int, RecordingAcker, Deferred, MessageWorker]:
    stuck: Deferred[None] = Deferred()
    worker, clock, _ = make_worker(ScriptedHandler(stuck))
    acker = RecordingAcker()
    worker(BODY, acker)
    d = Deferred.fromCoroutine(worker.drain(timeout))
    if timeout:
        clock.advance(timeout - 0.5)
        assert not d.called
        clock.advance(0.5)
    return result_of(d), acker, stuck, worker


def test_drain_cancels_stuck_work_after_timeout() -> None:
    _, acker, stuck, worker = _drain_with_stuck_handler(5)
    assert stuck.called  # cancelled
    assert worker.in_flight == 0
    assert (acker.acks, acker.rejects) == (0, 0)


@pytest.mark.parametrize("timeout", [5, 0])
def test_drain_counts_stuck_work_it_cancelled(timeout: float) -> None:
    cancelled, _, _, _ = _drain_with_stuck_handler(timeout)
    assert cancelled == 1


def test_no_retry_after_drain() -> None:
    handler = ScriptedHandler(retryable())
    worker, clock, publish = make_worker(handler)
    assert result_of(Deferred.fromCoroutine(worker.drain(5))) == 0
    acker = RecordingAcker()
    worker(BODY, acker)
    assert clock.getDelayedCalls() == []
    assert (acker.acks, acker.rejects, publish.published) == (0, 0, [])
    assert worker.in_flight == 0


# -- what is known of a message, and errors no handler should raise ------------------


def test_last_taken_is_when_a_message_was_last_acked() -> None:
    worker, clock, _ = make_worker(ScriptedHandler(None, HandlingFailed("bad", retryable=False)))
    assert worker.last_taken is None
    clock.advance(7)
    worker(BODY, RecordingAcker())
    assert worker.last_taken == 7
    clock.advance(3)
    worker(BODY, RecordingAcker())  # dead-lettered: taken too
    assert worker.last_taken == 10


@pytest.mark.parametrize(
    "message_id", ["x" * 256, "\ud800", ""], ids=["too long", "not UTF-8", "empty"]
)
def test_a_message_id_that_cannot_be_an_amqp_message_id_is_replaced(message_id: str) -> None:
    handler = ScriptedHandler(HandlingFailed("bad", retryable=False, message_id=message_id))
    worker, _, publish = make_worker(handler)
    worker(BODY, RecordingAcker())
    [sent] = publish.published
    assert sent.message_id != message_id
    assert len(sent.message_id) == 32


def test_an_error_outside_the_handler_is_logged_with_the_message_id() -> None:
    """A failing ack (a bug, not a delivery problem) is no silent loss: logged."""

    class BrokenAcker(RecordingAcker):
        def ack(self) -> None:
            raise RuntimeError("ack failed")

    worker, _, _ = make_worker(ScriptedHandler(None))
    with captured_logs() as logged:
        d = worker.handle(BODY, BrokenAcker())
    assert result_of(d) is None  # logged, not left unhandled in the Deferred
    [line] = [e for e in logged if "log_failure" in e]
    assert line["message_id"] == "m-1"
    assert line["queue"] == QUEUE
    assert worker.in_flight == 0
