"""Configuration: option names, defaults, validation and the three sources.

The options are those of vumi2's Junebug message API worker plus its base
worker options, so a vumi2 config file works unchanged. Values come from, in
rising priority: a YAML file, environment variables named like vumi2's
(``CONNECTOR_NAME``, ``AMQP_HOSTNAME``, with the optional prefix from
``VUMI_CONFIG_PREFIX``), and command-line options (``--connector-name``).

Nothing here runs anything: a bad value raises :class:`ConfigError` with one
line that names the option.
"""

from __future__ import annotations

import json
import math
import os
import re
import types
import typing
from collections.abc import Iterator, Mapping
from typing import Any
from urllib.parse import unquote, urlsplit

import attrs
import yaml

DEFAULT_STATE_CACHE = "junebug_api.state_cache.InMemoryStateCache"


class ConfigError(Exception):
    """A configuration problem, described in one line naming the option."""


@attrs.frozen(kw_only=True)
class AmqpConfig:
    """Where the RabbitMQ broker is and how to log in."""

    hostname: str = "127.0.0.1"
    port: int = 5672
    username: str = "guest"
    password: str = attrs.field(default="guest", repr=False)
    vhost: str = "/"
    tls: bool = False

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
    """Every option of the service; see the README's config reference."""

    # The Junebug message API options (the spec's names and defaults).
    connector_name: str
    mo_message_url: str
    mo_message_url_auth_token: str | None = None
    default_event_url: str | None = None
    default_event_auth_token: str | None = None
    base_url_path: str = ""
    transport_type: str = "sms"
    default_from_addr: str | None = None
    allow_expired_replies: bool = False
    state_cache_class: str = DEFAULT_STATE_CACHE
    state_cache_config: dict = attrs.field(factory=dict)
    request_timeout: float = 240.0
    mo_message_url_timeout: float = 10.0
    event_url_timeout: float = 10.0

    # The vumi2 base worker options.
    amqp: AmqpConfig = attrs.field(factory=AmqpConfig)
    amqp_url: str = ""
    worker_concurrency: int = 20
    sentry_dsn: str | None = attrs.field(default=None, repr=False)
    http_bind: str
    log_level: str = "INFO"
    middlewares: list = attrs.field(factory=list)

    # Protecting the outbound API.
    api_auth_username: str | None = None
    api_auth_password: str | None = attrs.field(default=None, repr=False)
    api_auth_token: str | None = attrs.field(default=None, repr=False)
    max_request_size: int = 1024 * 1024
    http_idle_timeout: float = 60.0
    http_read_timeout: float = 30.0

    # Delivery of inbound messages and events to HTTP.
    delivery_retry_delay: float = 1.0
    delivery_retry_max_delay: float = 60.0
    delivery_max_attempts: int = 10
    delivery_max_age: float = 86400.0
    delivery_max_hold: float = 60.0
    delivery_probe_interval: float = 5.0
    shutdown_timeout: float = 30.0
    amqp_heartbeat: int = 30

    # Operating it: errors to Sentry, metrics, log format, /health queues.
    sentry_environment: str | None = None
    metrics_enabled: bool = True
    metrics_path: str = "/metrics"
    metrics_auth: bool = False
    log_format: str = "text"
    health_stuck_after: float = 300.0

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


def _base_type(hint: Any) -> tuple[type, bool]:
    """The concrete type of a hint and whether None is allowed."""
    if isinstance(hint, types.UnionType):
        args = [a for a in hint.__args__ if a is not type(None)]
        return args[0], True
    return hint, False


def _check_value(name: str, hint: Any, value: Any) -> Any:
    """Check one value from YAML (already typed) against its field's type."""
    kind, optional = _base_type(hint)
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
            return float(value)
        raise ConfigError(f"{name} must be a number, got {value!r}")
    if kind is str:
        if isinstance(value, str):
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


_TRUE = {"true", "yes", "on", "1"}
_FALSE = {"false", "no", "off", "0"}


def _from_string(name: str, hint: Any, text: str) -> Any:
    """Turn an environment or command-line string into the field's type."""
    kind, optional = _base_type(hint)
    if kind is str:
        return text
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
            return float(text)
        except ValueError:
            raise ConfigError(f"{name} must be a number, got {text!r}") from None
    try:
        value = json.loads(text)
    except ValueError:
        raise ConfigError(f"{name} must be JSON, got {text!r}") from None
    return _check_value(name, hint, value)


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
            kwargs[name] = _check_value(f"{prefix}{name}", hint, data[name])
    return cls(**kwargs)


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


def _hint_for(dotted: str) -> Any:
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
            flat[dotted] = _from_string(key, _hint_for(dotted), environ[key])
    return _nest(flat)


