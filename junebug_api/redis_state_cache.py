"""A state cache in Redis, shared by every junebug-api process of a channel.

Entries expire in Redis itself (``SET ... EX``); nothing is kept in the
process. An inbound is stored as the compact JSON of the fields a reply needs,
event info as ``[url, token]``. Every call times out after
``operation_timeout`` seconds, so a slow or absent Redis turns into an error
the caller can answer (503) or retry, never a hang; the pool reconnects by
itself and a periodic PING keeps ``/health`` honest.
"""

from __future__ import annotations

import json
from typing import Any, ClassVar
from urllib.parse import unquote, urlsplit

from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall

from .config import ConfigError, redact_url
from .log import logger
from .state_cache import EventInfo, check_options
from .vumi_messages import VumiMessage, reply_source, reply_source_from_bytes

log = logger(__name__)

HEALTH_INTERVAL = 5.0


def parse_redis_url(url: str) -> dict[str, Any]:
    """``redis://[[user]:password@]host[:port][/db]`` (or ``rediss://``) as
    txredisapi connection arguments."""
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


class RedisStateCache:
    """The state cache in Redis; see the module docstring.

    Options (``state_cache_config``): ``url`` (default
    ``redis://127.0.0.1:6379/0``), ``timeout`` (seconds an entry lives,
    default 86400), ``store_event_info`` (default true), ``key_prefix``
    (default ``junebug:<connector_name>:``), ``operation_timeout`` (seconds,
    default 5), ``pool_size`` (connections, default 10), ``tls_ca_file`` (PEM
    certificate(s) to trust for ``rediss://`` instead of the system's).
    """

    OPTIONS: ClassVar[dict[str, type]] = {
        "url": str,
        "timeout": float,
        "store_event_info": bool,
        "key_prefix": str,
        "operation_timeout": float,
        "pool_size": int,
        "tls_ca_file": str,
    }

    def __init__(
        self,
        clock: IReactorTime,
        *,
        url: str,
        key_prefix: str,
        timeout: float = 86400,
        store_event_info: bool = True,
        operation_timeout: float = 5.0,
        pool_size: int = 10,
        tls_ca_file: str | None = None,
    ) -> None:
        self._tls_ca_file = tls_ca_file
        self._clock = clock
        self._url = url
        self._connection_args = parse_redis_url(url)
        self._prefix = key_prefix.encode("utf-8")
        self._expire = max(1, round(timeout))
        self.store_event_info_enabled = store_event_info
        self._operation_timeout = operation_timeout
        self._pool_size = pool_size
        self._redis: Any = None
        self._healthy = False
        self._last_error: str | None = "not connected yet"
        self._pinger = LoopingCall(self._ping)
        self._pinger.clock = clock

    @classmethod
    def check_config(cls, config: dict, connector_name: str = "") -> dict:
        """The options with defaults filled in; ConfigError if any is wrong."""
        options = check_options(cls.__name__, config, cls.OPTIONS)
        result = {
            "url": options.get("url", "redis://127.0.0.1:6379/0"),
            "timeout": options.get("timeout", 86400),
            "store_event_info": options.get("store_event_info", True),
            "key_prefix": options.get("key_prefix", f"junebug:{connector_name}:"),
            "operation_timeout": options.get("operation_timeout", 5.0),
            "pool_size": options.get("pool_size", 10),
            "tls_ca_file": options.get("tls_ca_file"),
        }
        parse_redis_url(result["url"])
        for name in ("timeout", "operation_timeout"):
            if result[name] <= 0:
                raise ConfigError(f"state_cache_config.{name} must be greater than 0")
        if not 1 <= result["pool_size"] <= 1000:
            raise ConfigError("state_cache_config.pool_size must be from 1 to 1000")
        if result["tls_ca_file"] is not None:
            try:
                with open(result["tls_ca_file"], "rb") as f:
                    f.read(1)
            except OSError as e:
                raise ConfigError(
                    f"state_cache_config.tls_ca_file cannot be read: {e.strerror}"
                ) from None
        return result

    @classmethod
    def from_config(
        cls, config: dict, *, clock: IReactorTime, connector_name: str
    ) -> RedisStateCache:
        return cls(clock, **cls.check_config(config, connector_name))

    # -- lifecycle --------------------------------------------------------

    def start(self) -> None:
        """Open the connection pool (it reconnects by itself) and start pinging."""
        import txredisapi

        args = dict(self._connection_args)
        tls = args.pop("tls")
        self._redis = txredisapi.lazyConnectionPool(
            poolsize=self._pool_size,
            reconnect=True,
            charset="utf-8",
            convertNumbers=False,
            connectTimeout=self._operation_timeout,
            # Drops a connection that stops answering (a half-open socket), so
            # the pool reconnects instead of waiting on it.
            replyTimeout=self._operation_timeout,
            ssl_context_factory=self._tls_options(args["host"]) if tls else False,
            **args,
        )
        self._pinger.start(HEALTH_INTERVAL, now=True).addErrback(
            lambda f: log.failure("Redis health check stopped", f)
        )

    def _tls_options(self, host: str) -> Any:
        """Client TLS that checks the server's certificate and name."""
        from twisted.internet.ssl import Certificate, optionsForClientTLS

        if self._tls_ca_file is None:
            return optionsForClientTLS(host)
        with open(self._tls_ca_file, "rb") as f:
            trust = Certificate.loadPEM(f.read())
        return optionsForClientTLS(host, trustRoot=trust)

    async def _stop(self) -> None:
        if self._pinger.running:
            self._pinger.stop()
        if self._redis is not None:
            try:
                await self._redis.disconnect()
            except Exception:
                pass

    def close(self) -> Deferred[None]:
        return Deferred.fromCoroutine(self._stop())

    # -- the calls ---------------------------------------------------------

    def _call(self, method: str, *args: Any, **kwargs: Any) -> Deferred:
        if self._redis is None:
            raise RuntimeError("RedisStateCache.start() was not called")
        d = getattr(self._redis, method)(*args, **kwargs)
        d.addTimeout(self._operation_timeout, self._clock)
        d.addErrback(self._failed)
        return d

    def _failed(self, failure: Any) -> Any:
        if failure.check(CancelledError):
            return failure  # the caller gave up (e.g. its client left): no news of Redis
        # One failed operation is news, not a verdict: health follows the
        # periodic PING, so a single timeout does not flip /health to down.
        self._last_error = failure.getErrorMessage() or failure.type.__name__
        return failure

    def _key(self, kind: bytes, message_id: str) -> bytes:
        return self._prefix + kind + message_id.encode("utf-8")

    def store_inbound(self, message: VumiMessage) -> Deferred[None]:
        key = self._key(b"inbound:", message["message_id"])
        return self._call("set", key, reply_source(message), expire=self._expire).addCallback(
            lambda _: None
        )

    def fetch_inbound(self, message_id: str) -> Deferred[VumiMessage | None]:
        return self._call("get", self._key(b"inbound:", message_id)).addCallback(
            lambda data: None if data is None else reply_source_from_bytes(data)
        )

    def delete_inbound(self, message_id: str) -> Deferred[None]:
        return self._call("delete", self._key(b"inbound:", message_id)).addCallback(lambda _: None)

    def store_event_info(self, message_id: str, info: EventInfo) -> Deferred[None]:
        if not self.store_event_info_enabled:
            from twisted.internet.defer import succeed

            return succeed(None)
        value = json.dumps([info.url, info.auth_token]).encode("utf-8")
        key = self._key(b"event:", message_id)
        return self._call("set", key, value, expire=self._expire).addCallback(lambda _: None)

    def fetch_event_info(self, message_id: str) -> Deferred[EventInfo | None]:
        return self._call("get", self._key(b"event:", message_id)).addCallback(
            lambda data: None if data is None else EventInfo(*json.loads(data))
        )

    def delete_event_info(self, message_id: str) -> Deferred[None]:
        return self._call("delete", self._key(b"event:", message_id)).addCallback(lambda _: None)

    # -- health -------------------------------------------------------------

    async def _ping(self) -> None:
        try:
            await self._call("ping")
        except Exception:
            was_healthy = self._healthy
            self._healthy = False
            if was_healthy is not False or self._last_error:
                log.warn(
                    "Redis at {url} is unreachable: {error}",
                    url=redact_url(self._url),
                    error=self._last_error,
                )
            return
        if not self._healthy:
            log.info("Redis at {url} is reachable", url=redact_url(self._url))
        self._healthy = True
        self._last_error = None

    def health(self) -> dict[str, dict[str, Any]]:
        status: dict[str, Any] = {
            "health": "ok" if self._healthy else "down",
            "url": redact_url(self._url),
        }
        if not self._healthy and self._last_error:
            status["error"] = self._last_error
        return {"redis": status}
