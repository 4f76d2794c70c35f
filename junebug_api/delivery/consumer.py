"""Working off consumed messages: retries, delay queues, dead-lettering, acks.

A :class:`MessageWorker` runs its handler for each message of one queue. A
message is acked only when the handler succeeded, or once the message sits
where it goes next (published with a confirm): on a delay queue for a later
try, or on the queue's ``.failed`` dead-letter queue.

Retries wait in the process only while that is short: a retry due within a
few seconds that keeps the delivery unacked no longer than ``max_hold``
waits here; a longer wait goes to a delay queue ``<queue>.retry.<seconds>``
whose TTL sends the message back to its queue. The attempt count and the
time of the first failure travel in the message's headers
(:mod:`junebug_api.delivery.headers`), so a restart resets neither. Attempts
made while the destination is down or throttling are not counted (see
:mod:`junebug_api.delivery.outages`); a message is dead-lettered after
``max_attempts`` counted attempts, on a permanent failure, for a body that
cannot be delivered, or once ``max_age`` has passed since its first failure.

No delivery is stranded: whatever goes wrong in any step (an error no
handler maps, a publish that raises, an ack that fails) ends with the
delivery acked, rejected back to its queue or on ``.failed``, and a log line
naming its message id; and the :class:`~junebug_api.delivery.watchdog.HoldWatchdog`
releases any delivery still in work ``policy.hold_limit`` seconds after it
was taken.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

import attrs
from twisted.internet.defer import CancelledError, Deferred, DeferredList
from twisted.internet.task import deferLater
from twisted.python.failure import Failure

from junebug_api.amqp.service import Acker, PublishFailed
from junebug_api.delivery.headers import (
    FAILED_AT_HEADER,
    SOURCE_QUEUE_HEADER,
    Budget,
)
from junebug_api.delivery.outcomes import DROPPED, Handler, HandlingFailed
from junebug_api.delivery.retry_policy import RetryPolicy, pick_delay
from junebug_api.delivery.watchdog import Delivery, HoldWatchdog
from junebug_api.formats.message_ids import generate_message_id
from junebug_api.formats.queue_names import failed_queue
from junebug_api.formats.vumi_messages import utc_timestamp
from junebug_api.observe.log import logger
from junebug_api.observe.metrics import NO_METRICS, Metrics

log = logger(__name__)

# A delivery held back because its destination is down waits this long
# (the first time, then the second), so it is back soon after the destination.
HELD_DELAYS = (5, 20)
# Dead-letter publishes that fail back off up to this long before release.
MAX_RELEASE_DELAY = 30.0


Publish = Callable[..., Deferred]


class HoldGate(Protocol):
    """What a worker whose queue pauses while its destination is down needs."""

    def wait_paused(self) -> Deferred[None]:
        """Fires once the queue's consumer is paused (at once if it is)."""


