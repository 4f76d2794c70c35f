"""A state cache in Redis, shared by every junebug-api process of a channel.

Entries expire in Redis itself (``SET ... EX``); nothing is kept in the
process. An inbound is stored as the compact JSON of the fields a reply needs,
event info as ``[url, token]``. All commands share one pipelining connection
(:mod:`.redis_client`): the writes of a reactor turn leave in one ``send``,
and the lookups of a turn become one ``MGET``. Every call times out after
``operation_timeout`` seconds, so a slow or absent Redis turns into an error
the caller can answer (503) or retry, never a hang; the connection is
re-established by itself and a periodic PING keeps ``/health`` honest.

With ``sentinels`` the master of ``service_name`` is found through Redis
Sentinel before every connection and checked with ``ROLE``; after a failover
the connection to the old master is dropped (the demoted master closes it,
answers ``READONLY``, or the periodic check sees the Sentinels name another
master) and the new master is used.
"""

from __future__ import annotations

import json
from typing import Any

from twisted.internet.defer import CancelledError, Deferred, TimeoutError, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall
from twisted.python.failure import Failure

from junebug_api.formats.urls import redact_url
from junebug_api.formats.vumi_messages import VumiMessage, reply_source, reply_source_from_bytes
from junebug_api.observe.log import logger
from junebug_api.state.cache import DEFAULT_MESSAGE_STATUS_TTL, EventInfo
from junebug_api.state.redis_options import parse_redis_url, parse_sentinel, redis_cache_options

log = logger(__name__)

HEALTH_INTERVAL = 5.0

_STORE_EVENT = (
    "redis.call('HSET', KEYS[1], ARGV[1], ARGV[2]);"
    " redis.call('EXPIRE', KEYS[1], ARGV[3]); return 1"
)
_FETCH_EVENTS = (
    "local values = redis.call('HVALS', KEYS[1]);"
    " if #values > 0 then redis.call('EXPIRE', KEYS[1], ARGV[1]) end; return values"
)


def _encoded_list(values: Any) -> list[bytes]:
    return [v.encode("utf-8") if isinstance(v, str) else v for v in values or []]


