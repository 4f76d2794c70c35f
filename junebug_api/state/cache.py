"""The state cache interface: what the service keeps between messages.

Inbound messages are kept for replies, the event info (where events go) of
outbound ones, and each outbound message's events for its status, per
channel: a message id asked for through another channel is unknown there.
:class:`StateCache` is the interface; every call returns a Deferred, so a
cache may live in this process (:mod:`junebug_api.state.memory_cache`) or
elsewhere (:mod:`junebug_api.state.redis_cache`). ``state_cache_class`` names
the class by its dotted path and ``state_cache_config`` its options, which
the class checks in ``from_config``; the built-in classes keep the names
configs have always used, ``junebug_api.state_cache.InMemoryStateCache`` and
``junebug_api.state_cache.RedisStateCache`` (:data:`BUILT_IN`, which also
takes the modules' names from before the package had subpackages). This module
imports neither implementation: each loads only when a config names it.
"""

from __future__ import annotations

import importlib
from typing import Any, Protocol

import attrs
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime

from junebug_api.config.model import ConfigError
from junebug_api.formats.vumi_messages import VumiMessage

#: Seconds a message's status (its events) is kept: old Junebug's two days.
DEFAULT_MESSAGE_STATUS_TTL = 172800.0


@attrs.frozen
class EventInfo:
    """Where the events of one outbound message go."""

    url: str
    auth_token: str | None = attrs.field(default=None, repr=False)


class StateCache(Protocol):
    """What the service needs of a state cache."""

    def store_inbound(self, message: VumiMessage) -> Deferred[None]:
        """Keep what a reply to ``message`` needs, under its message_id."""

    def fetch_inbound(self, message_id: str) -> Deferred[VumiMessage | None]:
        """The stored inbound (the fields a reply needs), or None."""

    def delete_inbound(self, message_id: str) -> Deferred[None]:
        """Forget an inbound message."""

    def store_event_info(self, channel_id: str, message_id: str, info: EventInfo) -> Deferred[None]:
        """Remember where events for outbound ``message_id`` of channel
        ``channel_id`` go."""

    def fetch_event_info(
        self, channel_id: str, message_id: str, *, legacy: bool = False
    ) -> Deferred[EventInfo | None]:
        """The event info ``channel_id`` stored for ``message_id``, or None:
        an event naming another channel's message never finds it. ``legacy``:
        also the entry a version before per-channel event info wrote (it names
        no channel), for a channel that shares the cache with no other."""

    def delete_event_info(self, channel_id: str, message_id: str) -> Deferred[None]:
        """Forget the event info of an outbound message."""

    def store_message_event(
        self, channel_id: str, message_id: str, event_id: str, event: bytes
    ) -> Deferred[None]:
        """Keep one event (its status JSON) of outbound ``message_id`` of
        channel ``channel_id``; the same ``event_id`` again replaces it. Renews
        the message's expiry."""

    def fetch_message_events(self, channel_id: str, message_id: str) -> Deferred[list[bytes]]:
        """Every kept event of ``message_id`` on channel ``channel_id`` (in no
        particular order; none for an id only another channel has); renews the
        expiry of a message that has any."""

    def start(self) -> None:
        """Open connections and start timers (called when the service starts)."""

    def health(self) -> dict[str, dict[str, Any]]:
        """Components for ``/health``, e.g. ``{"redis": {"health": "ok"}}``."""

    def close(self) -> Deferred[None]:
        """Release connections and timers."""


def check_options(cls_name: str, config: dict, types: dict[str, type]) -> dict:
    if not isinstance(config, dict):
        raise ConfigError("state_cache_config must be a mapping")
    for key, value in config.items():
        if key not in types:
            raise ConfigError(f"unknown option state_cache_config.{key} for {cls_name}")
        kind = types[key]
        ok = isinstance(value, kind) and not (kind is not bool and isinstance(value, bool))
        if kind is float:
            ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        if not ok:
            raise ConfigError(
                f"state_cache_config.{key} must be of type {kind.__name__}, got {value!r}"
            )
        if kind is float and not 0 < value <= MAX_CACHE_SECONDS:
            # Every float option of a cache is a duration; nan and inf fail here too.
            raise ConfigError(
                f"state_cache_config.{key} must be greater than 0 and at most"
                f" {MAX_CACHE_SECONDS} (ten years), got {value!r}"
            )
    return config


MAX_CACHE_SECONDS = 10 * 365 * 86400
"""The longest duration a state cache option accepts."""


#: The built-in caches by the names configs give them: where each lives.
BUILT_IN = {
    "junebug_api.state_cache.InMemoryStateCache": (
        "junebug_api.state.memory_cache.InMemoryStateCache"
    ),
    "junebug_api.state_cache.RedisStateCache": "junebug_api.state.redis_cache.RedisStateCache",
}

#: Modules configs may name that moved: their old names and where they are now.
MOVED_MODULES = {
    "junebug_api.state_cache": "junebug_api.state.cache",
    "junebug_api.memory_state_cache": "junebug_api.state.memory_cache",
    "junebug_api.redis_state_cache": "junebug_api.state.redis_cache",
}


def load_state_cache_class(path: str) -> type:
    """The class ``state_cache_class`` names; ConfigError if it is not there."""
    module_name, _, class_name = BUILT_IN.get(path, path).rpartition(".")
    module_name = MOVED_MODULES.get(module_name, module_name)
    try:
        module = importlib.import_module(module_name)
        cls = getattr(module, class_name)
    except (ImportError, AttributeError, ValueError):
        raise ConfigError(f"state_cache_class {path!r} cannot be imported") from None
    if not (hasattr(cls, "from_config") and hasattr(cls, "check_config")):
        raise ConfigError(f"state_cache_class {path!r} is not a state cache")
    return cls


def make_state_cache(
    path: str,
    config: dict,
    *,
    clock: IReactorTime,
    connector_name: str,
    message_status_ttl: float = DEFAULT_MESSAGE_STATUS_TTL,
) -> StateCache:
    """Build the configured state cache, checking its options."""
    cls = load_state_cache_class(path)
    return cls.from_config(
        config, clock=clock, connector_name=connector_name, message_status_ttl=message_status_ttl
    )


def __getattr__(name: str) -> Any:
    # The built-in classes also answer to their config names in Python
    # (``from junebug_api.state.cache import RedisStateCache``), loaded by name
    # only when asked for, so this module imports neither implementation.
    path = f"junebug_api.state_cache.{name}"
    if path in BUILT_IN:
        return load_state_cache_class(path)
    raise AttributeError(name)
