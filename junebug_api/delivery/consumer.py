"""Working off consumed messages: retries, delay queues, dead-lettering, acks.

A :class:`MessageWorker` runs its handler for each message of one queue. A
message is acked only when the handler succeeded, or once the message sits
where it goes next (published with a confirm): on a delay queue for a later
try, or on the queue's ``.failed`` dead-letter queue.

Retries wait in the process only while that is short: a retry due within a
few seconds that keeps the delivery unacked no longer than ``max_hold``
waits here; a longer wait goes to a delay queue ``<queue>.retry.<seconds>``
whose TTL sends the message back to its queue. The attempt count and the
time of the first failure travel in the message's headers, so a restart
resets neither. Attempts made while the destination is down are not
counted (see :mod:`junebug_api.delivery.outages`); a message is dead-lettered after
``max_attempts`` counted attempts, on a permanent failure, for a body that
cannot be delivered, or once ``max_age`` has passed since its first failure.
"""

from __future__ import annotations

import json
import random
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

import attrs
from twisted.internet.defer import CancelledError, Deferred, DeferredList
from twisted.internet.task import deferLater
from twisted.python.failure import Failure

from junebug_api.amqp.service import Acker, PublishFailed
from junebug_api.formats.message_ids import generate_message_id
from junebug_api.formats.queue_names import failed_queue
from junebug_api.formats.vumi_messages import utc_timestamp
from junebug_api.observe.log import logger
from junebug_api.observe.metrics import NO_METRICS, Metrics

log = logger(__name__)

ATTEMPTS_HEADER = "x-junebug-attempts"
FIRST_FAILURE_HEADER = "x-junebug-first-failure"
HOLDS_HEADER = "x-junebug-holds"
REASON_HEADER = "x-junebug-reason"
# A delivery held back because its destination is down waits this long
# (the first time, then the second), so it is back soon after the destination.
HELD_DELAYS = (5, 20)
# Dead-letter publishes that fail back off up to this long before release.
MAX_RELEASE_DELAY = 30.0


class HandlingFailed(Exception):
    """A message could not be handled; ``retryable`` says if another try may help.

    ``held``: no attempt was made, or only a probe, because the destination
    is down; such a failure spends no attempt.
    """

    def __init__(
        self,
        reason: str,
        *,
        retryable: bool,
        message_id: str | None = None,
        url: str | None = None,
        held: bool = False,
    ) -> None:
        super().__init__(reason)
        self.reason = reason
        self.retryable = retryable
        self.message_id = message_id
        #: Where the failed POST went, without credentials (for log fields).
        self.url = url
        self.held = held


#: What a handler returns for a message it handled by dropping it on purpose
#: (an event with nowhere to go); anything else it returns means delivered.
DROPPED = "dropped"

Handler = Callable[[bytes], Awaitable[Any]]
Publish = Callable[..., Deferred]


class HoldGate(Protocol):
    """What a worker whose queue pauses while its destination is down needs."""

    def wait_paused(self) -> Deferred[None]:
        """Fires once the queue's consumer is paused (at once if it is)."""


@attrs.frozen
class RetryPolicy:
    """Exponential backoff with jitter, capped; the budgets of a message.

    ``max_attempts`` counts attempts made while the destination was up;
    ``max_age`` (s) is the longest a message may wait since its first
    failure; ``max_hold`` (s) is the longest a delivery stays unacked for
    retries in the process; ``attempt_timeout`` (s) is what one attempt may take.
    """

    delay: float = 1.0
    max_delay: float = 60.0
    max_attempts: int = 10
    max_age: float = 86400.0
    max_hold: float = 60.0
    attempt_timeout: float = 10.0

    def backoff(self, attempt: int, rand: Callable[[], float] = random.random) -> float:
        """Seconds to wait after failed attempt number ``attempt`` (from 1).

        The ceiling doubles per attempt up to ``max_delay``; the wait is
        between half the ceiling and the ceiling, so workers do not retry in
        lockstep.
        """
        ceiling = min(self.max_delay, self.delay * 2 ** (attempt - 1))
        return ceiling / 2 + rand() * ceiling / 2


