"""The HTTP server under the API: body size limit, slow and idle clients.

twisted.web reads a whole request body into memory or a temporary file before
a resource sees it. :class:`LimitedRequest` refuses a body larger than
``max_request_size`` as soon as its Content-Length says so, or as soon as a
chunked body grows past it, answering 413 in the Junebug envelope and closing
the connection without storing the body. A request whose headers and body do
not arrive within ``read_timeout`` gets 408; a connection idle for
``idle_timeout`` is closed (twisted.web's own timeout).
"""

from __future__ import annotations

import weakref
from http import HTTPStatus
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.task import deferLater
from twisted.web.server import Request, Site

from .junebug_formats import JSON_CONTENT_TYPE, ApiError, error_envelope
from .log import debug_enabled

# On shutdown, how long a connection without a request in progress may
# still bring one before it is closed.
IDLE_GRACE = 0.5


class RequestTooLarge(ApiError):
    status = HTTPStatus.REQUEST_ENTITY_TOO_LARGE
    description = "request too large"
    error_type = "RequestTooLarge"


class RequestReadTimeout(ApiError):
    status = HTTPStatus.REQUEST_TIMEOUT
    description = "request timeout"
    error_type = "RequestTimeout"


class LimitedRequest(Request):
    """A Request that enforces its site's size limit and read deadline."""

    _refused = False
    _received = 0
    _deadline: Any = None

    def __init__(self, channel: Any, *args: Any, **kwargs: Any) -> None:
        super().__init__(channel, *args, **kwargs)
        site = getattr(channel, "site", None)
        self._drain_site = site if isinstance(site, ApiSite) else None
        if self._drain_site is not None:
            self._drain_site.request_started(self)
        self._max_size = getattr(site, "max_request_size", None)
        read_timeout = getattr(site, "read_timeout", None)
        if read_timeout:
            self._deadline = site.clock.callLater(read_timeout, self._read_timed_out)

    def gotLength(self, length: int | None) -> None:
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
        self._cancel_deadline()
        if self._refused:
            return
        super().requestReceived(command, path, version)

    def connectionLost(self, reason: Any) -> None:
        self._cancel_deadline()
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

    def _cancel_deadline(self) -> None:
        if self._deadline is not None and self._deadline.active():
            self._deadline.cancel()
        self._deadline = None

    def _read_timed_out(self) -> None:
        self._deadline = None
        self._refuse(RequestReadTimeout("the request did not arrive in time"))

    def _refuse(self, error: ApiError) -> None:
        """Answer ``error`` at once, before the request is complete, and hang up."""
        if self._refused:
            return
        self._refused = True
        self._cancel_deadline()
        body = error_envelope(error)
        status = error.status
        head = (
            f"HTTP/1.1 {status.value} {status.phrase}\r\n"
            f"Content-Type: {JSON_CONTENT_TYPE.decode()}\r\n"
            f"Content-Length: {len(body)}\r\n"
            "Connection: close\r\n\r\n"
        ).encode("ascii")
        transport = self.channel.transport
        if transport is not None:
            transport.write(head + body)
            transport.loseConnection()


class ApiSite(Site):
    """The Site serving the API, with limits and access logs only when debugging."""

    noisy = False
    requestFactory = LimitedRequest

    def __init__(
        self,
        resource: Any,
        *,
        clock: Any,
        max_request_size: int | None,
        read_timeout: float | None,
        idle_timeout: float | None,
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
        self._init_drain()

    def log(self, request: Any) -> None:
        if debug_enabled():
            super().log(request)

    # -- shutdown drain ------------------------------------------------------

    def _init_drain(self) -> None:
        self.draining = False
        self._requests: set[Any] = set()
        # The connections that have carried a request (kept-alive ones stay).
        self._transports: weakref.WeakSet[Any] = weakref.WeakSet()
        self._drain_waiter: Deferred[None] | None = None

    def request_started(self, request: Any) -> None:
        self._requests.add(request)
        transport = request.channel.transport
        if transport is not None:
            self._transports.add(transport)

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
        up to ``timeout`` s to be answered. Returns how many were not answered in time (their
        connections are closed).
        """
        self.draining = True
        # A client may be sending its next request on a connection that looks
        # idle right now: give it a moment to arrive (it then gets its answer
        # with Connection: close), and close only what stays idle.
        grace = min(IDLE_GRACE, timeout)
        if grace > 0:
            await deferLater(self.clock, grace)
        busy = {
            request.channel.transport for request in self._requests if request.channel is not None
        }
        for transport in list(self._transports):
            if transport not in busy and not transport.disconnecting:
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