class RedisStateCache:
    """The state cache in Redis; see the module docstring.

    Options (``state_cache_config``): ``url`` (default
    ``redis://127.0.0.1:6379/0``), ``timeout`` (seconds an entry lives,
    default 86400), ``store_event_info`` (default true), ``key_prefix``
    (default ``junebug:<connector_name>:``), ``operation_timeout`` (seconds,
    default 5), ``pool_size`` (accepted, no longer used: one pipelining
    connection), ``tls_ca_file`` (PEM certificate(s) to trust for
    ``rediss://`` instead of the system's), ``sentinels`` (``host:port``
    list), ``service_name`` and ``sentinel_password`` (Redis Sentinel).
    """

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
        message_status_ttl: float = DEFAULT_MESSAGE_STATUS_TTL,
        sentinels: list[str] | None = None,
        service_name: str | None = None,
        sentinel_password: str | None = None,
        min_replicas: int = 0,
    ) -> None:
        self._status_expire = max(1, round(message_status_ttl))
        self._tls_ca_file = tls_ca_file
        self._clock = clock
        self._url = url
        self._connection_args = parse_redis_url(url)
        self._sentinels = [parse_sentinel(a) for a in sentinels or []]
        self._service_name = service_name
        self._sentinel_password = sentinel_password
        self._prefix = key_prefix.encode("utf-8")
        self._expire = max(1, round(timeout))
        self.store_event_info_enabled = store_event_info
        self._operation_timeout = operation_timeout
        self._redis: Any = None
        self._gets: list[tuple[bytes, Deferred]] = []
        self._min_replicas = min_replicas
        self._replication: list[Deferred] | None = None  # waiting for this turn's WAIT
        self._healthy = False
        self._last_error: str | None = "not connected yet"
        self._pinger = LoopingCall(self._ping)
        self._pinger.clock = clock

    @classmethod
    def check_config(cls, config: dict, connector_name: str = "") -> dict:
        """The options with defaults filled in; ConfigError if any is wrong."""
        return redis_cache_options(cls.__name__, config, connector_name)

    @classmethod
    def from_config(
        cls,
        config: dict,
        *,
        clock: IReactorTime,
        connector_name: str,
        message_status_ttl: float = DEFAULT_MESSAGE_STATUS_TTL,
    ) -> RedisStateCache:
        return cls(
            clock, **cls.check_config(config, connector_name), message_status_ttl=message_status_ttl
        )

    # -- lifecycle --------------------------------------------------------

    def start(self) -> None:
        """Start connecting (it reconnects by itself) and pinging."""
        from junebug_api.state.redis_client import FixedLocator, RedisClient, SentinelLocator

        args = self._connection_args
        locator: Any
        if self._sentinels:
            locator = SentinelLocator(
                self._clock,
                self._sentinels,
                self._service_name or "",
                self._sentinel_password,
                timeout=min(2.0, self._operation_timeout),
            )
        else:
            locator = FixedLocator(args["host"], args["port"])
        self._redis = RedisClient(
            self._clock,
            locator,
            dbid=args["dbid"],
            username=args["username"],
            password=args["password"],
            tls_options=self._tls_options if args["tls"] else None,
            connect_timeout=self._operation_timeout,
            # Drops a connection that stops answering (a half-open socket), so
            # the client reconnects instead of waiting on it.
            reply_timeout=self._operation_timeout,
        )
        self._redis.start()
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
                await self._redis.stop()
            except Exception:
                pass

    def close(self) -> Deferred[None]:
        return Deferred.fromCoroutine(self._stop())

    # -- the calls ---------------------------------------------------------

    def _call(self, *args: Any) -> Deferred:
        if self._redis is None:
            raise RuntimeError("RedisStateCache.start() was not called")
        # The client fails a command after operation_timeout (no timer each).
        return self._redis.command(*args).addErrback(self._failed)

    def _failed(self, failure: Any) -> Any:
        if failure.check(CancelledError):
            return failure  # the caller gave up (e.g. its client left): no news of Redis
        # One failed operation is news, not a verdict: health follows the
        # periodic PING, so a single timeout does not flip /health to down.
        if failure.check(TimeoutError):
            waited = f"no answer within {self._operation_timeout:g} s"
            cause = self._redis.last_error
            self._last_error = f"{waited} ({cause})" if cause else waited
            # Twisted's TimeoutError reads "(5.0, 'Deferred')"; the log lines of
            # the callers (503s, retries) name the cause instead.
            return Failure(RedisUnavailable(f"Redis: {self._last_error}"))
        else:
            self._last_error = failure.getErrorMessage() or failure.type.__name__
        return failure

    def _key(self, kind: bytes, message_id: str) -> bytes:
        return self._prefix + kind + message_id.encode("utf-8")

    def _set(self, key: bytes, value: bytes) -> Deferred[None]:
        d = self._call(b"SET", key, value, b"EX", self._expire)
        if self._min_replicas:
            return d.addCallback(lambda _: self._replicated())
        return d.addCallback(_none)

    def _replicated(self) -> Deferred[None]:
        """Fires once ``min_replicas`` replicas have every write made so far.

        One ``WAIT`` per reactor turn covers all writes answered in it. A
        write a failing-over master accepted but no replica got fails here
        (and is retried or answered 503) instead of being lost.
        """
        d: Deferred[None] = Deferred()
        if self._replication is None:
            self._replication = []
            self._clock.callLater(0, self._wait_for_replicas)
        self._replication.append(d)
        return d

    def _wait_for_replicas(self) -> None:
        waiting, self._replication = self._replication or [], None
        wanted = self._min_replicas
        timeout_ms = max(1, int(self._operation_timeout * 500))

        def done(count: Any) -> None:
            if isinstance(count, int) and count < wanted:
                count = Failure(
                    ReplicationError(f"only {count} of {wanted} replica(s) acknowledged the write")
                )
            for d in waiting:
                if isinstance(count, Failure):
                    d.errback(count)
                else:
                    d.callback(None)

        self._call(b"WAIT", wanted, timeout_ms).addBoth(done)

    def _get(self, key: bytes) -> Deferred[bytes | None]:
        """GET, batched: the lookups of one reactor turn go out as one MGET."""
        if self._redis is None:
            raise RuntimeError("RedisStateCache.start() was not called")
        d: Deferred[bytes | None] = Deferred()
        if not self._gets:
            self._clock.callLater(0, self._flush_gets)
        self._gets.append((key, d))
        return d

    def _flush_gets(self) -> None:
        gets, self._gets = self._gets, []
        if len(gets) == 1:
            key, d = gets[0]
            self._call(b"GET", key).addCallbacks(
                lambda value: d.called or d.callback(value),
                lambda failure: d.called or d.errback(failure),
            )
            return

        def spread(values: list) -> None:
            for (_, d), value in zip(gets, values, strict=True):
                if not d.called:  # not cancelled by its caller
                    d.callback(value)

        def fail(failure: Any) -> None:
            for _, d in gets:
                if not d.called:
                    d.errback(failure)

        self._call(b"MGET", *[key for key, _ in gets]).addCallbacks(spread, fail)

    def store_inbound(self, message: VumiMessage) -> Deferred[None]:
        return self._set(self._key(b"inbound:", message["message_id"]), reply_source(message))

    def fetch_inbound(self, message_id: str) -> Deferred[VumiMessage | None]:
        return self._get(self._key(b"inbound:", message_id)).addCallback(
            lambda data: None if data is None else reply_source_from_bytes(data)
        )

    def delete_inbound(self, message_id: str) -> Deferred[None]:
        return self._call(b"DEL", self._key(b"inbound:", message_id)).addCallback(_none)

    # -- event info: where each outbound message's events go, per channel ----
    # ``<prefix>event-info:<channel>:<message_id>``; the version before
    # per-channel event info wrote ``<prefix>event:<message_id>``, which a
    # lookup with ``legacy`` still reads (such keys expire ``timeout`` after
    # that version wrote them).

    def _event_info_key(self, channel_id: str, message_id: str) -> bytes:
        return b"%sevent-info:%s:%s" % (
            self._prefix,
            _channel_key_part(channel_id),
            message_id.encode("utf-8"),
        )

    def store_event_info(self, channel_id: str, message_id: str, info: EventInfo) -> Deferred[None]:
        if not self.store_event_info_enabled:
            return succeed(None)
        value = json.dumps([info.url, info.auth_token], separators=(",", ":")).encode("utf-8")
        return self._set(self._event_info_key(channel_id, message_id), value)

    def fetch_event_info(
        self, channel_id: str, message_id: str, *, legacy: bool = False
    ) -> Deferred[EventInfo | None]:
        own = self._get(self._event_info_key(channel_id, message_id))
        if not legacy:
            return own.addCallback(_event_info)
        # Looked up in the same turn: one MGET.
        old = self._get(self._key(b"event:", message_id))
        return Deferred.fromCoroutine(_first_event_info(own, old))

    def delete_event_info(self, channel_id: str, message_id: str) -> Deferred[None]:
        return self._call(b"DEL", self._event_info_key(channel_id, message_id)).addCallback(_none)

    # -- message status: the events of each outbound message ----------------
    # One hash per channel and message (``<prefix>events:<channel>:<message_id>``:
    # event id -> status JSON), so a message id asked for through another
    # channel is not found; a Lua script writes (or reads) and renews the
    # expiry in one round trip.

    def _status_key(self, channel_id: str, message_id: str) -> bytes:
        return b"%sevents:%s:%s" % (
            self._prefix,
            _channel_key_part(channel_id),
            message_id.encode("utf-8"),
        )

    def store_message_event(
        self, channel_id: str, message_id: str, event_id: str, event: bytes
    ) -> Deferred[None]:
        key = self._status_key(channel_id, message_id)
        return self._call(
            b"EVAL", _STORE_EVENT, 1, key, event_id, event, self._status_expire
        ).addCallback(_none)

    def fetch_message_events(self, channel_id: str, message_id: str) -> Deferred[list[bytes]]:
        key = self._status_key(channel_id, message_id)
        own = self._call(b"EVAL", _FETCH_EVENTS, 1, key, self._status_expire)
        # Sent in the same turn (one pipeline): the key the version before
        # per-channel status wrote; see _legacy_events.
        legacy = self._call(b"HVALS", self._key(b"status:", message_id))
        return Deferred.fromCoroutine(_merged_events(channel_id, own, legacy))

    # -- health -------------------------------------------------------------

    def _where(self) -> str:
        if self._sentinels:
            return f"service {self._service_name} via Sentinel"
        return redact_url(self._url)

    async def _ping(self) -> None:
        try:
            await self._call(b"PING")
            if self._sentinels:
                await self._check_master()
        except Exception:
            was_healthy = self._healthy
            self._healthy = False
            if was_healthy is not False or self._last_error:
                log.warn(
                    "Redis at {url} is unreachable: {error}",
                    url=self._where(),
                    error=self._last_error or self._redis.last_error,
                )
            return
        if not self._healthy:
            log.info(
                "Redis at {url} is reachable (master {master})",
                url=self._where(),
                master=self._redis.master,
            )
        self._healthy = True
        self._last_error = None

    async def _check_master(self) -> None:
        """Drop the connection when the Sentinels name another master."""
        try:
            host, port = await self._redis.locator.locate()
        except Exception as e:
            # The master in use still answers; only a later reconnect needs them.
            log.warn("No Sentinel answers: {error}", error=str(e))
            return
        master = f"{host}:{port}"
        if self._redis.master is not None and master != self._redis.master:
            log.warn(
                "Sentinel names {new} the master of {service}, not {old}; reconnecting",
                new=master,
                service=self._service_name,
                old=self._redis.master,
            )
            self._redis.drop()
            self._healthy = False
            self._last_error = f"the master moved to {master}"
            raise RuntimeError(self._last_error)

    def health(self) -> dict[str, dict[str, Any]]:
        status: dict[str, Any] = {
            "health": "ok" if self._healthy else "down",
            "url": redact_url(self._url),
        }
        if self._sentinels:
            status["sentinels"] = [f"{h}:{p}" for h, p in self._sentinels]
            status["service_name"] = self._service_name
            status["master"] = self._redis.master if self._redis is not None else None
        if not self._healthy and self._last_error:
            status["error"] = self._last_error
        return {"redis": status}


