"""Which delivery destinations are down, and when to probe them again.

A destination is the scheme, host and port of a URL the service POSTs to
(``mo_message_url``, each event URL). After ``threshold`` consecutive
failures that look like an outage (connection refused or reset, timeouts,
no answer, any 5xx) it is *down*: deliveries to it are held back without
spending an attempt, except one probe every ``probe_interval`` seconds. Any
answer that is not a 5xx (a 2xx, and also a 4xx: the server is there) brings
it back. Going down and coming back are logged once each, not per message.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from functools import lru_cache
from typing import Any

import attrs

from junebug_api.formats.urls import format_origin, origin_parts
from junebug_api.observe.log import logger

log = logger(__name__)

Destination = tuple[str, str, int]
Listener = Callable[[Destination, bool], None]


@lru_cache(maxsize=1024)
def destination_of(url: str) -> Destination:
    """The (scheme, host, port) a URL's requests go to; no credentials, no path."""
    return origin_parts(url)


def describe_destination(destination: Destination) -> str:
    """``scheme://host:port``, as the open ``/health`` shows a callback URL."""
    return format_origin(*destination)


def _utc(seconds: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(seconds))


@attrs.define(eq=False)
class _State:
    failures: int = 0
    down_since: float | None = None
    probing: bool = False
    next_probe: float = 0.0


@attrs.define(eq=False)
class OutageTracker:
    """Consecutive outage-like failures per destination; down/up and probes."""

    _clock: Any
    threshold: int = 5
    probe_interval: float = 5.0
    _states: dict[Destination, _State] = attrs.field(factory=dict, init=False)
    _listeners: list[Listener] = attrs.field(factory=list, init=False)

    def subscribe(self, listener: Listener) -> None:
        """Call ``listener(destination, down)`` whenever a destination goes down or up."""
        self._listeners.append(listener)

    def is_down(self, destination: Destination) -> bool:
        state = self._states.get(destination)
        return state is not None and state.down_since is not None

    def admit(self, destination: Destination) -> bool:
        """May a delivery go to ``destination`` now? False: hold it back.

        While the destination is down, one delivery is let through as a probe
        when ``probe_interval`` has passed since the last one ended.
        """
        state = self._states.get(destination)
        if state is None or state.down_since is None:
            return True
        if state.probing or self._clock.seconds() < state.next_probe:
            return False
        state.probing = True
        return True

    def succeeded(self, destination: Destination) -> None:
        """The destination answered (anything but a 5xx)."""
        state = self._states.get(destination)
        if state is None:
            return
        del self._states[destination]
        if state.down_since is not None:
            down_for = self._clock.seconds() - state.down_since
            log.info(
                "Destination {destination} is back after {seconds:.0f} s down",
                destination=describe_destination(destination),
                seconds=down_for,
            )
            self._notify(destination, False)

    def failed(self, destination: Destination) -> None:
        """A failure that looks like an outage (connection, timeout, 5xx)."""
        state = self._states.get(destination)
        if state is None:
            state = self._states[destination] = _State()
        state.failures += 1
        now = self._clock.seconds()
        if state.probing:
            state.probing = False
            state.next_probe = now + self.probe_interval
        if state.down_since is None and state.failures >= self.threshold:
            state.down_since = now
            state.next_probe = now + self.probe_interval
            log.warn(
                "Destination {destination} is down after {failures} failures in a row;"
                " holding its deliveries back, probing every {interval:g} s",
                destination=describe_destination(destination),
                failures=state.failures,
                interval=self.probe_interval,
            )
            self._notify(destination, True)

    def abandoned(self, destination: Destination) -> None:
        """An admitted delivery ended without an answer either way (cancelled)."""
        state = self._states.get(destination)
        if state is not None and state.probing:
            state.probing = False

    def _notify(self, destination: Destination, down: bool) -> None:
        for listener in list(self._listeners):
            try:
                listener(destination, down)
            except Exception:
                log.failure("Outage listener failed")

    def health(self) -> dict[str, Any]:
        """The ``deliveries`` component of ``/health``.

        Stays ``ok`` while a destination is down: the service works and keeps
        the messages; taking it out of a load balancer would not help.
        """
        down = {
            describe_destination(dest): {
                "down_since": _utc(state.down_since),
                "failures": state.failures,
            }
            for dest, state in self._states.items()
            if state.down_since is not None
        }
        return {"health": "ok", "destinations_down": down}
