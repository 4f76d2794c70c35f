"""Builds the service tree from a config, and stops it in a safe order.

``JunebugService`` holds: the AMQP service (connection, publisher,
consumers), the HTTP endpoint service serving the Klein API, and the state
cache. On stop (SIGTERM) it stops listening, stops consuming, lets messages
in work finish for up to ``shutdown_timeout`` and only then closes the
AMQP connection; anything unfinished stays unacked and goes back to its queue.
"""

from __future__ import annotations

import gc
import sys
from typing import Any

from twisted.application.service import MultiService
from twisted.internet.defer import Deferred, gatherResults
from twisted.internet.endpoints import serverFromString
from twisted.internet.error import CannotListenError
from twisted.logger import ILogObserver, globalLogPublisher
from twisted.python.components import Componentized

from junebug_api.amqp.service import AmqpService
from junebug_api.channels.channel import Channel, ChannelLogRouter, ChannelMetrics
from junebug_api.config.channels import resolve_channels
from junebug_api.config.model import JunebugConfig, describe
from junebug_api.delivery.consumer import RetryPolicy
from junebug_api.delivery.http_delivery import HttpDelivery
from junebug_api.delivery.outages import OutageTracker
from junebug_api.formats.queue_names import QueueNames
from junebug_api.http.api import ApiCredentials, JunebugApi
from junebug_api.http.routes import openapi_path_of
from junebug_api.http.server import ApiSite, ListeningService, with_listen_backlog
from junebug_api.observe.log import Redactor, logger, set_log_level
from junebug_api.observe.metrics import NO_METRICS, Metrics, PrometheusMetrics
from junebug_api.observe.queue_health import QueueMonitor
from junebug_api.state.cache import StateCache, make_state_cache

log = logger(__name__)


def _tune_garbage_collector() -> None:
    """Run the cycle collector far less often than CPython's default.

    Every request and message makes short-lived Deferreds, dicts and frames;
    with the default thresholds (700, 10, 10) the collector ran so often that
    it cost over a quarter of the CPU under load (benchmark: outbound 1,137 -> 1,515
    requests/s, inbound 1,237 -> 1,778 messages/s). Objects that live from
    start-up on are frozen out of every collection.
    """
    gc.freeze()
    gc.set_threshold(20_000, 50, 50)


