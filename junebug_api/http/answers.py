"""What the API answers: :class:`Answer`, and the answers many routes give.

A route in the table (:mod:`junebug_api.http.routes`) lists its answers; the
OpenAPI document (:mod:`junebug_api.http.openapi`) renders each with its
status, meaning, headers and body: the envelope's ``result`` for a success,
the error envelope of its :class:`ApiError` classes otherwise.
"""

from __future__ import annotations

from http import HTTPStatus

import attrs

from junebug_api.formats.api_errors import (
    ApiError,
    ApiUsageError,
    ChannelInConfigFile,
    ChannelNotFound,
    InternalError,
    JsonDecodeError,
    MessageNotFound,
    MessageTooLong,
    MethodNotAllowed,
    NotFound,
    RequestReadTimeout,
    RequestTimedOut,
    RequestTooLarge,
    ServiceUnavailable,
    Unauthorized,
)
from junebug_api.formats.junebug_formats import INVALID_BODY


@attrs.frozen
class Answer:
    """One answer a route can give: its status, what it means, and its body:
    the envelope's ``result`` (a schema name in :mod:`junebug_api.http.openapi`)
    for a success, or the :class:`ApiError` classes answered with it."""

    status: HTTPStatus
    description: str
    result: str | None = None
    #: The envelope's ``description`` of a success.
    said: str | None = None
    errors: tuple[type[ApiError], ...] = ()
    #: Error types besides the classes' own (``invalid_body`` of a schema error).
    error_types: tuple[str, ...] = ()
    #: Headers it carries, by name (``Retry-After``, ``WWW-Authenticate``, ...).
    headers: tuple[str, ...] = ()
    #: The Content-Type of a body that is not the JSON envelope.
    media_type: str | None = None
    #: Its name in the document's ``components.responses``, for an answer
    #: many routes give.
    name: str | None = None


TOO_SLOW = Answer(
    HTTPStatus.REQUEST_TIMEOUT,
    "The request (line, headers and body) did not arrive within http_read_timeout;"
    " the connection is closed after the answer.",
    errors=(RequestReadTimeout,),
    name="RequestTimeout",
)
TOO_LARGE = Answer(
    HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
    "The body is larger than max_request_size (said by Content-Length, or found while"
    " a chunked body arrives); the connection is closed after the answer.",
    errors=(RequestTooLarge,),
    name="RequestTooLarge",
)
INTERNAL = Answer(
    HTTPStatus.INTERNAL_SERVER_ERROR,
    "A bug: the request could not be handled (logged with its traceback).",
    errors=(InternalError,),
    name="InternalError",
)
#: What any request may get, whatever its route.
EVERY_ROUTE = (TOO_SLOW, TOO_LARGE, INTERNAL)

REPEATED_SLASHES = Answer(
    HTTPStatus.PERMANENT_REDIRECT,
    "The path has repeated slashes (an empty or slash-holding parameter): the same path"
    " with single slashes is in Location and in the envelope's result.",
    result="Redirect",
    said="use the path with single slashes",
    headers=("Location",),
    name="RepeatedSlashes",
)
PATH_NOT_UTF8 = Answer(
    HTTPStatus.BAD_REQUEST,
    "A path parameter is not UTF-8 once percent-decoded.",
    errors=(ApiUsageError,),
    name="PathNotUtf8",
)
NO_SUCH_PATH = Answer(
    HTTPStatus.NOT_FOUND,
    "A parameter holding an encoded slash made a path that is not served.",
    errors=(NotFound,),
    name="NoSuchPath",
)
NO_SUCH_CHANNEL = Answer(
    HTTPStatus.NOT_FOUND,
    "No channel has this id (or, for a parameter holding an encoded slash, no such path).",
    errors=(ChannelNotFound, NotFound),
    name="ChannelNotFound",
)
CACHE_DOWN = Answer(
    HTTPStatus.SERVICE_UNAVAILABLE,
    "The state cache (Redis) cannot answer, or the request was not handled within"
    " request_timeout: try again later.",
    errors=(ServiceUnavailable, RequestTimedOut),
    name="StateCacheUnavailable",
)
NOT_SENT = Answer(
    HTTPStatus.SERVICE_UNAVAILABLE,
    "The message was not sent: the broker is unreachable, refuses publishing (flow"
    " control, with Retry-After in seconds when it says when to try again) or did not"
    " confirm it within request_timeout, or the state cache cannot store what the"
    " message needs. RapidPro retries.",
    errors=(ServiceUnavailable, RequestTimedOut),
    headers=("Retry-After",),
    name="MessageNotSent",
)
BAD_MESSAGE = Answer(
    HTTPStatus.BAD_REQUEST,
    "The body is not JSON (JsonDecodeError), breaks the schema (one invalid_body error"
    " per problem, with its schema_path), has neither to nor reply_to, has no from when"
    " not replying and the channel has no default_from_addr, or an event_url that is not"
    " http(s) (ApiUsageError); reply_to names no inbound message of this channel"
    " (MessageNotFound); the content is longer than the channel's character_limit"
    " (MessageTooLong).",
    errors=(JsonDecodeError, ApiUsageError, MessageNotFound, MessageTooLong),
    error_types=(INVALID_BODY,),
    name="BadMessage",
)

UNAUTHORIZED = Answer(
    HTTPStatus.UNAUTHORIZED,
    "Missing or wrong credentials: nothing was done.",
    errors=(Unauthorized,),
    headers=("WWW-Authenticate",),
    name="Unauthorized",
)
"""Added to a route's answers when it asks for credentials (it depends on the config)."""

NOT_ALLOWED = Answer(
    HTTPStatus.METHOD_NOT_ALLOWED,
    "The path is served, but not with this method: Allow lists those it is served with.",
    errors=(MethodNotAllowed,),
    headers=("Allow",),
    name="MethodNotAllowed",
)
"""What a path answers a method it is not served with."""

BAD_CHANNEL = Answer(
    HTTPStatus.BAD_REQUEST,
    "The body is not JSON (JsonDecodeError), breaks the schema (one invalid_body error per"
    " problem, with its schema_path), or gives settings a channels: entry could not have:"
    " a URL that is not usable, a pair given alone, a connector name another channel has"
    " (one invalid_body error naming the key).",
    errors=(JsonDecodeError, ApiUsageError),
    error_types=(INVALID_BODY,),
    name="BadChannel",
)
CONFIG_CHANNEL = Answer(
    HTTPStatus.FORBIDDEN,
    "The channel is set in the config file: the API cannot change, delete or restart it.",
    errors=(ChannelInConfigFile,),
    name="ChannelInConfigFile",
)
STORE_DOWN = Answer(
    HTTPStatus.SERVICE_UNAVAILABLE,
    "The channel store (Redis, or channel_api_file) cannot be read or written, or the"
    " request was not handled within request_timeout: try again (a change that timed out"
    " may have been made).",
    errors=(ServiceUnavailable, RequestTimedOut),
    name="ChannelStoreUnavailable",
)
