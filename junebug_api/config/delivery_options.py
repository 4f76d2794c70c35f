"""The delivery options: POSTing inbound messages and events to RapidPro,
retries, and the state cache that keeps what replies and events need."""

from __future__ import annotations

import attrs

from junebug_api.config.checks import Between, seconds
from junebug_api.config.options import option

DEFAULT_STATE_CACHE = "junebug_api.state_cache.InMemoryStateCache"

# Old Junebug and vumi2 class paths that mean the in-memory cache.
STATE_CACHE_ALIASES = {
    "vumi2.applications.junebug_message_api.junebug_state_cache.MemoryJunebugStateCache": (
        DEFAULT_STATE_CACHE
    ),
    "vumi2.applications.junebug_message_api.junebug_state_cache.InMemorySmppCache": (
        DEFAULT_STATE_CACHE
    ),
}


@attrs.frozen(kw_only=True, slots=False)
class DeliveryOptions:
    """The delivery and state cache options of the top-level config."""

    mo_message_url_timeout: float = option(
        10.0, checks=[seconds()], description="Seconds per inbound POST attempt."
    )
    event_url_timeout: float = option(
        10.0, checks=[seconds()], description="Seconds per event POST attempt."
    )
    delivery_retry_delay: float = option(
        1.0,
        checks=[seconds()],
        description="Seconds before the first retry of an inbound or event POST; it doubles.",
    )
    delivery_retry_max_delay: float = option(
        60.0, checks=[seconds()], description="The longest delay between retries, in seconds."
    )
    delivery_max_attempts: int = option(
        10,
        checks=[Between(1, 1_000_000)],
        description=(
            "Attempts, made while the destination was up, before a message goes to its"
            " .failed queue."
        ),
    )
    delivery_max_age: float = option(
        86400.0,
        checks=[seconds(1)],
        description=(
            "Seconds after a message's first failure at which it goes to its .failed queue."
        ),
    )
    delivery_max_hold: float = option(
        60.0,
        checks=[seconds()],
        description=(
            "The longest a delivery stays unacked for retries in the process; longer waits"
            " go to delay queues (keep it well under the broker's consumer_timeout)."
        ),
    )
    delivery_probe_interval: float = option(
        5.0,
        checks=[seconds()],
        description="Seconds between probe deliveries to a destination that is down.",
    )
    state_cache_class: str = option(
        DEFAULT_STATE_CACHE,
        default_text="InMemoryStateCache",
        description=(
            "The state cache class (InMemoryStateCache or RedisStateCache, in"
            " junebug_api.state_cache; vumi2's in-memory class paths mean the first)."
        ),
    )
    state_cache_config: dict = option(
        factory=dict,
        secret_keys=("password", "sentinel_password"),
        url_keys=("url",),
        description="The state cache's options (see The state cache).",
    )
    outbound_message_ttl: float = option(
        172800.0,
        checks=[seconds(1, 366 * 86400)],
        description=(
            "Seconds a message's status (its events) is kept, renewed on each read and write."
        ),
    )
    store_message_events: bool = option(
        True,
        description=(
            "Keeps each outbound message's events for GET .../messages/<message_id>;"
            " false stores nothing and answers no events."
        ),
    )
