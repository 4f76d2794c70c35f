"""RedisStateCache's ``state_cache_config``: its options, their defaults and
checks, and the Redis and Sentinel addresses they hold."""

from __future__ import annotations

from typing import Any
from urllib.parse import unquote, urlsplit

from junebug_api.config.model import ConfigError
from junebug_api.state.cache import check_options

#: The options ``state_cache_config`` takes, by type.
OPTIONS: dict[str, type] = {
    "url": str,
    "timeout": float,
    "store_event_info": bool,
    "key_prefix": str,
    "operation_timeout": float,
    "pool_size": int,
    "tls_ca_file": str,
    "sentinels": list,
    "service_name": str,
    "sentinel_password": str,
    "min_replicas": int,
}


def redis_cache_options(owner: str, config: dict, connector_name: str = "") -> dict:
    """The options with defaults filled in; ConfigError if any is wrong."""
    options = check_options(owner, config, OPTIONS)
    result = {
        "url": options.get("url", "redis://127.0.0.1:6379/0"),
        "timeout": options.get("timeout", 86400),
        "store_event_info": options.get("store_event_info", True),
        "key_prefix": options.get("key_prefix", f"junebug:{connector_name}:"),
        "operation_timeout": options.get("operation_timeout", 5.0),
        "pool_size": options.get("pool_size", 10),
        "tls_ca_file": options.get("tls_ca_file"),
        "sentinels": options.get("sentinels"),
        "service_name": options.get("service_name"),
        "sentinel_password": options.get("sentinel_password"),
        "min_replicas": options.get("min_replicas", 0),
    }
    parse_redis_url(result["url"])
    _check_numbers(result)
    _check_sentinels(result)
    if result["tls_ca_file"] is not None:
        _check_readable(result["tls_ca_file"])
    return result


def parse_redis_url(url: str) -> dict[str, Any]:
    """``redis://[[user]:password@]host[:port][/db]`` (or ``rediss://``) as
    connection arguments."""
    parts = urlsplit(url)
    if parts.scheme not in ("redis", "rediss"):
        raise ConfigError("state_cache_config.url must start with redis:// or rediss://")
    try:
        port = parts.port or 6379
    except ValueError:
        raise ConfigError("state_cache_config.url has an invalid port") from None
    if parts.query or parts.fragment:
        raise ConfigError("state_cache_config.url must not have a ?query or #fragment")
    path = parts.path.strip("/")
    if path and not path.isdigit():
        raise ConfigError("state_cache_config.url must end with a database number")
    return {
        "host": parts.hostname or "127.0.0.1",
        "port": port,
        "dbid": int(path) if path else 0,
        "password": unquote(parts.password) if parts.password else None,
        "username": unquote(parts.username) if parts.username else None,
        "tls": parts.scheme == "rediss",
    }


def _check_numbers(options: dict) -> None:
    for name in ("timeout", "operation_timeout"):
        if options[name] <= 0:
            raise ConfigError(f"state_cache_config.{name} must be greater than 0")
    if options["min_replicas"] < 0:
        raise ConfigError("state_cache_config.min_replicas must be 0 or more")
    if not 1 <= options["pool_size"] <= 1000:
        raise ConfigError("state_cache_config.pool_size must be from 1 to 1000")


def _check_sentinels(options: dict) -> None:
    """``sentinels`` a non-empty list of host:port with a ``service_name``;
    ``service_name`` and ``sentinel_password`` only with them."""
    sentinels = options["sentinels"]
    if sentinels is None:
        if options["service_name"] is not None or options["sentinel_password"] is not None:
            raise ConfigError(
                "state_cache_config.service_name and sentinel_password need sentinels"
            )
        return
    if not sentinels or not all(isinstance(a, str) for a in sentinels):
        raise ConfigError("state_cache_config.sentinels must be a non-empty list of host:port")
    for address in sentinels:
        parse_sentinel(address)
    if not options["service_name"]:
        raise ConfigError("state_cache_config.service_name is required with sentinels")


def _check_readable(path: str) -> None:
    try:
        with open(path, "rb") as f:
            f.read(1)
    except OSError as e:
        raise ConfigError(f"state_cache_config.tls_ca_file cannot be read: {e.strerror}") from None


def parse_sentinel(address: str) -> tuple[str, int]:
    """``host:port`` (``[v6]:port``) of a Sentinel; ConfigError if it is not one."""
    host, sep, port = address.rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError(f"state_cache_config.sentinels: {address!r} is not host:port")
    return host, int(port)
