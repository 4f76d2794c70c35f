"""A small pipelining Redis client for the state cache, with Sentinel discovery.

Why not txredisapi's pool: every command there goes through an
``inlineCallbacks`` connection checkout, a DeferredQueue and a timer of its
own, which made the Redis path about a quarter slower than the in-memory one.
Here one connection carries every command: a command is written at once and
its Deferred queued; Twisted sends everything written during one reactor turn
in one ``send``, so the writes of a turn travel as one pipeline and their
replies come back in order. One timer per connection (not per command)
enforces the reply deadline: a connection whose oldest command waits longer
than ``reply_timeout`` is dropped and its commands fail.

The address comes from a :class:`Locator`: a fixed host and port, or
:class:`SentinelLocator`, which asks the Sentinels for the master of a service
before every connection attempt and checks with ``ROLE`` that the server it
reached is that master. A lost connection is re-established (with backoff) by
a ``ClientService``; commands issued while there is no connection wait for
the next one (their callers' own timeouts bound that wait).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Sequence
from typing import Any, Protocol

from twisted.application.internet import ClientService, backoffPolicy
from twisted.internet import protocol
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.endpoints import HostnameEndpoint, wrapClientTLS
from twisted.internet.error import ConnectionDone
from twisted.internet.interfaces import IReactorTime

from junebug_api.observe.log import logger

log = logger(__name__)

Reply = Any  # bytes | int | None | list[Reply] | str (simple strings decoded)


def _nothing() -> None:
    pass


class RedisError(Exception):
    """Redis answered a command with an error reply."""


class RedisConnectionError(Exception):
    """No connection, or the connection was lost with the command unanswered."""


class IncompleteReply(Exception):
    """The data so far ends inside a reply: wait for more."""


def encode_command(args: Sequence[bytes | str | int]) -> bytes:
    """One command in RESP: an array of bulk strings."""
    parts = [b"*%d\r\n" % len(args)]
    for arg in args:
        if isinstance(arg, str):
            arg = arg.encode("utf-8")
        elif isinstance(arg, int):
            arg = b"%d" % arg
        parts.append(b"$%d\r\n%s\r\n" % (len(arg), arg))
    return b"".join(parts)


def parse_reply(buf: bytes, pos: int) -> tuple[Reply, int]:
    """One RESP2 reply from ``buf`` at ``pos``: (reply, position after it).

    Raises IncompleteReply when the buffer ends inside the reply. An error reply is
    returned as a RedisError instance.
    """
    end = buf.find(b"\r\n", pos)
    if end < 0:
        raise IncompleteReply
    kind = buf[pos : pos + 1]
    line = buf[pos + 1 : end]
    pos = end + 2
    if kind == b"$":
        return _bulk_string(buf, int(line), pos)
    if kind == b"*":
        return _array(buf, int(line), pos)
    simple = _SIMPLE_REPLIES.get(kind)
    if simple is None:
        raise RedisConnectionError(f"unexpected reply type {kind!r} from Redis")
    return simple(line), pos


def _bulk_string(buf: bytes, size: int, pos: int) -> tuple[bytes | None, int]:
    if size < 0:
        return None, pos
    if len(buf) < pos + size + 2:
        raise IncompleteReply
    return buf[pos : pos + size], pos + size + 2


def _array(buf: bytes, count: int, pos: int) -> tuple[list[Reply] | None, int]:
    if count < 0:
        return None, pos
    items = []
    for _ in range(count):
        item, pos = parse_reply(buf, pos)
        items.append(item)
    return items, pos


#: The one-line replies: simple strings, integers and errors.
_SIMPLE_REPLIES: dict[bytes, Callable[[bytes], Reply]] = {
    b"+": lambda line: line.decode("utf-8", "replace"),
    b":": int,
    b"-": lambda line: RedisError(line.decode("utf-8", "replace")),
}


class RedisProtocol(protocol.Protocol):
    """One Redis connection: commands pipelined, replies matched in order."""

    def __init__(
        self, clock: IReactorTime, reply_timeout: float, on_lost: Callable[[], None]
    ) -> None:
        self._clock = clock
        self._reply_timeout = reply_timeout
        self._on_lost = on_lost
        self._pending: deque[tuple[Deferred, float]] = deque()
        self._buffer = b""
        self._watchdog: Any = None
        self.lost = False

    def command(self, *args: bytes | str | int) -> Deferred[Reply]:
        """Send one command; a Deferred of its reply (RedisError for -ERR)."""
        if self.lost:
            return fail(RedisConnectionError("connection to Redis lost"))
        d: Deferred[Reply] = Deferred()
        self._pending.append((d, self._clock.seconds() + self._reply_timeout))
        self.transport.write(encode_command(args))
        if self._watchdog is None:
            self._watchdog = self._clock.callLater(self._reply_timeout, self._check_deadline)
        return d

    def _check_deadline(self) -> None:
        self._watchdog = None
        if not self._pending:
            return
        late = self._pending[0][1] - self._clock.seconds()
        if late <= 0:
            log.warn(
                "Redis did not answer within {timeout} s; reconnecting", timeout=self._reply_timeout
            )
            self._fail_all(
                RedisConnectionError(f"no reply from Redis within {self._reply_timeout:g} s")
            )
            self.transport.abortConnection()
            return
        self._watchdog = self._clock.callLater(late, self._check_deadline)

    def dataReceived(self, data: bytes) -> None:
        buf = self._buffer + data if self._buffer else data
        pos = 0
        pending = self._pending
        try:
            while pos < len(buf):
                reply, pos = parse_reply(buf, pos)
                if not pending:
                    raise RedisConnectionError("a reply from Redis that nobody asked for")
                d = pending.popleft()[0]
                if d.called:  # cancelled by its caller
                    continue
                if isinstance(reply, RedisError):
                    if str(reply).startswith("READONLY"):
                        # A demoted master (Sentinel failover): find the new one.
                        self.transport.loseConnection()
                    d.errback(reply)
                else:
                    d.callback(reply)
        except IncompleteReply:
            pass
        except (ValueError, RedisConnectionError) as e:
            self._fail_all(RedisConnectionError(f"bad reply from Redis: {e}"))
            self.transport.abortConnection()
            return
        self._buffer = buf[pos:]

    def _fail_all(self, error: Exception) -> None:
        pending, self._pending = self._pending, deque()
        for d, _ in pending:
            if not d.called:
                d.errback(error)

    def connectionLost(self, reason: Any = ConnectionDone) -> None:
        self.lost = True
        if self._watchdog is not None and self._watchdog.active():
            self._watchdog.cancel()
        self._watchdog = None
        self._fail_all(RedisConnectionError("connection to Redis lost"))
        self._on_lost()


class _Factory(protocol.Factory):
    noisy = False

    def __init__(
        self, clock: IReactorTime, reply_timeout: float, on_lost: Callable[[], None] = _nothing
    ) -> None:
        self._clock = clock
        self._reply_timeout = reply_timeout
        self._on_lost = on_lost

    def buildProtocol(self, addr: Any) -> RedisProtocol:
        return RedisProtocol(self._clock, self._reply_timeout, self._on_lost)


class Locator(Protocol):
    """Where the Redis to use is, asked before every connection attempt."""

    def locate(self) -> Deferred[tuple[str, int]]:
        """The (host, port) to connect to."""

    @property
    def is_sentinel(self) -> bool:
        """Whether the server must be checked to be a master (``ROLE``)."""


class FixedLocator:
    """One Redis at a fixed address."""

    is_sentinel = False

    def __init__(self, host: str, port: int) -> None:
        self.address = (host, port)

    def locate(self) -> Deferred[tuple[str, int]]:
        return succeed(self.address)


async def _one_shot(
    reactor: Any, host: str, port: int, commands: list[tuple], timeout: float
) -> list[Reply]:
    """Connect, run ``commands`` in order, disconnect; their replies."""
    endpoint = HostnameEndpoint(reactor, host, port, timeout=timeout)
    d = endpoint.connect(_Factory(reactor, timeout))
    d.addTimeout(timeout, reactor)
    conn = await d
    try:
        replies = []
        for args in commands:
            reply = await conn.command(*args)
            replies.append(reply)
        return replies
    finally:
        conn.transport.loseConnection()


class SentinelLocator:
    """The master of ``service_name`` as the Sentinels know it.

    Asks the Sentinels one after another (``SENTINEL
    get-master-addr-by-name``), the one that answered last first.
    """

    is_sentinel = True

    def __init__(
        self,
        reactor: Any,
        sentinels: list[tuple[str, int]],
        service_name: str,
        password: str | None = None,
        timeout: float = 2.0,
    ) -> None:
        self._reactor = reactor
        self.sentinels = list(sentinels)
        self.service_name = service_name
        self._password = password
        self._timeout = timeout

    def locate(self) -> Deferred[tuple[str, int]]:
        return Deferred.fromCoroutine(self._locate())

    async def _locate(self) -> tuple[str, int]:
        errors = []
        for i, (host, port) in enumerate(list(self.sentinels)):
            commands: list[tuple] = []
            if self._password is not None:
                commands.append((b"AUTH", self._password))
            commands.append((b"SENTINEL", b"get-master-addr-by-name", self.service_name))
            try:
                replies = await _one_shot(self._reactor, host, port, commands, self._timeout)
            except Exception as e:
                errors.append(f"{host}:{port}: {e or type(e).__name__}")
                continue
            reply = replies[-1]
            if isinstance(reply, list) and len(reply) == 2:
                if i:  # ask this one first next time
                    self.sentinels.insert(0, self.sentinels.pop(i))
                return reply[0].decode("ascii"), int(reply[1])
            errors.append(f"{host}:{port}: no master known for {self.service_name}")
        raise RedisConnectionError(
            f"no Sentinel knows a master for {self.service_name} ({'; '.join(errors)})"
        )


class _LocatingEndpoint:
    """A client endpoint that asks the locator for the address each time."""

    def __init__(self, client: RedisClient) -> None:
        self._client = client

    def __repr__(self) -> str:  # in ClientService's "Scheduling retry" lines
        locator = self._client.locator
        if isinstance(locator, SentinelLocator):
            return f"<Redis master of {locator.service_name} via Sentinel>"
        return f"<Redis at {self._client.target}>"

    def connect(self, factory: Any) -> Deferred:
        return Deferred.fromCoroutine(self._connect(factory))

    async def _connect(self, factory: Any) -> Any:
        client = self._client
        try:
            host, port = await client.locator.locate()
        except Exception as e:
            client.connection_failed(str(e))
            raise
        client.target = f"{host}:{port}"
        endpoint: Any = HostnameEndpoint(client.reactor, host, port, timeout=client.connect_timeout)
        if client.tls_options is not None:
            endpoint = wrapClientTLS(client.tls_options(host), endpoint)
        try:
            return await endpoint.connect(factory)
        except Exception as e:
            client.connection_failed(f"{host}:{port}: {e}")
            raise


class RedisClient:
    """One reconnecting, pipelining connection to the Redis a locator names.

    ``command`` returns a Deferred of the reply; with no connection at the
    moment, the command waits for the next one. Either way it fails after
    ``reply_timeout`` seconds without a reply.
    """

    def __init__(
        self,
        reactor: Any,
        locator: Locator,
        *,
        dbid: int = 0,
        username: str | None = None,
        password: str | None = None,
        tls_options: Any = None,
        connect_timeout: float = 5.0,
        reply_timeout: float = 5.0,
    ) -> None:
        self.reactor = reactor
        self.locator = locator
        self.tls_options = tls_options  # host -> IOpenSSLClientConnectionCreator
        self.connect_timeout = connect_timeout
        self._reply_timeout = reply_timeout
        self._dbid = dbid
        self._username = username
        self._password = password
        self._connection: RedisProtocol | None = None
        self._waiting: list[tuple[Deferred, tuple]] = []
        self.target: str | None = None  # host:port of the last attempt
        self.master: str | None = None  # host:port of the connection in use
        self.last_error: str | None = "not connected yet"
        self._service = ClientService(
            _LocatingEndpoint(self),
            _Factory(reactor, reply_timeout, self._lost),
            retryPolicy=backoffPolicy(initialDelay=0.1, maxDelay=2.0, factor=2.0),
            clock=reactor,
            prepareConnection=lambda conn: Deferred.fromCoroutine(self._prepare(conn)),
        )

    def start(self) -> None:
        self._service.startService()

    def stop(self) -> Deferred[None]:
        self._fail_waiting(RedisConnectionError("the Redis client was stopped"))
        return self._service.stopService()

    def command(self, *args: bytes | str | int) -> Deferred[Reply]:
        conn = self._connection
        if conn is not None and not conn.lost:
            return conn.command(*args)
        d: Deferred[Reply] = Deferred(lambda d: self._forget(d))
        self._waiting.append((d, args))
        # Sent commands are timed by their connection's watchdog; this one waits.
        d.addTimeout(self._reply_timeout, self.reactor)
        return d

    def _forget(self, d: Deferred) -> None:
        self._waiting = [(w, a) for w, a in self._waiting if w is not d]

    def _fail_waiting(self, error: Exception) -> None:
        waiting, self._waiting = self._waiting, []
        for d, _ in waiting:
            if not d.called:
                d.errback(error)

    def connection_failed(self, error: str) -> None:
        self.last_error = error

    def drop(self) -> None:
        """Close the connection in use (to reconnect, e.g. to a new master)."""
        if self._connection is not None:
            self._connection.transport.loseConnection()

    async def _prepare(self, conn: RedisProtocol) -> None:
        """AUTH, ROLE (behind Sentinel), SELECT; then hand the connection out."""
        try:
            if self._password is not None:
                auth: tuple = (b"AUTH", self._password)
                if self._username is not None:
                    auth = (b"AUTH", self._username, self._password)
                await conn.command(*auth)
            if self.locator.is_sentinel:
                role = await conn.command(b"ROLE")
                if not role or role[0] != b"master":
                    raise RedisConnectionError(
                        f"{self.target} is not a master (ROLE {role[0] if role else None!r})"
                    )
            if self._dbid:
                await conn.command(b"SELECT", self._dbid)
        except Exception as e:
            self.last_error = f"{self.target}: {e}"
            raise
        self._connection = conn
        self.master = self.target
        self.last_error = None
        log.info("Connected to Redis at {address}", address=self.target)
        waiting, self._waiting = self._waiting, []
        for d, args in waiting:
            if not d.called:
                conn.command(*args).chainDeferred(d)

    def _lost(self) -> None:
        """A connection ended: forget the one in use if that was it."""
        conn = self._connection
        if conn is not None and conn.lost:
            self._connection = None
            self.master = None
            self.last_error = "connection to Redis lost"
