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
from collections.abc import Callable
from typing import Any

from twisted.internet.defer import Deferred
from twisted.python.failure import Failure

from . import __version__

#: Every consumed message ends as one of these.
OUTCOMES = ("delivered", "dead_lettered", "dropped")
#: Delivery POSTs go to one of these.
TARGETS = ("mo", "event")


class Metrics:
    """The no-op metrics every component may be given; the interface too."""

    enabled = False

    def outbound_request(self, code: int) -> None:
        """An answer to ``POST .../messages`` with status ``code``."""

    def timed_publish(self, publish: Callable[..., Deferred]) -> Callable[..., Deferred]:
        """``publish``, recording the time from each publish to its confirm."""
        return publish

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

    def queue_depth(self, role: str, ready: int, consumers: int, stuck: bool) -> None:
        """The last passive declare of the queue with role ``role``."""

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
        """The exposition text and its Content-Type."""
        raise NotImplementedError("metrics are disabled")


NO_METRICS = Metrics()

_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)


def status_class(code: int) -> str:
    """``2xx``, ``4xx``, ``5xx``, ... for an HTTP status code."""
    return f"{code // 100}xx"


class PrometheusMetrics(Metrics):
    """Metrics kept in a registry of their own and exposed as Prometheus text."""

    enabled = True

    def __init__(self, connector_name: str, clock: Any = None) -> None:
        from prometheus_client import (
            CollectorRegistry,
            Counter,
            Gauge,
            Histogram,
            Info,
            PlatformCollector,
            ProcessCollector,
        )

        self._clock_seconds = clock.seconds if clock is not None else time.monotonic
        self.registry = registry = CollectorRegistry(auto_describe=True)
        ProcessCollector(registry=registry)
        PlatformCollector(registry=registry)
        Info("junebug_build", "The junebug-api version and connector.", registry=registry).info(
            {"version": __version__, "connector": connector_name}
        )
        self._outbound = Counter(
            "junebug_outbound_requests",
            "Answers to POST .../messages, by HTTP status code.",
            ["code"],
            registry=registry,
        )
        self._confirm = Histogram(
            "junebug_publish_confirm_seconds",
            "Time from an AMQP publish to the broker's confirm.",
            buckets=_LATENCY_BUCKETS,
            registry=registry,
        )
        self._publish_failures = Counter(
            "junebug_publish_failures",
            "AMQP publishes that were not confirmed (nack, unroutable, connection lost).",
            registry=registry,
        )
        self._post = Histogram(
            "junebug_delivery_post_seconds",
            "POSTs of inbound messages (mo) and events to RapidPro, by status class"
            " (2xx, 4xx, 5xx, error, timeout).",
            ["target", "status_class"],
            buckets=_LATENCY_BUCKETS,
            registry=registry,
        )
        self._consumed = Counter(
            "junebug_consumed_messages",
            "Consumed messages by queue role and how they ended (delivered,"
            " dead_lettered, dropped).",
            ["queue_role", "outcome"],
            registry=registry,
        )
        self._retries = Counter(
            "junebug_delivery_retries",
            "Failed delivery attempts that will be retried, by queue role.",
            ["queue_role"],
            registry=registry,
        )
        self._connects = Counter(
            "junebug_amqp_connections_opened",
            "AMQP connections opened, by connection; more than one means reconnects.",
            ["connection"],
            registry=registry,
        )
        self._cache_errors = Counter(
            "junebug_state_cache_errors",
            "State cache operations that failed.",
            registry=registry,
        )
        self._queue_ready = Gauge(
            "junebug_queue_messages_ready",
            "Messages ready on a queue at its last passive declare, by queue role.",
            ["queue_role"],
            registry=registry,
        )
        self._queue_consumers = Gauge(
            "junebug_queue_consumers",
            "Consumers of a queue at its last passive declare, by queue role.",
            ["queue_role"],
            registry=registry,
        )
        self._queue_stuck = Gauge(
            "junebug_queue_stuck",
            "1 when a queue has messages ready and none left it for health_stuck_after.",
            ["queue_role"],
            registry=registry,
        )
        # Touch the label values that exist, so every series shows from the start.
        for target in TARGETS:
            self._post.labels(target, "2xx")
        for role in ("inbound", "event"):
            self._retries.labels(role)
            for outcome in OUTCOMES:
                self._consumed.labels(role, outcome)
        self._Gauge = Gauge

    # -- events -------------------------------------------------------------

    def outbound_request(self, code: int) -> None:
        self._outbound.labels(str(code)).inc()

    def timed_publish(self, publish: Callable[..., Deferred]) -> Callable[..., Deferred]:
        now = self._clock_seconds
        observe = self._confirm.observe
        failures = self._publish_failures

        def done(result: Any, started: float) -> Any:
            if isinstance(result, Failure):
                failures.inc()
            else:
                observe(now() - started)
            return result

        def timed(*args: Any, **kwargs: Any) -> Deferred:
            return publish(*args, **kwargs).addBoth(done, now())

        return timed

    def delivery_post(self, target: str, status_class: str, seconds: float) -> None:
        self._post.labels(target, status_class).observe(seconds)

    def consumed(self, role: str, outcome: str) -> None:
        self._consumed.labels(role, outcome).inc()

    def retry(self, role: str) -> None:
        self._retries.labels(role).inc()

    def amqp_connected(self, connection: str) -> None:
        self._connects.labels(connection).inc()

    def cache_error(self) -> None:
        self._cache_errors.inc()

    def queue_depth(self, role: str, ready: int, consumers: int, stuck: bool) -> None:
        self._queue_ready.labels(role).set(ready)
        self._queue_consumers.labels(role).set(consumers)
        self._queue_stuck.labels(role).set(1 if stuck else 0)

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

    def render(self) -> tuple[bytes, str]:
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return generate_latest(self.registry), CONTENT_TYPE_LATEST