def _header_text(text: str, limit: int = 1000) -> str:
    # txAMQP writes header strings with their character count as length: keep
    # them ASCII so the frame stays intact.
    return text.encode("ascii", "backslashreplace").decode("ascii")[:limit]


def peek_message_id(body: bytes) -> str | None:
    """The id a log line names for a body that failed before its handler
    could say: an event's ``user_message_id``, else ``message_id``, else None."""
    try:
        data = json.loads(body)
    except (ValueError, RecursionError):
        return None
    if not isinstance(data, dict):
        return None
    value = data.get("user_message_id") if data.get("message_type") == "event" else None
    value = value or data.get("message_id")
    return value if isinstance(value, str) else None


def _header_number(headers: dict[str, Any], name: str) -> int | None:
    value = headers.get(name)
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return int(value)


def _safe_message_id(message_id: str | None) -> str:
    """An id that can be an AMQP message-id: the message's, or a new one."""
    if message_id:
        try:
            if len(message_id.encode("utf-8")) <= 255:
                return message_id
        except UnicodeEncodeError:
            pass
    return generate_message_id()


def pick_delay(delays: list[int], wanted: float) -> int:
    """The longest delay of ``delays`` (sorted) not over ``wanted``, else the shortest."""
    chosen = delays[0]
    for delay in delays:
        if delay <= wanted:
            chosen = delay
    return chosen


@attrs.define
class _Budget:
    """What is known of one message's history, from its headers and this delivery."""

    attempts: int
    first_failure: int | None
    holds: int

    @classmethod
    def from_headers(cls, headers: dict[str, Any]) -> _Budget:
        return cls(
            attempts=max(0, _header_number(headers, ATTEMPTS_HEADER) or 0),
            first_failure=_header_number(headers, FIRST_FAILURE_HEADER),
            holds=max(0, _header_number(headers, HOLDS_HEADER) or 0),
        )

    def headers(self, reason: str) -> dict[str, Any]:
        headers: dict[str, Any] = {
            ATTEMPTS_HEADER: self.attempts,
            HOLDS_HEADER: self.holds,
            REASON_HEADER: _header_text(reason),
        }
        if self.first_failure is not None:
            headers[FIRST_FAILURE_HEADER] = self.first_failure
        return headers


