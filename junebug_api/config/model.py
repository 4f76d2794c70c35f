"""Configuration: option names, defaults, validation and the three sources.

The options are those of vumi2's Junebug message API worker plus its base
worker options, so a vumi2 config file works unchanged. Values come from, in
rising priority: a YAML file, environment variables named like vumi2's
(``CONNECTOR_NAME``, ``AMQP_HOSTNAME``, with the optional prefix from
``VUMI_CONFIG_PREFIX``), and command-line options (``--connector-name``).

Nothing here runs anything: a bad value raises :class:`ConfigError` with one
line that names the option. ``ConfigError`` and the checks a channel's
settings share (:mod:`junebug_api.config.checks`) live below this module, and
each channel is resolved by :mod:`junebug_api.config.channels`, so neither
imports this one back.
"""

from __future__ import annotations

import ipaddress
import json
import math
import os
import re
import typing
from collections.abc import Iterator, Mapping
from typing import Any
from urllib.parse import quote, unquote, urlsplit

import attrs
import yaml

from junebug_api.config.channels import resolve_channels
from junebug_api.config.checks import (
    ConfigError,
    base_type,
    check_queue_prefix,
    check_url,
    check_value,
    read_secret_file,
)
from junebug_api.formats.queue_names import QueueNames
from junebug_api.formats.urls import redact_url, url_for_log

DEFAULT_STATE_CACHE = "junebug_api.state_cache.InMemoryStateCache"


class OptionError(ConfigError):
    """One option's value is wrong: ``name`` and what is wrong with it.

    Raised by the field validators below; :func:`load_config` puts the dotted
    prefix of a nested option (``amqp.``) in front of the name.
    """

    def __init__(self, name: str, problem: str) -> None:
        super().__init__(f"{name} {problem}")
        self.name = name
        self.problem = problem


# -- validators ---------------------------------------------------------------
#
# Every option gets its checks where it is declared, as an attrs validator:
#
#     my_timeout: float = attrs.field(default=5.0, validator=seconds())
#     my_count: int = attrs.field(default=3, validator=between(1, 100))
#     my_url: str | None = attrs.field(default=None, validator=http_url())
#
# A validator sees a value already of the field's type (a float is always
# finite: non-finite numbers are refused while reading) and raises
# OptionError(name, "must be ..."); None passes for optional fields.

MAX_SECONDS = 86400.0
"""The longest timeout or delay any option accepts: a day."""

MIN_SECONDS = 0.01
"""The shortest timeout any option accepts: shorter ones cannot be met."""

Validator = typing.Callable[[Any, "attrs.Attribute", Any], None]


def _fmt(number: float) -> str:
    return str(number) if isinstance(number, int) else f"{number:g}"


def between(low: float, high: float) -> Validator:
    """A number from ``low`` to ``high``, both included."""

    def check(_instance: Any, attribute: attrs.Attribute, value: Any) -> None:
        if value is None:
            return
        if not (math.isfinite(value) and low <= value <= high):
            raise OptionError(
                attribute.name, f"must be from {_fmt(low)} to {_fmt(high)}, got {value!r}"
            )

    return check


def seconds(low: float = MIN_SECONDS, high: float = MAX_SECONDS) -> Validator:
    """A duration in seconds; by default from 0.01 s to a day."""
    return between(low, high)


def printable() -> Validator:
    """A string without control characters (they would end up in headers or logs)."""

    def check(_instance: Any, attribute: attrs.Attribute, value: Any) -> None:
        if value is not None and any(ord(c) < 32 or ord(c) == 127 for c in value):
            raise OptionError(attribute.name, "must not contain control characters")

    return check


def amqp_name() -> Validator:
    """A name sent as an AMQP short string: printable ASCII, at most 255 bytes
    (the AMQP library counts characters, so other text would break framing)."""

    def check(_instance: Any, attribute: attrs.Attribute, value: Any) -> None:
        if value is None:
            return
        if not (value.isascii() and value.isprintable()):
            raise OptionError(attribute.name, f"must be printable ASCII, got {value!r}")
        if len(value) > 255:
            raise OptionError(attribute.name, f"must have at most 255 characters, got {len(value)}")

    return check


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


