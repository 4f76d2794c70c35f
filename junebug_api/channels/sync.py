"""Keeps this process's API channels what the store says they are.

Every ``interval`` seconds (1 s) the sync asks the store for its version
(one cheap read); when it moved, it reads every entry and has the registry
start, change and stop the API's channels to match
(``registry.apply(wanted, "api")``). So a channel created, changed or deleted
through another process is served accordingly here within about a second,
and at start every channel stored before is started. A store that cannot be
read is one log line (and one when it can again); the channels keep running
as they were.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from twisted.internet.defer import Deferred, DeferredLock
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall

from junebug_api.channels.admin import API, Registry
from junebug_api.channels.store import ChannelStore, Entry, StoreUnavailable
from junebug_api.config.channels import ChannelSettings, channel_settings
from junebug_api.config.checks import ConfigError
from junebug_api.observe.log import logger

log = logger(__name__)

#: Seconds between two looks at the store's version.
SYNC_INTERVAL = 1.0

_NEVER = object()


class StoreSync:
    """Polls the store's version; applies the stored channels when it moves."""

    def __init__(
        self,
        store: ChannelStore,
        registry: Registry,
        config: Any,
        lock: DeferredLock,
        clock: IReactorTime,
        interval: float = SYNC_INTERVAL,
    ) -> None:
        self._store = store
        self._registry = registry
        self._config = config
        self._lock = lock
        self._interval = interval
        self._applied: Any = _NEVER
        self._trouble: str | None = None
        self._loop = LoopingCall(lambda: Deferred.fromCoroutine(self.poll()))
        self._loop.clock = clock

    def start(self) -> None:
        """Apply the stored channels now, then follow the store."""
        self._loop.start(self._interval, now=True)

    def stop(self) -> None:
        if self._loop.running:
            self._loop.stop()

    async def poll(self) -> None:
        """One look at the store: apply its channels if they changed."""
        try:
            if await self._store.version() == self._applied:
                return
            async with self._lock:
                version, entries = await self._store.load()
                await self._registry.apply(self._wanted(entries), API)
                self._applied = version
        except (StoreUnavailable, ConfigError) as e:
            self._failed(str(e))
            return
        except Exception:
            log.failure("Applying the stored channels failed")
            return
        if self._trouble is not None:
            log.info("The channel store can be read again")
            self._trouble = None

    def use_config(self, config: Any) -> None:
        """The top-level config from now on (a reload changed the defaults):
        the stored channels are resolved and applied again on the next poll."""
        self._config = config
        self._applied = _NEVER

    def _failed(self, problem: str) -> None:
        if problem != self._trouble:
            log.error(
                "Cannot read the channel store ({problem}); the channels stay as they are",
                problem=problem,
            )
        self._trouble = problem

    def _wanted(self, entries: Mapping[str, Entry]) -> list[ChannelSettings]:
        """The settings of every stored channel that resolves; one log line
        for each that does not."""
        wanted = []
        for channel_id in sorted(entries):
            try:
                wanted.append(channel_settings(channel_id, entries[channel_id], self._config))
            except ConfigError as e:
                log.error(
                    "Stored channel {channel} is not served: {problem}",
                    channel=channel_id,
                    problem=str(e),
                )
        return wanted
