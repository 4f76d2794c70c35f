"""One delivery in work, settled once, and the watchdog that bounds how long
any delivery is held.

A :class:`Delivery` is a consumed message this process has neither acked
nor rejected yet. Only its first ack or reject goes to the broker: a second
``basic.reject`` of one delivery tag would make the broker close the
channel, taking every other delivery on it along.

The :class:`HoldWatchdog` knows when each delivery in work was taken. One
still in work ``limit`` seconds later, whatever it waits for (a state cache
that never answers, a pause or a confirm that never comes, a bug), is handed
to ``on_expired``, which names it in a log line and releases it back to its
queue. So no delivery stays unacked longer than ``limit`` (plus however late
the reactor runs the timer): that is what keeps the service inside the
broker's ``consumer_timeout``.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import attrs
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IDelayedCall

from junebug_api.amqp.service import Acker
from junebug_api.observe.log import logger

log = logger(__name__)


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


@attrs.define(eq=False)
class Delivery:
    """One consumed message of ``queue`` in work: its body, its Acker, when it
    was taken (clock seconds) and how it ended (``outcome``: None while held,
    then ``acked`` or ``rejected``)."""

    queue: str
    body: bytes
    acker: Acker
    taken: float
    outcome: str | None = None
    #: The work on it (the worker's Deferred), for the watchdog to cancel.
    work: Deferred[None] | None = None
    _message_id: str | None = None
    _peeked: bool = False

    @property
    def message_id(self) -> str | None:
        """The id log lines name: the one its handler found, else the body's (read
        only when first asked: most deliveries never need it)."""
        if self._message_id is None and not self._peeked:
            self._peeked = True
            self._message_id = peek_message_id(self.body)
        return self._message_id

    def name(self, message_id: str | None) -> None:
        """Its id, as its handler found it."""
        if message_id:
            self._message_id = message_id

    @property
    def held(self) -> bool:
        """Unacked by this process and still on a live connection: what the
        broker counts against ``consumer_timeout``."""
        return self.outcome is None and self.acker.alive

    def ack(self) -> bool:
        """Ack it, unless it was settled already; True if this call settled it."""
        if self.outcome is not None:
            return False
        self.outcome = "acked"
        try:
            self.acker.ack()
        except Exception:
            log.failure(
                "Could not ack {queue} message {message_id}; rejecting it instead",
                queue=self.queue,
                message_id=self.message_id,
            )
            self.outcome = None
            self.reject()
        return True

    def reject(self) -> bool:
        """Give it back to its queue, unless it was settled already; True if
        this call settled it."""
        if self.outcome is not None:
            return False
        self.outcome = "rejected"
        try:
            self.acker.reject()
        except Exception:
            log.failure(
                "Could not reject {queue} message {message_id}; the broker requeues it"
                " when the connection closes",
                queue=self.queue,
                message_id=self.message_id,
            )
        return True


@attrs.define(eq=False)
class HoldWatchdog:
    """Hands each watched delivery still watched ``limit`` seconds after it was
    taken to ``on_expired``; one timer, armed only while something is watched."""

    clock: Any
    limit: float
    on_expired: Callable[[Delivery], None]
    # Insertion order is taking order: the oldest first.
    _watched: dict[Delivery, None] = attrs.field(factory=dict, init=False)
    _timer: IDelayedCall | None = attrs.field(default=None, init=False)

    def watch(self, delivery: Delivery) -> None:
        self._watched[delivery] = None
        if self._timer is None:
            self._arm()

    def forget(self, delivery: Delivery) -> None:
        self._watched.pop(delivery, None)
        if not self._watched and self._timer is not None:
            if self._timer.active():
                self._timer.cancel()
            self._timer = None

    def __len__(self) -> int:
        return len(self._watched)

    def _arm(self) -> None:
        oldest = next(iter(self._watched))
        due = max(0.0, oldest.taken + self.limit - self.clock.seconds())
        self._timer = self.clock.callLater(due, self._check)

    def _check(self) -> None:
        self._timer = None
        now = self.clock.seconds()
        while self._watched:
            oldest = next(iter(self._watched))
            if now - oldest.taken < self.limit:
                break
            del self._watched[oldest]
            try:
                self.on_expired(oldest)
            except Exception:
                log.failure(
                    "Releasing {queue} message {message_id} failed",
                    queue=oldest.queue,
                    message_id=oldest.message_id,
                )
        if self._watched and self._timer is None:
            self._arm()
