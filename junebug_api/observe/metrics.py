"""Prometheus metrics: what the service counts, and ``GET /metrics``.

Components get a :class:`Metrics` at construction and call its small methods
(``outbound_request``, ``consumed``, ...). :data:`NO_METRICS` does nothing,
so code and tests that do not care need not pass one, and
``metrics_enabled: false`` costs nothing. :class:`PrometheusMetrics` keeps
its own ``CollectorRegistry`` (never prometheus_client's global one) and
renders it with ``generate_latest``; prometheus_client's Twisted resource is
not used, because it imports the reactor when it is imported.

Labels take only bounded values: status codes, outcomes, targets (``mo``,
``event``), status classes, queue roles and connection names; never message
ids, addresses or URLs.
"""

from __future__ import annotations

import time
from bisect import bisect_left
from collections.abc import Callable, Iterable
from typing import Any

from junebug_api import __version__

#: Every consumed message ends as one of these.
OUTCOMES = ("delivered", "dead_lettered", "dropped")
#: Delivery POSTs go to one of these.
TARGETS = ("mo", "event")


class Metrics:
    """The no-op metrics every component may be given; the interface too."""

    enabled = False

    def outbound_request(self, code: int) -> None:
        """An answer to ``POST .../messages`` with status ``code``."""

    def now(self) -> float:
        """The metrics clock, for :meth:`publish_done`'s ``started``."""
        return 0.0

    def publish_done(self, started: float, confirmed: bool) -> None:
        """A publish begun at ``started`` (by :meth:`now`) was confirmed, or not."""

    def delivery_post(self, target: str, status_class: str, seconds: float) -> None:
        """One POST to RapidPro (``target`` mo or event) and how it ended."""

    def consumed(self, role: str, outcome: str) -> None:
        """A message of queue role ``role`` (inbound, event) ended: see OUTCOMES."""

    def retry(self, role: str) -> None:
        """A failed attempt of a ``role`` message that will be tried again."""

    def amqp_connected(self, connection: str) -> None:
        """The AMQP connection ``connection`` (re)opened."""

    def cache_error(self) -> None:
        """A state cache operation failed."""

    def queue_depth(
        self, role: str, ready: int, consumers: int, stuck: bool, channel: str = ""
    ) -> None:
        """The last passive declare of the queue with role ``role`` (of ``channel``)."""

    def watch_channels(self, channels: Callable[[], Iterable[Any]]) -> None:
        """Per-channel series read at scrape time from the channels running
        then (``channels()``: objects with ``id``, ``rates.totals``,
        ``mo_delivery``, ``event_delivery``); the ``channel`` label takes only
        running channels' ids."""

    def forget_channel(self, channel_id: str) -> None:
        """A channel stopped: its queue series (:meth:`queue_depth`) go."""

    def watch(
        self,
        *,
        connections: Callable[[], dict[str, dict[str, Any]]],
        in_work: Callable[[], int],
        cache_entries: Callable[[], int] | None,
    ) -> None:
        """Gauges read at scrape time: AMQP connections (state, blocked,
        unconfirmed publishes, by connection name), messages in work, state
        cache entries (None: the cache cannot count them cheaply)."""

    def render(self) -> tuple[bytes, str]:
        """The exposition text and its Content-Type: with metrics off, nothing
        to expose (the route is not even mounted then)."""
        return b"", "text/plain; version=0.0.4; charset=utf-8"


NO_METRICS = Metrics()

_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)


def status_class(code: int) -> str:
    """``2xx``, ``4xx``, ``5xx``, ... for an HTTP status code."""
    return f"{code // 100}xx"


class _Counter:
    """A labelled counter kept as plain ints, collected at scrape time.

    Only the reactor thread counts and scrapes, so no lock is needed;
    prometheus_client's own Counter takes a lock per increment and per
    ``labels()`` lookup, which the outbound path would pay on every request.
    """

    def __init__(self, name: str, documentation: str, labelnames: tuple[str, ...] = ()) -> None:
        self.name = name
        self.documentation = documentation
        self.labelnames = labelnames
        self.values: dict[tuple[str, ...], int] = {} if labelnames else {(): 0}

    def inc(self, *labels: str) -> None:
        values = self.values
        values[labels] = values.get(labels, 0) + 1

    def touch(self, *labels: str) -> None:
        """Show the series (at 0) before its first increment."""
        self.values.setdefault(labels, 0)

    def collect(self) -> Any:
        from prometheus_client.core import CounterMetricFamily

        family = CounterMetricFamily(self.name, self.documentation, labels=self.labelnames)
        for labels, value in self.values.items():
            family.add_metric(list(labels), value)
        yield family


