"""The OpenAPI 3.1 document of exactly what this process serves.

Rendered from the route table (:mod:`junebug_api.http.routes`) that the
Klein app is built from, and from who gets in where (:class:`ApiAccess`,
from the credentials configured: which schemes, never a value). Served at
``openapi_path`` by :class:`junebug_api.http.api.JunebugApi` and printed by
``junebug-api-openapi`` (:func:`document_for_config`) without starting
anything. Error bodies are built from the :class:`ApiError` classes each
route answers, their examples by those classes themselves.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Iterable
from http import HTTPStatus
from typing import Any

import junebug_api
from junebug_api.config.channels import resolve_channels
from junebug_api.formats.api_errors import ApiError, envelope, error_envelope
from junebug_api.formats.json_bodies import compact_json
from junebug_api.formats.junebug_formats import parse_outbound_request
from junebug_api.http.access import Access, ApiAccess, api_access
from junebug_api.http.answers import NOT_ALLOWED, UNAUTHORIZED, Answer
from junebug_api.http.openapi_schemas import BARE, BODY_EXAMPLES, EXAMPLES, MESSAGE_ID, SCHEMAS
from junebug_api.http.routes import (
    PATH_PARAMETERS,
    Parameter,
    Route,
    api_routes,
    openapi_path_of,
    own_paths,
)

OPENAPI_VERSION = "3.1.0"
JSON = "application/json"

SECURITY_SCHEMES = {
    "basic": {
        "type": "http",
        "scheme": "basic",
        "description": "HTTP Basic with api_auth_username and api_auth_password (a channel's"
        " own, if it sets them): what RapidPro's Junebug channel sends. The channel"
        " management routes ask for admin_username and admin_password instead, which"
        " also open every read route.",
    },
    "token": {
        "type": "apiKey",
        "in": "header",
        "name": "Authorization",
        "description": "`Authorization: Token <api_auth_token>` (a channel's own, if it sets"
        " one). The channel management routes ask for `Token <admin_auth_token>` instead,"
        " which also opens every read route.",
    },
}

HEADERS = {
    "Retry-After": {
        "description": "Seconds to wait before trying again, when the broker said so.",
        "required": False,
        "schema": {"type": "integer", "minimum": 0},
    },
    "WWW-Authenticate": {
        "description": "The scheme to authenticate with.",
        "required": True,
        "schema": {"type": "string", "examples": ['Basic realm="junebug-api"']},
    },
    "Location": {
        "description": "The path with single slashes (and the query string, if any).",
        "required": True,
        "schema": {"type": "string"},
    },
    "Allow": {
        "description": "The methods this path serves.",
        "required": True,
        "schema": {"type": "string", "examples": ["GET, HEAD"]},
    },
}

#: The message of each error's example, by the error's class name.
SAMPLE_MESSAGES: dict[str, str] = {
    "JsonDecodeError": "Expecting value: line 1 column 1 (char 0)",
    "ApiUsageError": 'Either "to" or "reply_to" must be specified',
    "MessageNotFound": f"Inbound message with id {MESSAGE_ID} not found",
    "MessageTooLong": "message content is longer than 160 characters",
    "Unauthorized": "missing or wrong credentials",
    "ChannelNotFound": "channel 'sms-za' not found",
    "NotFound": "no such resource: /channels/sms-za/messages/a/b",
    "MethodNotAllowed": "method PUT is not allowed here",
    "RequestReadTimeout": "the request did not arrive in time",
    "RequestTooLarge": "the body is larger than 1048576 bytes",
    "ServiceUnavailable": "message not sent: the broker refuses publishing (flow control)",
    "RequestTimedOut": "request not handled within 240 s",
    "InternalError": "internal error",
    "ChannelInConfigFile": "channel 'sms-za' is set in the config file: change it there"
    " (and reload), not over the API",
}

DESCRIPTION = """\
The Junebug HTTP message API between RapidPro and vumi/vumi2 transports,
as this process serves it with its config.

