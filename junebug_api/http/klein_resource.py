"""Serves a Klein app on twisted.web without a reference cycle per request.

Klein's own resource keeps every request in a reference cycle: its error
handler is a closure that refers to itself and to the request (klein pull
request 101, open since 2016). Each finished request, with its headers, body
and adapters (about 40 objects), then waits for Python's cyclic garbage
collector instead of being freed at once. Under load that ran the collector
about ten times a second (10% of the CPU) and promoted requests still in flight
into an older generation, whose collections stalled the reactor for 100-180 ms
at a time: the outbound p99.

:class:`KleinAppResource` routes with the same Klein app (its werkzeug URL map
and its endpoints) and hands the endpoint's result, or any failure, on without
closures, so a finished request is freed as soon as twisted.web lets go of it.

werkzeug's URL matcher leaves a cycle of its own per match (a recursive
closure: a function, a set, a tuple and five cells), which ran the collector
every 2,500 requests or so (gc threshold 20,000, see service.py): a 5-7 ms
stall every 2.4 s at 1,000 sessions/s, the round trip's worst figures. The
routes never change once the app is built, so the last matches (method and
path) are kept and a repeated path, such as every POST to a channel's
messages, is routed without werkzeug.
"""

from __future__ import annotations

import re
from collections import OrderedDict
from collections.abc import Callable
from http import HTTPStatus
from typing import Any

from klein import Klein
from twisted.internet.defer import CancelledError, Deferred, fail
from twisted.python.failure import Failure
from twisted.web.iweb import IRequest
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET
from werkzeug.exceptions import BadRequest
from werkzeug.routing import RequestRedirect

from junebug_api.formats.api_errors import InternalError, error_envelope
from junebug_api.formats.json_bodies import JSON_CONTENT_TYPE
from junebug_api.observe.log import logger

log = logger(__name__)

#: Routing results kept (method and path -> endpoint and its arguments).
ROUTE_CACHE_SIZE = 256

#: Turns a failure (a werkzeug ``HTTPException`` for routing errors) into the
#: body to answer; the handler sets the status and headers. A returned Failure
#: means there is nothing to answer (the client has gone).
ErrorHandler = Callable[[IRequest, Failure], "bytes | Failure"]


class KleinAppResource(Resource):
    """The twisted.web resource for a :class:`klein.Klein` app at the site's root.

    An endpoint returns bytes or a Deferred that fires with bytes; routing
    errors and exceptions go to ``on_error``. Every request still connected
    gets an answer: when neither the endpoint nor ``on_error`` gives one, a
    500 in the Junebug envelope (or, once the answer has begun, a closed
    connection).
    """

    isLeaf = True

    def __init__(self, app: Klein, on_error: ErrorHandler) -> None:
        super().__init__()
        self._app = app
        self._on_error = on_error
        self._routes: OrderedDict[tuple[bytes, str], tuple[Any, tuple[tuple[str, Any], ...]]] = (
            OrderedDict()
        )

    @property
    def app(self) -> Klein:
        """The Klein app served (its URL map shows the routes)."""
        return self._app

    def render(self, request: IRequest) -> bytes | int:
        try:
            result = self._endpoint_result(request)
        except Exception:
            result = fail()
        if isinstance(result, bytes):
            return result
        if not isinstance(result, Deferred):
            result = fail(TypeError(f"the endpoint returned {type(result).__name__}, not bytes"))
        client = _Client()
        request.notifyFinish().addErrback(client.gone, result)
        result.addErrback(self._failed, request)
        result.addCallback(_write, request, client)
        result.addErrback(_unwritten, request, client)
        return NOT_DONE_YET

    def _endpoint_result(self, request: IRequest) -> Any:
        path = b"/" + b"/".join(request.postpath)
        try:
            path_info = path.decode("utf-8")
        except UnicodeDecodeError:
            raise BadRequest("the URL path is not UTF-8") from None
        endpoint, arguments = self._route(request.method, path_info)
        return self._app.execute_endpoint(endpoint, request, **arguments)

    def _route(self, method: bytes, path_info: str) -> tuple[Any, dict[str, Any]]:
        """The endpoint and its arguments for a request; werkzeug's routing
        exceptions (404, 405, redirects) as werkzeug raises them, never kept."""
        if path_info.startswith("//"):
            # werkzeug strips leading slashes before matching (so ``//messages``
            # would be served); merge_slashes' 308 for them as for inner ones.
            raise RequestRedirect(re.sub("/{2,}", "/", path_info))
        key = (method, path_info)
        route = self._routes.get(key)
        if route is not None:
            self._routes.move_to_end(key)
        else:
            urls = self._app.url_map.bind(
                "", path_info=path_info, default_method=method.decode("ascii")
            )
            endpoint, arguments = urls.match()
            route = self._routes[key] = (endpoint, tuple(arguments.items()))
            if len(self._routes) > ROUTE_CACHE_SIZE:
                self._routes.popitem(last=False)
        endpoint, arguments = route
        return endpoint, dict(arguments)

    def _failed(self, failure: Failure, request: IRequest) -> bytes | Failure:
        return self._on_error(request, failure)


class _Client:
    """Whether the client of one request is still there, as the request's
    ``notifyFinish()`` tells (Klein's own resource does the same)."""

    __slots__ = ("disconnected",)

    def __init__(self) -> None:
        self.disconnected = False

    def gone(self, reason: Failure, result: Deferred) -> None:
        """The connection closed before the answer: stop working on it."""
        self.disconnected = True
        result.cancel()


def _write(body: bytes, request: Any, client: _Client) -> None:
    # After a disconnect, twisted.web refuses finish(); there is no one to answer.
    if client.disconnected:
        return
    if not isinstance(body, bytes):
        raise TypeError(f"the answer is {type(body).__name__}, not bytes")
    request.setHeader(b"Content-Length", b"%d" % len(body))
    request.write(body)
    request.finish()


def _unwritten(failure: Failure, request: Any, client: _Client) -> None:
    """Nothing (or not all) was answered: log why, and answer what can be."""
    if client.disconnected and failure.check(CancelledError):
        return  # the client went away, and the endpoint stopped
    log.failure(
        "Could not answer {method} {path}", failure, method=request.method, path=request.path
    )
    if client.disconnected or request.finished:
        return
    if request.startedWriting:
        request.loseConnection()
        return
    request.setResponseCode(HTTPStatus.INTERNAL_SERVER_ERROR.value)
    request.setHeader(b"Content-Type", JSON_CONTENT_TYPE)
    request.setHeader(b"Content-Length", b"%d" % len(_INTERNAL_ERROR))
    request.write(_INTERNAL_ERROR)
    request.finish()


_INTERNAL_ERROR = error_envelope(InternalError("internal error"))