class _Histogram:
    """A labelled histogram kept as plain lists, collected at scrape time (see _Counter)."""

    def __init__(
        self,
        name: str,
        documentation: str,
        labelnames: tuple[str, ...] = (),
        buckets: tuple[float, ...] = _LATENCY_BUCKETS,
    ) -> None:
        self.name = name
        self.documentation = documentation
        self.labelnames = labelnames
        self.bounds = list(buckets)
        # Per label values: [count per bucket (the last one is +Inf), sum].
        self.series: dict[tuple[str, ...], list] = {}
        if not labelnames:
            self.touch()

    def touch(self, *labels: str) -> list:
        series = self.series.get(labels)
        if series is None:
            series = self.series[labels] = [[0] * (len(self.bounds) + 1), 0.0]
        return series

    def observe(self, value: float, *labels: str) -> None:
        series = self.series.get(labels) or self.touch(*labels)
        series[0][bisect_left(self.bounds, value)] += 1
        series[1] += value

    def collect(self) -> Any:
        from prometheus_client.core import HistogramMetricFamily
        from prometheus_client.utils import floatToGoString

        family = HistogramMetricFamily(self.name, self.documentation, labels=self.labelnames)
        for labels, (counts, total) in self.series.items():
            buckets, running = [], 0
            for bound, count in zip([*self.bounds, float("inf")], counts, strict=True):
                running += count
                buckets.append((floatToGoString(bound), running))
            family.add_metric(list(labels), buckets, total)
        yield family


class PrometheusMetrics(Metrics):
    """Metrics kept in a registry of their own and exposed as Prometheus text."""

    enabled = True

    def __init__(self, connector_name: str, clock: Any = None) -> None:
        from prometheus_client import (
            CollectorRegistry,
            Gauge,
            Info,
            PlatformCollector,
            ProcessCollector,
        )

        self._clock_seconds = clock.seconds if clock is not None else time.monotonic
        # The clock itself, not a method calling it: one call less per publish.
        self.now = self._clock_seconds  # type: ignore[method-assign]
        self.registry = registry = CollectorRegistry(auto_describe=True)
        ProcessCollector(registry=registry)
        PlatformCollector(registry=registry)
        Info("junebug_build", "The junebug-api version and connector.", registry=registry).info(
            {"version": __version__, "connector": connector_name}
        )
        self._outbound = _Counter(
            "junebug_outbound_requests",
            "Answers to POST .../messages, by HTTP status code.",
            ("code",),
        )
        self._confirm = _Histogram(
            "junebug_publish_confirm_seconds",
            "Time from an AMQP publish to the broker's confirm.",
        )
        self._publish_failures = _Counter(
            "junebug_publish_failures",
            "AMQP publishes that were not confirmed (nack, unroutable, connection lost).",
        )
        self._post = _Histogram(
            "junebug_delivery_post_seconds",
            "POSTs of inbound messages (mo) and events to RapidPro, by status class"
            " (2xx, 4xx, 5xx, error, timeout).",
            ("target", "status_class"),
        )
        self._consumed = _Counter(
            "junebug_consumed_messages",
            "Consumed messages by queue role and how they ended (delivered,"
            " dead_lettered, dropped).",
            ("queue_role", "outcome"),
        )
        self._retries = _Counter(
            "junebug_delivery_retries",
            "Failed delivery attempts that will be retried, by queue role.",
            ("queue_role",),
        )
        self._connects = _Counter(
            "junebug_amqp_connections_opened",
            "AMQP connections opened, by connection; more than one means reconnects.",
            ("connection",),
        )
        self._reconnects = _Counter(
            "junebug_amqp_reconnects",
            "AMQP connections opened again after their first open, by connection.",
            ("connection",),
        )
        self._cache_errors = _Counter(
            "junebug_state_cache_errors",
            "State cache operations that failed.",
        )
        for collector in (
            self._outbound,
            self._confirm,
            self._publish_failures,
            self._post,
            self._consumed,
            self._retries,
            self._connects,
            self._reconnects,
            self._cache_errors,
        ):
            registry.register(collector)
        self._queue_ready = Gauge(
            "junebug_queue_messages_ready",
            "Messages ready on a queue at its last passive declare, by channel and queue role.",
            ["channel", "queue_role"],
            registry=registry,
        )
        self._queue_consumers = Gauge(
            "junebug_queue_consumers",
            "Consumers of a queue at its last passive declare, by channel and queue role.",
            ["channel", "queue_role"],
            registry=registry,
        )
        self._queue_stuck = Gauge(
            "junebug_queue_stuck",
            "1 when a queue has messages and none left it for health_stuck_after, by channel"
            " and queue role.",
            ["channel", "queue_role"],
            registry=registry,
        )
        # Every series that exists shows from the start, at 0.
        for target in TARGETS:
            self._post.touch(target, "2xx")
        for role in ("inbound", "event"):
            self._retries.touch(role)
            for outcome in OUTCOMES:
                self._consumed.touch(role, outcome)
        self._Gauge = Gauge
        # The (channel, queue role) labels the queue gauges have series for.
        self._queue_labels: set[tuple[str, str]] = set()

    # -- events -------------------------------------------------------------

    def outbound_request(self, code: int) -> None:
        self._outbound.inc(str(code))

    def publish_done(self, started: float, confirmed: bool) -> None:
        if confirmed:
            self._confirm.observe(self._clock_seconds() - started)
        else:
            self._publish_failures.inc()

    def delivery_post(self, target: str, status_class: str, seconds: float) -> None:
        self._post.observe(seconds, target, status_class)

    def consumed(self, role: str, outcome: str) -> None:
        self._consumed.inc(role, outcome)

    def retry(self, role: str) -> None:
        self._retries.inc(role)

    def amqp_connected(self, connection: str) -> None:
        if (connection,) in self._connects.values:
            self._reconnects.inc(connection)
        else:
            self._reconnects.touch(connection)
        self._connects.inc(connection)

    def cache_error(self) -> None:
        self._cache_errors.inc()

    def queue_depth(
        self, role: str, ready: int, consumers: int, stuck: bool, channel: str = ""
    ) -> None:
        self._queue_labels.add((channel, role))
        self._queue_ready.labels(channel, role).set(ready)
        self._queue_consumers.labels(channel, role).set(consumers)
        self._queue_stuck.labels(channel, role).set(1 if stuck else 0)

    # -- gauges read at scrape time -----------------------------------------

    def watch(
        self,
        *,
        connections: Callable[[], dict[str, dict[str, Any]]],
        in_work: Callable[[], int],
        cache_entries: Callable[[], int] | None,
    ) -> None:
        Gauge = self._Gauge
        registry = self.registry
        names = list(connections())
        up = Gauge(
            "junebug_amqp_connected",
            "1 while the AMQP connection is open, by connection.",
            ["connection"],
            registry=registry,
        )
        blocked = Gauge(
            "junebug_amqp_blocked",
            "1 while the broker blocks publishing on the connection (connection.blocked).",
            ["connection"],
            registry=registry,
        )
        unconfirmed = Gauge(
            "junebug_amqp_unconfirmed_publishes",
            "Publishes waiting for the broker's confirm, by connection.",
            ["connection"],
            registry=registry,
        )
        for name in names:
            up.labels(name).set_function(lambda n=name: connections().get(n, {}).get("up", 0))
            blocked.labels(name).set_function(
                lambda n=name: connections().get(n, {}).get("blocked", 0)
            )
            unconfirmed.labels(name).set_function(
                lambda n=name: connections().get(n, {}).get("unconfirmed", 0)
            )
        Gauge(
            "junebug_messages_in_work",
            "Consumed messages being delivered or waiting for a retry.",
            registry=registry,
        ).set_function(in_work)
        if cache_entries is not None:
            Gauge(
                "junebug_state_cache_entries",
                "Entries in the in-memory state cache.",
                registry=registry,
            ).set_function(cache_entries)

    def watch_channels(self, channels: Callable[[], Iterable[Any]]) -> None:
        self.registry.register(_ChannelCollector(channels))

    def forget_channel(self, channel_id: str) -> None:
        for labels in [k for k in self._queue_labels if k[0] == channel_id]:
            self._queue_labels.discard(labels)
            for gauge in (self._queue_ready, self._queue_consumers, self._queue_stuck):
                gauge.remove(*labels)

    def render(self) -> tuple[bytes, str]:
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return generate_latest(self.registry), CONTENT_TYPE_LATEST


