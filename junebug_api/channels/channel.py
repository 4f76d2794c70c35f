"""One channel at run time: its queues, workers, sender, credentials and status.

A :class:`Channel` is built from its :class:`ChannelSettings` and the pieces
every channel shares (the AMQP service's ``publish``, the state cache, the
HTTP delivery pool). It owns what is its alone: its queue names (a
:class:`~junebug_api.formats.queue_names.QueueNames`), the workers of its
``.inbound`` and ``.event`` queues, its :class:`OutboundSender`, its API
credentials, its message rates over the last ``metric_window`` seconds, the
state of its deliveries and the last ``max_logs`` log records about it.
"""

from __future__ import annotations

import logging
import traceback
from collections import deque
from collections.abc import Awaitable, Callable, Container, Iterable
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.logger import LogLevel, formatEvent

from junebug_api.channels.message_status import message_status, status_event
from junebug_api.config.channels import ChannelSettings
from junebug_api.delivery.consumer import MessageWorker
from junebug_api.delivery.events import EventHandler
from junebug_api.delivery.http_delivery import HttpDelivery
from junebug_api.delivery.inbound import InboundHandler
from junebug_api.delivery.outages import OutageTracker, destination_of
from junebug_api.delivery.outbound import OutboundSender
from junebug_api.delivery.pause_while_down import PauseWhileDown, QueueControl
from junebug_api.delivery.retry_policy import RetryPolicy
from junebug_api.formats.message_ids import generate_message_id
from junebug_api.formats.queue_names import QueueNames
from junebug_api.formats.urls import mask_urls, url_origin
from junebug_api.formats.vumi_messages import VumiMessage
from junebug_api.http.api import ApiCredentials
from junebug_api.observe.metrics import NO_METRICS, Metrics
from junebug_api.state.cache import StateCache

#: Old Junebug's rate fields, by what is counted.
RATE_FIELDS = {
    "inbound": "inbound_message_rate",
    "outbound": "outbound_message_rate",
    "submitted": "submitted_event_rate",
    "rejected": "rejected_event_rate",
    "delivery_succeeded": "delivery_succeeded_rate",
    "delivery_failed": "delivery_failed_rate",
    "delivery_pending": "delivery_pending_rate",
}

_EVENT_KINDS = {"ack": "submitted", "nack": "rejected"}
_DELIVERY_KINDS = {
    "pending": "delivery_pending",
    "failed": "delivery_failed",
    "delivered": "delivery_succeeded",
}


class RateMeter:
    """Counts per second, for rates over the last ``window`` seconds.

    One small ring of per-second counts per kind: a count is two list
    operations, a rate a sum over ``window`` slots; no timestamps are kept.
    """

    def __init__(self, clock: IReactorTime, window: float, kinds: Iterable[str]) -> None:
        self._clock = clock
        self._window = window
        self._slots = max(1, int(window + 0.999999)) + 1
        self._counts = {kind: [0] * self._slots for kind in kinds}
        self._seconds = {kind: [-1] * self._slots for kind in kinds}
        #: Every count since start, by kind (for /metrics counters).
        self.totals = dict.fromkeys(self._counts, 0)

    def hit(self, kind: str, count: int = 1) -> None:
        second = int(self._clock.seconds())
        slot = second % self._slots
        seconds = self._seconds[kind]
        counts = self._counts[kind]
        if seconds[slot] != second:
            seconds[slot] = second
            counts[slot] = 0
        counts[slot] += count
        self.totals[kind] += count

    def rate(self, kind: str) -> float:
        """Events per second over the last ``window`` whole seconds."""
        now = int(self._clock.seconds())
        oldest = now - self._slots + 1
        seconds = self._seconds[kind]
        counts = self._counts[kind]
        total = sum(c for s, c in zip(seconds, counts, strict=True) if oldest <= s < now)
        return total / (self._slots - 1)


