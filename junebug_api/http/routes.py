"""The route table: every route the HTTP API serves, as data.

One :class:`Route` per method and path: its operation (the :class:`JunebugApi`
method that answers it), whose credentials it asks for, its request body
schema, query parameters and every answer it can give. :mod:`junebug_api.http.api`
builds its Klein routes from :func:`api_routes`, and :mod:`junebug_api.http.openapi`
renders the same table as the OpenAPI document, so the two cannot drift apart.

Which routes there are depends on the config: the top-level connector's
``<base_url_path>/messages`` (a path of its own), ``metrics_path`` while
metrics are on, ``openapi_path`` unless it is turned off. Answers every route
can give (408, 413, 500) and those of a path with parameters (308 to single
slashes, 400 for a parameter that is not UTF-8, 404) are added here too; 401
is the renderer's, because it depends on the credentials configured
(:mod:`junebug_api.http.access`).
"""

from __future__ import annotations

import enum
import re
from collections.abc import Iterable, Mapping
from http import HTTPStatus
from typing import Any

import attrs
from werkzeug.routing import Map, Rule

from junebug_api.config.channels import CHANNEL_ID
from junebug_api.formats.api_errors import ApiUsageError
from junebug_api.http.answers import (
    BAD_CHANNEL,
    BAD_MESSAGE,
    CACHE_DOWN,
    CONFIG_CHANNEL,
    EVERY_ROUTE,
    NO_SUCH_CHANNEL,
    NO_SUCH_PATH,
    NOT_SENT,
    PATH_NOT_UTF8,
    REPEATED_SLASHES,
    STORE_DOWN,
    Answer,
)

DEFAULT_OPENAPI_PATH = "/openapi.json"


class Auth(enum.Enum):
    """Whose credentials a route asks for."""

    OPEN = "open"  # nobody's: /health, the OpenAPI document
    CHANNEL = "channel"  # the channel's own (the top-level ones unless it sets its own)
    API = "api"  # the top-level api_auth_* (GET /channels/ lists every channel)
    METRICS = "metrics"  # the top-level ones with metrics_auth, else nobody's
    ADMIN = "admin"  # admin_* only: the channel API (admin ones also open every read route)


@attrs.frozen
class Parameter:
    """A path or query parameter: its name, JSON schema, meaning and an example."""

    name: str
    schema: Mapping[str, Any]
    description: str
    example: Any = None


#: The path parameters, by name.
PATH_PARAMETERS = {
    "channel_id": Parameter(
        "channel_id",
        {"type": "string", "pattern": CHANNEL_ID.pattern},
        "The channel's id: its key under channels: in the config (or the top-level"
        " connector_name).",
        "sms-za",
    ),
    "message_id": Parameter(
        "message_id",
        # twisted.web decodes %2F before routing: a slash cannot be in it.
        {"type": "string", "pattern": "^[^/]+$"},
        "The message_id answered when the message was sent.",
        "8b9c6a3e1f2d4e5c9a7b6c5d4e3f2a1b",
    ),
}


@attrs.frozen
class Route:
    """One method on one path, as served and as documented."""

    method: str
    #: The path as OpenAPI writes it: ``/channels/{channel_id}/messages``.
    path: str
    #: The operationId, also the Klein endpoint's name (each must be unique).
    operation_id: str
    #: The :class:`~junebug_api.http.api.JunebugApi` method that answers.
    handler: str
    auth: Auth
    tag: str
    summary: str
    description: str
    answers: tuple[Answer, ...]
    #: The name of the request body's schema in the document (``OutboundMessage``:
    #: :data:`~junebug_api.formats.junebug_formats.OUTBOUND_SCHEMA`).
    request_body: str | None = None
    query: tuple[Parameter, ...] = ()
    #: For a channel's path of its own (the top-level connector's): its id,
    #: given to the handler as ``channel_id``.
    channel: str | None = None

    @property
    def parameters(self) -> list[str]:
        """The path parameters, in order."""
        return re.findall(r"\{(\w+)\}", self.path)

    @property
    def klein_path(self) -> str:
        """The path as werkzeug writes it: ``/channels/<channel_id>/messages``."""
        return re.sub(r"\{(\w+)\}", r"<\1>", self.path)


