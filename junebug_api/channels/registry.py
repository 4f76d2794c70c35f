"""The channel registry: the channels running now, and each one's lifecycle.

A channel's start, change and stop take one path here, whether it comes
from the config file at start, the channel API, another process's store or
a SIGHUP reload. Starting a channel declares its queues, registers its
consumers, starts its queue monitor, files its log events, and adds its
secrets to the redactor; the HTTP API finds it per request (:meth:`get`),
and ``/metrics``, ``/health`` and ``GET /channels/`` read :meth:`channels`.
Stopping it undoes each: its routes answer 404 at once, its consumers are
cancelled, the messages it has in work finish (up to ``shutdown_timeout``)
or are rejected back to their queue, and nothing on its queues is deleted.
A change builds the channel anew from its new settings and puts it in the
old one's place in one step, so the next request and the next message see
the new settings; the old one's messages in work finish as a stop's do.

Lifecycle steps run one at a time (a lock); the wait for a stopped
channel's messages in work does not hold the others up.
"""

from __future__ import annotations

from collections.abc import Callable, Container, Iterable, Mapping, Sequence
from typing import Any, Protocol

import attrs
from twisted.internet.defer import Deferred, DeferredList, DeferredLock, gatherResults

from junebug_api.amqp.connect import SetupFailed
from junebug_api.amqp.connection import Consumer
from junebug_api.channels.channel import Channel, ChannelLogRouter, ChannelMetrics
from junebug_api.config.channels import ChannelSettings, check_distinct
from junebug_api.config.checks import ConfigError
from junebug_api.config.redaction import channel_secret_values
from junebug_api.observe.log import Redactor, logger
from junebug_api.observe.metrics import NO_METRICS, Metrics
from junebug_api.observe.queue_health import QueueMonitor

log = logger(__name__)

#: Where a channel comes from: the config file, or the channel API.
ORIGINS = ("config", "api")


class ChannelAmqp(Protocol):
    """What the registry needs of the AMQP service
    (:class:`~junebug_api.amqp.service.AmqpService`)."""

    def add_queues(self, queues: Mapping[str, Mapping[str, Any]]) -> Deferred[None]: ...

    def remove_queues(self, names: Iterable[str]) -> None: ...

    def add_consumer(self, queue: str, consumer: Consumer, prefetch: int | None = None) -> None: ...

    def remove_consumer(self, queue: str) -> Deferred[None]: ...

    async def queue_info(self, queue: str) -> tuple[int, int]: ...


#: Builds a channel from its settings, the connector names that are not its
#: own, and the channel it replaces (:class:`~junebug_api.channels.builder.ChannelBuilder`).
Build = Callable[[ChannelSettings, Container[str], "Channel | None"], Channel]


class OtherConnectors:
    """The connector names of the running channels other than channel
    ``own``: a live view for its sender (replies go only to its own inbound
    messages)."""

    def __init__(self, connectors: Mapping[str, str], own: str) -> None:
        self._connectors = connectors
        self._own = own

    def __contains__(self, name: object) -> bool:
        owner = self._connectors.get(name) if isinstance(name, str) else None
        return owner is not None and owner != self._own

    def __bool__(self) -> bool:
        """True while another channel runs (shares the state cache)."""
        return any(owner != self._own for owner in self._connectors.values())


@attrs.define(eq=False)
class _Running:
    """A running channel and what the registry set up for it."""

    channel: Channel
    origin: str
    monitor: QueueMonitor
    secrets: list[str]