class ChannelLog:
    """The last ``size`` log records about one channel, in old Junebug's shape."""

    def __init__(self, channel_id: str, size: int) -> None:
        self._channel_id = channel_id
        self._records: deque[dict[str, Any]] = deque(maxlen=size)

    def add(self, event: dict[str, Any]) -> None:
        record: dict[str, Any] = {
            "logger": self._channel_id,
            "level": _python_level(event.get("log_level")),
            "timestamp": event.get("log_time"),
            # Log lines show URLs masked (formats.urls): these records too.
            "message": mask_urls(formatEvent(event)),
        }
        failure = event.get("log_failure")
        if failure is not None:
            tb = failure.getTracebackObject()
            record["exception"] = {
                "class": failure.type.__name__,
                "instance": mask_urls(failure.getErrorMessage()),
                "stack": traceback.format_tb(tb)
                if tb is not None
                else failure.getTraceback().splitlines(),
            }
        self._records.append(record)

    def newest(self, n: int) -> list[dict[str, Any]]:
        """The newest ``n`` records, newest first."""
        records = self._records
        return [records[-i] for i in range(1, min(n, len(records)) + 1)]


def _python_level(level: Any) -> int:
    return {
        LogLevel.debug: logging.DEBUG,
        LogLevel.info: logging.INFO,
        LogLevel.warn: logging.WARNING,
        LogLevel.error: logging.ERROR,
        LogLevel.critical: logging.CRITICAL,
    }.get(level, logging.INFO)


class DeliveryState:
    """Whether a channel's POSTs to one destination are getting through."""

    def __init__(self, clock: IReactorTime) -> None:
        self._clock = clock
        self.last_success: float | None = None
        self.last_failure: float | None = None
        self.last_error: str | None = None
        self.in_flight = 0

    def status(self) -> dict[str, Any]:
        failing = self.last_failure is not None and (
            self.last_success is None or self.last_failure > self.last_success
        )
        status: dict[str, Any] = {
            "health": "degraded" if failing else "ok",
            "in_flight": self.in_flight,
        }
        if failing:
            status["error"] = self.last_error
        return status


