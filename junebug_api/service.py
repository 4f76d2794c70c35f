"""Builds the service tree from a config, and stops it in a safe order.

``JunebugService`` holds: the AMQP service (connection, publisher,
consumers), the HTTP endpoint service serving the Klein API, and the state
cache. On stop (SIGTERM) it stops listening, stops consuming, lets messages
in work finish for up to ``shutdown_timeout`` and only then closes the
AMQP connection; anything unfinished stays unacked and goes back to its queue.
"""

from __future__ import annotations

import gc
import signal
import sys
from typing import Any

from twisted.application.service import MultiService
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import serverFromString
from twisted.internet.error import CannotListenError
from twisted.logger import ILogObserver, globalLogPublisher
from twisted.python.components import Componentized

from junebug_api.amqp.service import AmqpService
from junebug_api.channels.builder import ChannelBuilder
from junebug_api.channels.channel_api import ChannelApi, admin_credentials
from junebug_api.channels.registry import ChannelRegistry
from junebug_api.channels.reload import ConfigReload, ConfigSource
from junebug_api.config.channels import resolve_channels
from junebug_api.config.model import JunebugConfig, describe
from junebug_api.config.redaction import top_level_secret_values
from junebug_api.delivery.http_delivery import HttpDelivery
from junebug_api.delivery.outages import OutageTracker
from junebug_api.http.api import ApiCredentials, JunebugApi
from junebug_api.http.routes import openapi_path_of, own_paths
from junebug_api.http.server import ApiSite, ListeningService, with_listen_backlog
from junebug_api.observe.log import Redactor, logger, set_log_level
from junebug_api.observe.metrics import NO_METRICS, Metrics, PrometheusMetrics
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
    """The whole service: API, AMQP, the channel registry and the state cache.

    ``redactor``: the log observer's (``tap.py`` makes one for both);
    ``config_source``: where SIGHUP reads the config again (none: SIGHUP is
    left alone).
    """

    def __init__(
        self,
        config: JunebugConfig,
        reactor: Any,
        log_observer: ILogObserver | None = None,
        *,
        redactor: Redactor | None = None,
        config_source: ConfigSource | None = None,
    ) -> None:
        super().__init__()
        self.config = config
        self._reactor = reactor
        self._log_observer = log_observer
        name = config.connector_name or "channels"
        self.redactor = redactor or Redactor.for_config(config)
        self.metrics: Metrics = (
            PrometheusMetrics(name, reactor) if config.metrics_enabled else NO_METRICS
        )
        self.sentry = self._sentry(name)
        self.cache: StateCache = make_state_cache(
            config.state_cache_class,
            config.state_cache_config,
            clock=reactor,
            connector_name=name,
            message_status_ttl=config.outbound_message_ttl,
        )
        self.outages = OutageTracker(reactor, probe_interval=config.delivery_probe_interval)
        self.amqp = AmqpService(
            config.amqp_connection,
            prefetch=config.worker_concurrency,
            reactor=reactor,
            connection_name=f"junebug-api {name}",
            metrics=self.metrics,
        )
        self.amqp.setServiceParent(self)
        delivery = HttpDelivery.create(
            reactor, config.worker_concurrency, self.metrics, outages=self.outages
        )
        self.registry = ChannelRegistry(
            ChannelBuilder(
                config, self.cache, delivery, self.amqp, self.outages, reactor, self.metrics
            ),
            self.amqp,
            reactor,
            shutdown_timeout=config.shutdown_timeout,
            stuck_after=config.health_stuck_after,
            metrics=self.metrics,
            redactor=self.redactor,
        )
        self.metrics.watch(
            connections=self.amqp.connection_metrics,
            in_work=self.registry.in_work,
            cache_entries=getattr(self.cache, "entry_count", None),
        )
        self.metrics.watch_channels(self.registry.channels)
        # channel_api: the store, the admin and the store sync of the API's channels.
        self.channel_api = (
            ChannelApi.for_config(config, self.cache, self.registry, reactor)
            if config.channel_api
            else None
        )
        self.api = self._api()
        self.site = ApiSite(
            self.api.resource(),
            clock=reactor,
            max_request_size=config.max_request_size,
            read_timeout=config.http_read_timeout,
            idle_timeout=config.http_idle_timeout,
            max_connections=config.http_max_connections,
        )
        self.http = ListeningService(
            serverFromString(reactor, with_listen_backlog(config.http_endpoint)), self.site
        )
        self.http.setServiceParent(self)
        self._stopping = False
        self.reload = (
            ConfigReload(config_source, self.registry, self._reloaded)
            if config_source is not None
            else None
        )

    def _sentry(self, name: str) -> Any:
        if not self.config.sentry:
            return None
        from junebug_api.observe.error_reporting import SentryReporter

        config = self.config
        return SentryReporter(config.sentry, config.sentry_environment, name, self.redactor)

    def _api(self) -> JunebugApi:
        config = self.config
        return JunebugApi(
            self.registry,
            self.health,
            config.request_timeout,
            self._reactor,
            amqp_health=self.amqp.health,
            # GET /channels/ lists every channel: the top-level credentials.
            credentials=top_level_credentials(config),
            metrics=self.metrics,
            metrics_path=config.metrics_path,
            metrics_auth=config.metrics_auth,
            openapi_path=openapi_path_of(config),
            own_paths=own_paths((c.id, c.messages_path) for c in resolve_channels(config)),
            admin_credentials=admin_credentials(config),
            management=self.channel_api.management(self.amqp.health)
            if self.channel_api is not None
            else None,
        )

    def _reloaded(self, config: JunebugConfig) -> None:
        """A reload applied ``config``: the top-level credentials follow, and
        its top-level secrets are redacted from now on (the old ones still are),
        and the API's channels take its top-level defaults."""
        self.api.use_credentials(top_level_credentials(config))
        redacted = self.redactor.secrets
        self.redactor.add([s for s in top_level_secret_values(config) if s not in redacted])
        if self.channel_api is not None:
            self.channel_api.use_config(config)

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
        globalLogPublisher.addObserver(self.registry.log_router)
        self.start_channels()
        self._warn_of_settings()
        self.cache.start()
        if self.channel_api is not None:
            self.channel_api.start()  # the channels created before, then the store's changes
        try:
            super().startService()
        except (CannotListenError, OSError) as e:
            self._cannot_listen(e)
        if self.reload is not None:
            self._previous_sighup = signal.signal(signal.SIGHUP, self._sighup)
        _tune_garbage_collector()
        paths = [c.settings.messages_path for c in self.registry.channels()]
        log.info(
            "Listening on {endpoint}; {count} channel(s), outbound messages at {paths}",
            endpoint=self.config.http_endpoint,
            count=len(paths),
            paths=", ".join(paths[:5]) + (", ..." if len(paths) > 5 else ""),
        )

    def start_channels(self) -> None:
        """Start the config file's channels (``startService`` does, before the
        AMQP connections open: their queues and consumers are set up as they connect)."""
        for settings in resolve_channels(self.config):
            started = Deferred.fromCoroutine(self.registry.start(settings, "config"))
            started.addErrback(_not_started, settings.id)

    def _sighup(self, signum: int, frame: Any) -> None:
        """SIGHUP: reload the config in the reactor's thread; ignored (one
        line) once the service is stopping."""
        self._reactor.callFromThread(self._reload_unless_stopping)

    def _reload_unless_stopping(self) -> None:
        if self._stopping:
            log.warn("SIGHUP ignored: the service is stopping")
        elif self.reload is not None:
            self.reload()

    def _warn_of_settings(self) -> None:
        """Channels whose messages API is open (the registry names each
        channel's options stored but not acted on as it starts)."""
        channels = self.registry.channels()
        open_channels = [c.id for c in channels if not c.credentials.required]
        if open_channels:
            log.warn(
                "The messages API is open for channel(s) {channels}: anyone who can reach it"
                " can send messages. Set api_auth_username/api_auth_password or api_auth_token.",
                channels=", ".join(open_channels),
            )
        if self.config.middlewares:
            log.warn("middlewares are not supported by junebug-api and are ignored")

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
        components["amqp"]["queues"] = self.registry.queue_status()
        components["amqp"]["stuck"] = self.registry.any_stuck()
        channels = {channel.id: channel.health(amqp) for channel in self.registry.channels()}
        return {
            "health": "ok" if healthy else "down",
            "components": components,
            "channels": channels,
        }

    async def _stop(self) -> None:
        # SIGHUP keeps its handler (which now ignores it) until the very end:
        # its default action would end the process while messages in work finish.
        self._stopping = True
        timeout = self.config.shutdown_timeout
        await self.http.stopService()
        unanswered = await self.site.drain(timeout)
        if unanswered:
            log.warn(
                "{count} HTTP request(s) still unanswered after {timeout} s are cut off",
                count=unanswered,
                timeout=timeout,
            )
        if self.channel_api is not None:
            self.channel_api.stop()
        cancelled = await self.registry.stop_all(timeout)
        if cancelled:
            log.warn(
                "{count} message(s) still in work after {timeout} s go back to their queues",
                count=cancelled,
                timeout=timeout,
            )
        await self.amqp.stopService()
        await self.cache.close()
        globalLogPublisher.removeObserver(self.registry.log_router)
        if self.sentry is not None:
            await self.sentry.stop(self._reactor)
        if self.reload is not None:
            signal.signal(signal.SIGHUP, self._previous_sighup)
        self.running = 0
        log.info("junebug-api stopped")

    def stopService(self) -> Deferred:
        return Deferred.fromCoroutine(self._stop())


def top_level_credentials(config: JunebugConfig) -> ApiCredentials:
    """The top-level ``api_auth_*`` (``GET /channels/``, ``metrics_auth``)."""
    return ApiCredentials(config.api_auth_username, config.api_auth_password, config.api_auth_token)


def _not_started(failure: Any, channel_id: str) -> None:
    log.failure("Channel {channel} of the config file could not start", failure, channel=channel_id)