def _safe_message_id(message_id: str | None) -> str:
    """An id that can be an AMQP message-id: the message's, or a new one."""
    if message_id:
        try:
            if len(message_id.encode("utf-8")) <= 255:
                return message_id
        except UnicodeEncodeError:
            pass
    return generate_message_id()


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
    # The deliveries whose work runs, oldest first.
    _deliveries: dict[Delivery, None] = attrs.field(factory=dict, init=False)
    _watchdog: HoldWatchdog = attrs.field(init=False)
    _last_taken: float | None = attrs.field(default=None, init=False)
    _waiting: set[Deferred] = attrs.field(factory=set, init=False)
    _stopping: bool = attrs.field(default=False, init=False)
    _publish_failures: int = attrs.field(default=0, init=False)

    @_watchdog.default
    def _make_watchdog(self) -> HoldWatchdog:
        return HoldWatchdog(self._clock, self.policy.hold_limit, self._expired)

    @property
    def failed_queue(self) -> str:
        return failed_queue(self.queue)

    def __call__(self, body: bytes, acker: Acker) -> None:
        """Take one delivery (the AMQP consumer callback)."""
        self.handle(body, acker)

    def handle(self, body: bytes, acker: Acker) -> Deferred[None]:
        """Take one delivery; the Deferred fires once it is acked, moved or released."""
        delivery = Delivery(self.queue, body, acker, self._clock.seconds())
        self._deliveries[delivery] = None
        self._watchdog.watch(delivery)
        d = Deferred.fromCoroutine(self._process(delivery))
        delivery.work = d
        d.addBoth(self._done, delivery)
        return d

    def _done(self, result: Any, delivery: Delivery) -> None:
        self._deliveries.pop(delivery, None)
        self._watchdog.forget(delivery)
        if isinstance(result, Failure) and not result.check(CancelledError):
            # _process lets nothing out; should a bug do so, still no stranding.
            log.failure(
                "Unexpected error handling {queue} message {message_id}; released",
                result,
                queue=self.queue,
                message_id=delivery.message_id,
            )
            delivery.reject()

    def _expired(self, delivery: Delivery) -> None:
        """The watchdog's call: ``delivery`` is in work past the hold limit."""
        if delivery.held:
            log.error(
                "{queue} message {message_id} held unacked for {seconds:.0f} s, over the"
                " {limit:g} s a delivery may be; released back to its queue",
                queue=self.queue,
                message_id=delivery.message_id,
                seconds=self._clock.seconds() - delivery.taken,
                limit=self.policy.hold_limit,
            )
            delivery.reject()
        if delivery.work is not None:
            delivery.work.cancel()

    @property
    def in_flight(self) -> int:
        """How many of this queue's deliveries this process really holds:
        unacked, on a live connection."""
        return sum(1 for delivery in self._deliveries if delivery.held)

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

    # -- one delivery ---------------------------------------------------------

    async def _process(self, delivery: Delivery) -> None:
        try:
            await self._work(delivery)
        except CancelledError:
            raise
        except Exception:
            await self._internal_error(delivery, Failure())

    async def _work(self, delivery: Delivery) -> None:
        budget = self._budget(delivery)
        if budget.first_failure is not None:
            age = delivery.taken - budget.first_failure
            if age >= self.policy.max_age:
                failure = HandlingFailed(
                    f"waited {age:.0f} s since its first failure, over delivery_max_age",
                    retryable=False,
                    message_id=delivery.message_id,
                )
                await self._dead_letter(delivery, failure, budget)
                return
        while await self._try_once(delivery, budget):
            pass

    def _budget(self, delivery: Delivery) -> Budget:
        """The budget its headers give; a value no run writes is ignored, and said."""
        budget = Budget.from_headers(delivery.acker.headers, delivery.taken)
        if budget.ignored:
            log.warn(
                "{queue} message {message_id}: ignored header value(s) the service never"
                " writes: {headers}",
                queue=self.queue,
                message_id=delivery.message_id,
                headers=", ".join(budget.ignored),
            )
        return budget

    async def _try_once(self, delivery: Delivery, budget: Budget) -> bool:
        """One attempt and what follows it; True: try again here (waited already)."""
        failure = await self._attempt(delivery)
        if failure is None or not delivery.acker.alive:
            return False  # done; or the broker requeued it with its dead connection
        now = self._clock.seconds()
        budget.failed(now)
        if failure.held and failure.retryable:
            await self._hold(delivery, failure, budget)
            return False
        budget.spend_attempt()
        if not failure.retryable or budget.attempts >= self.policy.max_attempts:
            await self._dead_letter(delivery, failure, budget)
            return False
        if self._stopping:
            return False  # shutting down: unacked, it goes back to its queue
        delay = self.policy.backoff(budget.attempts)
        if not self._may_wait_here(delay, now - delivery.taken):
            await self._delay(delivery, failure, budget, delay)
            return False
        self._retrying(failure, budget, f"{delay:.1f} s")
        await self._wait(delay)
        return True

    async def _attempt(self, delivery: Delivery) -> HandlingFailed | None:
        """Run the handler once: None when it succeeded (and the delivery is acked)."""
        try:
            result = await self.handler(delivery.body)
        except HandlingFailed as e:
            # Without its traceback: it would hold this frame, which holds
            # it, a cycle per failure left for the (rare) full collection.
            failure = e.with_traceback(None)
        except CancelledError:
            raise
        except Exception as e:
            failure = HandlingFailed(
                f"{type(e).__name__}: {e}", retryable=True, message_id=delivery.message_id
            )
        else:
            if delivery.ack():
                self._taken(DROPPED if result == DROPPED else "delivered")
            return None
        delivery.name(failure.message_id)
        if failure.message_id is None:  # failed before its handler knew: from the body
            failure.message_id = delivery.message_id
        return failure

    async def _wait(self, seconds: float) -> None:
        """Wait here; :meth:`drain` gives the wait up (CancelledError)."""
        wait = deferLater(self._clock, seconds)
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

    async def _internal_error(self, delivery: Delivery, failure: Failure) -> None:
        """An error no step maps (a bug, a value nothing expected): logged with
        the message id, and the message parked on ``.failed`` with the error
        as its reason, so it neither stays unacked nor comes back at once."""
        log.failure(
            "Unexpected error handling {queue} message {message_id}",
            failure,
            queue=self.queue,
            message_id=delivery.message_id,
        )
        if not delivery.held or self._stopping:
            return
        reason = f"internal error: {failure.type.__name__}: {failure.getErrorMessage()}"
        await self._dead_letter(
            delivery,
            HandlingFailed(reason, retryable=False, message_id=delivery.message_id),
            Budget(),
        )

    # -- where a message goes next ---------------------------------------------

    async def _hold(self, delivery: Delivery, failure: HandlingFailed, budget: Budget) -> None:
        """The destination is down or throttling: no attempt spent; the message waits."""
        if self.hold_gate is not None:
            # Back to the head of the queue, once its consumer is paused (so it
            # is not delivered again at once); the probe takes it from there.
            await self.hold_gate.wait_paused()
            delivery.reject()
            return
        if not self.retry_queues:
            delivery.reject()
            return
        wanted = max(HELD_DELAYS[min(budget.holds, len(HELD_DELAYS) - 1)], failure.wait or 0)
        budget.spend_hold()
        await self._delay(delivery, failure, budget, wanted, quiet=True)

    async def _move(
        self, queue: str, delivery: Delivery, message_id: str, headers: dict[str, Any]
    ) -> PublishFailed | None:
        """Publish the delivery's body to ``queue`` and wait for the confirm;
        the failure if it was not confirmed (any error of the publish counts)."""
        started = self.metrics.now()
        try:
            await self.publish(queue, delivery.body, message_id=message_id, headers=headers)
        except CancelledError:
            raise
        except Exception as e:
            self.metrics.publish_done(started, confirmed=False)
            if isinstance(e, PublishFailed):
                return e
            return PublishFailed(f"{type(e).__name__}: {e}")
        self.metrics.publish_done(started, confirmed=True)
        self._publish_failures = 0
        return None

    async def _delay(
        self,
        delivery: Delivery,
        failure: HandlingFailed,
        budget: Budget,
        wanted: float,
        quiet: bool = False,
    ) -> None:
        """Move the message to the delay queue closest to ``wanted`` seconds."""
        delay = pick_delay(sorted(self.retry_queues), wanted)
        queue = self.retry_queues[delay]
        message_id = _safe_message_id(failure.message_id)
        error = await self._move(queue, delivery, message_id, budget.headers(failure.reason))
        if error is not None:
            await self._release(delivery, failure, f"could not move it to {queue} ({error})")
            return
        if delivery.ack():
            self._taken(None)
        if not quiet:
            self._retrying(failure, budget, f"{delay} s (via {queue})")

    def _retrying(self, failure: HandlingFailed, budget: Budget, when: str) -> None:
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

    async def _release(self, delivery: Delivery, failure: HandlingFailed, why: str) -> None:
        """Give the message back to its queue after a backoff that grows with
        each failing publish in a row, so a broken queue is no hot loop; but
        never past ``max_hold`` since it was taken (the broker's
        consumer_timeout is what a longer hold would meet)."""
        self._publish_failures += 1
        delay = min(MAX_RELEASE_DELAY, 0.5 * 2 ** (self._publish_failures - 1))
        held_for = self._clock.seconds() - delivery.taken
        delay = max(0.0, min(delay, self.policy.max_hold - held_for))
        log.error(
            "{why}: {queue} message {message_id} goes back to its queue in {delay:.1f} s",
            why=why[:1].upper() + why[1:],
            queue=self.queue,
            message_id=failure.message_id,
            delay=delay,
        )
        if not self._stopping:
            try:
                await self._wait(delay)
            except CancelledError:
                pass  # shutting down, or held too long: released now
        delivery.reject()

    async def _dead_letter(
        self, delivery: Delivery, failure: HandlingFailed, budget: Budget
    ) -> None:
        headers = budget.headers(failure.reason)
        headers[FAILED_AT_HEADER] = utc_timestamp()
        headers[SOURCE_QUEUE_HEADER] = self.queue
        # A body with no usable id is logged and parked under a new one.
        message_id = _safe_message_id(failure.message_id)
        error = await self._move(self.failed_queue, delivery, message_id, headers)
        if error is not None:
            await self._release(delivery, failure, f"could not dead-letter it ({error})")
            return
        if delivery.ack():
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

    # -- stopping ---------------------------------------------------------------

    async def drain(self, timeout: float, *, release: bool = False) -> int:
        """Wait up to ``timeout`` s for messages in work; cancel the rest.

        Messages waiting for a retry are given up at once, and those still in
        work after ``timeout`` are cancelled. At shutdown both stay unacked,
        so the broker requeues them when the connection closes; with
        ``release`` (one channel stops while the connection stays) they are
        rejected back to their queue now. Returns how many were given up.
        """
        self._stopping = True
        held = list(self._deliveries)
        given_up = len(self._waiting)
        for wait in list(self._waiting):
            wait.cancel()
        pending = [d.work for d in self._deliveries if d.work is not None]
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
        left = [d.work for d in self._deliveries if d.work is not None]
        for work in left:
            work.cancel()
        if release:
            for delivery in held:
                delivery.reject()  # nothing for one settled already
        return given_up + len(left)
