"""The options of a channel: those it shares with the top level (whose values
are every channel's defaults) and those only a channel has.

:class:`ChannelOptions` is part of the top-level config
(:class:`junebug_api.config.model.JunebugConfig` derives from it) and of every
channel entry; :class:`ChannelEntry` adds old Junebug's channel fields. Every
one of them is applied by a SIGHUP reload (``reload=True``): a channel can be
changed while the process runs.
"""

from __future__ import annotations

from typing import Any

import attrs

from junebug_api.config.checks import Between, Check, HttpUrl, Printable, queue_prefix_problem
from junebug_api.config.options import option
from junebug_api.formats.queue_names import QueueNames


@attrs.frozen
class ConnectorName(Check):
    """A connector name whose queues RabbitMQ takes (see :func:`queue_prefix_problem`)."""

    def problem(self, value: Any) -> str | None:
        return queue_prefix_problem(value, QueueNames.for_connector(value).all())

    @property
    def text(self) -> str:
        return "printable ASCII, no 'amq.', its queue names within 255 bytes"


def channel_option(default: Any = None, *, reload: bool = True, **kwargs: Any) -> Any:
    """An option a channel may set: a reload applies it (a channel's entry
    is applied whole; ``reload`` says whether the top-level value is)."""
    return option(default, reload=reload, **kwargs)


@attrs.frozen(kw_only=True, slots=False)
class ChannelOptions:
    """The options a channel may set and that the top level sets for every channel."""

    # The top-level one is the vumi2 form's channel id: changing it is another
    # channel, which needs a restart; a channel entry's is applied.
    connector_name: str | None = channel_option(
        checks=[ConnectorName()],
        reload=False,
        channel_default="the channel id",
        default_text="required without channels",
        description=(
            "The prefix of the channel's queues: it publishes to <name>.outbound and"
            " consumes <name>.inbound and <name>.event."
        ),
    )
    mo_message_url: str | None = channel_option(
        checks=[HttpUrl()],
        aliases=("mo_url",),
        default_text="required without channels",
        description=(
            "Where inbound messages are POSTed; credentials in the URL become HTTP Basic auth."
        ),
    )
    mo_message_url_auth_token: str | None = channel_option(
        checks=[Printable()],
        secret=True,
        aliases=("mo_url_auth_token",),
        description="The token sent as 'Authorization: Token ...' with every inbound POST.",
    )
    default_event_url: str | None = channel_option(
        checks=[HttpUrl()],
        description=(
            "Where events of messages sent without an event_url are POSTed;"
            " unset, such events are logged and dropped."
        ),
    )
    default_event_auth_token: str | None = channel_option(
        checks=[Printable()],
        secret=True,
        description="The token sent as 'Authorization: Token ...' with default_event_url's events.",
    )
    transport_type: str = channel_option(
        "sms", description="The transport_type of the messages sent that are no replies."
    )
    default_from_addr: str | None = channel_option(
        description="The from address of messages sent without one; unset, they get 400."
    )
    allow_expired_replies: bool = channel_option(
        False,
        description=(
            "Sends a reply whose inbound message is no longer known as a new message to its"
            " 'to' address, instead of answering 400."
        ),
    )
    character_limit: int | None = channel_option(
        checks=[Between(0, 1_000_000)],
        description=(
            "Content longer than this many characters gets 400 MessageTooLong; unset, no limit."
        ),
    )
    api_auth_username: str | None = channel_option(
        checks=[Printable()],
        public=False,
        description=(
            "With api_auth_password: the HTTP Basic credentials every API request must carry."
        ),
    )
    api_auth_password: str | None = channel_option(
        checks=[Printable()],
        secret=True,
        description="The password of api_auth_username.",
    )
    api_auth_token: str | None = channel_option(
        checks=[Printable(non_empty=True)],
        secret=True,
        description=(
            "A token API requests may carry as 'Authorization: Token ...' instead;"
            " with no API credentials set, the API is open."
        ),
    )
    worker_concurrency: int = channel_option(
        20,
        checks=[Between(1, 65535)],
        description=(
            "The prefetch of each of the channel's AMQP consumers, so the most deliveries"
            " in flight per queue, and the size of its HTTP connection pool per host."
        ),
    )


_NOT_RUN = "junebug-api runs no transports"


@attrs.frozen(kw_only=True, slots=False)
class ChannelEntry(ChannelOptions):
    """Everything a ``channels:`` entry (or a channel API body) may set: the
    options above and old Junebug's own channel fields."""

    label: str | None = channel_option(description="A name for people, shown with the channel.")
    metadata: dict = channel_option(
        factory=dict, description="Free-form data kept and shown with the channel."
    )
    type: str | None = channel_option(
        api_required=True,
        description=f"Old Junebug's transport type: stored and shown ({_NOT_RUN}).",
    )
    config: dict = channel_option(
        factory=dict,
        api_required=True,
        secret_names=True,
        description=(
            "Old Junebug's transport config: stored and shown, with the values of keys naming"
            f" a password, secret or token masked ({_NOT_RUN})."
        ),
    )
    public_http: dict | None = channel_option(
        description=f"Old Junebug's HTTP settings of the transport: stored and shown ({_NOT_RUN}).",
    )
    amqp_queue: str | None = channel_option(
        checks=[Printable()],
        ignored="junebug-api does not repost inbound messages onto another queue",
        description="Old Junebug's extra queue for inbound messages: stored and shown, not used.",
    )
    status_url: str | None = channel_option(
        checks=[HttpUrl()],
        ignored=f"{_NOT_RUN}, so it has no transport status to POST",
        description="Old Junebug's URL for transport status events: stored and shown, not used.",
    )
    rate_limit_count: int | None = channel_option(
        checks=[Between(0, 1_000_000)],
        ignored="old Junebug did not implement rate limits either",
        description="Old Junebug's rate limit (messages per window): stored and shown, not used.",
    )
    rate_limit_window: int | None = channel_option(
        checks=[Between(0, 1_000_000)],
        ignored="old Junebug did not implement rate limits either",
        description="Old Junebug's rate limit window (seconds): stored and shown, not used.",
    )