def host_name() -> Validator:
    """A host name or IP address to connect to (see :func:`valid_host_name`)."""

    def check(_instance: Any, attribute: attrs.Attribute, value: Any) -> None:
        if value is not None and not valid_host_name(value):
            raise OptionError(
                attribute.name,
                "must be a host name (letters, digits, '-' and '.'; no '_') or an IP"
                f" address, got {value!r}",
            )

    return check


def http_url() -> Validator:
    """An http(s) URL of which every part is used (no fragment)."""

    def check(_instance: Any, attribute: attrs.Attribute, value: Any) -> None:
        if value is not None:
            check_url(attribute.name, value)

    return check


@attrs.frozen(kw_only=True)
class AmqpConfig:
    """Where the RabbitMQ broker is and how to log in."""

    hostname: str = attrs.field(default="127.0.0.1", validator=host_name())
    tls: bool = False
    # Without a port of its own: AMQP's 5672, or 5671 with TLS (as amqps:// has).
    port: int = attrs.field(
        default=attrs.Factory(lambda self: 5671 if self.tls else 5672, takes_self=True),
        validator=between(1, 65535),
    )
    username: str = attrs.field(default="guest", validator=printable())
    password: str = attrs.field(default="guest", repr=False)
    password_file: str | None = None
    vhost: str = attrs.field(default="/", validator=amqp_name())

    @property
    def address(self) -> str:
        """``host:port``, for log lines and ``/health`` (never credentials)."""
        host = f"[{self.hostname}]" if ":" in self.hostname else self.hostname
        return f"{host}:{self.port}"


AMQP_FAILOVER = ("in_order", "shuffle")
AMQP_AUTH_MECHANISMS = ("PLAIN", "EXTERNAL")
AMQP_DECLARE_MODES = ("declare", "passive")


@attrs.frozen(kw_only=True)
class AmqpConnectionSettings:
    """Everything the AMQP connections need: brokers, TLS, login, limits.

    Built from the options by :attr:`JunebugConfig.amqp_connection`; the
    replay script and tests build it directly (``brokers`` alone will do).
    """

    brokers: tuple[AmqpConfig, ...] = (AmqpConfig(),)
    failover: str = "in_order"
    tls_ca_file: str | None = None
    tls_cert_file: str | None = None
    tls_key_file: str | None = None
    tls_verify: bool = True
    auth_mechanism: str = "PLAIN"
    heartbeat: int = 30
    connect_timeout: float = 10.0
    max_unconfirmed: int = 5000
    queue_arguments: dict = attrs.field(factory=dict)
    declare: str = "declare"


