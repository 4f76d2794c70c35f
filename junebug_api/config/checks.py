"""ConfigError, and the checks of single values that the top-level config
and each channel's settings share.

Its own module so that the modules under :mod:`junebug_api.config.model` (channel
settings, the AMQP connection's TLS material) raise and check as the config
does without importing it: the config imports them.
"""

from __future__ import annotations

import math
import types
from typing import Any
from urllib.parse import urlsplit


class ConfigError(Exception):
    """A configuration problem, described in one line naming the option.

    Line breaks in the message (from a quoted value) are escaped, so the
    message stays one line whatever the value held.
    """

    def __init__(self, message: str) -> None:
        super().__init__("".join(c if c.isprintable() else repr(c)[1:-1] for c in str(message)))


def base_type(hint: Any) -> tuple[type, bool]:
    """The concrete type of a hint and whether None is allowed."""
    if isinstance(hint, types.UnionType):
        args = [a for a in hint.__args__ if a is not type(None)]
        return args[0], True
    return hint, False


def check_value(name: str, hint: Any, value: Any) -> Any:
    """Check one value from YAML (already typed) against its field's type."""
    kind, optional = base_type(hint)
    if value is None:
        if optional:
            return None
        raise ConfigError(f"{name} must not be null")
    if kind is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{name} must be true or false, got {value!r}")
    if kind is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{name} must be an integer, got {value!r}")
    if kind is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            try:
                number = float(value)
            except OverflowError:
                number = math.inf
            if math.isfinite(number):
                return number
            raise ConfigError(f"{name} must be a finite number, got {value!r}")
        raise ConfigError(f"{name} must be a number, got {value!r}")
    if kind is str:
        if isinstance(value, str):
            if "\x00" in value:
                raise ConfigError(f"{name} must not contain NUL characters")
            return value
        raise ConfigError(f"{name} must be a string, got {value!r}")
    if kind is dict:
        if isinstance(value, dict):
            return value
        raise ConfigError(f"{name} must be a mapping, got {value!r}")
    if kind is list:
        if isinstance(value, list):
            return value
        raise ConfigError(f"{name} must be a list, got {value!r}")
    raise AssertionError(f"unhandled config type {kind!r}")  # pragma: no cover


AMQP_NAME_LIMIT = 255
"""AMQP's short strings, queue names among them, hold at most 255 bytes."""


def check_queue_prefix(option: str, name: str, queues: list[str]) -> None:
    """A connector name given by ``option`` (the top level's or a channel's)
    and the queues named after it must be names RabbitMQ takes: printable
    ASCII (AMQP counts bytes; names stay plain for every client and tool), at
    most 255 bytes, not in the reserved ``amq.`` namespace."""
    if not (name.isascii() and name.isprintable()):
        raise ConfigError(f"{option} must be printable ASCII (it names AMQP queues), got {name!r}")
    if name.startswith("amq."):
        raise ConfigError(f"{option} must not start with 'amq.' (RabbitMQ reserves it)")
    longest = max(queues, key=lambda q: len(q.encode("utf-8")))
    longest_bytes = len(longest.encode("utf-8"))
    if longest_bytes > AMQP_NAME_LIMIT:
        allowed = len(name) - (longest_bytes - AMQP_NAME_LIMIT)
        raise ConfigError(
            f"{option} must have at most {allowed} characters, got {len(name)}:"
            f" its longest queue name would have {longest_bytes} bytes, AMQP allows"
            f" {AMQP_NAME_LIMIT}"
        )


def check_url(name: str, url: str) -> None:
    """An http(s) URL with a host, a valid port and nothing that would be dropped."""
    if any(c.isspace() or ord(c) < 32 or ord(c) == 127 for c in url):
        raise ConfigError(f"{name} must not contain spaces or control characters")
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - raises ValueError for a port out of range
    except ValueError as e:
        raise ConfigError(f"{name} is not a valid URL: {e}") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigError(f"{name} must be an http:// or https:// URL")
    if parts.fragment or url.endswith("#"):
        raise ConfigError(f"{name} must not have a #fragment (it is never sent)")


def read_secret_file(name: str, path: Any) -> str:
    """The secret in the file at ``path`` for option ``name`` (``..._file``)."""
    if not isinstance(path, str) or not path:
        raise ConfigError(f"{name} must be a file path, got {path!r}")
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except OSError as e:
        raise ConfigError(f"{name}: cannot read {path!r}: {e.strerror or e}") from None
    except (UnicodeDecodeError, ValueError):
        raise ConfigError(f"{name}: {path!r} is not UTF-8 text") from None
    return text.rstrip("\r\n")
