"""Which delivery destinations are down, and when to probe them again.

A destination is the scheme, host and port of a URL the service POSTs to
(``mo_message_url``, each event URL). After ``threshold`` consecutive
failures that look like an outage (connection refused or reset, timeouts,
no answer, any 5xx) it is *down*: deliveries to it are held back without
spending an attempt, except one probe every ``probe_interval`` seconds. Any
answer that is not a 5xx (a 2xx, and also a 4xx: the server is there) brings
it back. Going down and coming back are logged once each, not per message.

A destination that asks to be left alone (429, or 503 with ``Retry-After``)
is *throttled*: held back at once, as if down, until the wait it asked for
has passed; then one probe goes through, as for an outage.
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
    #: Held back because it asked to wait (429, 503 with Retry-After).
    throttled: bool = False


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

    def unsubscribe(self, listener: Listener) -> None:
        """Call ``listener`` no more (its channel stopped)."""
        if listener in self._listeners:
            self._listeners.remove(listener)

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

    def next_probe_in(self, destination: Destination) -> float:
        """Seconds until a delivery to ``destination`` may go through (0: now)."""
        state = self._states.get(destination)
        if state is None or state.down_since is None:
            return 0.0
        return max(0.0, state.next_probe - self._clock.seconds())

    def succeeded(self, destination: Destination) -> None:
        """The destination answered (anything but a 5xx or a throttling answer)."""
        state = self._states.get(destination)
        if state is None:
            return
        del self._states[destination]
        if state.down_since is not None:
            down_for = self._clock.seconds() - state.down_since
            log.info(
                "Destination {destination} is back after {seconds:.0f} s {how}",
                destination=describe_destination(destination),
                seconds=down_for,
                how="throttled" if state.throttled else "down",
            )
            self._notify(destination, False)

    def throttled(self, destination: Destination, wait: float | None) -> float:
        """The destination asked to be left alone for ``wait`` seconds (None:
        ``probe_interval``); held back from now, the next probe after that.
        Returns the seconds until that probe."""
        state = self._states.get(destination)
        if state is None:
            state = self._states[destination] = _State()
        now = self._clock.seconds()
        wait = self.probe_interval if wait is None else wait
        state.probing = False
        state.throttled = True
        if state.down_since is None:
            state.down_since = now
            state.next_probe = now + wait
            log.warn(
                "Destination {destination} asks to wait (throttling); holding its deliveries"
                " back for {wait:g} s, then probing",
                destination=describe_destination(destination),
                wait=wait,
            )
            self._notify(destination, True)
        else:
            state.next_probe = max(state.next_probe, now + wait)
        return state.next_probe - now

    def failed(self, destination: Destination) -> None:
        """A failure that looks like an outage (connection, timeout, 5xx)."""
        state = self._states.get(destination)
        if state is None:
            state = self._states[destination] = _State()
        state.failures += 1
        state.throttled = False
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
            describe_destination(dest): _describe(state)
            for dest, state in self._states.items()
            if state.down_since is not None
        }
        return {"health": "ok", "destinations_down": down}


def _describe(state: _State) -> dict[str, Any]:
    """A down destination as ``/health`` shows it."""
    entry: dict[str, Any] = {
        "down_since": _utc(state.down_since or 0.0),
        "failures": state.failures,
    }
    if state.throttled:
        entry["throttled_until"] = _utc(state.next_probe)
    return entry
