"""No delivery is stranded: whatever goes wrong in any step of one, it ends
acked, rejected back to its queue or on .failed, with a log line naming its
message id; the watchdog releases any delivery held past the hold limit;
``in_flight`` counts what is really held."""

from __future__ import annotations

import struct
from types import SimpleNamespace
from typing import Any

import pytest
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock

from junebug_api.amqp.service import PublishFailed
from junebug_api.config.checks import ConfigError
from junebug_api.config.delivery_options import DELIVERY_HOLD_GRACE, check_hold_bound
from junebug_api.delivery.consumer import MessageWorker
from junebug_api.delivery.headers import ATTEMPTS_HEADER, FIRST_FAILURE_HEADER, HOLDS_HEADER
from junebug_api.delivery.outcomes import HandlingFailed
from junebug_api.delivery.retry_policy import RetryPolicy
from junebug_api.delivery.watchdog import Delivery, HoldWatchdog
from junebug_api.formats.queue_names import delay_queues
from junebug_api.observe.metrics import Metrics
from junebug_api.testing import RecordingAcker, RecordingPublisher, captured_logs

from .test_consumer import BODY, QUEUE, ScriptedHandler

FAILED = f"{QUEUE}.failed"
HOSTILE_HEADERS = {
    ATTEMPTS_HEADER: 2**63 - 1,
    HOLDS_HEADER: 2**64 - 1,
    FIRST_FAILURE_HEADER: -1e300,
}


def make_worker(
    handler: Any,
    publish: Any = None,
    *,
    gate: Any = None,
    metrics: Metrics | None = None,
    retry_queues: bool = True,
    **policy: Any,
) -> tuple[MessageWorker, Clock, RecordingPublisher]:
    clock = Clock()
    clock.advance(1_700_000_000)
    publish = publish if publish is not None else RecordingPublisher()
    policy = {"delay": 1.0, "max_delay": 60.0, "max_attempts": 5, "max_hold": 20, **policy}
    extra: dict[str, Any] = {"metrics": metrics} if metrics is not None else {}
    worker = MessageWorker(
        QUEUE,
        handler,
        publish,
        RetryPolicy(**policy),
        clock,
        retry_queues=delay_queues(QUEUE) if retry_queues else {},
        hold_gate=gate,
        **extra,
    )
    return worker, clock, publish