@attrs.define(eq=False)
class MessageWorker:
    """Handles the messages of ``queue``; delays retries, parks failures on ``queue.failed``.

    ``retry_queues`` maps a delay in seconds to its delay queue (none: every
    retry waits in the process). ``hold_gate``, for a queue with one
    destination, pauses its consumer while that destination is down: a
    message held back then goes back to the head of its queue instead of a
    delay queue, so the queue keeps its order.
    """

    queue: str
    handler: Handler
    publish: Publish
    policy: RetryPolicy
    _clock: Any
    retry_queues: dict[int, str] = attrs.field(factory=dict)
    hold_gate: HoldGate | None = None
    metrics: Metrics = NO_METRICS
    role: str = ""
    _in_flight: set[Deferred] = attrs.field(factory=set, init=False)
    _last_taken: float | None = attrs.field(default=None, init=False)
    _waiting: set[Deferred] = attrs.field(factory=set, init=False)
    _stopping: bool = attrs.field(default=False, init=False)
    _publish_failures: int = attrs.field(default=0, init=False)

    @property
    def failed_queue(self) -> str:
        return failed_queue(self.queue)

    def __call__(self, body: bytes, acker: Acker) -> None:
        """Take one delivery (the AMQP consumer callback)."""
        self.handle(body, acker)

    def handle(self, body: bytes, acker: Acker) -> Deferred[None]:
        """Take one delivery; the Deferred fires once it is acked, moved or released."""
        d = Deferred.fromCoroutine(self._process(body, acker))
        self._in_flight.add(d)
        d.addBoth(self._done, d, body)
        return d

    def _done(self, result: Any, d: Deferred, body: bytes) -> None:
        self._in_flight.discard(d)
        if isinstance(result, Failure) and not result.check(CancelledError):
            log.failure(
                "Unexpected error handling {queue} message {message_id}",
                result,
                queue=self.queue,
                message_id=peek_message_id(body),
            )

    @property
    def in_flight(self) -> int:
        return len(self._in_flight)

    @property
    def last_taken(self) -> float | None:
        """When a message of this queue was last acked (delivered, dropped,
        moved to a delay queue or dead-lettered), by the clock; None before
        the first."""
        return self._last_taken

    def _taken(self, outcome: str | None) -> None:
        self._last_taken = self._clock.seconds()
        if outcome is not None:
            self.metrics.consumed(self.role, outcome)

    async def _process(self, body: bytes, acker: Acker) -> None:
        taken = self._clock.seconds()
        budget = _Budget.from_headers(acker.headers)
        if budget.first_failure is not None:
            age = taken - budget.first_failure
            if age >= self.policy.max_age:
                failure = HandlingFailed(
                    f"waited {age:.0f} s since its first failure, over delivery_max_age",
                    retryable=False,
                )
                await self._dead_letter(body, acker, failure, budget)
                return
        while True:
            try:
                result = await self.handler(body)
            except HandlingFailed as e:
                # Without its traceback: it would hold this frame, which holds
                # it, a cycle per failure left for the (rare) full collection.
                failure = e.with_traceback(None)
            except CancelledError:
                raise
            except Exception as e:
                failure = HandlingFailed(
                    f"{type(e).__name__}: {e}", retryable=True, message_id=peek_message_id(body)
                )
            else:
                acker.ack()
                self._taken(DROPPED if result == DROPPED else "delivered")
                return
            if not acker.alive:
                return  # the broker has requeued it with its dead connection
            now = self._clock.seconds()
            if budget.first_failure is None:
                budget.first_failure = int(now)
            if failure.held and failure.retryable:
                await self._hold(body, acker, failure, budget)
                return
            budget.attempts += 1
            if not failure.retryable or budget.attempts >= self.policy.max_attempts:
                await self._dead_letter(body, acker, failure, budget)
                return
            if self._stopping:
                return  # shutting down: unacked, it goes back to its queue
            delay = self.policy.backoff(budget.attempts)
            if not self._may_wait_here(delay, now - taken):
                await self._delay(body, acker, failure, budget, delay)
                return
            self._retrying(failure, budget, f"{delay:.1f} s")
            wait = deferLater(self._clock, delay)
            self._waiting.add(wait)
            try:
                await wait
            finally:
                self._waiting.discard(wait)

    def _may_wait_here(self, delay: float, held_for: float) -> bool:
        """A retry waits in the process if it is soon and keeps the delivery
        unacked no longer than ``max_hold``; otherwise on a delay queue."""
        if not self.retry_queues:
            return True
        if delay >= min(self.retry_queues):
            return False
        return held_for + delay + self.policy.attempt_timeout <= self.policy.max_hold

    async def _hold(
        self, body: bytes, acker: Acker, failure: HandlingFailed, budget: _Budget
    ) -> None:
        """The destination is down: no attempt spent; the message waits."""
        if self.hold_gate is not None:
            # Back to the head of the queue, once its consumer is paused (so it
            # is not delivered again at once); the probe takes it from there.
            await self.hold_gate.wait_paused()
            acker.reject()
            return
        if not self.retry_queues:
            acker.reject()
            return
        wanted = HELD_DELAYS[min(budget.holds, len(HELD_DELAYS) - 1)]
        budget.holds += 1
        await self._delay(body, acker, failure, budget, wanted, quiet=True)

    async def _delay(
        self,
        body: bytes,
        acker: Acker,
        failure: HandlingFailed,
        budget: _Budget,
        wanted: float,
        quiet: bool = False,
    ) -> None:
        """Move the message to the delay queue closest to ``wanted`` seconds."""
        delay = pick_delay(sorted(self.retry_queues), wanted)
        queue = self.retry_queues[delay]
        started = self.metrics.now()
        try:
            await self.publish(
                queue,
                body,
                message_id=_safe_message_id(failure.message_id),
                headers=budget.headers(failure.reason),
            )
        except PublishFailed as e:
            self.metrics.publish_done(started, confirmed=False)
            await self._release(acker, failure, f"could not move it to {queue} ({e})")
            return
        self.metrics.publish_done(started, confirmed=True)
        self._publish_failures = 0
        acker.ack()
        self._taken(None)
        if not quiet:
            self._retrying(failure, budget, f"{delay} s (via {queue})")

    def _retrying(self, failure: HandlingFailed, budget: _Budget, when: str) -> None:
        """Count a retry and log it: ``when`` says how long and where it waits."""
        self.metrics.retry(self.role)
        log.warn(
            "Attempt {attempt} for {queue} message {message_id} failed: {reason};"
            " retrying in {when}",
            attempt=budget.attempts,
            queue=self.queue,
            message_id=failure.message_id,
            reason=failure.reason,
            when=when,
            url=failure.url,
        )

    async def _release(self, acker: Acker, failure: HandlingFailed, why: str) -> None:
        """Give the message back to its queue after a backoff that grows with
        each failing publish in a row, so a broken queue is no hot loop."""
        self._publish_failures += 1
        delay = min(MAX_RELEASE_DELAY, 0.5 * 2 ** (self._publish_failures - 1))
        log.error(
            "{why}: {queue} message {message_id} goes back to its queue in {delay:.1f} s",
            why=why[:1].upper() + why[1:],
            queue=self.queue,
            message_id=failure.message_id,
            delay=delay,
        )
        if not self._stopping:
            wait = deferLater(self._clock, delay)
            self._waiting.add(wait)
            try:
                await wait
            except CancelledError:
                pass  # shutting down: released now
            finally:
                self._waiting.discard(wait)
        acker.reject()

    async def _dead_letter(
        self, body: bytes, acker: Acker, failure: HandlingFailed, budget: _Budget
    ) -> None:
        headers = budget.headers(failure.reason)
        headers["x-junebug-failed-at"] = utc_timestamp()
        headers["x-junebug-source-queue"] = self.queue
        # A body with no usable id is logged and parked under a new one.
        message_id = _safe_message_id(failure.message_id)
        started = self.metrics.now()
        try:
            await self.publish(self.failed_queue, body, message_id=message_id, headers=headers)
        except PublishFailed as e:
            self.metrics.publish_done(started, confirmed=False)
            await self._release(acker, failure, f"could not dead-letter it ({e})")
            return
        self.metrics.publish_done(started, confirmed=True)
        self._publish_failures = 0
        acker.ack()
        self._taken("dead_lettered")
        log.error(
            "Undeliverable {queue} message {message_id} moved to {failed_queue} after"
            " {attempts} attempt(s): {reason}",
            queue=self.queue,
            message_id=message_id,
            failed_queue=self.failed_queue,
            attempts=budget.attempts,
            reason=failure.reason,
            url=failure.url,
        )

    async def drain(self, timeout: float) -> int:
        """Wait up to ``timeout`` s for messages in work; cancel the rest.

        Messages waiting for a retry are given up at once, and those still in
        work after ``timeout`` are cancelled: both stay unacked, so the broker
        requeues them when the connection closes. Returns how many were given up.
        """
        self._stopping = True
        given_up = len(self._waiting)
        for wait in list(self._waiting):
            wait.cancel()
        pending = list(self._in_flight)
        if pending and timeout > 0:
            waiter: Deferred[None] = Deferred()

            def wake(_: Any = None) -> None:
                if not waiter.called:
                    waiter.callback(None)

            DeferredList(pending, consumeErrors=True).addBoth(wake)
            timer = self._clock.callLater(timeout, wake)
            await waiter
            if timer.active():
                timer.cancel()
        left = list(self._in_flight)
        for d in left:
            d.cancel()
        return given_up + len(left)