class _ChannelCollector:
    """Each channel's message counts (old Junebug's seven kinds), deliveries
    in flight and delivery health, collected at scrape time."""

    def __init__(self, channels: Callable[[], Iterable[Any]]) -> None:
        self._channels = channels

    def describe(self) -> list:
        return []

    def collect(self) -> Any:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        messages = CounterMetricFamily(
            "junebug_channel_messages",
            "Messages and events per channel: inbound (delivered), outbound (published),"
            " submitted, rejected, delivery_succeeded, delivery_failed, delivery_pending.",
            labels=["channel", "kind"],
        )
        in_flight = GaugeMetricFamily(
            "junebug_channel_deliveries_in_flight",
            "POSTs to RapidPro in work per channel, by target (mo, event).",
            labels=["channel", "target"],
        )
        degraded = GaugeMetricFamily(
            "junebug_channel_delivery_failing",
            "1 while a channel's last POST to the target (mo, event) failed.",
            labels=["channel", "target"],
        )
        for channel in self._channels():
            for kind, total in channel.rates.totals.items():
                messages.add_metric([channel.id, kind], total)
            for target, state in (("mo", channel.mo_delivery), ("event", channel.event_delivery)):
                in_flight.add_metric([channel.id, target], state.in_flight)
                failing = state.status()["health"] != "ok"
                degraded.add_metric([channel.id, target], 1 if failing else 0)
        yield messages
        yield in_flight
        yield degraded
