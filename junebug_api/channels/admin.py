"""The channel API's work: create, modify, delete and restart a channel.

Each change is checked as a ``channels:`` entry of the config file is
(:func:`~junebug_api.config.channel_api.created_entry`,
:func:`~junebug_api.config.channels.channel_settings`: URLs, ranges, a
connector name no other channel has), kept in the store (so every process and
every restart has it), then applied to this process's registry at once. The
store sync (:mod:`junebug_api.channels.sync`) brings the other processes
along; a lock shared with it keeps a sync from applying an older reading of
the store over a change made here.

Channels of the config file are not the API's: it cannot change, delete or
restart them (:class:`ChannelInConfigFile`).
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from typing import Any, Protocol

from twisted.internet.defer import DeferredLock

from junebug_api.channels.store import ChannelStore, Entry, StoreUnavailable
from junebug_api.config.channel_api import created_entry, modified_entry
from junebug_api.config.channels import (
    ChannelSettings,
    channel_entry,
    channel_settings,
    check_distinct,
)
from junebug_api.config.checks import ConfigError
from junebug_api.formats.api_errors import (
    ApiUsageError,
    ChannelInConfigFile,
    ChannelNotFound,
    ServiceUnavailable,
)
from junebug_api.formats.junebug_formats import INVALID_BODY
from junebug_api.observe.log import logger

log = logger(__name__)

#: The origin of the channels the API made (the registry's word for them).
API = "api"
#: The origin of the config file's channels.
CONFIG = "config"


class RunningChannel(Protocol):
    """What the admin needs of a running channel."""

    id: str
    settings: ChannelSettings


class Registry(Protocol):
    """What the admin and the store sync need of the channel registry
    (:class:`junebug_api.channels.registry.ChannelRegistry`)."""

    def get(self, channel_id: str) -> Any | None: ...

    def channels(self) -> Sequence[RunningChannel]: ...

    def origin(self, channel_id: str) -> str | None: ...

    async def start(self, settings: ChannelSettings, origin: str) -> Any: ...

    async def change(self, settings: ChannelSettings) -> Any: ...

    async def stop(self, channel_id: str) -> None: ...

    async def restart(self, channel_id: str) -> None: ...

    async def apply(self, wanted: Sequence[ChannelSettings], origin: str) -> None: ...


def new_channel_id() -> str:
    """A new channel's id, as old Junebug made them."""
    return str(uuid.uuid4())


def bad_body(error: ConfigError) -> ApiUsageError:
    """A 400 ``invalid_body`` naming the key, from a config check's one line."""
    message = str(error)
    return ApiUsageError(message, [{"type": INVALID_BODY, "message": message}])


class ChannelAdmin:
    """Create, modify, delete and restart the API's channels: check, store, apply."""

    def __init__(
        self,
        store: ChannelStore,
        registry: Registry,
        config: Any,
        lock: DeferredLock,
        new_id: Callable[[], str] = new_channel_id,
    ) -> None:
        self._store = store
        self._registry = registry
        self._config = config
        self._lock = lock
        self._new_id = new_id

    async def create(self, body: Any) -> Any:
        """A new channel from a create body; the running channel."""
        channel_id = self._new_id()
        try:
            settings = self._checked(channel_id, created_entry(body))
        except ConfigError as e:
            raise bad_body(e) from None
        async with self._changing():
            channel = await self._put(settings, previous=None)
        log.info("Channel {channel} created over the channel API", channel=channel_id)
        return channel

    async def modify(self, channel_id: str, body: Any) -> Any:
        """Change the keys a modify body gives; the running channel."""
        self._refuse_config_channel(channel_id)
        async with self._changing():
            stored = await self._stored(channel_id)
            try:
                settings = self._checked(channel_id, modified_entry(stored, body))
            except ConfigError as e:
                raise bad_body(e) from None
            channel = await self._put(settings, previous=stored)
        log.info("Channel {channel} changed over the channel API", channel=channel_id)
        return channel

    async def delete(self, channel_id: str) -> None:
        """Forget a channel and stop serving it (its queues are kept)."""
        self._refuse_config_channel(channel_id)
        async with self._changing():
            removed = await self._store.delete(channel_id)
            running = self._registry.origin(channel_id) == API
            if not (removed or running):
                raise _not_found(channel_id)
            if running:
                await self._registry.stop(channel_id)
        log.info("Channel {channel} deleted over the channel API", channel=channel_id)

    async def restart(self, channel_id: str) -> None:
        """Stop and start a channel with its stored settings."""
        self._refuse_config_channel(channel_id)
        async with self._changing():
            stored = await self._stored(channel_id)
            if self._registry.get(channel_id) is not None:
                await self._registry.restart(channel_id)
            else:
                await self._registry.start(self._resolved(channel_id, stored), API)
        log.info("Channel {channel} restarted over the channel API", channel=channel_id)

    # -- helpers ------------------------------------------------------------

    @asynccontextmanager
    async def _changing(self) -> AsyncIterator[None]:
        """One change at a time (the store sync's included); a store that
        cannot be read or written answers 503."""
        async with self._lock:
            try:
                yield
            except StoreUnavailable as e:
                log.error("Channel store unavailable: {error}", error=str(e))
                raise ServiceUnavailable("channel store unavailable") from None

    def _refuse_config_channel(self, channel_id: str) -> None:
        if self._registry.origin(channel_id) == CONFIG:
            raise ChannelInConfigFile(
                f"channel {channel_id!r} is set in the config file: change it there"
                " (and reload), not over the API"
            )

    async def _stored(self, channel_id: str) -> Entry:
        stored = await self._store.get(channel_id)
        if stored is None:
            raise _not_found(channel_id)
        return stored

    async def _put(self, settings: ChannelSettings, previous: Entry | None) -> Any:
        """Store ``settings`` and run the channel on them; if the registry
        refuses (a clash with a channel started meanwhile, queues that cannot
        be declared), the store gets ``previous`` back and the answer is 400."""
        await self._store.put(settings.id, channel_entry(settings))
        try:
            if self._registry.get(settings.id) is None:
                return await self._registry.start(settings, API)
            return await self._registry.change(settings)
        except ConfigError as e:
            if previous is None:
                await self._store.delete(settings.id)
            else:
                await self._store.put(settings.id, previous)
            raise bad_body(e) from None

    def use_config(self, config: Any) -> None:
        """The top-level config from now on (a reload changed its defaults)."""
        self._config = config

    def _resolved(self, channel_id: str, entry: Entry) -> ChannelSettings:
        try:
            return channel_settings(channel_id, entry, self._config)
        except ConfigError as e:
            raise bad_body(e) from None

    def _checked(self, channel_id: str, entry: Entry) -> ChannelSettings:
        """The settings of ``entry``, checked alone and against the other
        channels running (one id, connector name and messages path each)."""
        settings = channel_settings(channel_id, entry, self._config)
        others = [c.settings for c in self._registry.channels() if c.id != channel_id]
        check_distinct([*others, settings])
        return settings


def _not_found(channel_id: str) -> ChannelNotFound:
    return ChannelNotFound(f"channel {channel_id!r} not found")
