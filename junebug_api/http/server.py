"""The HTTP server under the API: body size limit, slow and idle clients,
connection floods.

twisted.web reads a whole request body into memory or a temporary file before
a resource sees it. :class:`LimitedRequest` refuses a body larger than
``max_request_size`` as soon as its Content-Length says so, or as soon as a
chunked body grows past it, answering 413 in the Junebug envelope and closing
the connection without storing the body.

:class:`ApiChannel` gives each request one deadline, ``read_timeout``, from
its first byte to its last (request line, headers and body together), then
answers 408 and closes: a client trickling bytes gains nothing, because the
deadline is not reset by data. A connection without a request in progress is
closed after ``idle_timeout`` (twisted.web's own timeout).

:class:`ApiSite` keeps at most ``max_connections`` connections open: past it,
each new connection first closes the oldest one that is not waiting for an
answer (idle, or still sending its request), so a flood of slow or idle
connections can neither exhaust the process's file descriptors nor keep a
normal request out. When every open connection is waiting for its answer,
the new one is refused.

:class:`ListeningService` listens for the site while the service runs, and
says at once when it cannot.
"""

from __future__ import annotations

from typing import Any

from twisted.application.service import Service
from twisted.internet.defer import CancelledError, Deferred, maybeDeferred
from twisted.internet.interfaces import IListeningPort, IProtocolFactory, IStreamServerEndpoint
from twisted.internet.task import deferLater
from twisted.python.failure import Failure
from twisted.web.http import HTTPChannel
from twisted.web.server import Request, Site

from junebug_api.formats.api_errors import (
    ApiError,
    RequestReadTimeout,
    RequestTooLarge,
    error_envelope,
)
from junebug_api.formats.json_bodies import JSON_CONTENT_TYPE
from junebug_api.observe.log import debug_enabled, logger

log = logger(__name__)

LISTEN_BACKLOG = 1024
"""Connections the kernel may hold for accepting (Twisted's default is 50):
under a flood, a short queue drops the SYN of a normal client, which then
waits a second or more to retry."""

MAX_CLOSING = 64
"""Connections closed to make room whose descriptors may not be released yet."""

EVICTION_LOG_INTERVAL = 60.0
"""Seconds between log lines about connections closed for the limit."""

# On shutdown, how long a connection without a request in progress may
# still bring one before it is closed.
IDLE_GRACE = 0.5


def with_listen_backlog(endpoint: str, backlog: int = LISTEN_BACKLOG) -> str:
    """A TCP or TLS server endpoint description with ``backlog`` unless it sets one."""
    kind = endpoint.split(":", 1)[0].lower()
    if kind in ("tcp", "tcp6", "ssl") and ":backlog=" not in endpoint:
        return f"{endpoint}:backlog={backlog}"
    return endpoint


class ListeningService(Service):
    """Listens on ``endpoint`` with ``factory`` while the service runs.

    Twisted's ``StreamServerEndpointService``, except that a failure to
    listen raises from ``privilegedStartService`` (where twistd listens,
    before it drops privileges, so ports below 1024 work) or
    ``startService``, for the caller to say in one line; the stock service
    only logs it, unless a private flag of it is set.
    """

    def __init__(self, endpoint: IStreamServerEndpoint, factory: IProtocolFactory) -> None:
        self.endpoint = endpoint
        self.factory = factory
        self._listening: Deferred[IListeningPort | None] | None = None

    def privilegedStartService(self) -> None:
        super().privilegedStartService()
        at_start: list[Failure] = []

        def not_listening(reason: Failure) -> None:
            if self._listening is None:
                at_start.append(reason)
            elif not reason.check(CancelledError):
                log.failure("Cannot listen on {endpoint}", reason, endpoint=self.endpoint)

        listening = self.endpoint.listen(self.factory).addErrback(not_listening)
        if at_start:
            at_start[0].raiseException()
        self._listening = listening

    def startService(self) -> None:
        super().startService()
        if self._listening is None:
            self.privilegedStartService()

    def stopService(self) -> Deferred[None]:
        """Stop listening (or trying to); fires once the port is closed."""
        super().stopService()
        listening, self._listening = self._listening, None

        async def stop() -> None:
            if listening is None:
                return
            listening.cancel()
            port = await listening
            if port is not None:
                await maybeDeferred(port.stopListening)

        return Deferred.fromCoroutine(stop())


def answer_and_close(transport: Any, error: ApiError) -> None:
    """Write ``error`` as a whole HTTP answer in the Junebug envelope, then hang up."""
    if transport is None:
        return
    body = error_envelope(error)
    status = error.status
    head = (
        f"HTTP/1.1 {status.value} {status.phrase}\r\n"
        f"Content-Type: {JSON_CONTENT_TYPE.decode()}\r\n"
        f"Content-Length: {len(body)}\r\n"
        "Connection: close\r\n\r\n"
    ).encode("ascii")
    transport.write(head + body)
    transport.loseConnection()


