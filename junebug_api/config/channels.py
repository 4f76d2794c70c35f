"""Channels: the settings of each channel this process serves.

Old Junebug served many channels from one process; vumi2's worker serves one
connector. Both are channels here: the top-level ``connector_name`` (with
``base_url_path``) is one channel, and each entry of ``channels:`` (or of the
channel API's store) is another, served at ``/channels/<id>``. Top-level
values are every channel's defaults; an entry overrides them.

- :func:`channel_settings` resolves one entry into a :class:`ChannelSettings`,
  or raises :class:`ConfigError` naming the channel and the key;
- :func:`channel_entry` gives back the entry that resolves to those settings
  (what the channel stores persist);
- :func:`public` is what ``GET /channels/<id>`` shows (no secret);
- :func:`resolve_channels` resolves the config file's channels.

What an entry may hold is :class:`~junebug_api.config.channel_options.ChannelEntry`:
every key is one of its options, an old Junebug alias of one
(``mo_url``), or ``<option>_file`` for a secret or a URL.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import attrs

from junebug_api.config import secrets
from junebug_api.config.channel_options import ChannelEntry, ChannelOptions
from junebug_api.config.checks import ConfigError
from junebug_api.config.options import Option, options
from junebug_api.config.structure import build
from junebug_api.formats.urls import url_masked

#: The top-level config (:class:`junebug_api.config.model.JunebugConfig`, a
#: :class:`ChannelOptions` with ``channels`` and ``base_url_path``), not
#: imported: config.model imports this module.
TopLevelConfig = Any

#: What a channel id may be: it is a URL path segment (and the OpenAPI document
#: says so).
CHANNEL_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._~-]*$")


@attrs.frozen(kw_only=True)
class ChannelSettings(ChannelEntry):
    """Everything one channel needs, resolved from its entry and the defaults."""

    id: str
    base_url_path: str
    #: Options given that are stored but not acted on: name -> why.
    ignored: dict = attrs.field(factory=dict)
    #: The options its entry set (the rest are defaults): :func:`channel_entry`.
    given: frozenset = attrs.field(default=frozenset(), eq=False, repr=False)

    @property
    def messages_path(self) -> str:
        """Where RapidPro POSTs this channel's messages, without a trailing slash."""
        return self.base_url_path.rstrip("/") + "/messages"

    def public(self) -> dict[str, Any]:
        """The settings for ``GET /channels/<id>``: see :func:`public`."""
        return public(self)


def entry_options() -> dict[str, tuple[str, Option]]:
    """Every key a channel entry takes -> the option it sets and its
    :class:`Option`: the options, their aliases and ``<option>_file``."""
    keys: dict[str, tuple[str, Option]] = {}
    for field, about, _ in options(ChannelEntry):
        for key in (field.name, *about.aliases):
            keys[key] = (field.name, about)
            if about.from_file:
                keys[f"{key}_file"] = (field.name, about)
    return keys


ENTRY_KEYS = entry_options()

#: Every option a channel entry sets -> its type.
CHANNEL_OPTIONS = {field.name: hint for field, _, hint in options(ChannelEntry)}

#: The options of a channel that are secrets.
SECRET_OPTIONS = frozenset(field.name for field, about, _ in options(ChannelEntry) if about.secret)

#: Old Junebug channel settings stored but not acted on: name -> why.
IGNORED = {field.name: about.ignored for field, about, _ in options(ChannelEntry) if about.ignored}


def check_channel_id(channel_id: Any) -> None:
    """A channel id is one URL path segment of unreserved characters."""
    if not isinstance(channel_id, str) or not CHANNEL_ID.match(channel_id):
        raise ConfigError(
            f"channels: channel id {channel_id!r} must be letters, digits, '.', '_', '~'"
            " or '-' (it is a URL path segment)"
        )


def given_options(entry: Any, where: str) -> dict[str, Any]:
    """The options an entry sets, by their own names (aliases and
    ``<option>_file`` resolved, secrets read from their files)."""
    if entry is None:
        return {}
    if not isinstance(entry, Mapping):
        raise ConfigError(f"{where} must be a mapping of options")
    values: dict[str, Any] = {}
    keys: dict[str, str] = {}
    for key, value in entry.items():
        if key not in ENTRY_KEYS:
            raise ConfigError(f"unknown option {where}.{key}")
        name, about = ENTRY_KEYS[key]
        from_file = key not in (name, *about.aliases)
        if name in keys:
            first = keys[name]
            if key.endswith("_file") or first.endswith("_file"):
                file_key = key if key.endswith("_file") else first
                raise ConfigError(f"{where}: set {name} or {file_key}, not both")
            raise ConfigError(f"{where}.{key}: {name} is given twice (once by its alias)")
        keys[name] = key
        if from_file:
            value = secrets.read_secret_file(f"{where}.{key}", value)
        values[name] = value
    return values


