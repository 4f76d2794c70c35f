"""The channel API's bodies, from the channel options: what a create or a
modify body may hold, the entry it makes, and their JSON Schemas.

A body holds what a ``channels:`` entry holds (the options and old Junebug's
aliases), except ``<option>_file``: the API never reads the server's files.
A create body must give the options marked ``api_required`` (``type`` and
``config``, as old Junebug asked); a modify body changes only the keys it
gives (:func:`modified_entry`). The resulting entry goes through
:func:`~junebug_api.config.channels.channel_settings` like any other.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from junebug_api.config.channel_options import ChannelEntry
from junebug_api.config.channels import ENTRY_KEYS
from junebug_api.config.checks import ConfigError
from junebug_api.config.options import Option, base_type, options

_JSON_TYPES = {
    str: "string",
    int: "integer",
    float: "number",
    bool: "boolean",
    dict: "object",
    list: "array",
}


def json_type(hint: Any) -> list[str] | str:
    """The JSON Schema ``type`` of an option's type hint."""
    kind, optional = base_type(hint)
    kinds = getattr(kind, "__args__", (kind,))
    names = [_JSON_TYPES[k] for k in kinds] + (["null"] if optional else [])
    return names[0] if len(names) == 1 else names


def option_schema(about: Option, hint: Any) -> dict[str, Any]:
    """The JSON Schema of one option's value: type, range, description."""
    return {"type": json_type(hint), **about.schema(), "description": about.description}


def _properties(with_files: bool) -> dict[str, Any]:
    properties: dict[str, Any] = {}
    for field, about, hint in options(ChannelEntry):
        properties[field.name] = option_schema(about, hint)
        for alias in about.aliases:
            properties[alias] = {**properties[field.name], "description": f"{field.name}."}
        if with_files and about.from_file:
            for key in (field.name, *about.aliases):
                properties[f"{key}_file"] = {
                    "type": "string",
                    "description": f"A file holding {field.name}.",
                }
    return properties


def api_required() -> list[str]:
    """The options a create body must give."""
    return [field.name for field, about, _ in options(ChannelEntry) if about.api_required]


def channel_entry_schema() -> dict[str, Any]:
    """The JSON Schema of a ``channels:`` entry (``<option>_file`` included)."""
    return {
        "type": "object",
        "properties": _properties(with_files=True),
        "additionalProperties": False,
    }


def channel_body_schema(create: bool) -> dict[str, Any]:
    """The JSON Schema of a channel API body: create (``POST /channels/``,
    with its required keys) or modify (``POST /channels/<id>``)."""
    schema: dict[str, Any] = {
        "type": "object",
        "properties": _properties(with_files=False),
        "additionalProperties": False,
    }
    if create:
        schema["required"] = api_required()
    return schema


def _canonical(body: Any, where: str) -> dict[str, Any]:
    """A body's keys as option names; ConfigError for a key no body takes."""
    if not isinstance(body, Mapping):
        raise ConfigError(f"{where} must be a JSON object")
    entry: dict[str, Any] = {}
    for key, value in body.items():
        name, about = ENTRY_KEYS.get(key, (None, None))
        if about is None or key not in (name, *about.aliases):
            raise ConfigError(f"unknown option {where}.{key}")
        if name in entry:
            raise ConfigError(f"{where}.{key}: {name} is given twice (once by its alias)")
        entry[name] = value
    return entry


def created_entry(body: Any, where: str = "body") -> dict[str, Any]:
    """The ``channels:`` entry a create body makes; ConfigError (one line)
    for a key it may not hold or a required key it lacks."""
    entry = _canonical(body, where)
    for name in api_required():
        if name not in entry:
            raise ConfigError(f"{where}.{name} is required")
    return entry


def modified_entry(stored: Mapping[str, Any], body: Any, where: str = "body") -> dict[str, Any]:
    """The entry ``stored`` with the keys of a modify ``body`` changed (null
    sets null, as in an entry); ConfigError for a key it may not hold."""
    return {**_canonical(stored, "stored entry"), **_canonical(body, where)}
