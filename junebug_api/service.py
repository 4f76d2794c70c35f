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

from twisted.application.internet import StreamServerEndpointService
from twisted.application.service import MultiService
from twisted.internet.defer import Deferred, gatherResults
from twisted.internet.endpoints import serverFromString
from twisted.internet.error import CannotListenError
from twisted.logger import ILogObserver
from twisted.python.components import Componentized

from .amqp_service import EXCHANGE, AmqpService
from .api import ApiCredentials, JunebugApi
from .config import JunebugConfig, describe
from .consumer import RETRY_DELAYS, MessageWorker, RetryPolicy
from .events import EventHandler
from .http_delivery import HttpDelivery
from .http_server import ApiSite, with_listen_backlog
from .inbound import InboundHandler
from .log import Redactor, logger, set_log_level
from .metrics import NO_METRICS, Metrics, PrometheusMetrics
from .outages import OutageTracker, destination_of
from .outbound import OutboundSender
from .pause_while_down import PauseWhileDown
from .queue_health import QueueMonitor
from .state_cache import StateCache, make_state_cache

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


def queue_names(connector_name: str) -> dict[str, str]:
    """The connector's queues, by role."""
    return {
        "outbound": f"{connector_name}.outbound",
        "inbound": f"{connector_name}.inbound",
        "event": f"{connector_name}.event",
        "inbound_failed": f"{connector_name}.inbound.failed",
        "event_failed": f"{connector_name}.event.failed",
    }


def retry_queues(queue: str) -> dict[int, str]:
    """The delay queues of a consumed queue, by their delay in seconds."""
    return {delay: f"{queue}.retry.{delay}" for delay in RETRY_DELAYS}


def retry_queue_names(connector_name: str) -> dict[str, str]:
    """The connector's delay queues, by role (``inbound_retry_5``, ...)."""
    queues = queue_names(connector_name)
    return {
        f"{role}_retry_{delay}": name
        for role in ("inbound", "event")
        for delay, name in retry_queues(queues[role]).items()
    }


def retry_queue_arguments(queue: str) -> dict[str, dict[str, Any]]:
    """Declare arguments of ``queue``'s delay queues: each holds a message
    for its delay, then dead-letters it to the vumi exchange with ``queue``
    as routing key, so it is back at the end of its queue."""
    return {
        name: {
            "x-message-ttl": delay * 1000,
            "x-dead-letter-exchange": EXCHANGE,
            "x-dead-letter-routing-key": queue,
        }
        for delay, name in retry_queues(queue).items()
    }


def declared_queue_names(config: JunebugConfig) -> list[str]:
    """Every queue the service declares for ``config``; the config check keeps
    each name within AMQP's 255 bytes, so new queues belong here."""
    return [
        *queue_names(config.connector_name).values(),
        *retry_queue_names(config.connector_name).values(),
    ]


