"""``kill -HUP``: the config read again as the process was started, and its
channels applied.

The config file, the environment and the command-line options are read
again (:class:`ConfigSource`, twistd's ``Options``). The channels of the new
config are applied to the registry's ``config`` channels: new ones start,
changed ones (tokens, URLs, limits, every channel option) are changed,
those gone stop; the channel API's channels stay as they are. Top-level
options a reload cannot apply (:func:`~junebug_api.config.model.restart_needed`)
are named in one log line and keep their running values. A config that
does not read, parse or validate is one log line, and nothing changes.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any, Protocol

import attrs
from twisted.internet.defer import Deferred, DeferredLock

from junebug_api.config.channels import ChannelSettings, resolve_channels
from junebug_api.config.model import ConfigError, JunebugConfig, restart_needed
from junebug_api.observe.log import logger

log = logger(__name__)


class ConfigSource(Protocol):
    """Where the config comes from (twistd's ``Options``): the config as
    loaded at start, and loading it again."""

    config: JunebugConfig

    def load(self) -> JunebugConfig: ...


class ChannelApplier(Protocol):
    """What a reload needs of the channel registry."""

    async def apply(self, wanted: Sequence[ChannelSettings], origin: str) -> None: ...


def keep_options(old: Any, new: Any, dotted: Iterable[str]) -> Any:
    """``new`` with the options named ``dotted`` (``"amqp.hostname"``,
    ``"log_level"``) as they are in ``old``."""
    for name in dotted:
        head, _, tail = name.partition(".")
        if tail:
            group = attrs.evolve(getattr(new, head), **{tail: getattr(getattr(old, head), tail)})
            new = attrs.evolve(new, **{head: group})
        else:
            new = attrs.evolve(new, **{head: getattr(old, head)})
    return new


@attrs.define(eq=False)
class ConfigReload:
    """Reloads ``source``'s config into ``registry`` (see the module
    docstring); ``applied`` hears of each config applied (the top-level
    options a reload applies, for the pieces outside the channels)."""

    source: ConfigSource
    registry: ChannelApplier
    applied: Callable[[JunebugConfig], None] = lambda config: None
    #: The config running now: the one loaded at start, then each reload's.
    config: JunebugConfig = attrs.field(init=False)
    _lock: DeferredLock = attrs.field(factory=DeferredLock, init=False)

    def __attrs_post_init__(self) -> None:
        self.config = self.source.config

    def __call__(self) -> Deferred[None]:
        """Reload (the SIGHUP handler's call); reloads asked meanwhile run after it."""
        return Deferred.fromCoroutine(self.reload()).addErrback(
            lambda failure: log.failure("SIGHUP: the reload failed", failure)
        )

    async def reload(self) -> None:
        async with self._lock:
            loaded = self._load()
            if loaded is None:
                return
            config, wanted = loaded
            await self.registry.apply(wanted, "config")
            self.config = config
            self.applied(config)
            log.info(
                "SIGHUP: config reloaded; {count} channel(s) from the config file",
                count=len(wanted),
            )

    def _load(self) -> tuple[JunebugConfig, list[ChannelSettings]] | None:
        """The config to apply and its channels; None (said in one line) if it is wrong."""
        try:
            new = self.source.load()
            needed = restart_needed(self.config, new)
            config = keep_options(self.config, new, needed)
            wanted = resolve_channels(config)
        except ConfigError as e:
            log.error(
                "SIGHUP: config not reloaded, the running configuration stays: {error}",
                error=str(e),
            )
            return None
        if needed:
            log.warn(
                "SIGHUP: {options} changed but need(s) a restart; left as they were",
                options=", ".join(needed),
            )
        return config, wanted