def errors(logged: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The log events at warning level or above."""
    return [e for e in logged if e["log_level"].name in ("warn", "error", "critical")]


def settled(acker: RecordingAcker) -> tuple[int, int]:
    return acker.acks, acker.rejects


# -- each step that can go wrong ---------------------------------------------------


def test_hostile_budget_headers_are_ignored_with_a_warning_and_the_message_delivered() -> None:
    worker, _, publish = make_worker(ScriptedHandler(None))
    acker = RecordingAcker(headers=dict(HOSTILE_HEADERS))
    with captured_logs() as logged:
        worker(BODY, acker)
    assert settled(acker) == (1, 0)
    assert publish.published == []
    [warning] = errors(logged)
    assert warning["message_id"] == "m-1"
    for name in HOSTILE_HEADERS:
        assert name in warning["headers"]


@pytest.mark.parametrize("retryable", [True, False])
def test_hostile_headers_then_a_failure_write_sane_headers(retryable: bool) -> None:
    """The case that stranded deliveries: the headers are written again."""
    handler = ScriptedHandler(HandlingFailed("HTTP 500", retryable=retryable, message_id="m-1"))
    worker, clock, publish = make_worker(handler, delay=10, max_delay=10)
    acker = RecordingAcker(headers=dict(HOSTILE_HEADERS))
    worker(BODY, acker)
    assert settled(acker) == (1, 0)
    [moved] = publish.published
    assert moved.routing_key == (f"{QUEUE}.retry.5" if retryable else FAILED)
    assert moved.headers[ATTEMPTS_HEADER] == 1
    assert moved.headers[HOLDS_HEADER] == 0
    assert moved.headers[FIRST_FAILURE_HEADER] == int(clock.seconds())
    assert worker.in_flight == 0


def test_a_publish_that_raises_is_a_failed_publish_and_the_message_is_released() -> None:
    """struct.error (or anything) raised by publish itself, at once."""

    def publish(*args: Any, **kwargs: Any) -> Deferred[None]:
        raise struct.error("argument out of range")

    handler = ScriptedHandler(HandlingFailed("HTTP 500", retryable=True, message_id="m-1"))
    worker, clock, _ = make_worker(handler, publish, delay=10, max_delay=10)
    acker = RecordingAcker()
    with captured_logs() as logged:
        worker(BODY, acker)
        assert settled(acker) == (0, 0)  # released after a pause: no hot loop
        clock.advance(0.5)
    assert settled(acker) == (0, 1)
    [line] = errors(logged)
    assert line["message_id"] == "m-1"
    assert "error: argument out of range" in line["why"]
    assert worker.in_flight == 0
    assert clock.getDelayedCalls() == []


def test_a_dead_letter_publish_that_fails_late_releases_the_message() -> None:
    publish = RecordingPublisher()
    publish.fail_next(TypeError("cannot encode"))
    handler = ScriptedHandler(HandlingFailed("HTTP 400", retryable=False, message_id="m-1"))
    worker, clock, _ = make_worker(handler, publish)
    acker = RecordingAcker()
    with captured_logs() as logged:
        worker(BODY, acker)
        clock.advance(0.5)
    assert settled(acker) == (0, 1)
    assert [e["message_id"] for e in errors(logged)] == ["m-1"]


def test_urls_in_a_failed_reason_are_masked_as_in_logs() -> None:
    """An error whose text holds a callback URL (user info, a token in the
    query, RapidPro's channel UUID in the path) parks the message on .failed
    with the URL shown as log lines show it."""
    secret_url = (
        "https://rp:pw-s3cret@rapidpro.example/c/jn/0f3c2f7e-1234-4a5b-9c8d-abcdef012345"
        "/receive?token=tok-s3cret"
    )
    handler = ScriptedHandler(
        HandlingFailed(f"could not reach {secret_url}.", retryable=False, message_id="m-1")
    )
    worker, _, publish = make_worker(handler, delay=10, max_delay=10)
    acker = RecordingAcker()
    with captured_logs():
        worker(BODY, acker)
    assert settled(acker) == (1, 0)
    [parked] = publish.published
    assert parked.routing_key == FAILED
    reason = parked.headers["x-junebug-reason"]
    assert "s3cret" not in reason and "0f3c2f7e" not in reason
    assert "https://***@rapidpro.example/c/jn/***/receive?token=***." in reason


def test_an_error_building_headers_parks_the_message_on_failed() -> None:
    """A reason that is no text (a handler's bug) breaks the header building:
    the message goes to .failed with the error as its reason."""
    handler = ScriptedHandler(HandlingFailed(b"bytes", retryable=True, message_id="m-1"))  # type: ignore[arg-type]
    worker, _, publish = make_worker(handler, delay=10, max_delay=10)
    acker = RecordingAcker()
    with captured_logs() as logged:
        worker(BODY, acker)
    assert settled(acker) == (1, 0)
    [parked] = publish.published
    assert parked.routing_key == FAILED
    assert parked.message_id == "m-1"
    assert parked.headers["x-junebug-reason"].startswith("internal error: AttributeError")
    named = [e.get("message_id") for e in errors(logged)]
    assert named and set(named) == {"m-1"}


class BrokenGate:
    def wait_paused(self) -> Deferred[None]:
        raise RuntimeError("gate broken")


def test_a_broken_hold_gate_parks_the_message_on_failed() -> None:
    handler = ScriptedHandler(HandlingFailed("down", retryable=True, held=True, message_id="m-1"))
    worker, _, publish = make_worker(handler, gate=BrokenGate())
    acker = RecordingAcker()
    with captured_logs() as logged:
        worker(BODY, acker)
    assert settled(acker) == (1, 0)
    assert [p.routing_key for p in publish.published] == [FAILED]
    assert any(e.get("message_id") == "m-1" and "log_failure" in e for e in logged)


class FailingAcker(RecordingAcker):
    def ack(self) -> None:
        super().ack()
        raise RuntimeError("ack failed")


def test_an_ack_that_fails_rejects_instead() -> None:
    worker, _, _ = make_worker(ScriptedHandler(None))
    acker = FailingAcker()
    with captured_logs() as logged:
        worker(BODY, acker)
    assert settled(acker) == (1, 1)
    [line] = [e for e in logged if "log_failure" in e]
    assert line["message_id"] == "m-1"
    assert worker.in_flight == 0


class UnrejectableAcker(RecordingAcker):
    def ack(self) -> None:
        raise RuntimeError("ack failed")

    def reject(self) -> None:
        raise RuntimeError("reject failed")


def test_an_ack_and_a_reject_that_both_fail_are_logged() -> None:
    worker, _, _ = make_worker(ScriptedHandler(None))
    with captured_logs() as logged:
        d = worker.handle(BODY, UnrejectableAcker())
    assert d.called
    lines = [e for e in logged if "log_failure" in e]
    assert [e["message_id"] for e in lines] == ["m-1", "m-1"]
    assert "when the connection closes" in lines[1]["log_format"]


class BrokenMetrics(Metrics):
    def now(self) -> float:
        raise RuntimeError("metrics broken")


def test_an_error_even_while_parking_it_releases_the_delivery() -> None:
    """The last line of defence: an error escaping everything else is
    logged and the delivery rejected back to its queue."""
    handler = ScriptedHandler(HandlingFailed("HTTP 400", retryable=False, message_id="m-1"))
    worker, clock, _ = make_worker(handler, metrics=BrokenMetrics())
    acker = RecordingAcker()
    with captured_logs() as logged:
        d = worker.handle(BODY, acker)
    assert d.called
    assert settled(acker) == (0, 1)
    released = [e for e in logged if "released" in e.get("log_format", "")]
    assert [e["message_id"] for e in released] == ["m-1"]
    assert worker.in_flight == 0
    assert clock.getDelayedCalls() == []


def test_an_unparsable_body_is_named_by_its_new_id() -> None:
    handler = ScriptedHandler(HandlingFailed("invalid inbound message", retryable=False))
    worker, _, publish = make_worker(handler)
    with captured_logs() as logged:
        worker(b"\xff not json", RecordingAcker())
    [parked] = publish.published
    [line] = errors(logged)
    assert line["message_id"] == parked.message_id
    assert len(parked.message_id) == 32


# -- the watchdog -------------------------------------------------------------------


def test_the_hold_limit_is_a_little_over_max_hold() -> None:
    assert RetryPolicy(max_hold=60, attempt_timeout=10).hold_limit == 60 + DELIVERY_HOLD_GRACE
    assert RetryPolicy(max_hold=5, attempt_timeout=10).hold_limit == 10 + DELIVERY_HOLD_GRACE


def test_a_hung_handler_is_released_at_the_hold_limit() -> None:
    hung: Deferred[None] = Deferred()
    worker, clock, _ = make_worker(ScriptedHandler(hung), max_hold=20, attempt_timeout=10)
    acker = RecordingAcker()
    with captured_logs() as logged:
        d = worker.handle(BODY, acker)
        assert worker.in_flight == 1
        clock.advance(24.9)
        assert settled(acker) == (0, 0)
        clock.advance(0.1)
    assert settled(acker) == (0, 1)
    assert hung.called  # its work cancelled
    assert d.called
    [line] = errors(logged)
    assert line["message_id"] == "m-1"
    assert "released back to its queue" in line["log_format"]
    assert worker.in_flight == 0
    assert clock.getDelayedCalls() == []


def test_a_confirm_that_never_comes_is_released_at_the_hold_limit() -> None:
    publish = RecordingPublisher(auto_confirm=False)
    handler = ScriptedHandler(HandlingFailed("HTTP 400", retryable=False, message_id="m-1"))
    worker, clock, _ = make_worker(handler, publish)
    acker = RecordingAcker()
    worker(BODY, acker)
    clock.advance(25)
    assert settled(acker) == (0, 1)
    assert publish.pending == []  # the wait for the confirm was cancelled
    assert worker.in_flight == 0


class NeverPausedGate:
    def __init__(self) -> None:
        self.waiters: list[Deferred[None]] = []

    def wait_paused(self) -> Deferred[None]:
        self.waiters.append(Deferred())
        return self.waiters[-1]


def test_a_pause_that_never_completes_is_released_at_the_hold_limit() -> None:
    gate = NeverPausedGate()
    handler = ScriptedHandler(HandlingFailed("down", retryable=True, held=True, message_id="m-1"))
    worker, clock, _ = make_worker(handler, gate=gate)
    acker = RecordingAcker()
    worker(BODY, acker)
    clock.advance(25)
    assert settled(acker) == (0, 1)
    gate.waiters[0].callback(None)  # the pause completes late: nothing more happens
    assert settled(acker) == (0, 1)


def test_each_delivery_is_released_at_its_own_limit() -> None:
    first: Deferred[None] = Deferred()
    second: Deferred[None] = Deferred()
    worker, clock, _ = make_worker(ScriptedHandler(first, second))
    a, b = RecordingAcker(), RecordingAcker()
    worker(BODY, a)
    clock.advance(10)
    worker(BODY, b)
    clock.advance(15)
    assert (settled(a), settled(b)) == ((0, 1), (0, 0))
    assert worker.in_flight == 1
    clock.advance(10)
    assert settled(b) == (0, 1)
    assert clock.getDelayedCalls() == []


def test_in_process_retries_end_before_the_hold_limit() -> None:
    """Retries waiting in the process never reach the watchdog's limit."""
    handler = ScriptedHandler(*[HandlingFailed("x", retryable=True) for _ in range(20)])
    worker, clock, publish = make_worker(
        handler, delay=2, max_delay=4, max_attempts=100, max_hold=20, attempt_timeout=10
    )
    acker = RecordingAcker()
    with captured_logs() as logged:
        worker(BODY, acker)
        clock.pump([0.5] * 60)
    assert settled(acker) == (1, 0)  # moved to a delay queue, not released
    assert publish.published[0].routing_key == f"{QUEUE}.retry.5"
    assert not [e for e in logged if "held unacked" in e.get("log_format", "")]


def test_a_delivery_on_a_dead_connection_is_not_held_and_is_cancelled_quietly() -> None:
    hung: Deferred[None] = Deferred()
    worker, clock, _ = make_worker(ScriptedHandler(hung))
    acker = RecordingAcker()
    worker(BODY, acker)
    assert worker.in_flight == 1
    acker.alive = False  # the broker requeued it with the connection
    assert worker.in_flight == 0
    with captured_logs() as logged:
        clock.advance(25)
    assert hung.called
    assert settled(acker) == (0, 0)
    assert errors(logged) == []


def test_settled_deliveries_do_not_count_as_held() -> None:
    publish = RecordingPublisher(auto_confirm=False)
    handler = ScriptedHandler(HandlingFailed("HTTP 400", retryable=False, message_id="m-1"))
    worker, _, _ = make_worker(handler, publish)
    worker(BODY, RecordingAcker())
    assert worker.in_flight == 1  # waiting for the .failed confirm: still held
    publish.confirm()
    assert worker.in_flight == 0


def test_delivery_settles_once() -> None:
    acker = RecordingAcker()
    delivery = Delivery(QUEUE, BODY, acker, 0.0)
    assert delivery.held
    assert delivery.reject()
    assert not delivery.reject()
    assert not delivery.ack()
    assert settled(acker) == (0, 1)
    assert delivery.outcome == "rejected"
    assert not delivery.held


def test_delivery_peeks_its_id_only_when_asked() -> None:
    delivery = Delivery(QUEUE, b'{"message_id": "m-9"}', RecordingAcker(), 0.0)
    delivery.name(None)
    assert delivery.message_id == "m-9"
    delivery.name("m-10")
    assert delivery.message_id == "m-10"


def test_the_watchdog_survives_a_failing_release() -> None:
    clock = Clock()
    released: list[str] = []

    def on_expired(delivery: Delivery) -> None:
        released.append(delivery.message_id or "")
        if len(released) == 1:
            raise RuntimeError("release failed")

    watchdog = HoldWatchdog(clock, 5.0, on_expired)
    for n in (1, 2):
        watchdog.watch(Delivery(QUEUE, f'{{"message_id": "m-{n}"}}'.encode(), RecordingAcker(), 0))
    with captured_logs() as logged:
        clock.advance(5)
    assert released == ["m-1", "m-2"]
    assert [e["message_id"] for e in logged if "log_failure" in e] == ["m-1"]
    assert len(watchdog) == 0
    assert clock.getDelayedCalls() == []


def test_drain_cancels_a_hold_waiting_for_its_pause() -> None:
    gate = NeverPausedGate()
    handler = ScriptedHandler(HandlingFailed("down", retryable=True, held=True, message_id="m-1"))
    worker, clock, _ = make_worker(handler, gate=gate)
    acker = RecordingAcker()
    worker(BODY, acker)
    d = Deferred.fromCoroutine(worker.drain(0))
    assert d.called
    assert worker.in_flight == 0
    assert settled(acker) == (0, 0)  # unacked: the broker requeues it on close
    assert clock.getDelayedCalls() == []


def test_the_release_backoff_stops_at_max_hold() -> None:
    """A release pause grows (to 30 s) but never keeps a delivery past
    max_hold: it is released by its own backoff, not by the watchdog."""
    publish = RecordingPublisher()
    publish.failure = PublishFailed("not connected to AMQP")
    handler = ScriptedHandler(*[HandlingFailed("HTTP 400", retryable=False) for _ in range(9)])
    worker, clock, _ = make_worker(handler, publish, max_hold=20)
    waits = []
    with captured_logs() as logged:
        for _ in range(8):
            acker = RecordingAcker()
            worker(BODY, acker)
            waited = 0.0
            while not acker.rejects:
                clock.advance(0.5)
                waited += 0.5
            waits.append(waited)
    assert waits == [0.5, 1, 2, 4, 8, 16, 20, 20]
    assert not [e for e in logged if "held unacked" in e.get("log_format", "")]
    assert clock.getDelayedCalls() == []


# -- the bound against the broker's consumer_timeout -------------------------------


def config(**values: Any) -> Any:
    defaults = {
        "delivery_max_hold": 60.0,
        "mo_message_url_timeout": 10.0,
        "event_url_timeout": 10.0,
        "amqp_consumer_timeout": 1800.0,
    }
    return SimpleNamespace(**{**defaults, **values})


def check(namespace: Any) -> None:
    check_hold_bound(namespace, namespace.amqp_consumer_timeout)


def test_the_default_hold_fits_rabbitmqs_default_consumer_timeout() -> None:
    check(config())
    check(config(amqp_consumer_timeout=30.0, delivery_max_hold=10.0))


@pytest.mark.parametrize(
    "values",
    [
        {"delivery_max_hold": 896.0},
        {"event_url_timeout": 900.0},
        {"amqp_consumer_timeout": 30.0, "delivery_max_hold": 20.0},
    ],
)
def test_a_hold_over_half_the_consumer_timeout_is_a_config_error(values: dict) -> None:
    with pytest.raises(ConfigError, match="at most half of amqp_consumer_timeout"):
        check(config(**values))
