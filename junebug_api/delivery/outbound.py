"""Outbound messages: from a validated API request to ``<connector>.outbound``.

Builds the vumi message (a reply when ``reply_to`` names a cached inbound),
stores where its events go, and publishes it; the API answers 201 only once
the broker confirmed it.
"""

from __future__ import annotations

from collections.abc import Callable, Container
from typing import Any
from urllib.parse import urlsplit

import attrs
from twisted.internet.defer import CancelledError, Deferred

from junebug_api.amqp.service import PublishFailed, PublishRefused
from junebug_api.formats.api_errors import (
    ApiUsageError,
    MessageNotFound,
    MessageTooLong,
    ServiceUnavailable,
)
from junebug_api.formats.junebug_formats import (
    junebug_message,
    outbound_message,
    parse_outbound_request,
    reply_message,
)
from junebug_api.formats.queue_names import QueueNames
from junebug_api.formats.vumi_messages import VumiMessage, serialise
from junebug_api.observe.log import debug_enabled, logger
from junebug_api.observe.metrics import NO_METRICS, Metrics
from junebug_api.state.cache import EventInfo, StateCache

log = logger(__name__)


@attrs.define(eq=False)
class OutboundSender:
    """Turns ``POST .../messages`` bodies into published vumi messages."""

    connector_name: str
    transport_type: str
    default_from_addr: str | None
    allow_expired_replies: bool
    cache: StateCache
    publish: Callable[..., Deferred]
    metrics: Metrics = NO_METRICS
    #: Longer content gets 400 MessageTooLong (old Junebug); None: no limit.
    character_limit: int | None = None
    #: ``channel_id`` of the Junebug JSON answered; None: the connector name.
    channel_id: str | None = None
    #: The connector names of the other channels sharing this process's state
    #: cache (a live view: channels come and go): an inbound message from one
    #: of them is not this channel's to reply to (old Junebug kept inbound
    #: messages per channel).
    other_connectors: Container[str] = frozenset()

    #: The queue messages are published to: the connector's ``.outbound``.
    routing_key: str = attrs.field(init=False)

    @routing_key.default
    def _outbound_queue(self) -> str:
        return QueueNames.for_connector(self.connector_name).outbound

    async def send(self, body: bytes) -> dict[str, Any]:
        """Publish the message a request body describes; its Junebug JSON."""
        request = parse_outbound_request(body)
        limit = self.character_limit
        if limit is not None and len(request.get("content") or "") > limit:
            raise MessageTooLong(f"message content is longer than {limit} characters")
        event_url = request.get("event_url")
        if event_url is not None and not _is_http_url(event_url):
            raise ApiUsageError('"event_url" must be an http:// or https:// URL')
        message = await self._build(request)
        message_id = message["message_id"]
        if event_url is None:
            await self._publish(message_id, message, event_info=False, stored=None)
        else:
            info = EventInfo(event_url, request.get("event_auth_token"))
            stored = self.cache.store_event_info(self._channel, message_id, info)
            if self._cache_down():
                # Known trouble: no publish before the state is written, or every
                # retry of RapidPro's would send the message once more.
                await self._cache_call(stored, "storing event info of", message_id)
                await self._publish(message_id, message, event_info=True, stored=None)
            else:
                # The write and the publish travel together; the 201 waits for both.
                await self._publish(message_id, message, event_info=True, stored=stored)
        if debug_enabled():
            log.debug("Sent outbound message {message_id}", message_id=message_id)
        return junebug_message(message, self._channel)

    @property
    def _channel(self) -> str:
        """The channel id: event info is kept under it."""
        return self.channel_id or self.connector_name

    async def _publish(
        self, message_id: str, message: VumiMessage, *, event_info: bool, stored: Deferred | None
    ) -> None:
        """Publish; with ``stored`` (the event info write in flight) wait for it too.

        Only both answer 201. A publish that failed takes its event info back;
        a write that failed after a confirmed publish is answered 503 like a
        crash at that point: RapidPro's retry may send the message twice.
        """
        started = self.metrics.now()
        try:
            await self.publish(
                self.routing_key, serialise(message), message_id=message_id, refuse_if_busy=True
            )
        except PublishFailed as e:
            self.metrics.publish_done(started, confirmed=False)
            await self._not_sent(message_id, e, stored if event_info else None, event_info)
        except BaseException as e:
            self._abandoned(message_id, e, stored)
            raise
        self.metrics.publish_done(started, confirmed=True)
        if stored is not None:
            await self._stored(message_id, stored)

    async def _not_sent(
        self, message_id: str, error: PublishFailed, stored: Deferred | None, event_info: bool
    ) -> None:
        """The publish failed: log it, take the event info back, answer 503."""
        log.error(
            "Outbound message {message_id} not sent: {error}",
            message_id=message_id,
            error=error,
            channel=self._channel,
        )
        if event_info:
            try:
                if stored is not None:
                    await stored  # the delete must not overtake the write
                await self.cache.delete_event_info(self._channel, message_id)
            except CancelledError:
                raise
            except Exception:
                pass  # an orphaned entry only expires; it sends nothing
        unavailable = ServiceUnavailable(f"message not sent: {error}")
        if isinstance(error, PublishRefused):
            unavailable.retry_after = error.retry_after
        raise unavailable from None

    def _abandoned(self, message_id: str, error: BaseException, stored: Deferred | None) -> None:
        """The publish was given up (the request cancelled, or a bug)."""
        if stored is not None:  # the request is gone (cancelled): nobody waits for it
            stored.addErrback(lambda _: None)
        if isinstance(error, CancelledError):
            log.error(
                "Outbound message {message_id} unanswered: its request timed out or its"
                " client went away before the broker confirmed it (it may still be"
                " on {queue})",
                message_id=message_id,
                queue=self.routing_key,
                channel=self._channel,
            )

    async def _stored(self, message_id: str, stored: Deferred) -> None:
        """Wait for the event info write that travelled with a confirmed publish."""
        try:
            await stored
        except CancelledError:
            raise
        except Exception as e:
            self.metrics.cache_error()
            log.error(
                "Outbound message {message_id} was sent but its event info was not stored"
                " (answered 503; a retry sends it again): {error}",
                message_id=message_id,
                error=e,
                channel=self._channel,
            )
            raise ServiceUnavailable("state cache unavailable") from None

    def _cache_down(self) -> bool:
        return any(c.get("health") == "down" for c in self.cache.health().values())

    async def _build(self, request: dict) -> VumiMessage:
        reply_to = request.get("reply_to")
        if reply_to is not None:
            inbound = await self._cache_call(
                self.cache.fetch_inbound(reply_to), "looking up inbound", reply_to
            )
            if inbound is not None and inbound.get("transport_name") in self.other_connectors:
                inbound = None  # another channel's message
            if inbound is not None:
                return reply_message(request, inbound)
            if request.get("to") is None or not self.allow_expired_replies:
                raise MessageNotFound(f"Inbound message with id {reply_to} not found")
        return outbound_message(
            request,
            connector_name=self.connector_name,
            transport_type=self.transport_type,
            default_from_addr=self.default_from_addr,
        )

    async def _cache_call(self, d: Deferred, action: str, message_id: str) -> Any:
        try:
            return await d
        except CancelledError:
            raise
        except Exception as e:
            self.metrics.cache_error()
            log.error(
                "State cache unavailable ({action} message {message_id}): {error}",
                action=action,
                message_id=message_id,
                error=e,
                channel=self._channel,
            )
            raise ServiceUnavailable("state cache unavailable") from None


def _is_http_url(url: str) -> bool:
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - raises ValueError for a port that is no number
    except ValueError:
        return False
    return parts.scheme in ("http", "https") and bool(parts.hostname)