def channel_defaults(config: ChannelOptions) -> dict[str, Any]:
    """The top-level values every channel defaults to."""
    return {
        field.name: getattr(config, field.name)
        for field, about, _ in options(ChannelOptions)
        if about.channel_default is None
    }


def channel_settings(
    channel_id: str, entry: Mapping[str, Any] | None, config: TopLevelConfig
) -> ChannelSettings:
    """The settings of channel ``channel_id`` from its ``entry`` (a
    ``channels:`` entry or an API body) and the top-level ``config``; a
    ConfigError (one line naming ``channels.<id>.<key>``) if they are wrong."""
    check_channel_id(channel_id)
    where = f"channels.{channel_id}"
    given = given_options(entry, where)
    if given.get("connector_name", "") is None:
        del given["connector_name"]  # null: the default, the channel's id
    ignored = {name: about.ignored for name, (_, about) in _ignored(given).items()}
    values = {
        **channel_defaults(config),
        "connector_name": channel_id,
        **given,
        "id": channel_id,
        "base_url_path": f"/channels/{channel_id}",
        "ignored": ignored,
        "given": frozenset(given),
    }
    settings = build(ChannelSettings, values, prefix=f"{where}.")
    _check_together(settings, where)
    return settings


def _ignored(given: Mapping[str, Any]) -> dict[str, tuple[str, Option]]:
    return {
        name: ENTRY_KEYS[name]
        for name, value in given.items()
        if ENTRY_KEYS[name][1].ignored and value is not None
    }


def _check_together(settings: ChannelSettings, where: str) -> None:
    if settings.mo_message_url is None:
        raise ConfigError(
            f"{where}.mo_message_url is required (in the channel or at the top level)"
        )
    if (settings.api_auth_username is None) != (settings.api_auth_password is None):
        raise ConfigError(f"{where}: api_auth_username and api_auth_password must be set together")


def channel_entry(settings: ChannelSettings) -> dict[str, Any]:
    """The ``channels:`` entry (secrets included) that resolves to ``settings``
    again: the options it set, by their own names. What a store persists."""
    return {
        field.name: getattr(settings, field.name)
        for field, _, _ in options(ChannelEntry)
        if field.name in settings.given
    }


def public(settings: ChannelSettings) -> dict[str, Any]:
    """What ``GET /channels/<id>`` shows: ``id``, every option that is no
    secret (an aliased one under old Junebug's name: ``mo_url``), URLs
    with their credentials and query values masked, the transport ``config`` with its secrets
    masked, and ``messages_path``."""
    shown: dict[str, Any] = {"id": settings.id}
    for field, about, _ in options(ChannelEntry):
        if about.secret or not about.public:
            continue
        value = getattr(settings, field.name)
        if about.url and isinstance(value, str):
            value = url_masked(value)
        shown[about.aliases[0] if about.aliases else field.name] = value
    shown["config"] = secrets.masked(settings.config)
    shown["messages_path"] = settings.messages_path
    return shown


def top_level_channel(config: TopLevelConfig) -> ChannelSettings | None:
    """The vumi2 form's one connector as a channel (id: its connector name), if set."""
    if config.connector_name is None:
        return None
    return ChannelSettings(
        id=config.connector_name,
        connector_name=config.connector_name,
        base_url_path=config.base_url_path,
        **channel_defaults(config),
    )


def resolve_channels(config: TopLevelConfig) -> list[ChannelSettings]:
    """Every channel of the config: the top-level connector first (if any),
    then ``channels:`` in id order; ConfigError if two share an id, a
    connector or a messages path."""
    channels: list[ChannelSettings] = []
    top = top_level_channel(config)
    if top is not None:
        channels.append(top)
    if not isinstance(config.channels, Mapping):
        raise ConfigError("channels must be a mapping of channel id to settings")
    for channel_id in sorted(config.channels, key=str):
        channels.append(channel_settings(channel_id, config.channels[channel_id], config))
    check_distinct(channels, top)
    return channels


def check_distinct(channels: list[ChannelSettings], top: ChannelSettings | None = None) -> None:
    """No two channels with one id, one connector name or one messages path."""
    seen: dict[tuple[str, str], ChannelSettings] = {}
    for channel in channels:
        where = f"channels.{channel.id}" if channel is not top else "connector_name"
        for kind, value in (
            ("id", channel.id),
            ("connector", channel.connector_name),
            ("path", channel.messages_path),
        ):
            other = seen.setdefault((kind, value), channel)
            if other is not channel:
                raise ConfigError(_clash(kind, where, channel, other, top))


def _clash(
    kind: str, where: str, channel: ChannelSettings, other: ChannelSettings, top: Any
) -> str:
    if kind == "id":
        return f"{where}: the top-level connector_name is already a channel with this id"
    if kind == "connector":
        return (
            f"{where}.connector_name {channel.connector_name!r} is already the connector"
            f" of channel {other.id!r}"
        )
    owner = "the top-level connector" if other is top else f"channel {other.id!r}"
    return f"{where}: its messages path {channel.messages_path} is already that of {owner}"
