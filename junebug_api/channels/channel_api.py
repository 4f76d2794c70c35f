"""The channel API's pieces, put together for the service (``channel_api: true``).

The store (Redis when the state cache is Redis, else ``channel_api_file``),
the admin that changes channels over HTTP and the sync that follows the store,
sharing one lock; the service starts and stops it, and the HTTP API gets its
management routes from :meth:`ChannelApi.management`.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import DeferredLock
from twisted.internet.interfaces import IReactorTime

from junebug_api.channels.admin import ChannelAdmin, Registry
from junebug_api.channels.store import ChannelStore, RedisCommands, store_for_config
from junebug_api.channels.sync import StoreSync
from junebug_api.config.model import JunebugConfig, uses_redis
from junebug_api.http.api import ApiCredentials, HealthCheck
from junebug_api.http.management import ChannelManagement


def admin_credentials(config: JunebugConfig) -> ApiCredentials:
    """The admin credentials: the channel API's, and every read route's too."""
    return ApiCredentials(config.admin_username, config.admin_password, config.admin_auth_token)


class ChannelApi:
    """The store, the admin and the store sync of one process."""

    def __init__(
        self, store: ChannelStore, registry: Registry, config: JunebugConfig, clock: IReactorTime
    ) -> None:
        lock = DeferredLock()  # one change at a time: the admin's and the sync's
        self.store = store
        self.admin = ChannelAdmin(store, registry, config, lock)
        self.sync = StoreSync(store, registry, config, lock, clock)
        self._config = config
        self._clock = clock

    @classmethod
    def for_config(
        cls, config: JunebugConfig, cache: Any, registry: Registry, clock: IReactorTime
    ) -> ChannelApi:
        """The channel API of ``config``: its channels in Redis when ``cache``
        is the Redis state cache, else in ``channel_api_file``."""
        redis: RedisCommands | None = cache if uses_redis(config) else None
        return cls(store_for_config(config, redis), registry, config, clock)

    def management(self, amqp_health: HealthCheck) -> ChannelManagement:
        """The handlers of the management routes."""
        return ChannelManagement(
            self.admin,
            admin_credentials(self._config),
            amqp_health,
            self._config.request_timeout,
            self._clock,
        )

    def use_config(self, config: JunebugConfig) -> None:
        """A reload's config: the API's channels take its top-level defaults."""
        self.admin.use_config(config)
        self.sync.use_config(config)

    def start(self) -> None:
        """Start the stored channels, then follow the store."""
        self.sync.start()

    def stop(self) -> None:
        self.sync.stop()
