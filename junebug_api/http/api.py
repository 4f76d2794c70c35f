"""The HTTP API (Klein): old Junebug's message and channel routes, and ``GET /health``.

Per channel: ``POST <messages path>`` (``/channels/<id>/messages``, or
``<base_url_path>/messages`` for the top-level connector), ``GET <messages
path>/<message_id>`` (message status), ``GET /channels/<id>`` (settings and
status) and ``GET /channels/<id>/logs``; ``GET /channels/`` lists them.
Each request looks its channel up in the channel registry
(:class:`ChannelDirectory`), so a channel started, changed or stopped while
the process runs is served accordingly from the next request on.
Channels are set in the config file, so old Junebug's create, modify, delete
and restart answer 405. The routes come from the route table
(:mod:`junebug_api.http.routes`), which also renders as the OpenAPI document at
``openapi_path``; their handlers, the request timeout and turning every failure
(routing errors included) into one of :mod:`junebug_api.formats.api_errors`, answered
in Junebug's envelope, live here; what a message becomes is the channel's
business (:mod:`junebug_api.channels.channel`, :mod:`junebug_api.delivery.outbound`).
"""

from __future__ import annotations

import base64
import hmac
import json
from collections.abc import Callable, Mapping, Sequence
from http import HTTPStatus
from typing import Any, Protocol
from urllib.parse import urlsplit

import attrs
from klein import Klein
from twisted.internet.defer import CancelledError, Deferred, TimeoutError
from twisted.python.failure import Failure
from twisted.web.iweb import IRequest
from werkzeug.exceptions import HTTPException
from werkzeug.exceptions import MethodNotAllowed as WerkzeugMethodNotAllowed
from werkzeug.exceptions import NotFound as WerkzeugNotFound
from werkzeug.routing import RequestRedirect

from junebug_api.formats.api_errors import (
    ApiError,
    ApiUsageError,
    ChannelNotFound,
    ChannelsReadOnly,
    InternalError,
    MethodNotAllowed,
    NotFound,
    RequestTimedOut,
    ServiceUnavailable,
    Unauthorized,
    answer,
    answer_error,
    envelope,
)
from junebug_api.http.access import api_access
from junebug_api.http.klein_resource import KleinAppResource
from junebug_api.http.openapi import ServedDocument
from junebug_api.http.routes import DEFAULT_OPENAPI_PATH, Route, RouteTable, api_routes
from junebug_api.observe.log import logger
from junebug_api.observe.metrics import NO_METRICS, Metrics

log = logger(__name__)

HealthCheck = Callable[[], dict[str, Any]]


@attrs.frozen
class ApiCredentials:
    """What a request to the messages API must carry, if anything.

    Basic auth with ``username``/``password``, or ``Authorization: Token
    <token>``; either or both may be set. Secrets are compared in constant time.
    """

    username: str | None = None
    password: str | None = attrs.field(default=None, repr=False)
    token: str | None = attrs.field(default=None, repr=False)

    @property
    def required(self) -> bool:
        return self.token is not None or self.username is not None

    def allow(self, authorization: bytes | None) -> bool:
        """Whether an Authorization header value lets the request in."""
        if not self.required:
            return True
        if not authorization:
            return False
        scheme, _, value = authorization.strip().partition(b" ")
        scheme = scheme.lower()
        value = value.strip()
        if scheme == b"token" and self.token is not None:
            return hmac.compare_digest(value, self.token.encode("utf-8"))
        if scheme == b"basic" and self.username is not None:
            try:
                decoded = base64.b64decode(value, validate=True)
            except ValueError:
                return False
            user, sep, password = decoded.partition(b":")
            user_ok = hmac.compare_digest(user, self.username.encode("utf-8"))
            password_ok = hmac.compare_digest(password, (self.password or "").encode("utf-8"))
            return bool(sep) and user_ok and password_ok
        return False


class ApiChannel(Protocol):
    """What the API needs of a channel (:class:`junebug_api.channels.channel.Channel`)."""

    id: str
    credentials: ApiCredentials

    @property
    def messages_path(self) -> str: ...

    async def send(self, body: bytes) -> dict[str, Any]: ...

    async def message_status(self, message_id: str) -> dict[str, Any]: ...

    def info(self, amqp_health: dict[str, Any]) -> dict[str, Any]: ...

    def logs(self, n: int) -> list[dict[str, Any]]: ...


class ChannelDirectory(Protocol):
    """Where the API finds the channels running now, per request (the channel
    registry: channels start and stop while the process runs)."""

    def get(self, channel_id: str) -> ApiChannel | None: ...

    def channels(self) -> Sequence[ApiChannel]: ...


_READ_ONLY = "channels are set in the config file; junebug-api cannot {what} them over HTTP"