class JunebugService(MultiService):
    """The whole service: API, AMQP, workers and state cache."""

    def __init__(
        self, config: JunebugConfig, reactor: Any, log_observer: ILogObserver | None = None
    ) -> None:
        super().__init__()
        self.config = config
        self._reactor = reactor
        self._log_observer = log_observer
        self.redactor = Redactor.for_config(config)
        self.metrics: Metrics = (
            PrometheusMetrics(config.connector_name, reactor)
            if config.metrics_enabled
            else NO_METRICS
        )
        metrics = self.metrics
        self.sentry = None
        if config.sentry:
            from .error_reporting import SentryReporter

            self.sentry = SentryReporter(
                config.sentry, config.sentry_environment, config.connector_name, self.redactor
            )
        self.cache: StateCache = make_state_cache(
            config.state_cache_class,
            config.state_cache_config,
            clock=reactor,
            connector_name=config.connector_name,
        )
        queues = queue_names(config.connector_name)
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

        self.amqp = AmqpService(
            config.amqp_connection,
            queues=list(queues.values()),
            consumers={},
            prefetch=config.worker_concurrency,
            reactor=reactor,
            connection_name=f"junebug-api {config.connector_name}",
            metrics=metrics,
        )
        # The delay queues, declared on every connect like the others.
        for role in ("inbound", "event"):
            for name, arguments in retry_queue_arguments(queues[role]).items():
                Deferred.fromCoroutine(self.amqp.declare_queue(name, arguments))
        inbound = InboundHandler(
            self.cache,
            delivery,
            config.mo_message_url,
            config.mo_message_url_auth_token,
            config.mo_message_url_timeout,
            max_body_size=config.max_request_size,
            metrics=metrics,
        )
        events = EventHandler(
            self.cache,
            delivery,
            config.connector_name,
            config.default_event_url,
            config.default_event_auth_token,
            config.event_url_timeout,
            max_body_size=config.max_request_size,
            metrics=metrics,
        )
        # .inbound has one destination: while it is down, stop taking messages.
        self.inbound_gate = PauseWhileDown(
            queues["inbound"],
            destination_of(config.mo_message_url),
            self.outages,
            self.amqp,
            lambda body, acker: inbound_worker.handle(body, acker),
            reactor,
            probe_interval=config.delivery_probe_interval,
        )
        inbound_worker = MessageWorker(
            queues["inbound"],
            inbound,
            self.amqp.publish,
            policy(config.mo_message_url_timeout),
            reactor,
            retry_queues=retry_queues(queues["inbound"]),
            hold_gate=self.inbound_gate,
            metrics=metrics,
            role="inbound",
        )
        event_worker = MessageWorker(
            queues["event"],
            events,
            self.amqp.publish,
            policy(config.event_url_timeout),
            reactor,
            retry_queues=retry_queues(queues["event"]),
            metrics=metrics,
            role="event",
        )
        self.workers = [inbound_worker, event_worker]
        self.amqp.consumers.update({w.queue: w for w in self.workers})
        self.amqp.setServiceParent(self)
        by_queue = {w.queue: w for w in self.workers}
        self.queue_monitor = QueueMonitor(
            queues,
            self.amqp.queue_info,
            lambda name: by_queue[name].last_taken if name in by_queue else None,
            reactor,
            in_work=lambda name: by_queue[name].in_flight if name in by_queue else None,
            stuck_after=config.health_stuck_after,
            interval=min(5.0, max(1.0, config.health_stuck_after / 4)),
            metrics=metrics,
        )
        metrics.watch(
            connections=self.amqp.connection_metrics,
            in_work=lambda: sum(w.in_flight for w in self.workers),
            cache_entries=getattr(self.cache, "entry_count", None),
        )

        sender = OutboundSender(
            config.connector_name,
            config.transport_type,
            config.default_from_addr,
            config.allow_expired_replies,
            self.cache,
            self.amqp.publish,
            metrics,
        )
        self.credentials = ApiCredentials(
            config.api_auth_username, config.api_auth_password, config.api_auth_token
        )
        api = JunebugApi(
            sender,
            self.health,
            config.messages_path,
            config.request_timeout,
            reactor,
            self.credentials,
            metrics=metrics,
            metrics_path=config.metrics_path,
            metrics_auth=config.metrics_auth,
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
        self.http = StreamServerEndpointService(
            serverFromString(reactor, with_listen_backlog(config.http_endpoint)), site
        )
        self.http._raiseSynchronously = True
        self.http.setServiceParent(self)

    def setServiceParent(self, parent: Any) -> None:
        """Join twistd's application; with ``log_format: json``, give it the
        JSON log observer, which twistd looks up on the application."""
        if self._log_observer is not None and isinstance(parent, Componentized):
            parent.setComponent(ILogObserver, self._log_observer)
        super().setServiceParent(parent)

    def startService(self) -> None:
        set_log_level(self.config.log_level)
        if self.sentry is not None:
            self.sentry.start()
        log.info("Starting junebug-api with config {config}", config=describe(self.config))
        if not self.credentials.required:
            log.warn(
                "The messages API is open: anyone who can reach it can send messages."
                " Set api_auth_username/api_auth_password or api_auth_token."
            )
        if self.config.middlewares:
            log.warn("middlewares are not supported by junebug-api and are ignored")
        self.cache.start()
        try:
            super().startService()
        except (CannotListenError, OSError) as e:
            self._cannot_listen(e)
        self.queue_monitor.start()
        _tune_garbage_collector()
        log.info(
            "Listening on {endpoint}; outbound messages at {path}",
            endpoint=self.config.http_endpoint,
            path=self.config.messages_path,
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
        """``/health``: ok only when every component is."""
        components = {
            "amqp": self.amqp.health(),
            **self.cache.health(),
            "deliveries": self.outages.health(),
        }
        healthy = all(c.get("health") == "ok" for c in components.values())
        # A stuck queue is reported, but outbound still works: still "ok".
        components["amqp"]["queues"] = self.queue_monitor.status()
        components["amqp"]["stuck"] = self.queue_monitor.any_stuck
        return {"health": "ok" if healthy else "down", "components": components}

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
        self.queue_monitor.stop()
        self.inbound_gate.stop()
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
        if self.sentry is not None:
            await self.sentry.stop(self._reactor)
        self.running = 0
        log.info("junebug-api stopped")

    def stopService(self) -> Deferred:
        return Deferred.fromCoroutine(self._stop())
