"""Every error the API answers, and Junebug's response envelope.

An :class:`ApiError` carries its HTTP status, the envelope's description and
its ``errors`` list; :func:`error_envelope` is its body and
:func:`answer_error` writes it as the answer to a request (status,
Content-Type, ``Retry-After`` when the error knows when to try again). Raised
by request parsing (:mod:`junebug_api.formats.junebug_formats`), the outbound path,
the routes (:mod:`junebug_api.http.api`) and the HTTP server under them
(:mod:`junebug_api.http.server`: too large, too slow); answered by the API
and, for a request that never reached it, by the server itself.
"""

from __future__ import annotations

from http import HTTPStatus
from typing import Any

from twisted.web.iweb import IRequest

from junebug_api.formats.json_bodies import JSON_CONTENT_TYPE, compact_json


class ApiError(Exception):
    """An error answered to the API client in the Junebug envelope."""

    status = HTTPStatus.BAD_REQUEST
    description = "api usage error"
    error_type = "ApiUsageError"

    def __init__(self, message: str, errors: list[dict] | None = None) -> None:
        super().__init__(message)
        self.errors = errors or [{"type": self.error_type, "message": message}]


class JsonDecodeError(ApiError):
    description = "json decode error"
    error_type = "JsonDecodeError"


class ApiUsageError(ApiError):
    pass


class MessageNotFound(ApiError):
    description = "message not found"
    error_type = "MessageNotFound"


class Unauthorized(ApiError):
    status = HTTPStatus.UNAUTHORIZED
    description = "unauthorized"
    error_type = "Unauthorized"


class InternalError(ApiError):
    status = HTTPStatus.INTERNAL_SERVER_ERROR
    description = "internal server error"
    error_type = "InternalError"


class ServiceUnavailable(ApiError):
    status = HTTPStatus.SERVICE_UNAVAILABLE
    description = "service unavailable"
    error_type = "ServiceUnavailable"
    # Seconds for a Retry-After header, when the service knows when to try again.
    retry_after: int | None = None


class RequestTimedOut(ApiError):
    # 503, not 504: the message was not sent, and the client may try again.
    status = HTTPStatus.SERVICE_UNAVAILABLE
    description = "service unavailable"
    error_type = "RequestTimeout"


class NotFound(ApiError):
    status = HTTPStatus.NOT_FOUND
    description = "not found"
    error_type = "NotFound"


class MethodNotAllowed(ApiError):
    status = HTTPStatus.METHOD_NOT_ALLOWED
    description = "method not allowed"
    error_type = "MethodNotAllowed"


class ChannelNotFound(ApiError):
    status = HTTPStatus.NOT_FOUND
    description = "channel not found"
    error_type = "ChannelNotFound"


class MessageTooLong(ApiError):
    description = "message too long"
    error_type = "MessageTooLong"


class ChannelsReadOnly(ApiError):
    """Old Junebug's channel create/modify/delete/restart: channels are set in
    the config file here."""

    status = HTTPStatus.METHOD_NOT_ALLOWED
    description = "method not allowed"
    error_type = "MethodNotAllowed"


class ChannelInConfigFile(ApiError):
    """The channel API cannot change, delete or restart a channel of the
    config file (the file would bring it back on the next start or reload)."""

    status = HTTPStatus.FORBIDDEN
    description = "channel in config file"
    error_type = "ChannelInConfigFile"


class RequestTooLarge(ApiError):
    status = HTTPStatus.REQUEST_ENTITY_TOO_LARGE
    description = "request too large"
    error_type = "RequestTooLarge"


class RequestReadTimeout(ApiError):
    status = HTTPStatus.REQUEST_TIMEOUT
    description = "request timeout"
    error_type = "RequestTimeout"


def envelope(status: HTTPStatus, description: str, result: Any) -> bytes:
    """Junebug's response envelope, as bytes."""
    return compact_json(
        {
            "status": status.value,
            "code": status.phrase,
            "description": description,
            "result": result,
        }
    )


def error_envelope(error: ApiError) -> bytes:
    """The envelope for an API error."""
    return envelope(error.status, error.description, {"errors": error.errors})


def answer_error(request: IRequest, error: ApiError) -> bytes:
    """Set the answer's status and headers for ``error``; its body."""
    retry_after = getattr(error, "retry_after", None)
    if retry_after is not None:
        request.setHeader(b"Retry-After", str(retry_after).encode("ascii"))
    return answer(request, error.status, error_envelope(error))


def answer(request: IRequest, status: HTTPStatus, body: bytes) -> bytes:
    """Set the answer's status and JSON Content-Type; ``body``."""
    request.setResponseCode(status.value)
    request.setHeader(b"Content-Type", JSON_CONTENT_TYPE)
    return body