class JunebugApi:
    """The Klein app of one service instance; ``own_paths``: channel id ->
    messages path of the channels served at a path of their own (the
    top-level connector's ``<base_url_path>/messages``, fixed until a restart)."""

    def __init__(
        self,
        channels: ChannelDirectory,
        health: HealthCheck,
        request_timeout: float,
        clock: Any,
        amqp_health: HealthCheck | None = None,
        credentials: ApiCredentials | None = None,
        metrics: Metrics = NO_METRICS,
        metrics_path: str = "/metrics",
        metrics_auth: bool = False,
        openapi_path: str | None = DEFAULT_OPENAPI_PATH,
        own_paths: Mapping[str, str] | None = None,
    ) -> None:
        self._channels = channels
        self._credentials = credentials or ApiCredentials()
        self._metrics = metrics
        self._metrics_auth = metrics_auth
        self._health = health
        self._amqp_health = amqp_health or (lambda: health()["components"].get("amqp", {}))
        self._timeout = request_timeout
        self._clock = clock
        self.routes = RouteTable(
            api_routes(
                own_paths=own_paths,
                metrics_path=metrics_path if metrics.enabled else None,
                openapi_path=openapi_path,
            )
        )
        self._openapi = ServedDocument(self.routes.routes)
        self.app = app = Klein()
        for route in self.routes.routes:
            app.route(
                route.klein_path,
                methods=[route.method],
                strict_slashes=False,
                endpoint=route.operation_id,
            )(self._handler(route))
        channel_path = "/channels/<channel_id>"
        app.route("/channels/", methods=["POST"], strict_slashes=False)(self._read_only("create"))
        app.route(channel_path, methods=["POST", "PUT", "PATCH"], strict_slashes=False)(
            self._read_only("modify")
        )
        app.route(channel_path, methods=["DELETE"], strict_slashes=False)(self._read_only("delete"))
        app.route(f"{channel_path}/restart", methods=["POST"], strict_slashes=False)(
            self._read_only("restart")
        )

    def use_credentials(self, credentials: ApiCredentials) -> None:
        """The top-level credentials from now on (a reload changed them)."""
        self._credentials = credentials

    def resource(self) -> KleinAppResource:
        """The twisted.web resource that serves this API."""
        return KleinAppResource(self.app, self._error)

    # -- helpers ------------------------------------------------------------

    def _channel(self, channel_id: str) -> ApiChannel:
        channel = self._channels.get(channel_id)
        if channel is None:
            raise ChannelNotFound(f"channel {channel_id!r} not found")
        return channel

    def _handler(self, route: Route) -> Callable[..., Any]:
        """The method answering ``route``; for a channel's path of its own,
        with that channel's id."""
        method = getattr(self, route.handler)
        channel_id = route.channel
        if channel_id is None:
            return method

        def for_channel(request: IRequest, **arguments: Any) -> Any:
            return method(request, channel_id=channel_id, **arguments)

        return for_channel

    def _read_only(self, what: str) -> Callable[..., bytes]:
        def refuse(request: IRequest, channel_id: str | None = None) -> bytes:
            request.setHeader(b"Allow", self._allowed(request))
            error = ChannelsReadOnly(_READ_ONLY.format(what=what))
            return answer_error(request, error)

        refuse.__name__ = f"read_only_{what}"
        return refuse

    def _allowed(self, request: IRequest) -> bytes:
        """``Allow`` for a 405: the methods the route table serves the path with."""
        path = b"/" + b"/".join(request.postpath)
        return self.routes.allowed(path.decode("utf-8", "replace")).encode("ascii")

    @staticmethod
    def _refused(request: IRequest) -> bytes:
        request.setHeader(b"WWW-Authenticate", b'Basic realm="junebug-api"')
        error = Unauthorized("missing or wrong credentials")
        return answer_error(request, error)

    def _created(self, result: dict[str, Any], request: IRequest) -> bytes:
        self._metrics.outbound_request(HTTPStatus.CREATED.value)
        return _created(result, request)

    # -- routes ---------------------------------------------------------------

    def post_channel_message(self, request: IRequest, channel_id: str) -> Deferred[bytes] | bytes:
        return self._post(self._channel(channel_id), request)

    def _post(self, channel: ApiChannel, request: IRequest) -> Deferred[bytes] | bytes:
        if not channel.credentials.allow(request.getHeader(b"authorization")):
            self._metrics.outbound_request(HTTPStatus.UNAUTHORIZED.value)
            return self._refused(request)
        body = request.content.read()
        d = Deferred.fromCoroutine(channel.send(body))
        d.addTimeout(self._timeout, self._clock)
        d.addCallback(self._created, request)
        return d

    def get_message_status(
        self, request: IRequest, channel_id: str, message_id: str
    ) -> Deferred[bytes] | bytes:
        return self._status(self._channel(channel_id), request, message_id)

    def _status(
        self, channel: ApiChannel, request: IRequest, message_id: str
    ) -> Deferred[bytes] | bytes:
        if not channel.credentials.allow(request.getHeader(b"authorization")):
            return self._refused(request)
        d = Deferred.fromCoroutine(_cache_answer(channel.message_status(message_id)))
        d.addTimeout(self._timeout, self._clock)
        d.addCallback(_ok, request, "message status")
        return d

    def list_channels(self, request: IRequest) -> bytes:
        if not self._credentials.allow(request.getHeader(b"authorization")):
            return self._refused(request)
        return _ok(sorted(c.id for c in self._channels.channels()), request, "channels listed")

    def get_channel(self, request: IRequest, channel_id: str) -> bytes:
        channel = self._channel(channel_id)
        if not channel.credentials.allow(request.getHeader(b"authorization")):
            return self._refused(request)
        return _ok(channel.info(self._amqp_health()), request, "channel found")

    def get_logs(self, request: IRequest, channel_id: str) -> bytes:
        channel = self._channel(channel_id)
        if not channel.credentials.allow(request.getHeader(b"authorization")):
            return self._refused(request)
        values = request.args.get(b"n")
        n = None
        if values:
            try:
                n = int(values[0])
            except ValueError:
                n = -1
            if n < 0:
                raise ApiUsageError("n must be a whole number of log records, 0 or more")
        return _ok(channel.logs(n), request, "logs retrieved")

    def get_metrics(self, request: IRequest) -> bytes:
        """``metrics_path``: the Prometheus exposition (behind the API
        credentials when ``metrics_auth`` is set)."""
        if self._metrics_auth and not self._credentials.allow(request.getHeader(b"authorization")):
            return self._refused(request)
        body, content_type = self._metrics.render()
        request.setHeader(b"Content-Type", content_type.encode("ascii"))
        return body

    def get_openapi(self, request: IRequest) -> bytes:
        """``openapi_path``: the OpenAPI document of these routes, with the
        credentials the channels ask for now (never their values)."""
        access = api_access(
            (self._credentials.username, self._credentials.token),
            self._metrics_auth,
            {
                c.id: (c.credentials.username, c.credentials.token)
                for c in self._channels.channels()
            },
        )
        return answer(request, HTTPStatus.OK, self._openapi.json(access))

    def get_health(self, request: IRequest) -> bytes:
        health = self._health()
        status = HTTPStatus.OK if health["health"] == "ok" else HTTPStatus.SERVICE_UNAVAILABLE
        return answer(request, status, json.dumps(health).encode("utf-8"))

    def _error(self, request: IRequest, failure: Failure) -> bytes | Failure:
        """The envelope answering a failed request (routing errors included)."""
        if failure.check(ApiError):
            error = failure.value
        elif failure.check(WerkzeugNotFound):
            error = NotFound(f"no such resource: {request.path.decode('utf-8', 'replace')}")
        elif failure.check(WerkzeugMethodNotAllowed):
            request.setHeader(b"Allow", self._allowed(request))
            error = MethodNotAllowed(
                f"method {request.method.decode('ascii', 'replace')} is not allowed here"
            )
        elif failure.check(RequestRedirect):
            return _redirect(request, failure.value)
        elif failure.check(HTTPException):
            error = ApiUsageError(failure.value.description or "bad request")
        elif failure.check(TimeoutError):
            error = RequestTimedOut(f"request not handled within {self._timeout:g} s")
            log.error("Outbound request timed out after {timeout} s", timeout=self._timeout)
        elif failure.check(CancelledError):
            return failure  # the client went away; nothing to answer
        else:
            log.failure("Unexpected error handling a request", failure)
            error = InternalError("internal error")
        if request.method == b"POST" and not failure.check(HTTPException):
            # Not a routing error: the answer to a message POST.
            self._metrics.outbound_request(error.status.value)
        return answer_error(request, error)


