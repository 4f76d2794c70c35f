"""The ``x-junebug-*`` headers a message carries from one delivery to the next.

The service writes them when it moves a message to a delay queue or to
``.failed``, and reads three back when the message returns: the attempts
made, the times it was held back, the time of its first failure. Anyone who
may publish to the queues can put anything there, so each value read back
is checked; a value no run of the service writes (another type than an
integer, negative, over the largest budget, a time before the epoch or more
than an hour ahead of this host's clock) is treated as absent, and named in
a warning. The
worst a forged value can then do is give a message a fresh budget, as
``junebug-api-replay`` does; it can never make a header that cannot be
encoded again (a 64-bit overflow) or strand the delivery.
"""

from __future__ import annotations

from typing import Any

import attrs

from junebug_api.formats.urls import mask_urls

ATTEMPTS_HEADER = "x-junebug-attempts"
FIRST_FAILURE_HEADER = "x-junebug-first-failure"
HOLDS_HEADER = "x-junebug-holds"
REASON_HEADER = "x-junebug-reason"
FAILED_AT_HEADER = "x-junebug-failed-at"
SOURCE_QUEUE_HEADER = "x-junebug-source-queue"

#: The largest count read back: ``delivery_max_attempts``' upper bound.
MAX_COUNT = 1_000_000
#: How far ahead of this host's clock a first failure may be (another host's clock).
MAX_CLOCK_AHEAD = 3600
#: Longest ``x-junebug-reason`` written, in characters.
MAX_REASON = 1000


def header_text(text: str, limit: int = MAX_REASON) -> str:
    """``text`` as a header string: ASCII (others backslash-escaped), every
    URL in it shown as in logs (:func:`~junebug_api.formats.urls.url_for_log`:
    whoever reads ``.failed`` may not see callback credentials), at most
    ``limit`` characters."""
    # Kept ASCII so that a peer counting characters as bytes (txAMQP did)
    # still reads an intact frame.
    return mask_urls(text.encode("ascii", "backslashreplace").decode("ascii"))[:limit]


def _count(value: Any) -> int | None:
    """A count the service could have written: an int from 0 to MAX_COUNT."""
    if type(value) is int and 0 <= value <= MAX_COUNT:
        return value
    return None


def _first_failure(value: Any, now: float) -> int | None:
    """A Unix time the service could have written as a first failure."""
    if type(value) is int and 0 <= value <= now + MAX_CLOCK_AHEAD:
        return value
    return None


def _shown(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


@attrs.define
class Budget:
    """What is known of one message's history: its headers and this delivery.

    ``ignored`` names each header read back whose value was not one the
    service writes (``name=value``), for the warning that says so.
    """

    attempts: int = 0
    first_failure: int | None = None
    holds: int = 0
    ignored: list[str] = attrs.field(factory=list)

    @classmethod
    def from_headers(cls, headers: Any, now: float) -> Budget:
        """The budget a delivery's headers give, each value checked (at ``now``)."""
        budget = cls()
        if not isinstance(headers, dict):
            return budget
        checks = (
            (ATTEMPTS_HEADER, "attempts", _count),
            (HOLDS_HEADER, "holds", _count),
            (FIRST_FAILURE_HEADER, "first_failure", lambda v: _first_failure(v, now)),
        )
        for name, field, check in checks:
            if name not in headers:
                continue
            value = check(headers[name])
            if value is None:
                budget.ignored.append(f"{name}={_shown(headers[name])}")
            else:
                setattr(budget, field, value)
        return budget

    def failed(self, now: float) -> None:
        """A failure at ``now``: the first one sets the first-failure time."""
        if self.first_failure is None:
            self.first_failure = int(now)

    def spend_attempt(self) -> None:
        self.attempts = min(MAX_COUNT, self.attempts + 1)

    def spend_hold(self) -> None:
        self.holds = min(MAX_COUNT, self.holds + 1)

    def headers(self, reason: str) -> dict[str, Any]:
        """The headers that carry this budget (and ``reason``) to the next delivery."""
        headers: dict[str, Any] = {
            ATTEMPTS_HEADER: self.attempts,
            HOLDS_HEADER: self.holds,
            REASON_HEADER: header_text(reason),
        }
        if self.first_failure is not None:
            headers[FIRST_FAILURE_HEADER] = self.first_failure
        return headers
