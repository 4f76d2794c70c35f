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
    sentry_dsn: str | None = None
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

    @property
    def amqp_settings(self) -> AmqpConfig:
        """The broker to use: ``amqp_url`` when set, else the ``amqp`` block."""
        if self.amqp_url:
            return parse_amqp_url(self.amqp_url)
        return self.amqp

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
    config.amqp_settings  # noqa: B018 - parses amqp_url, raising ConfigError
    config.http_endpoint  # noqa: B018 - checks http_bind
    cache_class = STATE_CACHE_ALIASES.get(config.state_cache_class)
    if cache_class is not None:
        config = attrs.evolve(config, state_cache_class=cache_class)
    return config


def _check_url(name: str, url: str) -> None:
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigError(f"{name} must be an http:// or https:// URL")


def parse_amqp_url(url: str) -> AmqpConfig:
    """``amqp://user:pass@host:port/vhost`` as an :class:`AmqpConfig`."""
    parts = urlsplit(url)
    if parts.scheme != "amqp":
        raise ConfigError("amqp_url must start with amqp://")
    try:
        port = parts.port or 5672
    except ValueError:
        raise ConfigError("amqp_url has an invalid port") from None
    vhost = unquote(parts.path[1:]) if len(parts.path) > 1 else "/"
    return AmqpConfig(
        hostname=parts.hostname or "127.0.0.1",
        port=port,
        username=unquote(parts.username) if parts.username is not None else "guest",
        password=unquote(parts.password) if parts.password is not None else "guest",
        vhost=vhost,
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
    if isinstance(plain.get("state_cache_config"), dict):
        cache = dict(plain["state_cache_config"])
        if isinstance(cache.get("url"), str):
            cache["url"] = redact_url(cache["url"])
        plain["state_cache_config"] = cache
    return plain
