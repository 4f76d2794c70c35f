"""The HTTP options: where the API listens, its paths, limits and credentials,
the channels it serves and the channel API."""

from __future__ import annotations

import re
from typing import Any

import attrs

from junebug_api.config.checks import (
    Between,
    Check,
    ConfigError,
    Printable,
    UrlPath,
    seconds,
)
from junebug_api.config.options import option

_ENDPOINT_TYPES = ("tcp", "tcp6", "ssl", "unix", "systemd", "le", "lets")
_HOST_PORT = re.compile(r"^(?:\[(?P<ip6>[0-9a-fA-F:.]+)\]|(?P<host>[^:\[\]]*)):(?P<port>\d+)$")


def http_bind_to_endpoint(bind: str) -> str:
    """``host:port``, ``unix:/path``, a bare port or an endpoint string, as a
    Twisted server endpoint string."""
    bind = bind.strip()
    kind = bind.split(":", 1)[0]
    if kind in _ENDPOINT_TYPES and ":" in bind:
        return bind
    if bind.isdigit():
        return f"tcp:{bind}"
    match = _HOST_PORT.match(bind)
    if match is None:
        raise ConfigError(
            f"http_bind must be host:port, unix:/path or an endpoint string, got {bind!r}"
        )
    if match["ip6"]:
        return f"tcp6:{match['port']}:interface={match['ip6'].replace(':', chr(92) + ':')}"
    host = match["host"]
    if host:
        return f"tcp:{match['port']}:interface={host}"
    return f"tcp:{match['port']}"


def check_http_bind(bind: str) -> None:
    """``http_bind`` as an endpoint the reactor can listen on: known type,
    arguments Twisted can parse (and, for ``ssl:``, key and certificate files
    it can read), a TCP port from 0 to 65535."""
    from twisted.internet.endpoints import serverFromString

    if not bind.strip():
        raise ConfigError("http_bind must not be empty")
    endpoint = http_bind_to_endpoint(bind)
    try:
        serverFromString(None, endpoint)
    except Exception as e:  # Twisted's parsers raise many kinds; all mean "bad value"
        problem = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ConfigError(f"http_bind {bind!r} is not a usable endpoint: {problem}") from None
    fields = re.split(r"(?<!\\):", endpoint)
    if fields[0].lower() in ("tcp", "tcp6", "ssl"):
        positional = [f for f in fields[1:] if "=" not in f]
        named = dict(f.split("=", 1) for f in fields[1:] if "=" in f)
        port = named.get("port", positional[0] if positional else "")
        if not (port.isdigit() and int(port) <= 65535):
            raise ConfigError(f"http_bind port must be from 0 to 65535, got {port!r}")


@attrs.frozen
class HttpBind(Check):
    """Somewhere to listen (see :func:`check_http_bind`)."""

    def __call__(self, _instance: Any, _attribute: attrs.Attribute, value: Any) -> None:
        check_http_bind(value)

    @property
    def text(self) -> str:
        return "host:port, unix:/path or a Twisted endpoint"


@attrs.frozen
class PathOrFalse(Check):
    """A URL path to serve something at, or false for not at all."""

    def problem(self, value: Any) -> str | None:
        if value is False:
            return None
        if value is True:
            return "must be a path or false, got True"
        return UrlPath().problem(value)

    @property
    def text(self) -> str:
        return "URL path or false"


DEFAULT_MAX_CONNECTIONS = 10_000
"""The most HTTP connections served at once when ``http_max_connections`` is unset."""


def default_max_connections(open_file_limit: int) -> int:
    """Three quarters of the open-file limit (the rest is for AMQP, outgoing
    HTTP, Redis, logs), at most :data:`DEFAULT_MAX_CONNECTIONS`."""
    return max(1, min(DEFAULT_MAX_CONNECTIONS, open_file_limit * 3 // 4))


@attrs.frozen(kw_only=True, slots=False)
class HttpOptions:
    """The HTTP API's options of the top-level config."""

    http_bind: str = option(
        attrs.NOTHING,
        checks=[HttpBind()],
        default_text="required",
        description=(
            "Where the API listens: host:port, unix:/path or a Twisted server endpoint"
            " (tcp:8080:interface=..., ssl:...)."
        ),
    )
    base_url_path: str = option(
        "",
        checks=[UrlPath(optional=True)],
        description=(
            "The top-level connector's messages are POSTed to <base_url_path>/messages"
            " (old Junebug: /channels/<channel_id>)."
        ),
    )
    request_timeout: float = option(
        240.0, checks=[seconds()], description="Seconds an outbound request may take (then 503)."
    )
    max_request_size: int = option(
        1024 * 1024,
        checks=[Between(1, 1 << 30)],
        description="Bytes a request body may have; larger ones get 413 before they are read.",
    )
    http_read_timeout: float = option(
        30.0,
        checks=[seconds()],
        description=(
            "Seconds a whole request (line, headers and body) may take to arrive from its"
            " first byte (then 408 and the connection closes)."
        ),
    )
    http_idle_timeout: float = option(
        60.0,
        checks=[seconds()],
        description="Seconds a connection without a request in progress is kept open.",
    )
    # None: three quarters of the open-file limit, at most DEFAULT_MAX_CONNECTIONS.
    http_max_connections: int | None = option(
        checks=[Between(1, 1_000_000)],
        default_text="3/4 of the open-file limit, at most 10,000",
        description=(
            "HTTP connections open at once; past it the oldest one not awaiting an answer"
            " is closed."
        ),
    )
    shutdown_timeout: float = option(
        30.0,
        checks=[seconds(0)],
        description=(
            "Seconds in-flight HTTP requests, and then in-flight deliveries, get to finish"
            " on SIGTERM."
        ),
    )
    channels: dict = option(
        factory=dict,
        reload=True,
        description=(
            "Channel id -> its settings (see Many channels); top-level values are every"
            " channel's defaults."
        ),
    )
    channel_api: bool = option(
        False,
        description=(
            "Serves old Junebug's channel management routes (create, modify, delete and"
            " restart channels); needs admin credentials, and Redis or channel_api_file."
        ),
    )
    channel_api_file: str | None = option(
        checks=[Printable(non_empty=True)],
        description=(
            "The YAML file the channel API keeps its channels in when the state cache is not Redis."
        ),
    )
    admin_auth_token: str | None = option(
        checks=[Printable(non_empty=True)],
        secret=True,
        description=(
            "A token ('Authorization: Token ...') for the channel API and every read route."
        ),
    )
    admin_username: str | None = option(
        checks=[Printable()],
        description=(
            "With admin_password: HTTP Basic credentials for the channel API and every read route."
        ),
    )
    admin_password: str | None = option(
        checks=[Printable()], secret=True, description="The password of admin_username."
    )
    openapi_path: str | bool = option(
        "/openapi.json",
        checks=[PathOrFalse()],
        description="Where the OpenAPI document of the routes served is (open); false: nowhere.",
    )

    @property
    def messages_path(self) -> str:
        """The path RapidPro POSTs outbound messages to, without a trailing slash."""
        return self.base_url_path.rstrip("/") + "/messages"

    @property
    def http_endpoint(self) -> str:
        """``http_bind`` as a Twisted server endpoint description."""
        return http_bind_to_endpoint(self.http_bind)

    def max_connections(self, open_file_limit: int) -> int:
        """``http_max_connections``, or its default under ``open_file_limit``."""
        if self.http_max_connections is not None:
            return self.http_max_connections
        return default_max_connections(open_file_limit)
