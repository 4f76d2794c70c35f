"""POSTing JSON to RapidPro: one persistent connection pool, auth, timeouts.

:func:`post_json` raises :class:`DeliveryFailed` for anything but a 2xx,
saying whether a retry may help (connection errors, timeouts, 5xx, 408) or
not (any other answer). A 429, or a 503 with ``Retry-After``, is
*throttling*: no failure of the message's, it is held back (spending no
attempt) for the wait the answer asks for, within
[``MIN_RETRY_AFTER``, ``MAX_RETRY_AFTER``]. Credentials in a URL become HTTP
Basic auth and never appear in an error message.
"""

from __future__ import annotations

import base64
from functools import lru_cache
from typing import Any
from urllib.parse import unquote, urlsplit, urlunsplit

import attrs
from twisted.internet.defer import CancelledError, Deferred, TimeoutError, succeed
from twisted.internet.endpoints import HostnameEndpoint, wrapClientTLS
from twisted.internet.error import (
    ConnectError,
    ConnectingCancelledError,
    ConnectionClosed,
    DNSLookupError,
)
from twisted.internet.interfaces import IAddress, IProtocol, IReactorTime, IStreamClientEndpoint
from twisted.internet.protocol import Factory, Protocol, connectionDone
from twisted.python.failure import Failure
from twisted.web.client import (
    Agent,
    BrowserLikePolicyForHTTPS,
    HTTPConnectionPool,
    ResponseDone,
    ResponseFailed,
    ResponseNeverReceived,
    SchemeNotSupported,
)
from twisted.web.http import PotentialDataLoss, stringToDatetime
from twisted.web.http_headers import Headers
from twisted.web.iweb import IAgent, IAgentEndpointFactory, IBodyProducer
from zope.interface import implementer

from junebug_api.delivery.outages import OutageTracker, describe_destination, destination_of
from junebug_api.formats.json_bodies import JSON_CONTENT_TYPE
from junebug_api.observe.metrics import NO_METRICS, Metrics, status_class

RETRYABLE_STATUSES = frozenset({408})
#: The shortest and longest wait a ``Retry-After`` is taken for (seconds): a
#: shorter one would be a hot loop, a longer one (a day, by mistake) would
#: keep a destination from being probed for longer than the longest delay queue.
MIN_RETRY_AFTER = 1.0
MAX_RETRY_AFTER = 300.0