class LimitedRequest(Request):
    """A Request that enforces its site's size limit."""

    _refused = False
    _received = 0

    def __init__(self, channel: Any, *args: Any, **kwargs: Any) -> None:
        super().__init__(channel, *args, **kwargs)
        site = getattr(channel, "site", None)
        self._drain_site = site if isinstance(site, ApiSite) else None
        if self._drain_site is not None:
            self._drain_site.request_started(self)
        self._max_size = getattr(site, "max_request_size", None)

    def gotLength(self, length: int | None) -> None:
        # twisted.web has no public hook between the headers and the body.
        # HTTPChannel calls gotLength once the headers are in and before it
        # answers "Expect: 100-continue", so a 413 here goes out with no
        # "100 Continue" after it. tests/unit/test_library_contracts.py fails
        # if a Twisted release calls them in another order.
        if self._max_size is not None and length is not None and length > self._max_size:
            self.requestHeaders.removeHeader(b"Expect")  # no 100 Continue after our 413
            self._refuse(RequestTooLarge(f"the body is larger than {self._max_size} bytes"))
        super().gotLength(0 if self._refused else length)

    def handleContentChunk(self, data: bytes) -> None:
        if self._refused:
            return
        self._received += len(data)
        if self._max_size is not None and self._received > self._max_size:
            self._refuse(RequestTooLarge(f"the body is larger than {self._max_size} bytes"))
            return
        super().handleContentChunk(data)

    def requestReceived(self, command: bytes, path: bytes, version: bytes) -> None:
        if self._refused:
            return
        super().requestReceived(command, path, version)

    def _refuse(self, error: ApiError) -> None:
        """Answer ``error`` at once, before the request is complete, and hang up."""
        if self._refused:
            return
        self._refused = True
        answer_and_close(self.channel.transport, error)

    def connectionLost(self, reason: Any) -> None:
        super().connectionLost(reason)
        self._request_ended()

    # -- shutdown drain ------------------------------------------------------

    def write(self, data: bytes) -> None:
        if not self.startedWriting:
            self._close_after_answer_if_draining()
        super().write(data)

    def finish(self) -> None:
        if not self.startedWriting:
            self._close_after_answer_if_draining()
        super().finish()
        self._request_ended()

    def _close_after_answer_if_draining(self) -> None:
        """While the site drains, answer with ``Connection: close`` and close
        the connection after the answer (HTTPChannel's ``persistent``)."""
        site = self._drain_site
        if site is not None and site.draining and self.channel is not None:
            self.responseHeaders.setRawHeaders(b"connection", [b"close"])
            self.channel.persistent = False

    def _request_ended(self) -> None:
        if self._drain_site is not None:
            self._drain_site.request_ended(self)


class ApiChannel(HTTPChannel):
    """An HTTP connection with one read deadline per request (see the module
    docstring). Its site is told when it opens and closes, and may close it
    to make room while it is not waiting for an answer (``busy``)."""

    busy = False
    _deadline: Any = None
    _timed_out = False

    def connectionMade(self) -> None:
        super().connectionMade()
        self.site.connection_opened(self)

    def dataReceived(self, data: bytes) -> None:
        if self._timed_out:
            return
        if data and not self.busy and self._deadline is None:
            timeout = self.site.read_timeout
            if timeout:
                self._deadline = self.callLater(timeout, self._read_timed_out)
        super().dataReceived(data)

    def allContentReceived(self) -> None:
        # The whole request is here: the deadline is met, the answer is awaited.
        self._cancel_deadline()
        self.busy = True
        super().allContentReceived()

    def requestDone(self, request: Any) -> None:
        # Cleared first: the parent feeds any pipelined bytes back in, and the
        # next request's deadline starts with them.
        self.busy = False
        super().requestDone(request)

    def connectionLost(self, reason: Any) -> None:
        self._cancel_deadline()
        self.site.connection_closed(self)
        super().connectionLost(reason)

    def _cancel_deadline(self) -> None:
        if self._deadline is not None and self._deadline.active():
            self._deadline.cancel()
        self._deadline = None

    def _read_timed_out(self) -> None:
        self._deadline = None
        self._timed_out = True
        self.setTimeout(None)
        answer_and_close(self.transport, RequestReadTimeout("the request did not arrive in time"))

    def evict(self) -> None:
        """Close now, to make room for a newer connection."""
        self._cancel_deadline()
        self._timed_out = True
        self.setTimeout(None)
        self.transport.abortConnection()