class Channel:
    """One channel: see the module docstring."""

    def __init__(
        self,
        settings: ChannelSettings,
        *,
        queues: QueueNames,
        cache: StateCache,
        delivery: HttpDelivery,
        publish: Callable[..., Deferred],
        inbound_policy: RetryPolicy,
        event_policy: RetryPolicy,
        outages: OutageTracker,
        control: QueueControl,
        probe_interval: float,
        max_body_size: int,
        clock: IReactorTime,
        mo_message_url_timeout: float,
        event_url_timeout: float,
        metric_window: float,
        max_logs: int,
        store_message_events: bool,
        metrics: Metrics = NO_METRICS,
        other_connectors: Container[str] = frozenset(),
        previous: Channel | None = None,
    ) -> None:
        self.settings = settings
        self.id = settings.id
        self.queues = queues
        self._cache = cache
        self._clock = clock
        self._store_events = store_message_events
        # A changed channel (``previous``: it before the change) keeps its
        # counts and log records.
        self.rates = previous.rates if previous else RateMeter(clock, metric_window, RATE_FIELDS)
        self.log = previous.log if previous else ChannelLog(settings.id, max_logs)
        self._max_logs = max_logs
        self.mo_delivery = DeliveryState(clock)
        self.event_delivery = DeliveryState(clock)
        self.credentials = ApiCredentials(
            settings.api_auth_username, settings.api_auth_password, settings.api_auth_token
        )
        self.sender = OutboundSender(
            settings.connector_name,
            settings.transport_type,
            settings.default_from_addr,
            settings.allow_expired_replies,
            cache,
            publish,
            metrics=metrics,
            character_limit=settings.character_limit,
            channel_id=settings.id,
            other_connectors=other_connectors,
        )
        # Inbound JSON's channel_id is the message's transport_name, as in
        # vumi2: the connector name, which is the channel id by default.
        self._inbound = InboundHandler(
            cache,
            delivery,
            settings.mo_message_url,
            settings.mo_message_url_auth_token,
            mo_message_url_timeout,
            max_body_size=max_body_size,
            metrics=metrics,
        )
        self._events = EventHandler(
            cache,
            delivery,
            settings.id,
            settings.default_event_url,
            settings.default_event_auth_token,
            event_url_timeout,
            max_body_size=max_body_size,
            metrics=metrics,
            on_event=self._store_event if store_message_events else None,
            on_done=self._event_done,
            legacy_event_info=lambda: not other_connectors,
        )
        # .inbound has one destination: while it is down, stop taking messages.
        self.inbound_gate = PauseWhileDown(
            queues.inbound,
            destination_of(settings.mo_message_url),
            outages,
            control,
            lambda body, acker: inbound_worker.handle(body, acker),
            clock,
            probe_interval=probe_interval,
        )
        inbound_worker = MessageWorker(
            queues.inbound,
            self._handle_inbound,
            publish,
            inbound_policy,
            clock,
            retry_queues=queues.delay_queues("inbound"),
            hold_gate=self.inbound_gate,
            metrics=metrics,
            role="inbound",
        )
        event_worker = MessageWorker(
            queues.event,
            self._handle_event,
            publish,
            event_policy,
            clock,
            retry_queues=queues.delay_queues("event"),
            metrics=metrics,
            role="event",
        )
        self.workers = [inbound_worker, event_worker]
        self._by_queue = {w.queue: w for w in self.workers}

    @property
    def consumers(self) -> dict[str, MessageWorker]:
        """The channel's consumers by queue, for the AMQP service."""
        return {w.queue: w for w in self.workers}

    @property
    def prefetch(self) -> int:
        return self.settings.worker_concurrency

    @property
    def messages_path(self) -> str:
        return self.settings.messages_path

    def logs(self, n: int | None = None) -> list[dict[str, Any]]:
        """The newest ``n`` (default: all kept) log records about this channel, newest first."""
        return self.log.newest(self._max_logs if n is None else n)

    # -- the message paths -------------------------------------------------

    async def send(self, body: bytes) -> dict[str, Any]:
        """Publish an outbound request body (``POST .../messages``)."""
        result = await self.sender.send(body)
        self.rates.hit("outbound")
        return result

    async def _handle_inbound(self, body: bytes) -> str | None:
        result = await self._tracked(self.mo_delivery, self._inbound, body)
        self.rates.hit("inbound")
        return result

    async def _handle_event(self, body: bytes) -> str | None:
        return await self._tracked(self.event_delivery, self._events, body)

    async def _tracked(
        self, state: DeliveryState, handle: Callable[[bytes], Awaitable[str | None]], body: bytes
    ) -> str | None:
        """Run one delivery, keeping ``state``'s in-flight count and last outcome."""
        state.in_flight += 1
        try:
            result = await handle(body)
        except Exception as e:
            state.last_failure = self._clock_seconds()
            # Shown on the open /health: a URL in it as scheme://host:port only.
            state.last_error = mask_urls(str(e), url_origin)
            raise
        finally:
            state.in_flight -= 1
        state.last_success = self._clock_seconds()
        return result

    def _event_done(self, event: VumiMessage) -> None:
        """An event was delivered (or dropped): count it by its old Junebug name."""
        if event["event_type"] == "delivery_report":
            self.rates.hit(_DELIVERY_KINDS[event["delivery_status"]])
        else:
            self.rates.hit(_EVENT_KINDS[event["event_type"]])

    def last_taken(self, queue: str) -> float | None:
        """When this channel last finished a message of ``queue`` (None: never,
        or not a queue it consumes); for the queue monitor."""
        worker = self._by_queue.get(queue)
        return None if worker is None else worker.last_taken

    def in_work(self, queue: str) -> int | None:
        """How many messages of ``queue`` this channel holds (None: not consumed here)."""
        worker = self._by_queue.get(queue)
        return None if worker is None else worker.in_flight

    def _clock_seconds(self) -> float:
        return self._clock.seconds()

    async def _store_event(self, event: VumiMessage) -> None:
        event_id = event.get("event_id") or generate_message_id()
        await self._cache.store_message_event(
            self.id, event["user_message_id"], event_id, status_event(event, self.id)
        )

    async def message_status(self, message_id: str) -> dict[str, Any]:
        """Old Junebug's status of one outbound message."""
        cache = self._cache
        events = await cache.fetch_message_events(self.id, message_id) if self._store_events else []
        return message_status(message_id, events)

    # -- what GET /channels/<id> shows --------------------------------------

    def health(self, amqp_health: dict[str, Any]) -> dict[str, Any]:
        """The channel's components and ``health``, the worst of them (for
        ``/health``, and the ``status`` of ``GET /channels/<id>``)."""
        components = {
            "amqp": {"health": amqp_health.get("health", "down")},
            "mo_message_url": self.mo_delivery.status(),
            "event_url": self.event_delivery.status(),
        }
        worst = "ok"
        for component in components.values():
            health = component["health"]
            if health == "down":
                worst = "down"
            elif health == "degraded" and worst == "ok":
                worst = "degraded"
        return {"health": worst, **components}

    def status(self, amqp_health: dict[str, Any]) -> dict[str, Any]:
        """``status`` of ``GET /channels/<id>``: components, the worst of them,
        and old Junebug's seven rates."""
        components = self.health(amqp_health)
        worst = components.pop("health")
        status: dict[str, Any] = {"status": worst, "components": components}
        for kind, field in RATE_FIELDS.items():
            status[field] = self.rates.rate(kind)
        return status

    def info(self, amqp_health: dict[str, Any]) -> dict[str, Any]:
        """The ``result`` of ``GET /channels/<id>``: settings without secrets, and status."""
        return {**self.settings.public(), "status": self.status(amqp_health)}


