"""The config without its secrets (the echo at start), and the list of its
secret values (the log redactor's input), both derived from the options'
``secret`` and ``url`` marks."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import attrs

from junebug_api.config.channels import ENTRY_KEYS, ChannelSettings, resolve_channels
from junebug_api.config.options import options
from junebug_api.config.secrets import held_secrets, shown


def _described(obj: Any) -> dict[str, Any]:
    described = {}
    for field, about, hint in options(type(obj)):
        value = getattr(obj, field.name)
        described[field.name] = _described(value) if attrs.has(hint) else shown(about, value)
    return described


def describe_entry(entry: Any) -> Any:
    """A ``channels:`` entry with its secrets masked (``_file`` paths are no secret)."""
    if not isinstance(entry, Mapping):
        return entry
    described = {}
    for key, value in entry.items():
        name, about = ENTRY_KEYS.get(key, (key, None))
        if about is None or key not in (name, *about.aliases):  # unknown, or <option>_file
            described[key] = value
        else:
            described[key] = shown(about, value)
    return described


def describe(config: Any) -> dict[str, Any]:
    """The config (:class:`~junebug_api.config.model.JunebugConfig`) as a
    plain mapping with every secret masked, for the log."""
    described = _described(config)
    if isinstance(config.channels, Mapping):
        described["channels"] = {
            channel_id: describe_entry(entry) for channel_id, entry in config.channels.items()
        }
    return described


def _held(obj: Any) -> list[str]:
    found = []
    for field, about, hint in options(type(obj)):
        value = getattr(obj, field.name)
        found += _held(value) if attrs.has(hint) else held_secrets(about, value)
    return found


def channel_secret_values(settings: ChannelSettings) -> list[str]:
    """Every secret one channel's settings hold: tokens, passwords, URL
    passwords, the secrets in its transport ``config``."""
    return _held(settings)


def top_level_secret_values(config: Any) -> list[str]:
    """Every secret the config holds outside its channels' entries (the
    channel registry adds each channel's as it starts)."""
    return _held(config)


def secret_values(config: Any) -> list[str]:
    """Every secret the config holds, its channels' included (those read from
    ``<option>_file`` too): what the log redactor takes out of any text."""
    found = _held(config)
    for channel in resolve_channels(config):
        found += channel_secret_values(channel)
    return found