@attrs.define(eq=False)
class ChannelRegistry:
    """Owns each running channel's whole lifecycle: see the module docstring.

    ``shutdown_timeout``: how long a stopped channel's messages in work may
    take to finish; ``stuck_after``: the queue monitors' ``health_stuck_after``.
    """

    build: Build
    amqp: ChannelAmqp
    clock: Any
    shutdown_timeout: float
    stuck_after: float
    metrics: Metrics = NO_METRICS
    redactor: Redactor = attrs.field(factory=Redactor)
    log_router: ChannelLogRouter = attrs.field(factory=ChannelLogRouter)
    # Channel id -> the running channel, in start order.
    _running: dict[str, _Running] = attrs.field(factory=dict, init=False)
    # Connector name -> the id of the channel running it (OtherConnectors' view).
    _connectors: dict[str, str] = attrs.field(factory=dict, init=False)
    # Channels stopped or replaced whose messages in work are still settling.
    _retiring: dict[Channel, Deferred[int]] = attrs.field(factory=dict, init=False)
    _lock: DeferredLock = attrs.field(factory=DeferredLock, init=False)
    _closed: bool = attrs.field(default=False, init=False)

    # -- what runs --------------------------------------------------------------

    def get(self, channel_id: str) -> Channel | None:
        """The running channel ``channel_id``, if any."""
        running = self._running.get(channel_id)
        return None if running is None else running.channel

    def channels(self) -> list[Channel]:
        """The running channels, in start order."""
        return [running.channel for running in self._running.values()]

    def origin(self, channel_id: str) -> str | None:
        """Where the running channel ``channel_id`` comes from: ``config`` or ``api``."""
        running = self._running.get(channel_id)
        return None if running is None else running.origin

    def queue_status(self) -> dict[str, dict[str, Any]]:
        """Every running channel's queues as their monitors saw them last (``/health``)."""
        status: dict[str, dict[str, Any]] = {}
        for running in self._running.values():
            status.update(running.monitor.status())
        return status

    def any_stuck(self) -> bool:
        return any(running.monitor.any_stuck for running in self._running.values())

    def in_work(self) -> int:
        """Messages this process holds, those of channels still settling included."""
        channels = [*self.channels(), *self._retiring]
        return sum(worker.in_flight for channel in channels for worker in channel.workers)

    # -- lifecycle ----------------------------------------------------------------

    async def start(self, settings: ChannelSettings, origin: str) -> Channel:
        """Start a channel; ConfigError (one line) if its id, connector name or
        messages path is another running channel's, or its queues cannot be declared."""
        if origin not in ORIGINS:
            raise ValueError(f"origin must be one of {ORIGINS}, not {origin!r}")
        async with self._lock:
            self._check_free(settings, replacing=None)
            return await self._start(settings, origin, None)

    async def change(self, settings: ChannelSettings) -> Channel:
        """Put channel ``settings.id`` (KeyError if not running) on ``settings``:
        the next request and message see them; its messages in work finish
        as they began."""
        async with self._lock:
            old = self._running[settings.id]
            self._check_free(settings, replacing=settings.id)
            return await self._start(settings, old.origin, old)

    async def restart(self, channel_id: str) -> None:
        """Stop and start channel ``channel_id`` (KeyError if not running) with
        its settings, with no gap in which its routes answer 404."""
        async with self._lock:
            old = self._running[channel_id]
            await self._start(old.channel.settings, old.origin, old)

    async def stop(self, channel_id: str) -> None:
        """Stop channel ``channel_id`` (KeyError if not running); returns once
        its messages in work are settled (finished, or back on their queue)."""
        settled = await self._stop_now(channel_id)
        await settled

    async def stop_all(self, timeout: float) -> int:
        """Stop every channel (the service stops): messages in work get
        ``timeout`` s to finish; returns how many went back to their queue."""
        async with self._lock:
            self._closed = True
            settling = [
                self._stop_running(channel_id, timeout) for channel_id in list(self._running)
            ]
        settling += [d for d in self._retiring.values() if d not in settling]
        # A settling someone else awaits (a stop under way) answers None here.
        return sum(count or 0 for count in await gatherResults(settling))

    async def apply(self, wanted: Sequence[ChannelSettings], origin: str) -> None:
        """Make the channels of ``origin`` those of ``wanted``: start the new,
        change those whose settings differ, stop those gone. Each channel
        that cannot be is one log line; the other origin's channels stay."""
        # Decided once the steps asked before are done (the config file's
        # channels still starting when a SIGHUP comes, say), so that none is
        # started twice or left as it was; the steps run in that order after.
        async with self._lock:
            steps = self._steps_to(wanted, origin)
        await DeferredList(steps, consumeErrors=True)

    def _steps_to(self, wanted: Sequence[ChannelSettings], origin: str) -> list[Deferred[Any]]:
        by_id = {settings.id: settings for settings in wanted}
        steps: list[Deferred[Any]] = []
        for channel_id, running in list(self._running.items()):
            if running.origin == origin and channel_id not in by_id:
                steps.append(self._step("stopped", channel_id, self._stop_soon(channel_id)))
        for settings in wanted:
            step = self._apply_one(settings, origin)
            if step is not None:
                steps.append(self._step(step[0], settings.id, step[1]))
        return steps

    def _apply_one(self, settings: ChannelSettings, origin: str) -> tuple[str, Any] | None:
        running = self._running.get(settings.id)
        if running is None:
            return "started", self.start(settings, origin)
        if running.origin != origin:
            log.error(
                "Channel {channel} of the {origin} is not started: the {other} has a"
                " channel with this id",
                channel=settings.id,
                origin=_origin_name(origin),
                other=_origin_name(running.origin),
            )
            return None
        if running.channel.settings != settings:
            return "changed", self.change(settings)
        return None

    @staticmethod
    def _step(what: str, channel_id: str, step: Any) -> Deferred[Any]:
        def failed(failure: Any) -> None:
            if failure.check(ConfigError, KeyError):
                log.error(
                    "Channel {channel} could not be {what}: {error}",
                    channel=channel_id,
                    what=what,
                    error=failure.getErrorMessage(),
                )
            else:
                log.failure(
                    "Channel {channel} could not be {what}", failure, channel=channel_id, what=what
                )

        def done(_: Any) -> None:
            if what != "stopped":  # a stop says so itself
                log.info("Channel {channel} {what}", channel=channel_id, what=what)

        return Deferred.fromCoroutine(step).addCallbacks(done, failed)

    # -- the steps --------------------------------------------------------------

    def _check_free(self, settings: ChannelSettings, replacing: str | None) -> None:
        if self._closed:
            raise ConfigError(f"channels.{settings.id}: the service is stopping")
        if replacing is None and settings.id in self._running:
            raise ConfigError(f"channels.{settings.id}: a channel with this id runs already")
        others = [r.channel.settings for cid, r in self._running.items() if cid != replacing]
        top = next((s for s in others if s.messages_path != _own_path(s.id)), None)
        check_distinct([*others, settings], top)

    async def _start(self, settings: ChannelSettings, origin: str, old: _Running | None) -> Channel:
        """Build and start a channel; in ``old``'s place if given (which then settles)."""
        channel = self.build(
            settings,
            OtherConnectors(self._connectors, settings.id),
            old.channel if old is not None else None,
        )
        declarations = channel.queues.declarations()
        try:
            await self.amqp.add_queues(declarations)
        except SetupFailed as e:
            kept = old.channel.queues.declarations() if old is not None else {}
            self.amqp.remove_queues([q for q in declarations if q not in kept])
            raise ConfigError(f"channels.{settings.id}: {e}") from None
        if old is None or old.channel.settings.ignored != settings.ignored:
            _warn_of_ignored(settings)
        running = _Running(channel, origin, self._monitor(channel), channel_secret_values(settings))
        self.redactor.add(running.secrets)
        self.log_router.add(channel)
        self._running[settings.id] = running
        self._index_connectors()
        if old is not None:
            keep = channel.queues.declarations()
            self._retire(old, keep, self.shutdown_timeout).addErrback(_settle_failed, settings.id)
        for queue, worker in channel.consumers.items():
            self.amqp.add_consumer(queue, worker, channel.prefetch)
        # Its RapidPro down already (changed or restarted during an outage):
        # paused and probing from the start, as the channel it replaces was.
        channel.inbound_gate.wait_paused()
        running.monitor.start()
        return channel

    async def _stop_soon(self, channel_id: str) -> None:
        """Stop channel ``channel_id``; its messages in work settle meanwhile."""
        await self._stop_now(channel_id)

    async def _stop_now(self, channel_id: str) -> Deferred[int]:
        """Stop channel ``channel_id`` at once (KeyError if not running); the
        Deferred fires once its messages in work are settled."""
        async with self._lock:
            settled = self._stop_running(channel_id, self.shutdown_timeout)
        log.info("Channel {channel} stopped", channel=channel_id)
        return settled

    def _stop_running(self, channel_id: str, timeout: float) -> Deferred[int]:
        running = self._running.pop(channel_id)
        self._index_connectors()
        settled = self._retire(running, keep={}, timeout=timeout)
        self.metrics.forget_channel(channel_id)
        return settled

    def _retire(self, running: _Running, keep: Container[str], timeout: float) -> Deferred[int]:
        """Take ``running`` off the broker's and the process's hands: its
        monitor and queue declarations (but those in ``keep``) at once, its
        consumers cancelled; then its messages in work settle."""
        channel = running.channel
        running.monitor.stop()
        channel.inbound_gate.stop()
        self.amqp.remove_queues([q for q in channel.queues.declarations() if q not in keep])
        cancelled = [self.amqp.remove_consumer(queue) for queue in channel.consumers]
        settled = Deferred.fromCoroutine(self._settle(running, cancelled, timeout))
        if not settled.called:
            self._retiring[channel] = settled
        return settled

    async def _settle(
        self, running: _Running, cancelled: list[Deferred[None]], timeout: float
    ) -> int:
        channel = running.channel
        try:
            await gatherResults(cancelled)
            drains = [
                Deferred.fromCoroutine(worker.drain(timeout, release=True))
                for worker in channel.workers
            ]
            released = sum(await gatherResults(drains))
        finally:
            self._retiring.pop(channel, None)
            self.redactor.remove(running.secrets)
            self.log_router.remove(channel)
        if released:
            log.warn(
                "Channel {channel}: {count} message(s) still in work after {timeout} s went"
                " back to their queue",
                channel=channel.id,
                count=released,
                timeout=timeout,
            )
        return released

    def _monitor(self, channel: Channel) -> QueueMonitor:
        return QueueMonitor(
            channel.queues.by_role(),
            self.amqp.queue_info,
            channel.last_taken,
            self.clock,
            in_work=channel.in_work,
            stuck_after=self.stuck_after,
            interval=min(5.0, max(1.0, self.stuck_after / 4)),
            metrics=ChannelMetrics(self.metrics, channel.id),
        )

    def _index_connectors(self) -> None:
        self._connectors.clear()
        for channel_id, running in self._running.items():
            self._connectors[running.channel.settings.connector_name] = channel_id


def _warn_of_ignored(settings: ChannelSettings) -> None:
    for option, why in sorted(settings.ignored.items()):
        log.warn(
            "Channel {channel}: {option} is ignored ({why})",
            channel=settings.id,
            option=option,
            why=why,
        )


def _settle_failed(failure: Any, channel_id: str) -> int:
    log.failure(
        "Channel {channel}: the replaced channel did not settle", failure, channel=channel_id
    )
    return 0


def _own_path(channel_id: str) -> str:
    return f"/channels/{channel_id}/messages"


def _origin_name(origin: str) -> str:
    return "config file" if origin == "config" else "channel API"