class ChannelLogRouter:
    """A log observer that files each log event about a channel in its log.

    An event is about a channel when it carries a ``channel`` field (a channel
    id) or a ``queue`` field naming one of the channel's queues. Channels are
    added and removed as they start and stop.
    """

    def __init__(self, channels: Iterable[Channel] = ()) -> None:
        self._by_id: dict[str, Channel] = {}
        self._by_queue: dict[str, Channel] = {}
        for channel in channels:
            self.add(channel)

    def add(self, channel: Channel) -> None:
        """File events about ``channel`` in its log (instead of a channel it replaces)."""
        self._by_id[channel.id] = channel
        for queue in channel.queues.by_role().values():
            self._by_queue[queue] = channel

    def remove(self, channel: Channel) -> None:
        """File events about ``channel`` no more (unless another took its place)."""
        if self._by_id.get(channel.id) is channel:
            del self._by_id[channel.id]
        for queue in channel.queues.by_role().values():
            if self._by_queue.get(queue) is channel:
                del self._by_queue[queue]

    def __call__(self, event: dict[str, Any]) -> None:
        channel = None
        channel_id = event.get("channel")
        if isinstance(channel_id, str):
            channel = self._by_id.get(channel_id)
        if channel is None:
            queue = event.get("queue")
            if isinstance(queue, str):
                channel = self._by_queue.get(queue)
        if channel is not None:
            try:
                channel.log.add(event)
            except Exception:
                pass  # a log record must never break logging


class ChannelMetrics(Metrics):
    """The metrics a channel's queue monitor reports to: its queue gauges get
    the channel's id as their ``channel`` label (the queue monitor reports
    nothing else)."""

    def __init__(self, metrics: Metrics, channel_id: str) -> None:
        self._metrics = metrics
        self._channel_id = channel_id
        self.enabled = metrics.enabled

    def queue_depth(self, role: str, ready: int, consumers: int, stuck: bool) -> None:
        self._metrics.queue_depth(role, ready, consumers, stuck, channel=self._channel_id)
