"""Working off consumed messages: retry with backoff, dead-letter, then ack.

A :class:`MessageWorker` runs its handler for each message of one queue. A
message is acked only when the handler succeeded, or once the message sits on
the queue's ``.failed`` dead-letter queue (published with a confirm): after
the last attempt, on a permanent failure, or for a body that is no vumi
message. While a message waits for its next attempt it keeps its prefetch
slot, and others flow through the rest; if the process dies, the broker puts
it back on the queue.
"""

from __future__ import annotations

import json
import random
from collections.abc import Awaitable, Callable
from typing import Any

import attrs
from twisted.internet.defer import CancelledError, Deferred, DeferredList
from twisted.internet.task import deferLater
from twisted.python.failure import Failure

from .amqp_service import Acker, PublishFailed
from .log import logger
from .metrics import NO_METRICS, Metrics
from .vumi_messages import generate_message_id, utc_timestamp

log = logger(__name__)


class HandlingFailed(Exception):
    """A message could not be handled; ``retryable`` says if another try may help."""

    def __init__(
        self,
        reason: str,
        *,
        retryable: bool,
        message_id: str | None = None,
        url: str | None = None,
    ) -> None:
        super().__init__(reason)
        self.reason = reason
        self.retryable = retryable
        self.message_id = message_id
        #: Where the failed POST went, without credentials (for log fields).
        self.url = url


#: What a handler returns for a message it handled by dropping it on purpose
#: (an event with nowhere to go); anything else it returns means delivered.
DROPPED = "dropped"

Handler = Callable[[bytes], Awaitable[Any]]
Publish = Callable[..., Deferred]


@attrs.frozen
class RetryPolicy:
    """Exponential backoff with jitter, capped, for a bounded number of attempts."""

    delay: float = 1.0
    max_delay: float = 60.0
    max_attempts: int = 10

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
    except ValueError:
        return None
    if not isinstance(data, dict):
        return None
    value = data.get("user_message_id") if data.get("message_type") == "event" else None
    value = value or data.get("message_id")
    return value if isinstance(value, str) else None


@attrs.define(eq=False)
class MessageWorker:
    """Handles the messages of ``queue``; parks failures on ``queue.failed``."""

    queue: str
    handler: Handler
    publish: Publish
    policy: RetryPolicy
    _clock: Any
    metrics: Metrics = NO_METRICS
    role: str = ""
    _in_flight: set[Deferred] = attrs.field(factory=set, init=False)
    _last_taken: float | None = attrs.field(default=None, init=False)
    _waiting: set[Deferred] = attrs.field(factory=set, init=False)
    _stopping: bool = attrs.field(default=False, init=False)

    @property
    def failed_queue(self) -> str:
        return f"{self.queue}.failed"

    def __call__(self, body: bytes, acker: Acker) -> None:
        """Take one delivery (the AMQP consumer callback)."""
        d = Deferred.fromCoroutine(self._process(body, acker))
        self._in_flight.add(d)
        d.addBoth(self._done, d, body)

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
        """When a message of this queue was last acked (delivered, dropped or
        dead-lettered), by the clock; None before the first."""
        return self._last_taken

    def _taken(self, outcome: str) -> None:
        self._last_taken = self._clock.seconds()
        self.metrics.consumed(self.role, outcome)

    async def _process(self, body: bytes, acker: Acker) -> None:
        attempt = 0
        while True:
            attempt += 1
            try:
                result = await self.handler(body)
            except HandlingFailed as e:
                failure = e
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
            if failure.retryable and attempt < self.policy.max_attempts:
                if self._stopping:
                    return  # shutting down: unacked, it goes back to its queue
                delay = self.policy.backoff(attempt)
                self.metrics.retry(self.role)
                log.warn(
                    "Attempt {attempt} for {queue} message {message_id} failed: {reason};"
                    " retrying in {delay:.1f} s",
                    attempt=attempt,
                    queue=self.queue,
                    message_id=failure.message_id,
                    reason=failure.reason,
                    delay=delay,
                    url=failure.url,
                )
                wait = deferLater(self._clock, delay)
                self._waiting.add(wait)
                try:
                    await wait
                finally:
                    self._waiting.discard(wait)
                continue
            await self._dead_letter(body, acker, failure, attempt)
            return

    async def _dead_letter(
        self, body: bytes, acker: Acker, failure: HandlingFailed, attempts: int
    ) -> None:
        headers = {
            "x-junebug-reason": _header_text(failure.reason),
            "x-junebug-attempts": attempts,
            "x-junebug-failed-at": utc_timestamp(),
            "x-junebug-source-queue": self.queue,
        }
        message_id = failure.message_id or generate_message_id()
        started = self.metrics.now()
        try:
            await self.publish(self.failed_queue, body, message_id=message_id, headers=headers)
        except PublishFailed as e:
            self.metrics.publish_done(started, confirmed=False)
            log.error(
                "Could not dead-letter {queue} message {message_id} ({error});"
                " it goes back to its queue",
                queue=self.queue,
                message_id=message_id,
                error=e,
            )
            acker.reject()
            return
        self.metrics.publish_done(started, confirmed=True)
        acker.ack()
        self._taken("dead_lettered")
        log.error(
            "Undeliverable {queue} message {message_id} moved to {failed_queue} after"
            " {attempts} attempt(s): {reason}",
            queue=self.queue,
            message_id=message_id,
            failed_queue=self.failed_queue,
            attempts=attempts,
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
