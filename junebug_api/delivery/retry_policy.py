"""How often and how long a failed delivery is tried again: backoff, budgets,
and which delay queue a wait goes to."""

from __future__ import annotations

import random
from collections.abc import Callable

import attrs

from junebug_api.config.delivery_options import DELIVERY_HOLD_GRACE


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

    @property
    def hold_limit(self) -> float:
        """The longest any delivery stays unacked: ``max_hold`` (or one
        attempt's timeout, if longer) and DELIVERY_HOLD_GRACE more to settle it.
        The config keeps it within half the broker's ``consumer_timeout``."""
        return max(self.max_hold, self.attempt_timeout) + DELIVERY_HOLD_GRACE


def pick_delay(delays: list[int], wanted: float) -> int:
    """The longest delay of ``delays`` (sorted) not over ``wanted``, else the shortest."""
    chosen = delays[0]
    for delay in delays:
        if delay <= wanted:
            chosen = delay
    return chosen