class JunebugService(MultiService):
    """The whole service: API, AMQP, the channels' workers and the state cache."""

    def __init__(
        self, config: JunebugConfig, reactor: Any, log_observer: ILogObserver | None = None
    ) -> None:
        super().__init__()
        self.config = config
        self._reactor = reactor
        self._log_observer = log_observer
        settings = resolve_channels(config)
        name = config.connector_name or "channels"
        self.redactor = Redactor.for_config(config)
        self.metrics: Metrics = (
            PrometheusMetrics(name, reactor) if config.metrics_enabled else NO_METRICS
        )
        metrics = self.metrics
        self.sentry = None
        if config.sentry:
            from junebug_api.observe.error_reporting import SentryReporter

            self.sentry = SentryReporter(
                config.sentry, config.sentry_environment, name, self.redactor
            )
        self.cache: StateCache = make_state_cache(
            config.state_cache_class,
            config.state_cache_config,
            clock=reactor,
            connector_name=name,
            message_status_ttl=config.outbound_message_ttl,
        )
        self.outages = OutageTracker(reactor, probe_interval=config.delivery_probe_interval)
        delivery = HttpDelivery.create(
            reactor, config.worker_concurrency, metrics, outages=self.outages
        )

        def policy(attempt_timeout: float) -> RetryPolicy:
            return RetryPolicy(
                config.delivery_retry_delay,
                config.delivery_retry_max_delay,
                config.delivery_max_attempts,
                max_age=config.delivery_max_age,
                max_hold=config.delivery_max_hold,
                attempt_timeout=attempt_timeout,
            )

        queue_names = {c.id: QueueNames.for_connector(c.connector_name) for c in settings}
        self.amqp = AmqpService(
            config.amqp_connection,
            prefetch=config.worker_concurrency,
            reactor=reactor,
            connection_name=f"junebug-api {name}",
            metrics=metrics,
        )
        # Every channel's queues (delay queues with their arguments), declared
        # on every connect.
        for names in queue_names.values():
            self.amqp.add_queues(names.declarations())
        self.channels = [
            Channel(
                channel,
                queues=queue_names[channel.id],
                cache=self.cache,
                delivery=delivery,
                publish=self.amqp.publish,
                inbound_policy=policy(config.mo_message_url_timeout),
                event_policy=policy(config.event_url_timeout),
                outages=self.outages,
                control=self.amqp,
                probe_interval=config.delivery_probe_interval,
                max_body_size=config.max_request_size,
                clock=reactor,
                mo_message_url_timeout=config.mo_message_url_timeout,
                event_url_timeout=config.event_url_timeout,
                metric_window=config.metric_window,
                max_logs=config.max_logs,
                store_message_events=config.store_message_events,
                metrics=metrics,
                other_connectors=frozenset(
                    c.connector_name for c in settings if c.connector_name != channel.connector_name
                ),
            )
            for channel in settings
        ]
        self.workers = [w for c in self.channels for w in c.workers]
        for channel in self.channels:
            for queue, consumer in channel.consumers.items():
                self.amqp.add_consumer(queue, consumer, channel.prefetch)
        self.amqp.setServiceParent(self)
        self._log_router = ChannelLogRouter(self.channels)
        # One monitor per channel: its queues by role, its gauges labelled with
        # the channel; every queue is looked at once per interval.
        self.queue_monitors = {
            channel.id: QueueMonitor(
                channel.queues.by_role(),
                self.amqp.queue_info,
                channel.last_taken,
                reactor,
                in_work=channel.in_work,
                stuck_after=config.health_stuck_after,
                interval=min(5.0, max(1.0, config.health_stuck_after / 4)),
                metrics=ChannelMetrics(metrics, channel.id),
            )
            for channel in self.channels
        }
        metrics.watch(
            connections=self.amqp.connection_metrics,
            in_work=lambda: sum(w.in_flight for w in self.workers),
            cache_entries=getattr(self.cache, "entry_count", None),
        )
        metrics.watch_channels(self.channels)

        api = JunebugApi(
            self.channels,
            self.health,
            config.request_timeout,
            reactor,
            amqp_health=self.amqp.health,
            # GET /channels/ lists every channel: the top-level credentials.
            credentials=ApiCredentials(
                config.api_auth_username, config.api_auth_password, config.api_auth_token
            ),
            metrics=metrics,
            metrics_path=config.metrics_path,
            metrics_auth=config.metrics_auth,
            openapi_path=openapi_path_of(config),
        )
        site = ApiSite(
            api.resource(),
            clock=reactor,
            max_request_size=config.max_request_size,
            read_timeout=config.http_read_timeout,
            idle_timeout=config.http_idle_timeout,
            max_connections=config.http_max_connections,
        )
        self.site = site
        self.http = ListeningService(
            serverFromString(reactor, with_listen_backlog(config.http_endpoint)), site
        )
        self.http.setServiceParent(self)

    def setServiceParent(self, parent: Any) -> None:
        """Join twistd's application; give it the log observer (text or JSON
        lines, redacted), which twistd looks up on the application."""
        if self._log_observer is not None and isinstance(parent, Componentized):
            parent.setComponent(ILogObserver, self._log_observer)
        super().setServiceParent(parent)

    def startService(self) -> None:
        set_log_level(self.config.log_level)
        if self.sentry is not None:
            self.sentry.start()
        log.info("Starting junebug-api with config {config}", config=describe(self.config))
        globalLogPublisher.addObserver(self._log_router)
        open_channels = [c.id for c in self.channels if not c.credentials.required]
        if open_channels:
            log.warn(
                "The messages API is open for channel(s) {channels}: anyone who can reach it"
                " can send messages. Set api_auth_username/api_auth_password or api_auth_token.",
                channels=", ".join(open_channels),
            )
        for channel in self.channels:
            for option, why in sorted(channel.settings.ignored.items()):
                log.warn(
                    "Channel {channel}: {option} is ignored ({why})",
                    channel=channel.id,
                    option=option,
                    why=why,
                )
        if self.config.middlewares:
            log.warn("middlewares are not supported by junebug-api and are ignored")
        self.cache.start()
        try:
            super().startService()
        except (CannotListenError, OSError) as e:
            self._cannot_listen(e)
        for monitor in self.queue_monitors.values():
            monitor.start()
        _tune_garbage_collector()
        paths = [c.settings.messages_path for c in self.channels]
        log.info(
            "Listening on {endpoint}; {count} channel(s), outbound messages at {paths}",
            endpoint=self.config.http_endpoint,
            count=len(paths),
            paths=", ".join(paths[:5]) + (", ..." if len(paths) > 5 else ""),
        )

    def privilegedStartService(self) -> None:
        # twistd listens here, before startService (so ports below 1024 work).
        try:
            super().privilegedStartService()
        except (CannotListenError, OSError) as e:
            self._cannot_listen(e)

    def _cannot_listen(self, error: CannotListenError | OSError) -> None:
        """A port taken, an address not local or a UNIX socket in a directory
        that is missing or not ours is an operator's mistake, not a bug: one
        line in the log and on the terminal, and exit status 1."""
        if isinstance(error, CannotListenError):
            socket_error = error.socketError
            reason = getattr(socket_error, "strerror", None) or str(socket_error or error)
        else:  # e.g. the lock file of a UNIX socket cannot be made
            reason = error.strerror or str(error)
        line = f"cannot listen on {self.config.http_bind}: {reason}"
        log.critical("junebug-api: {line}", line=line)
        sys.__stderr__.write(f"junebug-api: {line}\n")
        raise SystemExit(1)

    def health(self) -> dict[str, Any]:
        """``/health``: ok only when every component is; ``channels`` shows each
        channel's state (a degraded channel does not make the process down)."""
        amqp = self.amqp.health()
        components = {
            "amqp": amqp,
            **self.cache.health(),
            "deliveries": self.outages.health(),
        }
        healthy = all(c.get("health") == "ok" for c in components.values())
        # A stuck queue is reported, but outbound still works: still "ok".
        queues: dict[str, Any] = {}
        for monitor in self.queue_monitors.values():
            queues.update(monitor.status())
        components["amqp"]["queues"] = queues
        components["amqp"]["stuck"] = any(m.any_stuck for m in self.queue_monitors.values())
        channels = {channel.id: channel.health(amqp) for channel in self.channels}
        return {
            "health": "ok" if healthy else "down",
            "components": components,
            "channels": channels,
        }

    async def _stop(self) -> None:
        timeout = self.config.shutdown_timeout
        await self.http.stopService()
        unanswered = await self.site.drain(timeout)
        if unanswered:
            log.warn(
                "{count} HTTP request(s) still unanswered after {timeout} s are cut off",
                count=unanswered,
                timeout=timeout,
            )
        for monitor in self.queue_monitors.values():
            monitor.stop()
        for channel in self.channels:
            channel.inbound_gate.stop()
        await self.amqp.stop_consuming()
        drains = [Deferred.fromCoroutine(w.drain(timeout)) for w in self.workers]
        cancelled = sum(await gatherResults(drains))
        if cancelled:
            log.warn(
                "{count} message(s) still in work after {timeout} s go back to their queues",
                count=cancelled,
                timeout=timeout,
            )
        await self.amqp.stopService()
        await self.cache.close()
        globalLogPublisher.removeObserver(self._log_router)
        if self.sentry is not None:
            await self.sentry.stop(self._reactor)
        self.running = 0
        log.info("junebug-api stopped")

    def stopService(self) -> Deferred:
        return Deferred.fromCoroutine(self._stop())