def _messages_routes(prefix: str, suffix: str, channel: str | None) -> list[Route]:
    """POST a message and GET its status, at ``prefix`` + ``/messages``."""
    not_found = () if channel is not None else (NO_SUCH_CHANNEL,)
    whose = "this connector" if channel is not None else "the channel"
    return [
        Route(
            "POST",
            f"{prefix}/messages",
            f"send{suffix}_message",
            "post_channel_message",
            Auth.CHANNEL,
            "messages",
            f"Send a message through {whose}",
            "Publishes the message to the connector's `.outbound` queue and answers once the"
            " broker confirmed it. A message with `reply_to` answers that inbound message"
            " (same session, to its sender). With `event_url`, the message's events (ack,"
            " nack, delivery reports) are POSTed there, else to the channel's"
            " default_event_url. The path may end with a slash, as old Junebug's did.",
            (
                Answer(
                    HTTPStatus.CREATED,
                    "Published and confirmed by the broker.",
                    "Message",
                    "message submitted",
                ),
                BAD_MESSAGE,
                *not_found,
                NOT_SENT,
            ),
            request_body="OutboundMessage",
            channel=channel,
        ),
        Route(
            "GET",
            f"{prefix}/messages/{{message_id}}",
            f"get{suffix}_message_status",
            "get_message_status",
            Auth.CHANNEL,
            "messages",
            "A message's status: its events so far",
            "Old Junebug's message status: every event of an outbound message kept for"
            " outbound_message_ttl seconds, sorted by time, and the last one's type and"
            " time. An unknown or expired message id answers 200 with nulls and no events.",
            (
                Answer(
                    HTTPStatus.OK,
                    "The message's events (none if unknown).",
                    "MessageStatus",
                    "message status",
                ),
                *not_found,
                CACHE_DOWN,
            ),
            channel=channel,
        ),
    ]


LOG_COUNT = Parameter(
    "n",
    {"type": "integer", "minimum": 0},
    "How many of the newest records (default and at most: max_logs).",
    10,
)


def _channel_routes() -> list[Route]:
    """Old Junebug's channel routes: list, settings and status, logs."""
    return [
        Route(
            "GET",
            "/channels/",
            "list_channels",
            "list_channels",
            Auth.API,
            "channels",
            "List the channels",
            "The ids of every channel this process serves, sorted (the top-level connector"
            " is one, under its connector name). Asks for the top-level credentials.",
            (Answer(HTTPStatus.OK, "The channel ids.", "ChannelIds", "channels listed"),),
        ),
        Route(
            "GET",
            "/channels/{channel_id}",
            "get_channel",
            "get_channel",
            Auth.CHANNEL,
            "channels",
            "A channel's settings and status",
            "Its settings without any secret (URL credentials masked), and its status:"
            " the health of its connection and deliveries and old Junebug's seven rates"
            " over the last metric_window seconds.",
            (Answer(HTTPStatus.OK, "The channel.", "Channel", "channel found"), NO_SUCH_CHANNEL),
        ),
        Route(
            "GET",
            "/channels/{channel_id}/logs",
            "get_channel_logs",
            "get_logs",
            Auth.CHANNEL,
            "channels",
            "A channel's newest log records",
            "The last log records about the channel kept by this process (retries,"
            " dead-lettering, undelivered messages), newest first, in old Junebug's shape.",
            (
                Answer(
                    HTTPStatus.OK,
                    "The newest records, newest first.",
                    "LogRecords",
                    "logs retrieved",
                ),
                Answer(
                    HTTPStatus.BAD_REQUEST,
                    "n is not a whole number from 0 up.",
                    errors=(ApiUsageError,),
                ),
                NO_SUCH_CHANNEL,
            ),
            query=(LOG_COUNT,),
        ),
    ]


def _management_route(
    method: str, path: str, name: str, summary: str, description: str, *answers: Answer
) -> Route:
    return Route(
        method,
        path,
        name,
        name,
        Auth.ADMIN,
        "channel management",
        summary,
        description + " Asks for the admin credentials (admin_auth_token or"
        " admin_username/admin_password), never a channel's own.",
        answers,
        request_body=_BODIES.get(name),
    )


_BODIES = {"create_channel": "NewChannel", "modify_channel": "ChannelChanges"}

_BY_ID = (CONFIG_CHANNEL, NO_SUCH_CHANNEL, STORE_DOWN)


def _management_routes() -> list[Route]:
    """Old Junebug's create, modify, delete and restart (with ``channel_api``)."""
    return [
        _management_route(
            "POST",
            "/channels/",
            "create_channel",
            "Create a channel",
            "A new channel under a new id (a UUID), kept in the channel store (Redis or"
            " channel_api_file) and served at once by this process, within seconds by"
            " every other one on the same store. type and config are required (kept and"
            " shown: junebug-api runs no transport); any other key a channels: entry"
            " takes may be given. Its queues are named after its id unless it sets"
            " connector_name.",
            Answer(HTTPStatus.CREATED, "The channel created.", "Channel", "channel created"),
            BAD_CHANNEL,
            STORE_DOWN,
        ),
        _management_route(
            "POST",
            "/channels/{channel_id}",
            "modify_channel",
            "Change a channel",
            "Changes the keys given (null unsets one); the others stay. Applies from the"
            " next message on.",
            Answer(HTTPStatus.OK, "The channel changed.", "Channel", "channel updated"),
            BAD_CHANNEL,
            *_BY_ID,
        ),
        _management_route(
            "DELETE",
            "/channels/{channel_id}",
            "delete_channel",
            "Delete a channel",
            "Stops serving it: its routes answer 404, its consumers stop, messages in"
            " work finish or go back to their queue. Its queues and their messages are kept.",
            Answer(HTTPStatus.OK, "The channel is deleted.", "Empty", "channel deleted"),
            *_BY_ID,
        ),
        _management_route(
            "POST",
            "/channels/{channel_id}/restart",
            "restart_channel",
            "Restart a channel",
            "Stops and starts it with its stored settings (its consumers and queue monitor anew).",
            Answer(HTTPStatus.OK, "The channel restarted.", "Empty", "channel restarted"),
            *_BY_ID,
        ),
    ]


