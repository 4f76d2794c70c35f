"""The state cache in this process's memory: fast, not shared, not kept.

:class:`InMemoryStateCache` implements :class:`~junebug_api.state.cache.StateCache`
with expiring maps (:class:`ExpiringMap`): inbound messages, event info,
and one of message status per channel; configs name it
``junebug_api.state_cache.InMemoryStateCache``.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any, ClassVar

from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IDelayedCall, IReactorTime

from junebug_api.config.model import ConfigError
from junebug_api.formats.vumi_messages import VumiMessage, reply_source, reply_source_from_bytes
from junebug_api.state.cache import DEFAULT_MESSAGE_STATUS_TTL, EventInfo, check_options


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

    def renew(self, key: str) -> Any:
        """The value of ``key`` (None if absent), its expiry renewed."""
        value = self.get(key)
        if value is not None:
            self.set(key, value)
        return value

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
        self,
        clock: IReactorTime,
        timeout: float = 86400,
        store_event_info: bool = True,
        message_status_ttl: float = DEFAULT_MESSAGE_STATUS_TTL,
    ) -> None:
        self.store_event_info_enabled = store_event_info
        self._inbound = ExpiringMap(clock, timeout)
        self._event_info = ExpiringMap(clock, timeout)
        self._clock = clock
        self._status_ttl = message_status_ttl
        #: Message status by channel id, then message id.
        self._status: dict[str, ExpiringMap] = {}

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
        cls,
        config: dict,
        *,
        clock: IReactorTime,
        connector_name: str,
        message_status_ttl: float = DEFAULT_MESSAGE_STATUS_TTL,
    ) -> InMemoryStateCache:
        return cls(
            clock, **cls.check_config(config, connector_name), message_status_ttl=message_status_ttl
        )

    def store_inbound(self, message: VumiMessage) -> Deferred[None]:
        self._inbound.set(message["message_id"], reply_source(message))
        return succeed(None)

    def fetch_inbound(self, message_id: str) -> Deferred[VumiMessage | None]:
        data = self._inbound.get(message_id)
        return succeed(None if data is None else reply_source_from_bytes(data))

    def delete_inbound(self, message_id: str) -> Deferred[None]:
        self._inbound.delete(message_id)
        return succeed(None)

    # Event info is kept per channel: one key holds the channel id and the
    # message id (NUL cannot be in a channel id's URL path segment).

    def store_event_info(self, channel_id: str, message_id: str, info: EventInfo) -> Deferred[None]:
        if self.store_event_info_enabled:
            self._event_info.set(f"{channel_id}\0{message_id}", (info.url, info.auth_token))
        return succeed(None)

    def fetch_event_info(
        self, channel_id: str, message_id: str, *, legacy: bool = False
    ) -> Deferred[EventInfo | None]:
        # Nothing outlives the process here: there are no legacy entries.
        data = self._event_info.get(f"{channel_id}\0{message_id}")
        return succeed(None if data is None else EventInfo(*data))

    def delete_event_info(self, channel_id: str, message_id: str) -> Deferred[None]:
        self._event_info.delete(f"{channel_id}\0{message_id}")
        return succeed(None)

    # -- message status: the events of each outbound message ----------------
    # One map per channel (a message id asked for through another channel is
    # not found), and one flat tuple per message, (event_id, json, event_id,
    # json, ...): the smallest container for the usual two or three events.

    def store_message_event(
        self, channel_id: str, message_id: str, event_id: str, event: bytes
    ) -> Deferred[None]:
        statuses = self._status.get(channel_id)
        if statuses is None:
            statuses = self._status[channel_id] = ExpiringMap(self._clock, self._status_ttl)
        stored = statuses.get(message_id) or ()
        for i in range(0, len(stored), 2):
            if stored[i] == event_id:
                stored = stored[:i] + stored[i + 2 :]
                break
        statuses.set(message_id, (*stored, event_id, event))
        return succeed(None)

    def fetch_message_events(self, channel_id: str, message_id: str) -> Deferred[list[bytes]]:
        statuses = self._status.get(channel_id)
        stored = statuses.renew(message_id) if statuses is not None else None
        return succeed(list((stored or ())[1::2]))

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
        for statuses in self._status.values():
            statuses.clear()
        self._status.clear()
        return succeed(None)