class DeliveryFailed(Exception):
    """A POST that did not get a 2xx; ``retryable`` says if trying again may help."""

    def __init__(
        self,
        reason: str,
        retryable: bool,
        status_class: str = "error",
        *,
        outage: bool = False,
        throttled: bool = False,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(reason)
        self.reason = reason
        self.retryable = retryable
        #: ``4xx``/``5xx`` for an answer, ``timeout`` or ``error`` without one.
        self.status_class = status_class
        #: Looks like the destination is down (connection errors, timeouts, 5xx).
        self.outage = outage
        #: The destination asked to be left alone (429, 503 with Retry-After).
        self.throttled = throttled
        #: Seconds to wait before the destination is tried again, if known.
        self.retry_after = retry_after
        #: Not made, or only a probe, because the destination is down, or
        #: throttled: it spends no attempt.
        self.held = throttled


def retry_after_seconds(values: list[bytes] | None, now: float) -> float | None:
    """The wait a ``Retry-After`` header asks for (delta-seconds or an
    HTTP-date, against ``now``), clamped to [MIN_RETRY_AFTER,
    MAX_RETRY_AFTER]; None when there is none or it cannot be read."""
    if not values:
        return None
    text = values[0].strip()
    if text.isdigit():  # delta-seconds (bytes: ASCII digits only)
        wait = float(text)
    elif text[:1].isdigit() or text[:1] in (b"-", b"+", b"."):
        return None  # a number, but not delta-seconds (negative, fractional)
    else:
        try:
            wait = stringToDatetime(text) - now
        except Exception:  # untrusted text: any parse error means unreadable
            return None
    return min(MAX_RETRY_AFTER, max(MIN_RETRY_AFTER, wait))


def answer_failure(code: int, headers: Headers, now: float) -> DeliveryFailed:
    """The DeliveryFailed for an answer that is not a 2xx."""
    retry_after = retry_after_seconds(headers.getRawHeaders(b"retry-after"), now)
    if code == 429 or (code == 503 and retry_after is not None):
        when = "" if retry_after is None else f", Retry-After {retry_after:g} s"
        return DeliveryFailed(
            f"HTTP {code} (throttled{when})",
            retryable=True,
            status_class=status_class(code),
            throttled=True,
            retry_after=retry_after,
        )
    return DeliveryFailed(
        f"HTTP {code}",
        retryable=code >= 500 or code in RETRYABLE_STATUSES,
        status_class=status_class(code),
        outage=code >= 500,
    )


def _timed_out(result: Any, timeout: float) -> Any:
    """``addTimeout``'s ``onTimeoutCancel``: the POST was cancelled because its
    time was up, whatever the failure its cancellation became (Twisted's
    client reports a cancelled request as ResponseNeverReceived)."""
    if isinstance(result, Failure):
        raise TimeoutError(timeout, "Deferred")
    return result


def _no_answer(error: Exception, timeout: float) -> Exception:
    """What a POST that got no answer raises: DeliveryFailed saying why, or
    CancelledError when it was cancelled from outside (the shutdown drain,
    the hold watchdog: no answer was waited for, so nothing failed)."""
    if isinstance(error, TimeoutError):  # _timed_out: addTimeout's own cancellation
        return DeliveryFailed(
            f"timed out after {timeout:g} s", retryable=True, status_class="timeout", outage=True
        )
    if isinstance(error, ConnectingCancelledError):
        return CancelledError()
    if isinstance(error, (ConnectError, DNSLookupError, ConnectionClosed)):
        return DeliveryFailed(f"connection failed: {type(error).__name__}", True, outage=True)
    if isinstance(error, (ResponseNeverReceived, ResponseFailed)):
        if any(r.check(CancelledError) for r in error.reasons):
            return CancelledError()
        reasons = ", ".join(r.getErrorMessage() for r in error.reasons) or type(error).__name__
        return DeliveryFailed(f"no response: {reasons}", retryable=True, outage=True)
    if isinstance(error, SchemeNotSupported):
        return DeliveryFailed(f"cannot POST there: {error}", retryable=False)
    return error


@lru_cache(maxsize=1024)
def split_credentials(url: str) -> tuple[bytes, bytes | None]:
    """The URL without user info, and a Basic Authorization value if it had any."""
    parts = urlsplit(url)
    if parts.username is None and parts.password is None:
        return url.encode("utf-8"), None
    netloc = parts.netloc.rsplit("@", 1)[1]
    clean = urlunsplit(parts._replace(netloc=netloc))
    user = unquote(parts.username or "")
    password = unquote(parts.password or "")
    token = base64.b64encode(f"{user}:{password}".encode()).decode("ascii")
    return clean.encode("utf-8"), f"Basic {token}".encode("ascii")


class _QuietFactory(Factory):
    """The pool's protocol factory (a noisy Factory) without its "Starting
    factory" and "Stopping factory" log lines, one each per connection."""

    noisy = False

    def __init__(self, factory: Factory) -> None:
        self.factory = factory

    def startFactory(self) -> None:
        self.factory.startFactory()

    def stopFactory(self) -> None:
        self.factory.stopFactory()

    def buildProtocol(self, addr: IAddress) -> IProtocol | None:
        return self.factory.buildProtocol(addr)


@implementer(IStreamClientEndpoint)
class _QuietEndpoint:
    """Connects as ``endpoint`` does, through a :class:`_QuietFactory`."""

    def __init__(self, endpoint: IStreamClientEndpoint) -> None:
        self.endpoint = endpoint

    def connect(self, factory: Factory) -> Deferred[IProtocol]:
        return self.endpoint.connect(_QuietFactory(factory))


def make_pool(reactor: Any, max_per_host: int) -> HTTPConnectionPool:
    """The one persistent pool that every outgoing POST shares."""
    pool = HTTPConnectionPool(reactor, persistent=True)
    pool.maxPersistentPerHost = max_per_host
    pool.cachedConnectionTimeout = 120
    pool.retryAutomatically = False
    return pool


@implementer(IAgentEndpointFactory)
class _EndpointCache:
    """One client endpoint per scheme, host and port, built once (and quiet:
    no log lines per connection).

    Agent's own factory builds (and IDNA-encodes the host of) a new endpoint
    for every request; the pool only needs it when it opens a connection.
    """

    def __init__(self, reactor: Any) -> None:
        self._reactor = reactor
        self._tls_policy = BrowserLikePolicyForHTTPS()
        self._endpoints: dict[tuple[bytes, bytes, int], Any] = {}

    def endpointForURI(self, uri: Any) -> Any:
        key = (uri.scheme, uri.host, uri.port)
        endpoint = self._endpoints.get(key)
        if endpoint is None:
            if uri.scheme not in (b"http", b"https"):
                raise SchemeNotSupported(f"unsupported scheme: {uri.scheme!r}")
            endpoint = HostnameEndpoint(self._reactor, uri.host, uri.port, timeout=30)
            if uri.scheme == b"https":
                creator = self._tls_policy.creatorForNetloc(uri.host, uri.port)
                endpoint = wrapClientTLS(creator, endpoint)
            endpoint = _QuietEndpoint(endpoint)
            if len(self._endpoints) < 1024:
                self._endpoints[key] = endpoint
        return endpoint


@implementer(IBodyProducer)
class _BytesProducer:
    """A body already in memory, written at once (no cooperator task per POST)."""

    def __init__(self, body: bytes) -> None:
        self._body = body
        self.length = len(body)

    def startProducing(self, consumer: Any) -> Deferred[None]:
        consumer.write(self._body)
        return succeed(None)

    def stopProducing(self) -> None:
        pass

    def pauseProducing(self) -> None:
        pass

    def resumeProducing(self) -> None:
        pass


class _Discard(Protocol):
    """Reads a response body to its end, so its connection goes back to the pool.

    Its Deferred fires when the body is complete and fails when the body was
    cut short; cancelling it (a delivery's timeout) aborts the connection,
    as ``readBody`` does, instead of waiting for the peer to close it.
    """

    def __init__(self) -> None:
        self.finished: Deferred[None] = Deferred(self._abort)

    def _abort(self, _: Deferred) -> None:
        # The body's transport is the client's proxy for the connection: it
        # has loseConnection (which closes at once, nothing being written),
        # and abortConnection in Twisted versions that proxy it.
        transport = self.transport
        if transport is None:
            return
        close = getattr(transport, "abortConnection", None) or transport.loseConnection
        close()

    def dataReceived(self, data: bytes) -> None:
        pass

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        if self.finished.called:
            return
        if reason.check(ResponseDone, PotentialDataLoss):
            self.finished.callback(None)
        else:
            self.finished.errback(reason)


@attrs.define(eq=False)
class HttpDelivery:
    """POSTs JSON through one Agent, and so one persistent connection pool.

    This is the Agent that treq wraps, used directly: at hundreds of POSTs a
    second treq's per-request layers (hyperlink URL parsing, cookie and gzip
    agents, a cooperator task per body) cost more CPU than the POST itself,
    and a delivery needs none of them.
    """

    _agent: IAgent
    _clock: IReactorTime
    metrics: Metrics = NO_METRICS
    _outages: OutageTracker | None = None

    @classmethod
    def create(
        cls,
        reactor: Any,
        max_per_host: int,
        metrics: Metrics = NO_METRICS,
        outages: OutageTracker | None = None,
    ) -> HttpDelivery:
        agent = Agent.usingEndpointFactory(
            reactor, _EndpointCache(reactor), pool=make_pool(reactor, max_per_host)
        )
        return cls(agent, reactor, metrics, outages)

    async def _post(self, url: bytes, headers: Headers, body: bytes) -> Any:
        """The request and the reading of its answer, under one timeout."""
        response = await self._agent.request(b"POST", url, headers, _BytesProducer(body))
        reader = _Discard()
        response.deliverBody(reader)
        await reader.finished
        return response

    async def post_json(
        self,
        url: str,
        body: bytes,
        auth_token: str | None,
        timeout: float,
        target: str = "mo",
    ) -> int:
        """POST ``body`` to ``url``; the status code of a 2xx, else DeliveryFailed.

        ``target`` (``mo`` or ``event``) labels the POST's latency metric.
        With an outage tracker, a POST to a destination that is down (or
        throttled) is not made (DeliveryFailed with ``held``, and
        ``retry_after`` the seconds until its next probe) unless it is due as
        a probe, and every outcome is recorded for the destination.
        """
        outages = self._outages
        if outages is None:
            return await self._post_json(url, body, auth_token, timeout, target)
        destination = destination_of(url)
        if not outages.admit(destination):
            failure = DeliveryFailed(
                f"{describe_destination(destination)} is down",
                retryable=True,
                outage=True,
                retry_after=outages.next_probe_in(destination),
            )
            failure.held = True
            raise failure
        try:
            code = await self._post_json(url, body, auth_token, timeout, target)
        except DeliveryFailed as e:
            if e.throttled:
                e.retry_after = outages.throttled(destination, e.retry_after)
            elif e.outage:
                outages.failed(destination)
                e.held = outages.is_down(destination)
            else:
                outages.succeeded(destination)
            raise
        except BaseException:
            outages.abandoned(destination)
            raise
        outages.succeeded(destination)
        return code

    async def _post_json(
        self, url: str, body: bytes, auth_token: str | None, timeout: float, target: str
    ) -> int:
        clean_url, basic = split_credentials(url)
        headers = Headers(
            {
                b"Content-Type": [JSON_CONTENT_TYPE],
                b"Accept": [b"application/json"],
            }
        )
        if auth_token is not None:
            headers.setRawHeaders(b"Authorization", [f"Token {auth_token}".encode()])
        elif basic is not None:
            headers.setRawHeaders(b"Authorization", [basic])
        started = self._clock.seconds()
        try:
            try:
                posting = Deferred.fromCoroutine(self._post(clean_url, headers, body))
                response = await posting.addTimeout(timeout, self._clock, _timed_out)
            except Exception as e:
                raise _no_answer(e, timeout) from None
            code = response.code
            if not 200 <= code < 300:
                raise answer_failure(code, response.headers, self._clock.seconds())
        except DeliveryFailed as e:
            self.metrics.delivery_post(target, e.status_class, self._clock.seconds() - started)
            raise
        self.metrics.delivery_post(target, "2xx", self._clock.seconds() - started)
        return code
