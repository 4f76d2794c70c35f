"""Queue depths and stuck queues for ``/health`` and ``/metrics``.

A timer asks the broker, every ``interval`` seconds, how many messages are
ready on each of the service's queues and how many consumers each has (a
passive ``queue.declare`` on the publishing channel). ``/health`` reads the
last answers: it never waits for the broker, and no outbound request ever
waits for this.

A queue is **stuck** when it has messages (ready, or in work in this
process) and nothing has left it for ``stuck_after`` seconds. Something left
a queue when its ready count fell between two looks (or was zero), or, for
the queues this process consumes, when one of its messages was acked
(delivered, dropped or dead-lettered). Messages in work count because with a
RapidPro that is down every message may sit in the prefetch window, retrying,
with none ready. Dead-letter queues (``.failed``) are reported but never
stuck: nothing is meant to drain them.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import attrs
from twisted.internet.defer import Deferred
from twisted.internet.task import LoopingCall

from junebug_api.observe.log import logger
from junebug_api.observe.metrics import NO_METRICS, Metrics

log = logger(__name__)

QueueInfo = Callable[[str], Awaitable[tuple[int, int]]]


@attrs.define(eq=False)
class _QueueState:
    name: str
    role: str
    watched: bool
    ready: int | None = None
    consumers: int | None = None
    in_work: int | None = None
    last_progress: float = 0.0
    stuck: bool = False


@attrs.define(eq=False)
class QueueMonitor:
    """Looks at the queues on a timer; ``status()`` is what ``/health`` shows.

    ``queues`` maps a role (``outbound``, ``inbound_failed``, ...) to a queue
    name; ``query`` answers ``(messages ready, consumers)`` for a queue name;
    ``last_taken`` gives, for a queue this process consumes, when it last
    finished one of its messages (None if never or not consumed here), and
    ``in_work`` how many of its messages this process holds, unacked on a
    live connection (None: not consumed here).
    """

    queues: dict[str, str]
    query: QueueInfo
    last_taken: Callable[[str], float | None]
    clock: Any
    in_work: Callable[[str], int | None] = lambda queue: None
    stuck_after: float = 300.0
    interval: float = 5.0
    metrics: Metrics = NO_METRICS
    _states: list[_QueueState] = attrs.field(factory=list, init=False)
    _loop: LoopingCall | None = attrs.field(default=None, init=False)
    _running: Deferred | None = attrs.field(default=None, init=False)
    _stopped: bool = attrs.field(default=False, init=False)

    def __attrs_post_init__(self) -> None:
        now = self.clock.seconds()
        self._states = [
            _QueueState(name, role, watched=not role.endswith("failed"), last_progress=now)
            for role, name in self.queues.items()
        ]

    def start(self) -> None:
        """Look now, then every ``interval`` seconds."""
        self._loop = LoopingCall(self._tick)
        self._loop.clock = self.clock
        self._loop.start(self.interval, now=True).addErrback(
            lambda f: log.failure("Queue monitor stopped", f)
        )

    def stop(self) -> None:
        """No more looks; a look under way reports nothing more (its channel's
        series may be gone from the metrics)."""
        self._stopped = True
        if self._loop is not None and self._loop.running:
            self._loop.stop()

    def _tick(self) -> Deferred | None:
        if self._running is not None:
            return None  # the last look is still waiting for the broker
        self._running = Deferred.fromCoroutine(self.refresh())
        self._running.addBoth(self._finished)
        return None

    def _finished(self, result: Any) -> None:
        self._running = None

    async def refresh(self) -> None:
        """Ask the broker about every queue and update ``stuck``."""
        for state in self._states:
            if self._stopped:
                return
            try:
                ready, consumers = await self.query(state.name)
            except Exception as e:
                state.ready = state.consumers = None
                log.debug("Cannot look at queue {queue}: {error}", queue=state.name, error=e)
                continue
            if not self._stopped:
                self._update(state, ready, consumers)

    def _update(self, state: _QueueState, ready: int, consumers: int) -> None:
        now = self.clock.seconds()
        taken = self.last_taken(state.name)
        in_work = self.in_work(state.name)
        waiting = ready + (in_work or 0)
        if waiting == 0 or (state.ready is not None and ready < state.ready):
            state.last_progress = now
        if taken is not None and taken > state.last_progress:
            state.last_progress = taken
        state.ready, state.consumers, state.in_work = ready, consumers, in_work
        was_stuck = state.stuck
        state.stuck = (
            state.watched and waiting > 0 and now - state.last_progress >= self.stuck_after
        )
        if state.stuck and not was_stuck:
            log.warn(
                "Queue {queue} is stuck: {ready} message(s) ready, {in_work} in work here,"
                " {consumers} consumer(s), nothing taken for {seconds:.0f} s",
                queue=state.name,
                ready=ready,
                in_work=in_work or 0,
                consumers=consumers,
                seconds=now - state.last_progress,
            )
        elif was_stuck and not state.stuck:
            log.info("Queue {queue} is moving again", queue=state.name)
        self.metrics.queue_depth(state.role, ready, consumers, state.stuck)

    def status(self) -> dict[str, dict[str, Any]]:
        """Per queue name: ``messages_ready``, ``consumers``, ``stuck`` (from the
        last look), and ``messages_in_work`` for the queues this process
        consumes: the deliveries it holds now (no broker asked, so not stale)."""
        result = {}
        for s in self._states:
            entry: dict[str, Any] = {
                "messages_ready": s.ready,
                "consumers": s.consumers,
                "stuck": s.stuck,
            }
            in_work = self.in_work(s.name)
            if in_work is not None:
                entry["messages_in_work"] = in_work
            result[s.name] = entry
        return result

    @property
    def any_stuck(self) -> bool:
        return any(s.stuck for s in self._states)
