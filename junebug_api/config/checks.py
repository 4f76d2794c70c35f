"""ConfigError, and the checks of single values that options declare.

Each check is an attrs validator (``check(instance, attribute, value)``) that
also says what it accepts: ``text`` for the option reference and ``--help``,
``schema()`` for the JSON Schema of a channel body. An option states its checks
once, where it is declared (:func:`junebug_api.config.options.option`); the
top level, each channel and the channel API all use them from there.
"""

from __future__ import annotations

import ipaddress
import math
import os
import re
import stat
from typing import Any

import attrs

from junebug_api.config import urls


class ConfigError(Exception):
    """A configuration problem, described in one line naming the option.

    Line breaks in the message (from a quoted value) are escaped, so the
    message stays one line whatever the value held.
    """

    def __init__(self, message: str) -> None:
        super().__init__("".join(c if c.isprintable() else repr(c)[1:-1] for c in str(message)))


class OptionError(ConfigError):
    """One option's value is wrong: ``name`` and what is wrong with it.

    Raised by the checks below; the loader puts the dotted path of a nested
    option (``amqp.``, ``channels.<id>.``) in front of the name.
    """

    def __init__(self, name: str, problem: str, separator: str = " ") -> None:
        super().__init__(f"{name}{separator}{problem}")
        self.name = name
        self.problem = problem


def _fmt(number: float) -> str:
    return str(number) if isinstance(number, int) else f"{number:g}"


@attrs.frozen
class Check:
    """A validator that also describes what it accepts; None always passes
    (an optional option left unset)."""

    def __call__(self, _instance: Any, attribute: attrs.Attribute, value: Any) -> None:
        if value is None:
            return
        problem = self.problem(value)
        if problem is not None:
            raise OptionError(attribute.name, problem)

    def problem(self, value: Any) -> str | None:  # pragma: no cover - every check has its own
        """What is wrong with ``value`` (after the option's name), or None."""
        raise NotImplementedError

    @property
    def text(self) -> str | None:
        """The accepted range or choices, for the reference (None: only the type)."""
        return None

    def schema(self) -> dict[str, Any]:
        """JSON Schema keywords for the accepted values."""
        return {}


@attrs.frozen
class Between(Check):
    """A number from ``low`` to ``high``, both included (``above``: ``low`` excluded)."""

    low: float
    high: float
    above: bool = False

    def problem(self, value: Any) -> str | None:
        low_ok = value > self.low if self.above else value >= self.low
        if math.isfinite(value) and low_ok and value <= self.high:
            return None
        if self.above:
            return (
                f"must be greater than {_fmt(self.low)} and at most {_fmt(self.high)},"
                f" got {value!r}"
            )
        return f"must be from {_fmt(self.low)} to {_fmt(self.high)}, got {value!r}"

    @property
    def text(self) -> str:
        if self.above:
            return f"over {_fmt(self.low)}, at most {_fmt(self.high)}"
        return f"{_fmt(self.low)}-{_fmt(self.high)}"

    def schema(self) -> dict[str, Any]:
        low = "exclusiveMinimum" if self.above else "minimum"
        return {low: self.low, "maximum": self.high}


MAX_SECONDS = 86400.0
"""The longest timeout or delay any option accepts: a day."""

MIN_SECONDS = 0.01
"""The shortest timeout any option accepts: shorter ones cannot be met."""


def seconds(low: float = MIN_SECONDS, high: float = MAX_SECONDS) -> Between:
    """A duration in seconds; by default from 0.01 s to a day."""
    return Between(low, high)


@attrs.frozen
class OneOf(Check):
    """One of ``values``; with ``fold_case`` in any letter case."""

    values: tuple[str, ...]
    fold_case: bool = False

    def problem(self, value: Any) -> str | None:
        key = value.upper() if self.fold_case else value
        if key in self.values:
            return None
        return f"must be {self.text}, got {value!r}"

    @property
    def text(self) -> str:
        if len(self.values) == 2:
            return " or ".join(self.values)
        return "one of " + ", ".join(self.values)

    def schema(self) -> dict[str, Any]:
        return {} if self.fold_case else {"enum": list(self.values)}


def has_control_characters(text: str) -> bool:
    """Whether ``text`` holds a control character (they would end up in headers or logs)."""
    return any(ord(c) < 32 or ord(c) == 127 for c in text)


@attrs.frozen
class Printable(Check):
    """Text without control characters; with ``non_empty`` not blank either."""

    non_empty: bool = False

    def problem(self, value: Any) -> str | None:
        if has_control_characters(value):
            return "must not contain control characters"
        if self.non_empty and not value.strip():
            return "must not be empty"
        return None

    def schema(self) -> dict[str, Any]:
        return {"minLength": 1} if self.non_empty else {}


@attrs.frozen
class AmqpName(Check):
    """A name sent as an AMQP short string: printable ASCII, at most 255 bytes
    (the AMQP library counts characters, so other text would break framing)."""

    def problem(self, value: Any) -> str | None:
        if not (value.isascii() and value.isprintable()):
            return f"must be printable ASCII, got {value!r}"
        if len(value) > AMQP_NAME_LIMIT:
            return f"must have at most 255 characters, got {len(value)}"
        return None

    @property
    def text(self) -> str:
        return "printable ASCII, at most 255"


