"""The HTTP API (Klein): ``POST <base_url_path>/messages`` and ``GET /health``.

Routes, the request timeout and turning every error into Junebug's envelope
live here; what a message becomes is :mod:`junebug_api.outbound`'s business.
"""

from __future__ import annotations

import base64
import hmac
import json
from collections.abc import Callable
from http import HTTPStatus
from typing import Any
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

from .junebug_formats import (
    JSON_CONTENT_TYPE,
    ApiError,
    ApiUsageError,
    InternalError,
    MethodNotAllowed,
    NotFound,
    RequestTimedOut,
    Unauthorized,
    envelope,
    error_envelope,
)
from .klein_resource import KleinAppResource
from .log import logger
from .metrics import NO_METRICS, Metrics
from .outbound import OutboundSender

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


class JunebugApi:
    """The Klein app of one service instance."""

    def __init__(
        self,
        sender: OutboundSender,
        health: HealthCheck,
        messages_path: str,
        request_timeout: float,
        clock: Any,
        credentials: ApiCredentials | None = None,
        metrics: Metrics = NO_METRICS,
        metrics_path: str = "/metrics",
        metrics_auth: bool = False,
    ) -> None:
        self._credentials = credentials or ApiCredentials()
        self._metrics = metrics
        self._metrics_auth = metrics_auth
        self._sender = sender
        self._health = health
        self._timeout = request_timeout
        self._clock = clock
        self.app = Klein()
        for path in (messages_path, messages_path + "/"):
            self.app.route(path, methods=["POST"], strict_slashes=False)(self.post_message)
        self.app.route("/health", methods=["GET"], strict_slashes=False)(self.get_health)
        if metrics.enabled:
            self.app.route(metrics_path, methods=["GET"], strict_slashes=False)(self.get_metrics)

    def resource(self) -> KleinAppResource:
        """The twisted.web resource that serves this API."""
        return KleinAppResource(self.app, self._error)

    def post_message(self, request: IRequest) -> Deferred[bytes] | bytes:
        if not self._credentials.allow(request.getHeader(b"authorization")):
            request.setHeader(b"WWW-Authenticate", b'Basic realm="junebug-api"')
            error = Unauthorized("missing or wrong credentials")
            self._metrics.outbound_request(error.status.value)
            return _answer(request, error.status, error_envelope(error))
        body = request.content.read()
        d = Deferred.fromCoroutine(self._sender.send(body))
        d.addTimeout(self._timeout, self._clock)
        d.addCallback(self._created, request)
        return d

    def _created(self, result: dict[str, Any], request: IRequest) -> bytes:
        self._metrics.outbound_request(HTTPStatus.CREATED.value)
        return _created(result, request)

    def get_metrics(self, request: IRequest) -> bytes:
        """``metrics_path``: the Prometheus exposition (behind the API
        credentials when ``metrics_auth`` is set)."""
        if self._metrics_auth and not self._credentials.allow(request.getHeader(b"authorization")):
            request.setHeader(b"WWW-Authenticate", b'Basic realm="junebug-api"')
            error = Unauthorized("missing or wrong credentials")
            return _answer(request, error.status, error_envelope(error))
        body, content_type = self._metrics.render()
        request.setHeader(b"Content-Type", content_type.encode("ascii"))
        return body

    def get_health(self, request: IRequest) -> bytes:
        health = self._health()
        status = HTTPStatus.OK if health["health"] == "ok" else HTTPStatus.SERVICE_UNAVAILABLE
        return _answer(request, status, json.dumps(health).encode("utf-8"))

    def _error(self, request: IRequest, failure: Failure) -> bytes | Failure:
        """The envelope answering a failed request (routing errors included)."""
        if failure.check(ApiError):
            error = failure.value
            retry_after = getattr(error, "retry_after", None)
            if retry_after is not None:
                request.setHeader(b"Retry-After", str(retry_after).encode("ascii"))
        elif failure.check(WerkzeugNotFound):
            error = NotFound(f"no such resource: {request.path.decode('utf-8', 'replace')}")
        elif failure.check(WerkzeugMethodNotAllowed):
            allowed = failure.value.valid_methods or []
            request.setHeader(b"Allow", ", ".join(sorted(allowed)).encode("ascii"))
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
        return _answer(request, error.status, error_envelope(error))


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
    return _answer(
        request,
        status,
        envelope(status, "use the path with single slashes", {"location": location.decode()}),
    )


def _created(result: dict[str, Any], request: IRequest) -> bytes:
    return _answer(
        request, HTTPStatus.CREATED, envelope(HTTPStatus.CREATED, "message submitted", result)
    )


def _answer(request: IRequest, status: HTTPStatus, body: bytes) -> bytes:
    request.setResponseCode(status.value)
    request.setHeader(b"Content-Type", JSON_CONTENT_TYPE)
    return body
