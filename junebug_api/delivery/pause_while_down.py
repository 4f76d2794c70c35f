"""Pausing a queue's consumer while its only destination is down, and probing it.

``.inbound`` has one destination, ``mo_message_url``. While that is down
there is no point taking its messages: :class:`PauseWhileDown` cancels the
queue's consumer (the messages stay ready in the queue, in order), gives the
deliveries already taken back to the head of the queue, and every
``probe_interval`` seconds (or once a throttling destination's
``Retry-After`` is over, if later) takes one message (``basic.get``) as a
probe. The first answer from the destination brings it back up; the tracker
then says so, and consuming resumes at full speed.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

import attrs
from twisted.internet.defer import Deferred, DeferredLock, succeed

from junebug_api.amqp.service import Acker
from junebug_api.delivery.outages import Destination, OutageTracker, describe_destination
from junebug_api.observe.log import logger

log = logger(__name__)


class QueueControl(Protocol):
    """The consumer controls :class:`PauseWhileDown` needs (AmqpService has them)."""

    async def pause_consumer(self, queue: str) -> None: ...

    async def resume_consumer(self, queue: str) -> None: ...

    async def get(self, queue: str) -> tuple[bytes, dict[str, Any], Acker] | None: ...


Probe = Callable[[bytes, Acker], Deferred[None]]


@attrs.define(eq=False)
class PauseWhileDown:
    """Follows ``destination`` in ``outages``: pauses ``queue`` while it is down.

    ``probe`` handles one delivery taken as a probe (the queue's worker).
    """

    queue: str
    destination: Destination
    outages: OutageTracker
    control: QueueControl
    probe: Probe
    _clock: Any
    probe_interval: float = 5.0
    _state: str = attrs.field(default="running", init=False)  # running, pausing, paused
    _waiters: list[Deferred[None]] = attrs.field(factory=list, init=False)
    _lock: DeferredLock = attrs.field(factory=DeferredLock, init=False)
    _timer: Any = attrs.field(default=None, init=False)
    _stopped: bool = attrs.field(default=False, init=False)

    def __attrs_post_init__(self) -> None:
        self.outages.subscribe(self._changed)

    @property
    def paused(self) -> bool:
        return self._state != "running"

    def _changed(self, destination: Destination, down: bool) -> None:
        if destination != self.destination or self._stopped:
            return
        if down:
            self._pause()
        else:
            self._resume()

    def wait_paused(self) -> Deferred[None]:
        """Fires once the consumer is paused; pauses it if it is not yet."""
        if self._state == "paused" or self._stopped:
            return succeed(None)
        if self._state == "running" and not self.outages.is_down(self.destination):
            return succeed(None)  # back up already: nothing to pause for
        waiter: Deferred[None] = Deferred()
        self._waiters.append(waiter)
        self._pause()
        return waiter

    def _wake_waiters(self) -> None:
        waiters, self._waiters = self._waiters, []
        for waiter in waiters:
            waiter.callback(None)

    def _pause(self) -> None:
        if self._state != "running":
            return
        self._state = "pausing"
        self._lock.run(lambda: Deferred.fromCoroutine(self._do_pause()))

    async def _do_pause(self) -> None:
        if self._stopped:
            return  # its channel stopped: the queue may have another consumer now
        try:
            await self.control.pause_consumer(self.queue)
        except Exception as e:
            # Not connected: no consumer to cancel, and a new connection
            # does not consume a paused queue.
            log.warn("Could not pause the {queue} consumer: {error}", queue=self.queue, error=e)
        if self._state == "pausing":
            self._state = "paused"
            log.warn(
                "Paused consuming {queue} while {destination} is down",
                queue=self.queue,
                destination=describe_destination(self.destination),
            )
            self._schedule_probe()
        self._wake_waiters()

    def _resume(self) -> None:
        if self._state == "running":
            return
        self._state = "running"
        self._cancel_timer()
        self._wake_waiters()
        self._lock.run(lambda: Deferred.fromCoroutine(self._do_resume()))

    async def _do_resume(self) -> None:
        if self._stopped:
            return
        try:
            await self.control.resume_consumer(self.queue)
        except Exception as e:
            log.warn("Could not resume the {queue} consumer: {error}", queue=self.queue, error=e)
            return
        log.info("Consuming {queue} again", queue=self.queue)

    def _schedule_probe(self) -> None:
        """The next probe in ``probe_interval`` seconds, or once the
        destination's wait is over if it asked for a longer one (throttling)."""
        if self._state == "paused" and self._timer is None and not self._stopped:
            delay = max(self.probe_interval, self.outages.next_probe_in(self.destination))
            self._timer = self._clock.callLater(delay, self._probe_now)

    def _cancel_timer(self) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None

    def _probe_now(self) -> None:
        self._timer = None
        Deferred.fromCoroutine(self._probe())

    async def _probe(self) -> None:
        try:
            got = await self.control.get(self.queue)
        except Exception as e:
            log.debug("No probe from {queue}: {error}", queue=self.queue, error=e)
            got = None
        if got is not None and self._stopped:
            # Its channel stopped (or changed) while the get was on its way:
            # back to the queue, for the queue's next consumer to deliver.
            got[2].reject()
            return
        if got is not None:
            body, _, acker = got
            try:
                await self.probe(body, acker)
            except Exception:
                log.failure("Probe delivery from {queue} failed", queue=self.queue)
        if not self.outages.is_down(self.destination):
            self._resume()
        self._schedule_probe()

    def stop(self) -> None:
        """No more probes and no more following the destination (shutdown, or
        its channel stopped); a paused consumer stays paused."""
        self._stopped = True
        self.outages.unsubscribe(self._changed)
        self._cancel_timer()
        self._wake_waiters()