class RedisUnavailable(Exception):
    """A command got no answer within ``operation_timeout`` (no connection, or
    a Redis that does not answer); the message says which."""


class ReplicationError(Exception):
    """Fewer replicas than ``min_replicas`` acknowledged a write in time."""


def _none(_: object) -> None:
    return None


def _event_info(data: bytes | None) -> EventInfo | None:
    return None if data is None else EventInfo(*json.loads(data))


async def _first_event_info(own: Deferred, old: Deferred) -> EventInfo | None:
    """The channel's own entry, else the legacy one (both already asked for)."""
    try:
        data = await own
    except BaseException:
        old.addErrback(_none)  # its failure is the same news
        raise
    legacy = await old
    return _event_info(data if data is not None else legacy)


def _channel_key_part(channel_id: str) -> bytes:
    """A channel id as a part of a key: ``%`` and ``:`` escaped, so a
    channel id with a colon (a top-level ``connector_name`` may have one)
    cannot make two channels' keys meet."""
    return channel_id.replace("%", "%25").replace(":", "%3A").encode("utf-8")


async def _merged_events(channel_id: str, own: Deferred, legacy: Deferred) -> list[bytes]:
    try:
        values = _encoded_list(await own)
    except BaseException:
        legacy.addErrback(_none)  # its failure is the same news
        raise
    return values + _legacy_events(channel_id, _encoded_list(await legacy), values)


def _legacy_events(channel_id: str, legacy: list[bytes], own: list[bytes]) -> list[bytes]:
    """The events of ``channel_id`` in a hash the previous version wrote.

    Before status was kept per channel, the events of a message id were kept
    under ``<prefix>status:<message_id>``, whichever channel they came from.
    Each status event names its channel, so those of this channel are still
    answered (those also in the new hash once only); those of other channels
    never are. Nothing writes or renews these keys any more: they expire
    ``outbound_message_ttl`` after the previous version last touched them.
    """
    kept = []
    for value in legacy:
        if value in own:
            continue
        try:
            event = json.loads(value)
        except ValueError:
            continue
        if isinstance(event, dict) and event.get("channel_id") == channel_id:
            kept.append(value)
    return kept
