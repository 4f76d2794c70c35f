"""What a message handler's work comes to: delivered, dropped on purpose
(:data:`DROPPED`), or :class:`HandlingFailed` with whether another try may help."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any


class HandlingFailed(Exception):
    """A message could not be handled; ``retryable`` says if another try may help.

    ``held``: no attempt was made, or only a probe, because the destination
    is down or throttling; such a failure spends no attempt. ``wait``: the
    seconds the destination asked for (or until its next probe), if known.
    """

    def __init__(
        self,
        reason: str,
        *,
        retryable: bool,
        message_id: str | None = None,
        url: str | None = None,
        held: bool = False,
        wait: float | None = None,
    ) -> None:
        super().__init__(reason)
        self.reason = reason
        self.retryable = retryable
        self.message_id = message_id
        #: Where the failed POST went, without credentials (for log fields).
        self.url = url
        self.held = held
        self.wait = wait


#: What a handler returns for a message it handled by dropping it on purpose
#: (an event with nowhere to go); anything else it returns means delivered.
DROPPED = "dropped"

Handler = Callable[[bytes], Awaitable[Any]]