def valid_host_name(host: str) -> bool:
    """Whether ``host`` is an IP address or a host name a connection can use:
    what Twisted's HostnameEndpoint takes (IDNA rules: letters, digits and
    hyphens between dots; no underscore, no space). Twisted finds out only when
    it connects, and then on every attempt."""
    if not host:
        return False
    try:
        ipaddress.ip_address(host.split("%", 1)[0])  # fe80::1%eth0 too
        return True
    except ValueError:
        pass
    try:
        import idna  # as Twisted does: the idna package, else the stdlib codec
    except ImportError:  # pragma: no cover - Twisted's TLS extra brings it
        encode = lambda text: text.encode("idna")  # noqa: E731
    else:
        encode = idna.encode
    try:
        encode(host)
    except (UnicodeError, ValueError):
        return False
    return True


@attrs.frozen
class HostName(Check):
    """A host name or IP address to connect to (see :func:`valid_host_name`)."""

    def problem(self, value: Any) -> str | None:
        if valid_host_name(value):
            return None
        return (
            "must be a host name (letters, digits, '-' and '.'; no '_') or an IP"
            f" address, got {value!r}"
        )


@attrs.frozen
class HttpUrl(Check):
    """An http(s) URL of which every part is used (see :func:`urls.http_url_problem`)."""

    def problem(self, value: Any) -> str | None:
        return urls.http_url_problem(value)

    @property
    def text(self) -> str:
        return "http(s) URL"

    def schema(self) -> dict[str, Any]:
        return {"format": "uri", "pattern": "^https?://"}


AMQP_NAME_LIMIT = 255
"""AMQP's short strings, queue names among them, hold at most 255 bytes."""


def check_queue_prefix(option: str, name: str, queues: list[str]) -> None:
    """A connector name given by ``option`` (the top level's or a channel's)
    and the queues named after it must be names RabbitMQ takes (see
    :func:`queue_prefix_problem`)."""
    problem = queue_prefix_problem(name, queues)
    if problem is not None:
        raise OptionError(option, problem)


def queue_prefix_problem(name: str, queues: list[str]) -> str | None:
    """Printable ASCII (AMQP counts bytes; names stay plain for every client
    and tool), not in the reserved ``amq.`` namespace, and every queue named
    after it at most 255 bytes."""
    if not name.strip():
        return "must not be empty"
    if has_control_characters(name):
        return "must not contain control characters"
    if not (name.isascii() and name.isprintable()):
        return f"must be printable ASCII (it names AMQP queues), got {name!r}"
    if name.startswith("amq."):
        return "must not start with 'amq.' (RabbitMQ reserves it)"
    longest = max(len(q.encode("utf-8")) for q in queues)
    if longest > AMQP_NAME_LIMIT:
        allowed = len(name) - (longest - AMQP_NAME_LIMIT)
        return (
            f"must have at most {allowed} characters, got {len(name)}: its longest queue"
            f" name would have {longest} bytes, AMQP allows {AMQP_NAME_LIMIT}"
        )
    return None


URL_PATH = re.compile(r"^[A-Za-z0-9/\-._~!$&'()*+,;=:@]*$")
"""The characters of a URL path (RFC 3986 pchar and '/', without escapes)."""


@attrs.frozen
class UrlPath(Check):
    """A URL path: ``/`` first (``optional``: or empty), then only path characters."""

    optional: bool = False

    def problem(self, value: Any) -> str | None:
        if not value.startswith("/") and not (self.optional and value == ""):
            return "must start with '/'"
        if not URL_PATH.match(value):
            return f"must be a URL path: letters, digits, '/' and -._~!$&'()*+,;=:@, got {value!r}"
        return None

    @property
    def text(self) -> str:
        return "URL path"

    def schema(self) -> dict[str, Any]:
        return {"pattern": URL_PATH.pattern}


def file_problem(path: str) -> str | None:
    """Why the file at ``path`` cannot be read at start: missing, unreadable,
    or no regular file (a FIFO or a device would block or never end)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY)
    except OSError as e:
        return str(e.strerror)
    except ValueError:  # a NUL in the path
        return "not a valid path"
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return "not a regular file"
    finally:
        os.close(fd)
    return None


@attrs.frozen
class ReadableFile(Check):
    """The path of a regular file this process can read."""

    def __call__(self, _instance: Any, attribute: attrs.Attribute, value: Any) -> None:
        problem = None if value is None else file_problem(value)
        if problem is not None:
            raise ConfigError(f"cannot read {attribute.name} {value}: {problem}")

    def problem(self, value: Any) -> str | None:
        return file_problem(value)

    @property
    def text(self) -> str:
        return "readable file"


def read_regular_file(name: str, path: Any, limit: int) -> bytes:
    """The bytes of the regular file at ``path`` for option ``name``, at most
    ``limit`` of them; ConfigError naming ``name`` otherwise. A FIFO, a
    socket or a device is refused before it is read (reading one could block
    the start for ever)."""
    if not isinstance(path, str) or not path:
        raise ConfigError(f"{name} must be a file path, got {path!r}")
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY)
    except OSError as e:
        raise ConfigError(f"{name}: cannot read {path!r}: {e.strerror or e}") from None
    except ValueError:
        raise ConfigError(f"{name} is not a valid path") from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise ConfigError(f"{name}: {path!r} is not a regular file")
    try:
        with os.fdopen(fd, "rb") as f:
            data = f.read(limit + 1)
    except OSError as e:
        raise ConfigError(f"{name}: cannot read {path!r}: {e.strerror or e}") from None
    if len(data) > limit:
        raise ConfigError(f"{name}: {path!r} is larger than {limit} bytes")
    return data
