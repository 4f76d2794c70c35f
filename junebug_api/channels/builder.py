"""Building a :class:`~junebug_api.channels.channel.Channel` from its settings.

Every channel is made of the same shared pieces (the AMQP service's
``publish`` and consumer controls, the state cache, the HTTP delivery pool,
the outage tracker, the metrics) and the top-level options no channel sets
(retry policy, timeouts, ``max_logs``, ...); a :class:`ChannelBuilder` holds
them, so the channel registry only says which settings it wants built.
"""

from __future__ import annotations

from collections.abc import Container
from typing import Any

import attrs

from junebug_api.channels.channel import Channel
from junebug_api.config.channels import ChannelSettings
from junebug_api.delivery.http_delivery import HttpDelivery
from junebug_api.delivery.outages import OutageTracker
from junebug_api.delivery.retry_policy import RetryPolicy
from junebug_api.formats.queue_names import QueueNames
from junebug_api.observe.metrics import NO_METRICS, Metrics
from junebug_api.state.cache import StateCache


@attrs.frozen
class ChannelBuilder:
    """Builds channels from their settings; ``config`` is the top-level
    :class:`~junebug_api.config.model.JunebugConfig` (its options that need a
    restart: a reload never changes them); ``amqp`` publishes and pauses,
    resumes and probes consumers (:class:`~junebug_api.amqp.service.AmqpService`)."""

    config: Any
    cache: StateCache
    delivery: HttpDelivery
    amqp: Any
    outages: OutageTracker
    clock: Any
    metrics: Metrics = NO_METRICS

    def policy(self, attempt_timeout: float) -> RetryPolicy:
        """The retry policy of deliveries whose attempts take ``attempt_timeout`` s at most."""
        config = self.config
        return RetryPolicy(
            config.delivery_retry_delay,
            config.delivery_retry_max_delay,
            config.delivery_max_attempts,
            max_age=config.delivery_max_age,
            max_hold=config.delivery_max_hold,
            attempt_timeout=attempt_timeout,
        )

    def __call__(
        self,
        settings: ChannelSettings,
        other_connectors: Container[str],
        previous: Channel | None = None,
    ) -> Channel:
        """The channel of ``settings``; ``previous``: the one it replaces (a
        change), whose counts and log records it keeps."""
        config = self.config
        return Channel(
            settings,
            queues=QueueNames.for_connector(settings.connector_name),
            cache=self.cache,
            delivery=self.delivery,
            publish=self.amqp.publish,
            inbound_policy=self.policy(config.mo_message_url_timeout),
            event_policy=self.policy(config.event_url_timeout),
            outages=self.outages,
            control=self.amqp,
            probe_interval=config.delivery_probe_interval,
            max_body_size=config.max_request_size,
            clock=self.clock,
            mo_message_url_timeout=config.mo_message_url_timeout,
            event_url_timeout=config.event_url_timeout,
            metric_window=config.metric_window,
            max_logs=config.max_logs,
            store_message_events=config.store_message_events,
            metrics=self.metrics,
            other_connectors=other_connectors,
            previous=previous,
        )