@attrs.frozen(kw_only=True)
class JunebugConfig:
    """Every option of the service; see the README's config reference.

    Each option's own checks sit on its field (see the validators above);
    checks of several options together are in :func:`_check_semantics`.
    """

    # The Junebug message API options (the spec's names and defaults).
    # connector_name and mo_message_url are required unless ``channels`` is
    # set (see _check_semantics).
    connector_name: str | None = attrs.field(default=None, validator=printable())
    mo_message_url: str | None = attrs.field(default=None, validator=http_url())
    mo_message_url_auth_token: str | None = attrs.field(default=None, validator=printable())
    mo_message_url_auth_token_file: str | None = None
    default_event_url: str | None = attrs.field(default=None, validator=http_url())
    default_event_auth_token: str | None = attrs.field(default=None, validator=printable())
    default_event_auth_token_file: str | None = None
    base_url_path: str = attrs.field(default="", validator=printable())
    transport_type: str = "sms"
    default_from_addr: str | None = None
    allow_expired_replies: bool = False
    state_cache_class: str = DEFAULT_STATE_CACHE
    state_cache_config: dict = attrs.field(factory=dict)
    request_timeout: float = attrs.field(default=240.0, validator=seconds())
    mo_message_url_timeout: float = attrs.field(default=10.0, validator=seconds())
    event_url_timeout: float = attrs.field(default=10.0, validator=seconds())

    # The vumi2 base worker options.
    amqp: AmqpConfig = attrs.field(factory=AmqpConfig)
    amqp_url: str = attrs.field(default="", repr=False)
    amqp_url_file: str | None = None
    # AMQP's basic.qos prefetch-count is a 16-bit field.
    worker_concurrency: int = attrs.field(default=20, validator=between(1, 65535))
    sentry_dsn: str | None = attrs.field(default=None, repr=False)
    sentry_dsn_file: str | None = None
    http_bind: str
    log_level: str = "INFO"
    middlewares: list = attrs.field(factory=list)

    # Protecting the outbound API.
    api_auth_username: str | None = attrs.field(default=None, validator=printable())
    api_auth_password: str | None = attrs.field(default=None, repr=False, validator=printable())
    api_auth_password_file: str | None = None
    api_auth_token: str | None = attrs.field(default=None, repr=False, validator=printable())
    api_auth_token_file: str | None = None
    max_request_size: int = attrs.field(default=1024 * 1024, validator=between(1, 1 << 30))
    http_idle_timeout: float = attrs.field(default=60.0, validator=seconds())
    http_read_timeout: float = attrs.field(default=30.0, validator=seconds())
    # None: three quarters of the open-file limit, at most DEFAULT_MAX_CONNECTIONS.
    http_max_connections: int | None = attrs.field(default=None, validator=between(1, 1_000_000))

    # Delivery of inbound messages and events to HTTP.
    delivery_retry_delay: float = attrs.field(default=1.0, validator=seconds())
    delivery_retry_max_delay: float = attrs.field(default=60.0, validator=seconds())
    delivery_max_attempts: int = attrs.field(default=10, validator=between(1, 1_000_000))
    delivery_max_age: float = attrs.field(default=86400.0, validator=seconds(1))
    delivery_max_hold: float = attrs.field(default=60.0, validator=seconds())
    delivery_probe_interval: float = attrs.field(default=5.0, validator=seconds())
    shutdown_timeout: float = attrs.field(default=30.0, validator=seconds(0))
    # AMQP's connection.tune heartbeat is a 16-bit field; 0 turns heartbeats off.
    amqp_heartbeat: int = attrs.field(default=30, validator=between(0, 65535))

    # Many channels in one process (old Junebug); see junebug_api/channel_config.py.
    channels: dict = attrs.field(factory=dict)
    character_limit: int | None = attrs.field(default=None, validator=between(0, 1_000_000))
    metric_window: float = attrs.field(default=10.0, validator=seconds(1, 3600))
    max_logs: int = attrs.field(default=100, validator=between(1, 100_000))
    # Old Junebug's default: two days; up to a year.
    outbound_message_ttl: float = attrs.field(default=172800.0, validator=seconds(1, 366 * 86400))
    store_message_events: bool = True
    # Operating it: errors to Sentry, metrics, log format, /health queues.
    sentry_environment: str | None = None
    metrics_enabled: bool = True
    metrics_path: str = "/metrics"
    metrics_auth: bool = False
    log_format: str = "text"
    health_stuck_after: float = attrs.field(default=300.0, validator=seconds())

    # Production brokers: TLS, clusters, limits, topology.
    amqp_urls: list = attrs.field(factory=list)
    amqp_failover: str = "in_order"
    amqp_tls_ca_file: str | None = None
    amqp_tls_cert_file: str | None = None
    amqp_tls_key_file: str | None = None
    amqp_tls_verify: bool = True
    amqp_auth_mechanism: str = "PLAIN"
    amqp_connect_timeout: float = 10.0
    amqp_max_unconfirmed: int = 5000
    amqp_queue_arguments: dict = attrs.field(factory=dict)
    amqp_declare: str = "declare"

    @property
    def amqp_brokers(self) -> list[AmqpConfig]:
        """The brokers to connect to, in order: ``amqp_urls``, else ``amqp_url``,
        else the ``amqp`` block."""
        if self.amqp_urls:
            return [parse_amqp_url(url, f"amqp_urls[{i}]") for i, url in enumerate(self.amqp_urls)]
        if self.amqp_url:
            return [parse_amqp_url(self.amqp_url)]
        return [self.amqp]

    @property
    def amqp_settings(self) -> AmqpConfig:
        """The first broker (the only one unless ``amqp_urls`` lists several)."""
        return self.amqp_brokers[0]

    @property
    def amqp_connection(self) -> AmqpConnectionSettings:
        """The settings the AMQP service connects with."""
        return AmqpConnectionSettings(
            brokers=tuple(self.amqp_brokers),
            failover=self.amqp_failover,
            tls_ca_file=self.amqp_tls_ca_file,
            tls_cert_file=self.amqp_tls_cert_file,
            tls_key_file=self.amqp_tls_key_file,
            tls_verify=self.amqp_tls_verify,
            auth_mechanism=self.amqp_auth_mechanism.upper(),
            heartbeat=self.amqp_heartbeat,
            connect_timeout=self.amqp_connect_timeout,
            max_unconfirmed=self.amqp_max_unconfirmed,
            queue_arguments=dict(self.amqp_queue_arguments),
            declare=self.amqp_declare,
        )

    @property
    def sentry(self) -> str | None:
        """The Sentry DSN to use: None for unset, empty, ``null`` or ``none``
        (as environment variables spell "unset")."""
        dsn = (self.sentry_dsn or "").strip()
        return None if dsn.lower() in ("", "null", "none") else dsn

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


