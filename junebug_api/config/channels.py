"""Channels: the settings of each channel this process serves.

Old Junebug served many channels from one process; vumi2's worker serves one
connector. Both are channels here: the top-level ``connector_name`` (with
``base_url_path``) is one channel, and each entry of ``channels:`` is another,
served at ``/channels/<id>``. Top-level values are every channel's defaults;
an entry overrides them. :func:`resolve_channels` turns a config into one
:class:`ChannelSettings` per channel, or raises :class:`ConfigError` naming
the channel and the option.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import attrs

from junebug_api.config.checks import (
    ConfigError,
    check_queue_prefix,
    check_url,
    check_value,
    read_secret_file,
)
from junebug_api.formats.queue_names import QueueNames
from junebug_api.formats.urls import url_masked

#: The top-level config (:class:`junebug_api.config.model.JunebugConfig`),
#: not imported: config.model imports this module.
JunebugConfig = Any

#: Old Junebug names accepted for the options they mean.
ALIASES = {"mo_url": "mo_message_url", "mo_url_auth_token": "mo_message_url_auth_token"}

#: Old Junebug channel settings accepted and ignored (with a warning each).
IGNORED = {
    "amqp_queue": "junebug-api does not repost inbound messages onto another queue",
    "status_url": "junebug-api runs no transports, so it has no transport status to POST",
    "rate_limit_count": "old Junebug did not implement rate limits either",
    "rate_limit_window": "old Junebug did not implement rate limits either",
}

#: Options a channel may set, with the type of each. Those also at the top
#: level default to the top-level value.
CHANNEL_OPTIONS: dict[str, Any] = {
    "connector_name": str,
    "mo_message_url": str,
    "mo_message_url_auth_token": str | None,
    "default_event_url": str | None,
    "default_event_auth_token": str | None,
    "transport_type": str,
    "default_from_addr": str | None,
    "allow_expired_replies": bool,
    "character_limit": int | None,
    "label": str | None,
    "metadata": dict,
    "api_auth_username": str | None,
    "api_auth_password": str | None,
    "api_auth_token": str | None,
    "worker_concurrency": int,
}

#: Options that carry a secret: never in ``GET /channels/<id>`` or a log line.
SECRET_OPTIONS = frozenset(
    {
        "mo_message_url_auth_token",
        "default_event_auth_token",
        "api_auth_password",
        "api_auth_token",
    }
)

_CHANNEL_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._~-]*$")


@attrs.frozen(kw_only=True)
class ChannelSettings:
    """Everything one channel needs, resolved from its entry and the defaults."""

    id: str
    connector_name: str
    base_url_path: str
    mo_message_url: str
    mo_message_url_auth_token: str | None = attrs.field(default=None, repr=False)
    default_event_url: str | None = None
    default_event_auth_token: str | None = attrs.field(default=None, repr=False)
    transport_type: str = "sms"
    default_from_addr: str | None = None
    allow_expired_replies: bool = False
    character_limit: int | None = None
    label: str | None = None
    metadata: dict = attrs.field(factory=dict)
    api_auth_username: str | None = None
    api_auth_password: str | None = attrs.field(default=None, repr=False)
    api_auth_token: str | None = attrs.field(default=None, repr=False)
    worker_concurrency: int = 20
    #: Old Junebug options given and ignored: name -> why.
    ignored: dict = attrs.field(factory=dict)

    @property
    def messages_path(self) -> str:
        """Where RapidPro POSTs this channel's messages, without a trailing slash."""
        return self.base_url_path.rstrip("/") + "/messages"

    def public(self) -> dict[str, Any]:
        """The settings for ``GET /channels/<id>``: without any secret, and
        with URL credentials and query values masked."""
        return {
            "id": self.id,
            "label": self.label,
            "metadata": self.metadata,
            "connector_name": self.connector_name,
            "mo_url": url_masked(self.mo_message_url),
            "default_event_url": (
                url_masked(self.default_event_url) if self.default_event_url else None
            ),
            "transport_type": self.transport_type,
            "default_from_addr": self.default_from_addr,
            "allow_expired_replies": self.allow_expired_replies,
            "character_limit": self.character_limit,
            "worker_concurrency": self.worker_concurrency,
            "messages_path": self.messages_path,
        }


def _defaults(config: JunebugConfig) -> dict[str, Any]:
    return {
        name: getattr(config, name)
        for name in CHANNEL_OPTIONS
        if hasattr(config, name) and name != "connector_name"
    }