def _redirect(request: IRequest, redirect: RequestRedirect) -> bytes:
    """werkzeug's answer to a path with repeated slashes: the same path with single ones.

    The URL map is bound without a host, so only the path of werkzeug's URL
    means anything; the request's query string is kept.
    """
    location = urlsplit(redirect.new_url).path.encode("ascii")
    query = request.uri.partition(b"?")[2]
    if query:
        location += b"?" + query
    request.setHeader(b"Location", location)
    status = HTTPStatus(redirect.code)
    return answer(
        request,
        status,
        envelope(status, "use the path with single slashes", {"location": location.decode()}),
    )


async def _cache_answer(status: Any) -> dict[str, Any]:
    """A message status, or 503 when the state cache cannot answer."""
    try:
        return await status
    except (CancelledError, ApiError):
        raise
    except Exception as e:
        log.error("State cache unavailable: {error}", error=e)
        raise ServiceUnavailable("state cache unavailable") from None


def _ok(result: Any, request: IRequest, description: str) -> bytes:
    return answer(request, HTTPStatus.OK, envelope(HTTPStatus.OK, description, result))


def _created(result: dict[str, Any], request: IRequest) -> bytes:
    return answer(
        request, HTTPStatus.CREATED, envelope(HTTPStatus.CREATED, "message submitted", result)
    )