class ApiSite(Site):
    """The Site serving the API, with limits and access logs only when debugging."""

    noisy = False
    protocol = ApiChannel
    requestFactory = LimitedRequest

    def __init__(
        self,
        resource: Any,
        *,
        clock: Any,
        max_request_size: int | None,
        read_timeout: float | None,
        idle_timeout: float | None,
        max_connections: int | None = None,
    ) -> None:
        # The API reads JSON bodies whatever their Content-Type; twisted.web
        # would otherwise parse that header with the (slow) email package on
        # every POST, only to decode form bodies nobody reads.
        super().__init__(
            resource, parsePOSTFormSubmission=False, timeout=idle_timeout, reactor=clock
        )
        self.clock = clock
        self.max_request_size = max_request_size
        self.read_timeout = read_timeout
        self.max_connections = max_connections
        # Open connections, oldest first (dicts keep insertion order).
        self._open: dict[ApiChannel, None] = {}
        self._closing: set[ApiChannel] = set()
        self._evicted = 0
        self._refused = 0
        self._last_report: float | None = None
        self._init_drain()

    @property
    def open_connections(self) -> int:
        """How many HTTP connections are open."""
        return len(self._open)

    def buildProtocol(self, addr: Any) -> Any:
        if self.max_connections is not None and len(self._open) >= self.max_connections:
            # An evicted connection's descriptor is closed on the reactor's next
            # turn, while the reactor may accept a burst of new ones in this one:
            # past MAX_CLOSING such descriptors, new connections are refused
            # (closed at once) so that the process never runs out of them.
            victim = None
            if len(self._closing) < MAX_CLOSING:
                victim = next((c for c in self._open if not c.busy), None)
            if victim is None:
                self._refused += 1
                self._report()
                return None  # the endpoint closes the new connection at once
            del self._open[victim]
            self._closing.add(victim)
            victim.evict()
            self._evicted += 1
            self._report()
        return super().buildProtocol(addr)

    def connection_opened(self, channel: ApiChannel) -> None:
        self._open[channel] = None

    def connection_closed(self, channel: ApiChannel) -> None:
        self._open.pop(channel, None)
        self._closing.discard(channel)

    def _report(self) -> None:
        """One warning when the limit is first reached, then at most one a minute."""
        now = self.clock.seconds()
        if self._last_report is not None and now - self._last_report < EVICTION_LOG_INTERVAL:
            return
        log.warn(
            "http_max_connections ({limit}) reached: closed {evicted} idle or unfinished"
            " connection(s) and refused {refused} new one(s) since the last report",
            limit=self.max_connections,
            evicted=self._evicted,
            refused=self._refused,
        )
        self._last_report = now
        self._evicted = self._refused = 0

    def log(self, request: Any) -> None:
        if debug_enabled():
            super().log(request)

    # -- shutdown drain ------------------------------------------------------

    def _init_drain(self) -> None:
        self.draining = False
        self._requests: set[Any] = set()
        self._drain_waiter: Deferred[None] | None = None

    def request_started(self, request: Any) -> None:
        self._requests.add(request)

    def request_ended(self, request: Any) -> None:
        requests = self._requests
        requests.discard(request)
        if not requests and self.draining:
            self._drained()

    def _drained(self) -> None:
        waiter, self._drain_waiter = self._drain_waiter, None
        if waiter is not None and not waiter.called:
            waiter.callback(None)

    async def drain(self, timeout: float) -> int:
        """Answer the requests in progress, then close every connection.

        For shutdown, after the port stopped listening: from now on every
        answer carries ``Connection: close``; keep-alive connections still
        idle after ``IDLE_GRACE`` s close cleanly; requests in progress get
        up to ``timeout`` s (the grace included) to be answered. Returns how
        many were not answered in time (their connections are closed).
        """
        self.draining = True
        # A client may be sending its next request on a connection that looks
        # idle right now: give it a moment to arrive (it then gets its answer
        # with Connection: close), and close only what stays idle.
        grace = min(IDLE_GRACE, timeout)
        if grace > 0:
            await deferLater(self.clock, grace)
        busy = {request.channel for request in self._requests}
        for channel in list(self._open):
            transport = channel.transport
            if channel not in busy and transport is not None and not transport.disconnecting:
                transport.loseConnection()
        if self._requests and timeout - grace > 0:
            waiter: Deferred[None] = Deferred()
            self._drain_waiter = waiter
            timer = self.clock.callLater(timeout - grace, self._drained)
            await waiter
            if timer.active():
                timer.cancel()
        left = list(self._requests)
        for request in left:
            transport = request.channel.transport if request.channel else None
            if transport is not None:
                transport.abortConnection()
        return len(left)