def _health_route() -> Route:
    return Route(
        "GET",
        "/health",
        "get_health",
        "get_health",
        Auth.OPEN,
        "operations",
        "Whether the process works",
        "For load balancers and orchestrators: 200 while the AMQP connections (and the"
        " state cache, if Redis) work, 503 otherwise; the components' details and each"
        " channel's health in either case (a degraded channel does not make the process"
        " down). Never shows a secret. Not in the envelope.",
        (
            Answer(HTTPStatus.OK, "Every component works.", "Health"),
            Answer(HTTPStatus.SERVICE_UNAVAILABLE, "A component is down.", "Health"),
        ),
    )


def _metrics_route(path: str) -> Route:
    return Route(
        "GET",
        path,
        "get_metrics",
        "get_metrics",
        Auth.METRICS,
        "operations",
        "Prometheus metrics",
        "The Prometheus text exposition of this process's metrics (messages, deliveries,"
        " queues, connections, per channel where it applies). Asks for the top-level"
        " credentials when metrics_auth is set.",
        (
            Answer(
                HTTPStatus.OK,
                "The exposition.",
                "Metrics",
                media_type="text/plain",
            ),
        ),
    )


def _openapi_route(path: str) -> Route:
    return Route(
        "GET",
        path,
        "get_openapi",
        "get_openapi",
        Auth.OPEN,
        "operations",
        "This document",
        "The OpenAPI document of the routes this process serves with its config, and of"
        " the credentials it asks for (never their values). `junebug-api-openapi --config"
        " FILE` prints the same without starting the service.",
        (Answer(HTTPStatus.OK, "The OpenAPI document.", "OpenApiDocument"),),
    )


def _with_common_answers(route: Route) -> Route:
    """``route`` with the answers of its path's parameters and of every route."""
    extra: list[Answer] = []
    if route.parameters:
        extra += [REPEATED_SLASHES, PATH_NOT_UTF8]
    if not any(a.status == HTTPStatus.NOT_FOUND for a in route.answers) and route.parameters:
        extra.append(NO_SUCH_PATH)
    return attrs.evolve(route, answers=(*route.answers, *extra, *EVERY_ROUTE))


def api_routes(
    *,
    own_paths: Mapping[str, str] | None = None,
    metrics_path: str | None = None,
    openapi_path: str | None = DEFAULT_OPENAPI_PATH,
    channel_api: bool = False,
) -> list[Route]:
    """Every route served, in the document's order.

    ``own_paths``: channel id -> messages path, for each channel whose
    messages path is not ``/channels/<id>/messages`` (the top-level
    connector's ``<base_url_path>/messages``). ``metrics_path``: None while
    metrics are off; ``openapi_path``: None when turned off; ``channel_api``:
    whether the channel management routes are served.
    """
    own = sorted((own_paths or {}).items())
    routes: list[Route] = []
    for channel_id, path in own:
        suffix = f"_{_identifier(channel_id)}" if len(own) > 1 else ""
        routes += _messages_routes(path.removesuffix("/messages"), suffix, channel_id)
    routes += _messages_routes("/channels/{channel_id}", "_channel", None)
    routes += _channel_routes()
    if channel_api:
        routes += _management_routes()
    routes.append(_health_route())
    if metrics_path:
        routes.append(_metrics_route(metrics_path))
    if openapi_path:
        routes.append(_openapi_route(openapi_path))
    return [_with_common_answers(r) for r in routes]


def own_paths(channels: Iterable[tuple[str, str]]) -> dict[str, str]:
    """Of ``(channel id, messages path)`` pairs, those served at a path of
    their own rather than ``/channels/<id>/messages``."""
    return {cid: path for cid, path in channels if path != f"/channels/{cid}/messages"}


def _identifier(text: str) -> str:
    return re.sub(r"\W", "_", text)


class RouteTable:
    """The routes served, and which methods a path allows (for ``Allow``)."""

    def __init__(self, routes: Iterable[Route]) -> None:
        self.routes = tuple(routes)
        self._map = Map(
            [Rule(r.klein_path, methods=[r.method], strict_slashes=False) for r in self.routes]
        )

    def allowed(self, path: str) -> str:
        """The ``Allow`` value for ``path``: the methods served there (HEAD with GET)."""
        methods = self._map.bind("").allowed_methods(path)
        return ", ".join(sorted(methods))


def openapi_path_of(config: Any) -> str | None:
    """``openapi_path`` of a config: None when turned off (``false``)."""
    path = config.openapi_path
    return path if isinstance(path, str) and path else None