Every answer but `/health`, the metrics and this document is Junebug's
envelope: `{"status": <HTTP status>, "code": <its phrase>, "description":
<what happened>, "result": <the answer>}`; an error's result is `{"errors":
[{"type": ..., "message": ...}, ...]}`.

Every path is also answered with a trailing slash, and every GET also as
HEAD. A path with repeated slashes is answered 308 with the path with single
slashes. A method a path is not served with is answered 405 with `Allow`
(components/responses/MethodNotAllowed). Any request may be answered 408
(too slow), 413 (too large) or 500 (a bug).
"""

TAGS = [
    {"name": "messages", "description": "Sending messages and reading their status."},
    {"name": "channels", "description": "Old Junebug's channel routes."},
    {
        "name": "channel management",
        "description": "Old Junebug's create, modify, delete and restart (channel_api).",
    },
    {"name": "operations", "description": "Health, metrics and this document."},
]


def document_for_config(config: Any) -> dict[str, Any]:
    """The document of what ``twistd junebug-api`` serves with ``config``,
    built as the service builds its routes (see service.py and api.py)."""
    channels = resolve_channels(config)
    routes = api_routes(
        own_paths=own_paths((c.id, c.messages_path) for c in channels),
        metrics_path=config.metrics_path if config.metrics_enabled else None,
        openapi_path=openapi_path_of(config),
        channel_api=config.channel_api,
    )
    access = api_access(
        (config.api_auth_username, config.api_auth_token),
        config.metrics_auth,
        {c.id: (c.api_auth_username, c.api_auth_token) for c in channels},
        admin=(config.admin_username, config.admin_auth_token),
    )
    return openapi_document(routes, access)


class ServedDocument:
    """The document a process serves: rendered again only when who gets in
    where has changed (a reload, a channel with credentials of its own)."""

    def __init__(self, routes: Iterable[Route]) -> None:
        self._routes = tuple(routes)
        self._last: tuple[ApiAccess, bytes] | None = None

    def json(self, access: ApiAccess) -> bytes:
        """The document for ``access``, as compact JSON."""
        if self._last is None or self._last[0] != access:
            self._last = (access, compact_json(openapi_document(self._routes, access)))
        return self._last[1]


def openapi_document(routes: Iterable[Route], access: ApiAccess) -> dict[str, Any]:
    """The OpenAPI document of ``routes``, with ``access``'s security (a new
    object each time: the caller may change it)."""
    routes = tuple(routes)
    paths: dict[str, dict[str, Any]] = {}
    schemes: set[str] = set()
    shared: dict[str, Any] = {"MethodNotAllowed": _response(NOT_ALLOWED)}
    for route in routes:
        allowed = access.of(route)
        schemes |= allowed.schemes
        item = paths.setdefault(route.path, _path_item(route))
        item[route.method.lower()] = _operation(route, allowed, shared)
    for item in paths.values():
        item["description"] = _not_allowed_text(item)
    return copy.deepcopy(
        {
            "openapi": OPENAPI_VERSION,
            "info": {
                "title": "junebug-api",
                "version": junebug_api.__version__,
                "description": DESCRIPTION,
            },
            "tags": [tag for tag in TAGS if tag["name"] in {r.tag for r in routes}],
            "paths": paths,
            "components": {
                "schemas": SCHEMAS,
                "securitySchemes": {name: SECURITY_SCHEMES[name] for name in sorted(schemes)},
                "headers": HEADERS,
                "responses": dict(sorted(shared.items())),
            },
        }
    )


def _path_item(route: Route) -> dict[str, Any]:
    item: dict[str, Any] = {}
    if route.parameters:
        item["parameters"] = [_parameter(PATH_PARAMETERS[p], "path") for p in route.parameters]
    return item


def _not_allowed_text(item: dict[str, Any]) -> str:
    """The path's 405: which methods ``Allow`` lists."""
    methods = {m.upper() for m in item if m in ("get", "post", "put", "patch", "delete")}
    if "GET" in methods:
        methods.add("HEAD")
    allow = ", ".join(sorted(methods))
    return (
        f"Served with {allow}; any other method is answered 405 MethodNotAllowed"
        f" with `Allow: {allow}`."
    )


def _parameter(parameter: Parameter, where: str) -> dict[str, Any]:
    rendered: dict[str, Any] = {
        "name": parameter.name,
        "in": where,
        "required": where == "path",
        "description": parameter.description,
        "schema": dict(parameter.schema),
    }
    if parameter.example is not None:
        rendered["example"] = parameter.example
    return rendered


def _operation(route: Route, access: Access, shared: dict[str, Any]) -> dict[str, Any]:
    """The operation of ``route``; answers many routes give go into ``shared``
    (``components.responses``) and are referred to."""
    operation: dict[str, Any] = {
        "operationId": route.operation_id,
        "tags": [route.tag],
        "summary": route.summary,
        "description": route.description,
    }
    if route.query:
        operation["parameters"] = [_parameter(q, "query") for q in route.query]
    if route.request_body is not None:
        operation["requestBody"] = {
            "required": True,
            "description": "JSON, whatever the Content-Type says.",
            "content": {
                JSON: {
                    "schema": {"$ref": f"#/components/schemas/{route.request_body}"},
                    "examples": BODY_EXAMPLES[route.request_body],
                }
            },
        }
    answers = list(route.answers)
    if access.schemes:
        answers.append(UNAUTHORIZED)
        operation["security"] = [{name: []} for name in sorted(access.schemes)]
        if access.open:
            operation["security"].append({})
    operation["responses"] = {
        str(status.value): _shared_response(same, shared)
        for status, same in sorted(_by_status(answers).items())
    }
    return operation


def _shared_response(answers: list[Answer], shared: dict[str, Any]) -> dict[str, Any]:
    if len(answers) > 1 or answers[0].name is None:
        return _response(*answers)
    name = answers[0].name
    shared.setdefault(name, _response(answers[0]))
    return {"$ref": f"#/components/responses/{name}"}


def _by_status(answers: Iterable[Answer]) -> dict[HTTPStatus, list[Answer]]:
    grouped: dict[HTTPStatus, list[Answer]] = {}
    for answer in answers:
        grouped.setdefault(answer.status, []).append(answer)
    return grouped


def _response(*answers: Answer) -> dict[str, Any]:
    """One status's response: the answers of that status, merged."""
    first = answers[0]
    response: dict[str, Any] = {"description": " ".join(a.description for a in answers)}
    headers = sorted({h for a in answers for h in a.headers})
    if headers:
        response["headers"] = {h: {"$ref": f"#/components/headers/{h}"} for h in headers}
    errors = tuple(dict.fromkeys(e for a in answers for e in a.errors))
    if errors:
        types = tuple(t for a in answers for t in a.error_types)
        response["content"] = {
            JSON: {
                "schema": _error_schema(first.status, errors, types),
                "examples": _error_examples(errors, types),
            }
        }
    elif first.result in BARE:
        response["content"] = {
            first.media_type or JSON: {
                "schema": {"$ref": f"#/components/schemas/{first.result}"},
                **_example(first.result, first.status),
            }
        }
    elif first.result is not None:
        response["content"] = {JSON: _success(first)}
    return response


def _example(name: str, status: HTTPStatus) -> dict[str, Any]:
    """The example of schema ``name`` as answered with ``status`` (``"Health 503"``),
    else its one example."""
    example = EXAMPLES.get(f"{name} {status.value}", EXAMPLES.get(name))
    return {} if example is None else {"example": example}


def _envelope_schema(status: HTTPStatus, description: Any, result: Any) -> dict[str, Any]:
    return {
        "type": "object",
        "required": ["status", "code", "description", "result"],
        "properties": {
            "status": {"type": "integer", "const": status.value},
            "code": {"type": "string", "const": status.phrase},
            "description": {"type": "string", **description},
            "result": result,
        },
    }


def _success(answer: Answer) -> dict[str, Any]:
    said = {"const": answer.said} if answer.said is not None else {}
    content: dict[str, Any] = {
        "schema": _envelope_schema(
            answer.status, said, {"$ref": f"#/components/schemas/{answer.result}"}
        )
    }
    if answer.result in EXAMPLES:
        content["example"] = json.loads(
            envelope(answer.status, answer.said or "", EXAMPLES[answer.result])
        )
    return content


def _error_schema(
    status: HTTPStatus, errors: tuple[type[ApiError], ...], extra_types: tuple[str, ...]
) -> dict[str, Any]:
    types = list(dict.fromkeys([*(e.error_type for e in errors), *extra_types]))
    item = {
        "type": "object",
        "required": ["type", "message"],
        "properties": {
            "type": {"type": "string", "enum": types},
            "message": {"type": "string"},
            "schema_path": {
                "type": "array",
                "items": {"type": ["string", "integer"]},
                "description": "Where in the request schema an invalid_body error is.",
            },
        },
    }
    result = {
        "type": "object",
        "required": ["errors"],
        "properties": {"errors": {"type": "array", "minItems": 1, "items": item}},
    }
    descriptions = list(dict.fromkeys(e.description for e in errors))
    return _envelope_schema(status, {"enum": descriptions}, result)


def _error_examples(
    errors: tuple[type[ApiError], ...], extra_types: tuple[str, ...]
) -> dict[str, Any]:
    """An example of each error, answered as the service answers it."""
    examples = {
        error.__name__: {
            "summary": error.description,
            "value": json.loads(error_envelope(error(SAMPLE_MESSAGES[error.__name__]))),
        }
        for error in errors
    }
    if extra_types:
        examples["invalid_body"] = {
            "summary": "the body breaks the schema",
            "value": json.loads(error_envelope(_schema_error())),
        }
    return examples


def _schema_error() -> ApiError:
    """The error the service answers to a body that breaks the schema."""
    try:
        parse_outbound_request(b'{"to": 27820000001, "content": "Hello", "colour": "red"}')
    except ApiError as e:
        return e
    raise AssertionError("the request schema accepted a number as to")  # pragma: no cover
