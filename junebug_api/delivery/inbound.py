"""Inbound messages: from ``<connector>.inbound`` to ``mo_message_url``.

Each message is cached for replies, then POSTed to RapidPro as Junebug JSON.
"""

from __future__ import annotations

import attrs
from twisted.internet.defer import CancelledError

from junebug_api.delivery.http_delivery import DeliveryFailed, HttpDelivery
from junebug_api.delivery.outcomes import HandlingFailed
from junebug_api.formats.junebug_formats import Unsendable, junebug_message, to_json
from junebug_api.formats.urls import url_for_log
from junebug_api.formats.vumi_messages import InvalidMessage, parse_user_message
from junebug_api.observe.log import debug_enabled, logger
from junebug_api.observe.metrics import NO_METRICS, Metrics
from junebug_api.state.cache import StateCache

log = logger(__name__)


@attrs.define(eq=False)
class InboundHandler:
    """Caches an inbound message and POSTs it to ``mo_message_url``."""

    cache: StateCache
    delivery: HttpDelivery
    url: str
    auth_token: str | None = attrs.field(repr=False)
    timeout: float
    # Larger bodies are refused at once: no destination should get them.
    max_body_size: int = 1048576
    metrics: Metrics = NO_METRICS

    async def __call__(self, body: bytes) -> None:
        if len(body) > self.max_body_size:
            raise HandlingFailed(
                f"{len(body)} bytes, over the {self.max_body_size} bytes a body may have",
                retryable=False,
            )
        try:
            message = parse_user_message(body)
        except InvalidMessage as e:
            raise HandlingFailed(f"invalid inbound message: {e}", retryable=False) from None
        message_id = message["message_id"]
        try:
            await self.cache.store_inbound(message)
        except CancelledError:
            raise
        except Exception as e:
            self.metrics.cache_error()
            raise HandlingFailed(
                f"state cache unavailable: {e}", retryable=True, message_id=message_id
            ) from None
        try:
            payload = to_json(junebug_message(message, message["transport_name"]))
        except Unsendable as e:
            raise HandlingFailed(
                f"inbound message cannot be sent on: {e}", retryable=False, message_id=message_id
            ) from None
        try:
            await self.delivery.post_json(self.url, payload, self.auth_token, self.timeout)
        except DeliveryFailed as e:
            url = url_for_log(self.url)
            raise HandlingFailed(
                f"POST to {url} failed: {e.reason}",
                retryable=e.retryable,
                message_id=message_id,
                url=url,
                held=e.held,
                wait=e.retry_after,
            ) from None
        if debug_enabled():
            log.debug("Delivered inbound message {message_id}", message_id=message_id)
