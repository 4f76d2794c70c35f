"""The configuration: :class:`JunebugConfig`, its checks, and :func:`load_config`.

The options are those of vumi2's Junebug message API worker plus its base
worker options, so a vumi2 config file works unchanged, and old Junebug's
channels. Each option is stated once, as a field of one of the option groups
JunebugConfig is made of (:mod:`~junebug_api.config.channel_options`,
:mod:`~junebug_api.config.http_options`,
:mod:`~junebug_api.config.delivery_options`,
:mod:`~junebug_api.config.amqp_options`,
:mod:`~junebug_api.config.operations_options`), with its type, default,
checks, description and the rest (:mod:`junebug_api.config.options`).

Values come from, in rising priority: a YAML file, environment variables
named like vumi2's (``CONNECTOR_NAME``, ``AMQP_HOSTNAME``, with the optional
prefix from ``VUMI_CONFIG_PREFIX``), and command-line options
(``--connector-name``). Nothing here runs anything: a bad value raises
:class:`ConfigError` with one line that names the option.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import attrs

from junebug_api.config import secrets, sources
from junebug_api.config.amqp_options import (
    AMQP_AUTH_MECHANISMS,
    AMQP_DECLARE_MODES,
    AMQP_FAILOVER,
    AmqpConfig,
    AmqpConnectionSettings,
    AmqpOptions,
    check_amqp,
    parse_amqp_url,
)
from junebug_api.config.channel_options import ChannelOptions
from junebug_api.config.channels import resolve_channels
from junebug_api.config.checks import MAX_SECONDS, MIN_SECONDS, ConfigError, OptionError
from junebug_api.config.delivery_options import (
    DEFAULT_STATE_CACHE,
    STATE_CACHE_ALIASES,
    DeliveryOptions,
    check_hold_bound,
)
from junebug_api.config.http_options import (
    DEFAULT_MAX_CONNECTIONS,
    HttpOptions,
    check_http_bind,
    default_max_connections,
    http_bind_to_endpoint,
)
from junebug_api.config.operations_options import LOG_FORMATS, LOG_LEVELS, OperationsOptions
from junebug_api.config.options import leaves
from junebug_api.config.redaction import describe
from junebug_api.config.structure import build
from junebug_api.config.urls import url_problem
from junebug_api.formats.urls import redact_url

__all__ = [
    "AMQP_AUTH_MECHANISMS",
    "AMQP_DECLARE_MODES",
    "AMQP_FAILOVER",
    "DEFAULT_MAX_CONNECTIONS",
    "DEFAULT_STATE_CACHE",
    "LOG_FORMATS",
    "LOG_LEVELS",
    "MAX_SECONDS",
    "MIN_SECONDS",
    "STATE_CACHE_ALIASES",
    "AmqpConfig",
    "AmqpConnectionSettings",
    "ConfigError",
    "JunebugConfig",
    "OptionError",
    "check_config",
    "check_http_bind",
    "default_max_connections",
    "describe",
    "http_bind_to_endpoint",
    "load_config",
    "option_names",
    "option_type",
    "parse_amqp_url",
    "redact_url",
    "reloadable_options",
    "restart_needed",
]


@attrs.frozen(kw_only=True, slots=False)
class JunebugConfig(OperationsOptions, AmqpOptions, DeliveryOptions, HttpOptions, ChannelOptions):
    """Every option of the service: the groups' fields, channel options first
    (the docs' configuration reference is generated from them)."""


def option_names() -> list[tuple[str, str]]:
    """Every option as ``(dotted name, flat name)``, e.g.
    ``("amqp.hostname", "amqp_hostname")``, ``_file`` forms included: the
    environment variables (upper-cased) and command-line options."""
    return [(s.dotted, s.name) for s in sources.sources(JunebugConfig)]


def option_type(dotted: str) -> Any:
    """The type of an option by its dotted name (``"amqp.port"`` -> ``int``):
    what a string from the environment or the command line becomes."""
    return {s.dotted: s.hint for s in sources.sources(JunebugConfig)}[dotted]


def load_config(
    path: str | None = None,
    environ: Mapping[str, str] | None = None,
    cli: Mapping[str, str | None] | None = None,
) -> JunebugConfig:
    """Load and check the config from the file, the environment and the CLI."""
    environ = os.environ if environ is None else environ
    data = sources.gather(JunebugConfig, path, environ, cli or {})
    config = build(JunebugConfig, secrets.read_secret_files(data, JunebugConfig))
    config = check_config(config)
    resolve_channels(config)  # raises ConfigError naming the channel and option
    return config


def reloadable_options() -> frozenset[str]:
    """The top-level options a SIGHUP reload applies: the channel options
    (every channel's defaults) and ``channels``."""
    return frozenset(leaf.dotted for leaf in leaves(JunebugConfig) if leaf.about.reload)


def restart_needed(old: JunebugConfig, new: JunebugConfig) -> list[str]:
    """The options (dotted names) whose values differ between ``old`` and
    ``new`` and that a SIGHUP reload cannot apply: they need a restart.
    Channel options and ``channels`` are applied by a reload."""
    changed = []
    for leaf in leaves(JunebugConfig):
        if leaf.about.reload:
            continue
        head, _, tail = leaf.dotted.partition(".")
        old_value, new_value = getattr(old, head), getattr(new, head)
        if tail:
            old_value, new_value = getattr(old_value, tail), getattr(new_value, tail)
        if old_value != new_value:
            changed.append(leaf.dotted)
    return changed


# -- checks of several options together ---------------------------------------


def _check_required(config: JunebugConfig) -> None:
    """One connector at least: the top-level one unless channels come from
    ``channels:`` or the channel API."""
    if config.channels or config.channel_api:
        return
    for name in ("connector_name", "mo_message_url"):
        if getattr(config, name) is None:
            raise ConfigError(f"{name} is required")


def _check_credentials(config: JunebugConfig) -> None:
    """User names and passwords come in pairs; the channel API and
    authenticated metrics need credentials."""
    for user, password in (
        ("api_auth_username", "api_auth_password"),
        ("admin_username", "admin_password"),
    ):
        if (getattr(config, user) is None) != (getattr(config, password) is None):
            raise ConfigError(f"{user} and {password} must be set together")
    if config.metrics_auth and config.api_auth_username is None and config.api_auth_token is None:
        raise ConfigError(
            "metrics_auth needs api_auth_username/api_auth_password or api_auth_token"
        )


def uses_redis(config: JunebugConfig) -> bool:
    """Whether the state cache is Redis (then it keeps the API's channels too)."""
    return "redis" in config.state_cache_class.rsplit(".", 1)[-1].lower()


def _check_channel_api(config: JunebugConfig) -> None:
    """The channel API needs admin credentials and somewhere to keep channels."""
    if not config.channel_api:
        return
    if config.admin_auth_token is None and config.admin_username is None:
        raise ConfigError("channel_api needs admin_auth_token or admin_username/admin_password")
    if config.channel_api_file is None and not uses_redis(config):
        raise ConfigError(
            "channel_api needs RedisStateCache (state_cache_class) or channel_api_file"
            " to keep its channels in"
        )


def _route_clash(path: str, config: JunebugConfig) -> bool:
    """Whether ``path`` is, or is inside, one of the API's own routes."""
    path = path.rstrip("/")
    messages = config.messages_path
    return (
        path in ("", "/health")
        or path == "/channels"
        or path.startswith("/channels/")
        or path == messages
        or path.startswith(messages + "/")
    )


def _check_paths(config: JunebugConfig) -> None:
    """``metrics_path`` and ``openapi_path`` (when served) are outside the
    API's routes and apart from each other."""
    served = {}
    if config.metrics_enabled:
        served["metrics_path"] = config.metrics_path
    if config.openapi_path is not False:
        served["openapi_path"] = config.openapi_path
    for name, path in served.items():
        if _route_clash(path, config):
            raise ConfigError(
                f"{name} must start with '/' and lie outside the API's routes (/health,"
                f" /channels/..., {config.messages_path}...), got {path!r}"
            )
    if len(served) == 2 and config.metrics_path.rstrip("/") == config.openapi_path.rstrip("/"):
        raise ConfigError("metrics_path and openapi_path must differ")


def _check_state_cache_urls(config: JunebugConfig) -> None:
    """A URL in ``state_cache_config`` (Redis's) has a port from 1 to 65535
    and valid percent-escapes, as every URL option has."""
    url = config.state_cache_config.get("url")
    if isinstance(url, str):
        problem = url_problem(url)
        if problem is not None:
            raise ConfigError(f"state_cache_config.url {problem}")


def _check_hold_bound(config: JunebugConfig) -> None:
    check_hold_bound(config, config.amqp_consumer_timeout)


_CHECKS = (
    _check_required,
    _check_credentials,
    _check_channel_api,
    check_amqp,
    _check_paths,
    _check_state_cache_urls,
    _check_hold_bound,
)


def check_config(config: JunebugConfig) -> JunebugConfig:
    """The checks of several options together (each option's own ran as it
    was built); vumi2's state cache class paths as the ones they mean."""
    for check in _CHECKS:
        check(config)
    cache_class = STATE_CACHE_ALIASES.get(config.state_cache_class)
    if cache_class is not None:
        config = attrs.evolve(config, state_cache_class=cache_class)
    return config
