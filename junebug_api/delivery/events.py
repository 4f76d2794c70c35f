"""Events: from ``<connector>.event`` to the event URL of their message.

The URL is the one this channel stored when the outbound message was sent
(an event naming another channel's message does not find it), else
``default_event_url``; an event with neither is logged and dropped, as the
spec says.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import attrs
from twisted.internet.defer import CancelledError

from junebug_api.delivery.http_delivery import DeliveryFailed, HttpDelivery
from junebug_api.delivery.outcomes import DROPPED, HandlingFailed
from junebug_api.formats.junebug_formats import Unsendable, junebug_event, to_json
from junebug_api.formats.urls import url_for_log
from junebug_api.formats.vumi_messages import InvalidMessage, VumiMessage, parse_event
from junebug_api.observe.log import debug_enabled, logger
from junebug_api.observe.metrics import NO_METRICS, Metrics
from junebug_api.state.cache import EventInfo, StateCache

log = logger(__name__)


@attrs.define(eq=False)
class EventHandler:
    """Finds where an event goes and POSTs it there as Junebug JSON."""

    cache: StateCache
    delivery: HttpDelivery
    channel_id: str
    default_url: str | None
    default_auth_token: str | None = attrs.field(repr=False)
    timeout: float
    # Larger bodies are refused at once: no destination should get them.
    max_body_size: int = 1048576
    metrics: Metrics = NO_METRICS
    #: Called with each parsed event before it is delivered (message status);
    #: a failure there is retried like a state cache failure.
    on_event: Callable[[VumiMessage], Awaitable[None]] | None = None
    #: Called with each event once delivered or dropped (channel rates).
    on_done: Callable[[VumiMessage], None] | None = None
    #: Asked at each lookup: also read event info a version before per-channel
    #: keys stored (it names no channel)? Only while the channel shares the
    #: state cache with no other, so an event never reaches another channel's
    #: event URL.
    legacy_event_info: Callable[[], bool] = lambda: False

    async def __call__(self, body: bytes) -> str | None:
        event = self._parse(body)
        message_id = event["user_message_id"]
        info = await self._event_info(event)
        if info is None:
            log.warn(
                "No event URL for {event_type} event {event_id} of message {message_id}; dropped",
                event_type=event["event_type"],
                event_id=event.get("event_id"),
                message_id=message_id,
                channel=self.channel_id,
            )
            self._done(event)
            return DROPPED
        try:
            payload = to_json(junebug_event(event, self.channel_id))
        except Unsendable as e:
            raise HandlingFailed(
                f"event cannot be sent on: {e}", retryable=False, message_id=message_id
            ) from None
        await self._post(event, info, payload)
        self._done(event)
        if debug_enabled():
            log.debug("Delivered event for message {message_id}", message_id=message_id)
        return None

    def _parse(self, body: bytes) -> VumiMessage:
        """The event in ``body``; a permanent HandlingFailed if there is none."""
        if len(body) > self.max_body_size:
            raise HandlingFailed(
                f"{len(body)} bytes, over the {self.max_body_size} bytes a body may have",
                retryable=False,
            )
        try:
            return parse_event(body)
        except InvalidMessage as e:
            raise HandlingFailed(f"invalid event: {e}", retryable=False) from None

    async def _event_info(self, event: VumiMessage) -> EventInfo | None:
        """Where the event goes: its message's stored event info, else the
        default URL, else None (nowhere)."""
        message_id = event["user_message_id"]
        try:
            if self.on_event is not None:
                await self.on_event(event)
            info = await self.cache.fetch_event_info(
                self.channel_id, message_id, legacy=self.legacy_event_info()
            )
        except CancelledError:
            raise
        except Exception as e:
            self.metrics.cache_error()
            raise HandlingFailed(
                f"state cache unavailable: {e}", retryable=True, message_id=message_id
            ) from None
        if info is None and self.default_url is not None:
            info = EventInfo(self.default_url, self.default_auth_token)
        return info

    async def _post(self, event: VumiMessage, info: EventInfo, payload: bytes) -> None:
        try:
            await self.delivery.post_json(
                info.url, payload, info.auth_token, self.timeout, target="event"
            )
        except DeliveryFailed as e:
            url = url_for_log(info.url)
            raise HandlingFailed(
                f"POST of {event['event_type']} event to {url} failed: {e.reason}",
                retryable=e.retryable,
                message_id=event["user_message_id"],
                url=url,
                held=e.held,
                wait=e.retry_after,
            ) from None

    def _done(self, event: VumiMessage) -> None:
        if self.on_done is not None:
            self.on_done(event)