DEFAULT_MAX_CONNECTIONS = 10_000
"""The most HTTP connections served at once when ``http_max_connections`` is unset."""


def default_max_connections(open_file_limit: int) -> int:
    """Three quarters of the open-file limit (the rest is for AMQP, outgoing
    HTTP, Redis, logs), at most :data:`DEFAULT_MAX_CONNECTIONS`."""
    return max(1, min(DEFAULT_MAX_CONNECTIONS, open_file_limit * 3 // 4))


# Old Junebug and vumi2 class paths that mean the in-memory cache.
STATE_CACHE_ALIASES = {
    "vumi2.applications.junebug_message_api.junebug_state_cache.MemoryJunebugStateCache": (
        DEFAULT_STATE_CACHE
    ),
    "vumi2.applications.junebug_message_api.junebug_state_cache.InMemorySmppCache": (
        DEFAULT_STATE_CACHE
    ),
}

LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "WARN", "ERROR", "CRITICAL")
_ENDPOINT_TYPES = ("tcp", "tcp6", "ssl", "unix", "systemd", "le", "lets")


def _fields(cls: type) -> Iterator[tuple[attrs.Attribute, Any]]:
    hints = typing.get_type_hints(cls)
    for field in attrs.fields(cls):
        yield field, hints[field.name]


def option_names() -> list[tuple[str, str]]:
    """Every leaf option as ``(dotted name, CLI/env name)``, e.g.
    ``("amqp.hostname", "amqp_hostname")``."""
    names = []
    for field, hint in _fields(JunebugConfig):
        if attrs.has(hint):
            for sub, _ in _fields(hint):
                names.append((f"{field.name}.{sub.name}", f"{field.name}_{sub.name}"))
        else:
            names.append((field.name, field.name))
    return names


_TRUE = {"true", "yes", "on", "1"}
_FALSE = {"false", "no", "off", "0"}


def _from_string(name: str, hint: Any, text: str) -> Any:
    """Turn an environment or command-line string into the field's type."""
    kind, optional = base_type(hint)
    if kind is str:
        return check_value(name, hint, text)
    if kind is list and not text.strip().startswith("["):
        # Lists such as amqp_urls: comma-separated in the environment and CLI.
        return [item.strip() for item in text.split(",") if item.strip()]
    if optional and text.strip().lower() in ("", "null", "none"):
        return None
    if kind is bool:
        if text.strip().lower() in _TRUE:
            return True
        if text.strip().lower() in _FALSE:
            return False
        raise ConfigError(f"{name} must be true or false, got {text!r}")
    if kind is int:
        try:
            return int(text)
        except ValueError:
            raise ConfigError(f"{name} must be an integer, got {text!r}") from None
    if kind is float:
        try:
            number = float(text)
        except ValueError:
            raise ConfigError(f"{name} must be a number, got {text!r}") from None
        return check_value(name, hint, number)
    try:
        value = json.loads(text)
    except ValueError:
        raise ConfigError(f"{name} must be JSON, got {text!r}") from None
    return check_value(name, hint, value)


def _build(cls: type, data: Mapping[str, Any], prefix: str = "") -> Any:
    if not isinstance(data, Mapping):
        raise ConfigError(f"{prefix.rstrip('.') or 'the config'} must be a mapping")
    known = dict(_fields(cls))
    by_name = {f.name: (f, hint) for f, hint in known.items()}
    for key in data:
        if key not in by_name:
            raise ConfigError(f"unknown option {prefix}{key}")
    kwargs = {}
    for name, (field, hint) in by_name.items():
        if name not in data:
            if field.default is attrs.NOTHING:
                raise ConfigError(f"{prefix}{name} is required")
            continue
        if attrs.has(hint):
            kwargs[name] = _build(hint, data[name] or {}, f"{prefix}{name}.")
        else:
            kwargs[name] = check_value(f"{prefix}{name}", hint, data[name])
    try:
        return cls(**kwargs)
    except OptionError as e:
        raise ConfigError(f"{prefix}{e}") from None


def _merge(base: dict, extra: Mapping) -> dict:
    result = dict(base)
    for key, value in extra.items():
        if isinstance(value, Mapping) and isinstance(result.get(key), Mapping):
            result[key] = _merge(result[key], value)
        else:
            result[key] = value
    return result


def _nest(flat: Mapping[str, Any]) -> dict:
    nested: dict = {}
    for dotted, value in flat.items():
        head, _, tail = dotted.partition(".")
        if tail:
            nested.setdefault(head, {})[tail] = value
        else:
            nested[head] = value
    return nested


def option_type(dotted: str) -> Any:
    """The type hint of an option by its dotted name (``"amqp.port"`` -> ``int``):
    what a string from the environment or the command line becomes."""
    head, _, tail = dotted.partition(".")
    hint = dict((f.name, h) for f, h in _fields(JunebugConfig))[head]
    if tail:
        hint = dict((f.name, h) for f, h in _fields(hint))[tail]
    return hint


def read_yaml_file(path: str) -> dict:
    """The mapping in a YAML config file; an empty file is an empty config."""
    try:
        with open(path, encoding="utf-8") as f:
            data = yaml.safe_load(f)
    except OSError as e:
        raise ConfigError(f"cannot read config file {path}: {e.strerror}") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark is not None else ""
        problem = getattr(e, "problem", None) or "invalid YAML"
        raise ConfigError(f"config file {path}{where}: {problem}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping of options")
    return data


def options_from_environment(environ: Mapping[str, str]) -> dict:
    """Options set by environment variables, named as vumi2 names them."""
    prefix = environ.get("VUMI_CONFIG_PREFIX", "")
    flat = {}
    for dotted, name in option_names():
        key = "_".join(p for p in (prefix, name) if p).upper()
        if key in environ:
            flat[dotted] = _from_string(key, option_type(dotted), environ[key])
    return _nest(flat)


def options_from_cli(values: Mapping[str, str | None]) -> dict:
    """Options given on the command line, keyed by their ``a_b`` names."""
    flat = {}
    for dotted, name in option_names():
        text = values.get(name)
        if text is not None:
            flag = "--" + name.replace("_", "-")
            flat[dotted] = _from_string(flag, option_type(dotted), text)
    return _nest(flat)


def load_config(
    path: str | None = None,
    environ: Mapping[str, str] | None = None,
    cli: Mapping[str, str | None] | None = None,
) -> JunebugConfig:
    """Load and check the config from the file, the environment and the CLI."""
    environ = os.environ if environ is None else environ
    if path is None:
        path = environ.get("VUMI_CONFIG_FILE") or None
    data = read_yaml_file(path) if path else {}
    data = _merge(data, options_from_environment(environ))
    data = _merge(data, options_from_cli(cli or {}))
    config = _build(JunebugConfig, _resolve_secret_files(data))
    config = _check_semantics(config)
    resolve_channels(config)  # raises ConfigError naming the channel and option
    return config


def _check_semantics(config: JunebugConfig) -> JunebugConfig:
    """Checks of several options together, and of names and URLs in depth."""
    if not config.channels:
        for name in ("connector_name", "mo_message_url"):
            if getattr(config, name) is None:
                raise ConfigError(f"{name} is required")
    for name in ("connector_name", "mo_message_url", "http_bind"):
        value = getattr(config, name)
        if value is not None and not value.strip():
            raise ConfigError(f"{name} must not be empty")
    if config.connector_name is not None:
        check_connector_name(config)
    if config.log_level.upper() not in LOG_LEVELS:
        raise ConfigError(
            f"log_level must be one of {', '.join(LOG_LEVELS)}, got {config.log_level!r}"
        )
    if (config.api_auth_username is None) != (config.api_auth_password is None):
        raise ConfigError("api_auth_username and api_auth_password must be set together")
    if config.api_auth_token is not None and not config.api_auth_token:
        raise ConfigError("api_auth_token must not be empty")
    if config.base_url_path and not config.base_url_path.startswith("/"):
        raise ConfigError("base_url_path must start with '/'")
    if not _URL_PATH.match(config.base_url_path):
        raise ConfigError(
            "base_url_path must be a URL path: letters, digits, '/' and -._~!$&'()*+,;=:@,"
            f" got {config.base_url_path!r}"
        )
    try:
        _check_amqp(config)  # parses the AMQP URLs
    except OptionError as e:  # a broker's part, e.g. its vhost
        raise ConfigError(f"{'amqp_urls' if config.amqp_urls else 'amqp_url'}: {e}") from None
    check_http_bind(config.http_bind)
    _check_operations(config)
    cache_class = STATE_CACHE_ALIASES.get(config.state_cache_class)
    if cache_class is not None:
        config = attrs.evolve(config, state_cache_class=cache_class)
    return config


_URL_PATH = re.compile(r"^[A-Za-z0-9/\-._~!$&'()*+,;=:@]*$")


def check_connector_name(config: JunebugConfig) -> None:
    """Every queue the service declares for ``connector_name`` must be a name
    RabbitMQ takes: printable ASCII (AMQP counts bytes; names stay plain for
    every client and tool), at most 255 bytes, not in the reserved ``amq.``
    namespace."""
    queues = QueueNames.for_connector(config.connector_name).all()
    check_queue_prefix("connector_name", config.connector_name, queues)


def check_http_bind(bind: str) -> None:
    """``http_bind`` as an endpoint the reactor can listen on: known type,
    arguments Twisted can parse (and, for ``ssl:``, key and certificate files
    it can read), a TCP port from 0 to 65535."""
    from twisted.internet.endpoints import serverFromString

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


LOG_FORMATS = ("text", "json")


def _check_operations(config: JunebugConfig) -> None:
    """The Sentry, metrics, log format and /health options."""
    if config.sentry:
        parts = urlsplit(config.sentry)
        try:
            parts.port  # noqa: B018 - raises ValueError for a port that is no number
        except ValueError:
            raise ConfigError("sentry_dsn has an invalid port") from None
        if (
            parts.scheme not in ("http", "https")
            or not parts.hostname
            or not parts.username
            or not parts.path.strip("/")
        ):
            # The DSN itself is not repeated: it holds the project's key.
            raise ConfigError("sentry_dsn must look like https://<key>@<host>/<project id>")
    if config.log_format not in LOG_FORMATS:
        raise ConfigError(f"log_format must be text or json, got {config.log_format!r}")
    path = config.metrics_path
    if not path.startswith("/") or path.rstrip("/") in ("", "/health", config.messages_path):
        raise ConfigError(
            "metrics_path must start with '/' and differ from /health and the messages path"
        )
    if config.metrics_auth and config.api_auth_username is None and config.api_auth_token is None:
        raise ConfigError(
            "metrics_auth needs api_auth_username/api_auth_password or api_auth_token"
        )


# -- secrets from files -------------------------------------------------------

SECRET_FILE_OPTIONS = (
    "api_auth_password",
    "api_auth_token",
    "mo_message_url_auth_token",
    "default_event_auth_token",
    "amqp_url",
    "amqp.password",
    "sentry_dsn",
)
"""Options that may instead be given as ``<option>_file``: the path of a file
holding the value (a container secret), its trailing newline stripped."""

STATE_CACHE_SECRET_FILES = ("url", "password", "sentinel_password")
"""``state_cache_config.url_file``, ``state_cache_config.password_file``
(the password is put into ``url``, by default ``redis://127.0.0.1:6379/0``)
and ``state_cache_config.sentinel_password_file``."""

DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"


def _resolve_secret_files(data: dict) -> dict:
    """``data`` with every ``<secret>_file`` read into ``<secret>``."""
    data = dict(data)
    for dotted in SECRET_FILE_OPTIONS:
        head, _, tail = dotted.partition(".")
        holder = data
        if tail:
            if not isinstance(data.get(head), Mapping):
                continue
            holder = data[head] = dict(data[head])
        key = tail or head
        path = holder.get(f"{key}_file")
        if path is None:
            continue
        if holder.get(key) is not None:
            raise ConfigError(f"set {dotted} or {dotted}_file, not both")
        holder[key] = read_secret_file(f"{dotted}_file", path)
    cache = data.get("state_cache_config")
    if isinstance(cache, Mapping) and any(f"{k}_file" in cache for k in STATE_CACHE_SECRET_FILES):
        cache = dict(cache)
        for key in STATE_CACHE_SECRET_FILES:
            path = cache.pop(f"{key}_file", None)
            if path is None:
                continue
            if key in cache:
                raise ConfigError(
                    f"set state_cache_config.{key} or state_cache_config.{key}_file, not both"
                )
            cache[key] = read_secret_file(f"state_cache_config.{key}_file", path)
        if "password" in cache:
            cache["url"] = _with_password(
                cache.get("url", DEFAULT_REDIS_URL), cache.pop("password")
            )
        data["state_cache_config"] = cache
    return data


def _with_password(url: Any, password: str) -> Any:
    """``url`` with ``password`` as its password (percent-encoded)."""
    if not isinstance(url, str):
        return url  # the cache's own check names the wrong type
    parts = urlsplit(url)
    user = parts.username or ""
    host = parts.netloc.rsplit("@", 1)[-1]
    return parts._replace(netloc=f"{user}:{quote(password, safe='')}@{host}").geturl()


def _check_amqp(config: JunebugConfig) -> None:
    """The AMQP options: URLs parse, choices are known, files are readable."""
    if config.amqp_url and config.amqp_urls:
        raise ConfigError("set amqp_url or amqp_urls, not both")
    for i, url in enumerate(config.amqp_urls):
        if not isinstance(url, str) or not url.strip():
            raise ConfigError(f"amqp_urls[{i}] must be a non-empty amqp:// or amqps:// URL")
    brokers = config.amqp_brokers  # parses the URLs, raising ConfigError
    if config.amqp_failover not in AMQP_FAILOVER:
        raise ConfigError(
            f"amqp_failover must be one of {', '.join(AMQP_FAILOVER)}, got {config.amqp_failover!r}"
        )
    if config.amqp_declare not in AMQP_DECLARE_MODES:
        raise ConfigError(
            f"amqp_declare must be one of {', '.join(AMQP_DECLARE_MODES)},"
            f" got {config.amqp_declare!r}"
        )
    mechanism = config.amqp_auth_mechanism.upper()
    if mechanism not in AMQP_AUTH_MECHANISMS:
        raise ConfigError(
            f"amqp_auth_mechanism must be one of {', '.join(AMQP_AUTH_MECHANISMS)},"
            f" got {config.amqp_auth_mechanism!r}"
        )
    if (config.amqp_tls_cert_file is None) != (config.amqp_tls_key_file is None):
        raise ConfigError("amqp_tls_cert_file and amqp_tls_key_file must be set together")
    for name in ("amqp_tls_ca_file", "amqp_tls_cert_file", "amqp_tls_key_file"):
        path = getattr(config, name)
        if path is not None:
            try:
                with open(path, "rb") as f:
                    f.read(1)
            except OSError as e:
                raise ConfigError(f"cannot read {name} {path}: {e.strerror}") from None
            except ValueError:  # a NUL in the path
                raise ConfigError(f"{name} is not a valid path") from None
    if mechanism == "EXTERNAL":
        if config.amqp_tls_cert_file is None:
            raise ConfigError("amqp_auth_mechanism EXTERNAL needs amqp_tls_cert_file and _key_file")
        if not all(broker.tls for broker in brokers):
            raise ConfigError("amqp_auth_mechanism EXTERNAL needs amqps:// (or amqp.tls: true)")
    if any(broker.tls for broker in brokers):
        from junebug_api.config.tls import TlsMaterial  # here: it needs Twisted's TLS

        TlsMaterial(config.amqp_connection)  # reads the PEM files, raising ConfigError
    if not math.isfinite(config.amqp_connect_timeout) or not (
        0 < config.amqp_connect_timeout <= 3600
    ):
        raise ConfigError("amqp_connect_timeout must be greater than 0 and at most 3600")
    if not 1 <= config.amqp_max_unconfirmed <= 1_000_000:
        raise ConfigError("amqp_max_unconfirmed must be between 1 and 1000000")
    for key, value in config.amqp_queue_arguments.items():
        if not isinstance(key, str) or not 0 < len(key.encode("utf-8")) <= 255:
            raise ConfigError(f"amqp_queue_arguments: {key!r} is no valid argument name")
        if isinstance(value, int) and not -(2**63) <= value < 2**63:
            raise ConfigError(f"amqp_queue_arguments.{key} is out of range")
        if not isinstance(value, (str, int, bool)):
            raise ConfigError(
                f"amqp_queue_arguments.{key} must be a string, an integer or a boolean,"
                f" got {value!r}"
            )


def parse_amqp_url(url: str, name: str = "amqp_url") -> AmqpConfig:
    """``amqp[s]://user:pass@host:port/vhost`` as an :class:`AmqpConfig`.

    ``amqps`` means TLS (default port 5671), as in vumi2. Parts the service
    would drop (a query string such as ``?heartbeat=10``, a fragment) are
    refused rather than silently ignored: their options are separate settings.
    """
    try:
        parts = urlsplit(url.strip())
    except ValueError:
        raise ConfigError(f"{name} is not a valid URL") from None
    if parts.scheme not in ("amqp", "amqps"):
        raise ConfigError(f"{name} must start with amqp:// or amqps://")
    if parts.query or url.rstrip().endswith("?"):
        raise ConfigError(
            f"{name} must not have a query string ({parts.query!r}): use the amqp_* options"
        )
    if parts.fragment:
        raise ConfigError(f"{name} must not have a #fragment")
    tls = parts.scheme == "amqps"
    try:
        port = parts.port or (5671 if tls else 5672)
    except ValueError:
        raise ConfigError(f"{name} has an invalid port") from None
    vhost = unquote(parts.path[1:]) if len(parts.path) > 1 else "/"
    return AmqpConfig(
        hostname=parts.hostname or "127.0.0.1",
        port=port,
        username=unquote(parts.username) if parts.username is not None else "guest",
        password=unquote(parts.password) if parts.password is not None else "guest",
        vhost=vhost,
        tls=tls,
    )


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


_SECRET_OPTIONS = {
    "api_auth_password",
    "api_auth_token",
    "mo_message_url_auth_token",
    "default_event_auth_token",
    "sentry_dsn",
    "amqp.password",
}


def describe(config: JunebugConfig) -> dict:
    """The config as a plain mapping with every secret masked, for the log."""
    plain = attrs.asdict(config)
    for dotted in _SECRET_OPTIONS:
        head, _, tail = dotted.partition(".")
        holder = plain[head] if tail else plain
        key = tail or head
        if holder.get(key):
            holder[key] = "***"
    for name in ("mo_message_url", "default_event_url"):
        if plain.get(name):
            plain[name] = url_for_log(plain[name])
    if plain.get("amqp_url"):
        plain["amqp_url"] = redact_url(plain["amqp_url"])
    if isinstance(plain.get("channels"), dict):
        plain["channels"] = {
            channel_id: _describe_channel(entry) for channel_id, entry in plain["channels"].items()
        }
    if plain.get("amqp_urls"):
        plain["amqp_urls"] = [
            redact_url(url) if isinstance(url, str) else url for url in plain["amqp_urls"]
        ]
    if isinstance(plain.get("state_cache_config"), dict):
        cache = dict(plain["state_cache_config"])
        if isinstance(cache.get("url"), str):
            cache["url"] = redact_url(cache["url"])
        if cache.get("sentinel_password"):
            cache["sentinel_password"] = "***"
        plain["state_cache_config"] = cache
    return plain


_SECRET_CHANNEL_OPTIONS = {
    "api_auth_password",
    "api_auth_token",
    "mo_message_url_auth_token",
    "mo_url_auth_token",
    "default_event_auth_token",
}


def _describe_channel(entry: Any) -> Any:
    """A ``channels:`` entry with its secrets masked, for the log."""
    if not isinstance(entry, dict):
        return entry
    plain = dict(entry)
    for key, value in plain.items():
        if key in _SECRET_CHANNEL_OPTIONS and value:
            plain[key] = "***"
        elif key in ("mo_message_url", "mo_url", "default_event_url", "status_url") and isinstance(
            value, str
        ):
            plain[key] = url_for_log(value)
    return plain