def options_from_cli(values: Mapping[str, str | None]) -> dict:
    """Options given on the command line, keyed by their ``a_b`` names."""
    flat = {}
    for dotted, name in option_names():
        text = values.get(name)
        if text is not None:
            flag = "--" + name.replace("_", "-")
            flat[dotted] = _from_string(flag, _hint_for(dotted), text)
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
    config = _build(JunebugConfig, data)
    return _check_semantics(config)


def _check_semantics(config: JunebugConfig) -> JunebugConfig:
    for name in ("connector_name", "mo_message_url", "http_bind"):
        if not getattr(config, name).strip():
            raise ConfigError(f"{name} must not be empty")
    _check_url("mo_message_url", config.mo_message_url)
    if config.default_event_url is not None:
        _check_url("default_event_url", config.default_event_url)
    if config.log_level.upper() not in LOG_LEVELS:
        raise ConfigError(
            f"log_level must be one of {', '.join(LOG_LEVELS)}, got {config.log_level!r}"
        )
    if config.worker_concurrency < 1:
        raise ConfigError("worker_concurrency must be at least 1")
    if config.delivery_max_attempts < 1:
        raise ConfigError("delivery_max_attempts must be at least 1")
    for name in (
        "request_timeout",
        "mo_message_url_timeout",
        "event_url_timeout",
        "delivery_retry_delay",
        "delivery_retry_max_delay",
        "delivery_max_age",
        "delivery_max_hold",
        "delivery_probe_interval",
    ):
        if getattr(config, name) <= 0:
            raise ConfigError(f"{name} must be greater than 0")
    if (config.api_auth_username is None) != (config.api_auth_password is None):
        raise ConfigError("api_auth_username and api_auth_password must be set together")
    if config.api_auth_token is not None and not config.api_auth_token:
        raise ConfigError("api_auth_token must not be empty")
    if config.max_request_size < 1:
        raise ConfigError("max_request_size must be at least 1")
    for name in ("http_idle_timeout", "http_read_timeout"):
        if getattr(config, name) <= 0:
            raise ConfigError(f"{name} must be greater than 0")
    if config.shutdown_timeout < 0:
        raise ConfigError("shutdown_timeout must not be negative")
    if config.amqp_heartbeat < 0:
        raise ConfigError("amqp_heartbeat must not be negative")
    if config.base_url_path and not config.base_url_path.startswith("/"):
        raise ConfigError("base_url_path must start with '/'")
    _check_operations(config)
    _check_amqp(config)
    config.http_endpoint  # noqa: B018 - checks http_bind
    cache_class = STATE_CACHE_ALIASES.get(config.state_cache_class)
    if cache_class is not None:
        config = attrs.evolve(config, state_cache_class=cache_class)
    return config


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
    if config.health_stuck_after <= 0:
        raise ConfigError("health_stuck_after must be greater than 0")
    path = config.metrics_path
    if not path.startswith("/") or path.rstrip("/") in ("", "/health", config.messages_path):
        raise ConfigError(
            "metrics_path must start with '/' and differ from /health and the messages path"
        )
    if config.metrics_auth and config.api_auth_username is None and config.api_auth_token is None:
        raise ConfigError(
            "metrics_auth needs api_auth_username/api_auth_password or api_auth_token"
        )


def _check_url(name: str, url: str) -> None:
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigError(f"{name} must be an http:// or https:// URL")


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
        from .amqp_connect import TlsMaterial  # here: it needs Twisted's TLS

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


def redact_url(url: str) -> str:
    """A URL with its user info (a user name may be an API key) as ``***``."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return "***"
    if "@" not in parts.netloc:
        return url
    netloc = parts.netloc.rsplit("@", 1)[1]
    return parts._replace(netloc=f"***@{netloc}").geturl()


def describe(config: JunebugConfig) -> dict:
    """The config as a plain mapping with every secret masked, for the log."""
    plain = attrs.asdict(config)
    for dotted in _SECRET_OPTIONS:
        head, _, tail = dotted.partition(".")
        holder = plain[head] if tail else plain
        key = tail or head
        if holder.get(key):
            holder[key] = "***"
    for name in ("mo_message_url", "default_event_url", "amqp_url"):
        if plain.get(name):
            plain[name] = redact_url(plain[name])
    if plain.get("amqp_urls"):
        plain["amqp_urls"] = [
            redact_url(url) if isinstance(url, str) else url for url in plain["amqp_urls"]
        ]
    if isinstance(plain.get("state_cache_config"), dict):
        cache = dict(plain["state_cache_config"])
        if isinstance(cache.get("url"), str):
            cache["url"] = redact_url(cache["url"])
        plain["state_cache_config"] = cache
    return plain
