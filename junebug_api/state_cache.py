"""State caches: inbound messages kept for replies, event info for outbound.

:class:`StateCache` is the interface; every call returns a Deferred, so a
cache may live in this process (:class:`InMemoryStateCache`) or elsewhere.
``state_cache_class`` names the class and ``state_cache_config`` its options,
which the class checks in ``from_config``.
"""

from __future__ import annotations

import importlib
from collections import OrderedDict
from typing import Any, ClassVar, Protocol

import attrs
from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IDelayedCall, IReactorTime

from .config import ConfigError
from .vumi_messages import VumiMessage, reply_source, reply_source_from_bytes


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

    def store_event_info(self, message_id: str, info: EventInfo) -> Deferred[None]:
        """Remember where events for outbound ``message_id`` go."""

    def fetch_event_info(self, message_id: str) -> Deferred[EventInfo | None]:
        """The stored event info, or None."""

    def delete_event_info(self, message_id: str) -> Deferred[None]:
        """Forget the event info of an outbound message."""

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


class ExpiringMap:
    """A mapping whose entries expire ``timeout`` seconds after they are set.

    Every entry lives equally long, so insertion order is expiry order: an
    OrderedDict keeps it and one timer, set for the oldest entry, clears out
    whatever is due. There is no timer per entry and no scan on insert.
    """

    def __init__(self, clock: IReactorTime, timeout: float) -> None:
        self._clock = clock
        self._timeout = timeout
        self._entries: OrderedDict[str, tuple[float, Any]] = OrderedDict()
        self._timer: IDelayedCall | None = None

    def __len__(self) -> int:
        return len(self._entries)

    def set(self, key: str, value: Any) -> None:
        expires = self._clock.seconds() + self._timeout
        self._entries.pop(key, None)
        self._entries[key] = (expires, value)
        if self._timer is None:
            self._timer = self._clock.callLater(self._timeout, self._expire)

    def get(self, key: str) -> Any:
        entry = self._entries.get(key)
        if entry is None:
            return None
        if entry[0] <= self._clock.seconds():
            del self._entries[key]
            return None
        return entry[1]

    def delete(self, key: str) -> None:
        self._entries.pop(key, None)

    def _expire(self) -> None:
        self._timer = None
        now = self._clock.seconds()
        entries = self._entries
        while entries:
            expires = next(iter(entries.values()))[0]
            if expires > now:
                self._timer = self._clock.callLater(expires - now, self._expire)
                return
            entries.popitem(last=False)

    def clear(self) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        self._entries.clear()


class InMemoryStateCache:
    """A state cache in this process's memory: fast, not shared, not kept.

    Options: ``timeout`` (seconds an entry lives, default 86400) and
    ``store_event_info`` (default true; false sends every event to
    ``default_event_url``). An inbound costs one compact bytes value (the
    fields a reply needs) plus its key and an ordered-dict slot.
    """

    OPTIONS: ClassVar[dict[str, type]] = {"timeout": float, "store_event_info": bool}

    def __init__(
        self, clock: IReactorTime, timeout: float = 86400, store_event_info: bool = True
    ) -> None:
        self.store_event_info_enabled = store_event_info
        self._inbound = ExpiringMap(clock, timeout)
        self._event_info = ExpiringMap(clock, timeout)

    @classmethod
    def check_config(cls, config: dict, connector_name: str = "") -> dict:
        """The options with defaults filled in; ConfigError if any is wrong."""
        options = check_options(cls.__name__, config, cls.OPTIONS)
        timeout = options.get("timeout", 86400)
        if timeout <= 0:
            raise ConfigError("state_cache_config.timeout must be greater than 0")
        return {"timeout": timeout, "store_event_info": options.get("store_event_info", True)}

    @classmethod
    def from_config(
        cls, config: dict, *, clock: IReactorTime, connector_name: str
    ) -> InMemoryStateCache:
        return cls(clock, **cls.check_config(config, connector_name))

    def store_inbound(self, message: VumiMessage) -> Deferred[None]:
        self._inbound.set(message["message_id"], reply_source(message))
        return succeed(None)

    def fetch_inbound(self, message_id: str) -> Deferred[VumiMessage | None]:
        data = self._inbound.get(message_id)
        return succeed(None if data is None else reply_source_from_bytes(data))

    def delete_inbound(self, message_id: str) -> Deferred[None]:
        self._inbound.delete(message_id)
        return succeed(None)

    def store_event_info(self, message_id: str, info: EventInfo) -> Deferred[None]:
        if self.store_event_info_enabled:
            self._event_info.set(message_id, (info.url, info.auth_token))
        return succeed(None)

    def fetch_event_info(self, message_id: str) -> Deferred[EventInfo | None]:
        data = self._event_info.get(message_id)
        return succeed(None if data is None else EventInfo(*data))

    def delete_event_info(self, message_id: str) -> Deferred[None]:
        self._event_info.delete(message_id)
        return succeed(None)

    def start(self) -> None:
        pass

    def health(self) -> dict[str, dict[str, Any]]:
        return {}

    def entry_count(self) -> int:
        """Inbound messages and event infos held (for ``/metrics``)."""
        return len(self._inbound) + len(self._event_info)

    def close(self) -> Deferred[None]:
        self._inbound.clear()
        self._event_info.clear()
        return succeed(None)


def load_state_cache_class(path: str) -> type:
    """The class ``state_cache_class`` names; ConfigError if it is not there."""
    module_name, _, class_name = path.rpartition(".")
    try:
        module = importlib.import_module(module_name)
        cls = getattr(module, class_name)
    except (ImportError, AttributeError, ValueError):
        raise ConfigError(f"state_cache_class {path!r} cannot be imported") from None
    if not (hasattr(cls, "from_config") and hasattr(cls, "check_config")):
        raise ConfigError(f"state_cache_class {path!r} is not a state cache")
    return cls


def make_state_cache(
    path: str, config: dict, *, clock: IReactorTime, connector_name: str
) -> StateCache:
    """Build the configured state cache, checking its options."""
    cls = load_state_cache_class(path)
    return cls.from_config(config, clock=clock, connector_name=connector_name)


def __getattr__(name: str) -> Any:
    # RedisStateCache lives in its own module so that its client (which
    # imports the reactor) loads only when a config names it.
    if name == "RedisStateCache":
        from .redis_state_cache import RedisStateCache

        return RedisStateCache
    raise AttributeError(name)