def _resolve_entry(channel_id: Any, entry: Any, config: JunebugConfig) -> ChannelSettings:
    if not isinstance(channel_id, str) or not _CHANNEL_ID.match(channel_id):
        raise ConfigError(
            f"channels: channel id {channel_id!r} must be letters, digits, '.', '_', '~'"
            " or '-' (it is a URL path segment)"
        )
    where = f"channels.{channel_id}"
    if entry is None:
        entry = {}
    if not isinstance(entry, Mapping):
        raise ConfigError(f"{where} must be a mapping of options")
    values = _defaults(config)
    values["connector_name"] = channel_id
    given: set[str] = set()
    ignored: dict[str, str] = {}
    for key, value in entry.items():
        name = ALIASES.get(key, key)
        secret = ALIASES.get(key.removesuffix("_file"), key.removesuffix("_file"))
        if key.endswith("_file") and secret in SECRET_OPTIONS:
            # <secret>_file: the secret read from a file, as at the top level.
            if secret in given:
                raise ConfigError(f"{where}: set {secret} or {key}, not both")
            given.add(secret)
            values[secret] = read_secret_file(f"{where}.{key}", value)
            continue
        if name in IGNORED:
            ignored[name] = IGNORED[name]
            continue
        if name not in CHANNEL_OPTIONS:
            raise ConfigError(f"unknown option {where}.{key}")
        if name in given:
            raise ConfigError(f"{where}.{key}: {name} is given twice (once by its alias)")
        given.add(name)
        values[name] = check_value(f"{where}.{key}", CHANNEL_OPTIONS[name], value)
        if isinstance(values[name], str) and any(
            ord(c) < 32 or ord(c) == 127 for c in values[name]
        ):
            raise ConfigError(f"{where}.{key} must not contain control characters")
    settings = ChannelSettings(
        id=channel_id, base_url_path=f"/channels/{channel_id}", ignored=ignored, **values
    )
    _check_settings(settings, where)
    return settings


def _check_settings(settings: ChannelSettings, where: str) -> None:
    if settings.mo_message_url is None:
        raise ConfigError(
            f"{where}.mo_message_url is required (in the channel or at the top level)"
        )
    if not settings.connector_name.strip():
        raise ConfigError(f"{where}.connector_name must not be empty")
    check_queue_prefix(
        f"{where}.connector_name",
        settings.connector_name,
        QueueNames.for_connector(settings.connector_name).all(),
    )
    check_url(f"{where}.mo_message_url", settings.mo_message_url)
    if settings.default_event_url is not None:
        check_url(f"{where}.default_event_url", settings.default_event_url)
    if settings.character_limit is not None and not 0 <= settings.character_limit <= 1_000_000:
        raise ConfigError(
            f"{where}.character_limit must be from 0 to 1000000, got {settings.character_limit}"
        )
    if not 1 <= settings.worker_concurrency <= 65535:
        raise ConfigError(
            f"{where}.worker_concurrency must be from 1 to 65535, got {settings.worker_concurrency}"
        )
    if (settings.api_auth_username is None) != (settings.api_auth_password is None):
        raise ConfigError(f"{where}: api_auth_username and api_auth_password must be set together")
    if settings.api_auth_token is not None and not settings.api_auth_token:
        raise ConfigError(f"{where}.api_auth_token must not be empty")


def top_level_channel(config: JunebugConfig) -> ChannelSettings | None:
    """The vumi2 form's one connector as a channel (id: its connector name), if set."""
    if config.connector_name is None:
        return None
    values = _defaults(config)
    return ChannelSettings(
        id=config.connector_name,
        connector_name=config.connector_name,
        base_url_path=config.base_url_path,
        **values,
    )


def resolve_channels(config: JunebugConfig) -> list[ChannelSettings]:
    """Every channel of the config: the top-level connector first (if any),
    then ``channels:`` in id order."""
    channels: list[ChannelSettings] = []
    top = top_level_channel(config)
    if top is not None:
        channels.append(top)
    if not isinstance(config.channels, Mapping):
        raise ConfigError("channels must be a mapping of channel id to settings")
    for channel_id in sorted(config.channels, key=str):
        channels.append(_resolve_entry(channel_id, config.channels[channel_id], config))
    ids: dict[str, ChannelSettings] = {}
    connectors: dict[str, ChannelSettings] = {}
    paths: dict[str, ChannelSettings] = {}
    for channel in channels:
        where = f"channels.{channel.id}" if channel is not top else "connector_name"
        if channel.id in ids:
            raise ConfigError(
                f"{where}: the top-level connector_name is already a channel with this id"
            )
        other = connectors.get(channel.connector_name)
        if other is not None:
            raise ConfigError(
                f"{where}.connector_name {channel.connector_name!r} is already the connector"
                f" of channel {other.id!r}"
            )
        other = paths.get(channel.messages_path)
        if other is not None:
            raise ConfigError(
                f"{where}: its messages path {channel.messages_path} is already that of"
                f" {'the top-level connector' if other is top else 'channel ' + repr(other.id)}"
            )
        ids[channel.id] = connectors[channel.connector_name] = paths[channel.messages_path] = (
            channel
        )
    return channels
