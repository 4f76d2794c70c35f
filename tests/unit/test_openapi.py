"""The OpenAPI document: valid, exactly the routes served, no secret, the
request schema the service enforces, and answers that fit it.

The service is the real one (JunebugService on a MemoryReactorClock, its
Klein app over StubTreq); ``junebug-api-openapi`` must print what it serves.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import pytest
from openapi_spec_validator import validate
from referencing import Registry
from referencing.jsonschema import DRAFT202012
from treq.testing import StubTreq
from twisted.internet.testing import MemoryReactorClock

from junebug_api.channels.channel import RATE_FIELDS
from junebug_api.cli import openapi as cli
from junebug_api.config.model import JunebugConfig, load_config
from junebug_api.formats.junebug_formats import OUTBOUND_SCHEMA
from junebug_api.http.access import api_access
from junebug_api.http.openapi import ServedDocument, document_for_config
from junebug_api.http.openapi_schemas import EXAMPLES, SCHEMAS
from junebug_api.http.routes import api_routes
from junebug_api.observe.log import set_log_level
from junebug_api.service import JunebugService

from .helpers import result_of

SECRETS = {
    "api_auth_password": "basic-secret-1",
    "api_auth_token": "token-secret-2",
    "mo_message_url_auth_token": "mo-token-secret-3",
    "default_event_auth_token": "event-token-secret-4",
}
MO_URL = "http://rp-user:mo-url-secret-5@rapidpro.example/in"
AMQP_URL = "amqp://guest:amqp-secret-6@127.0.0.1:5672/%2F"
ALL_SECRETS = [*SECRETS.values(), "mo-url-secret-5", "amqp-secret-6", "za-secret-7"]
METHODS = ("get", "put", "post", "delete", "patch")


def load(**options: Any) -> JunebugConfig:
    cli_options = {
        "http_bind": "127.0.0.1:0",
        "mo_message_url": MO_URL,
        "amqp_url": AMQP_URL,
        **{k: v if isinstance(v, str) else json.dumps(v) for k, v in options.items()},
    }
    return load_config(None, environ={}, cli=cli_options)


CONFIGS = {
    "single connector": dict(
        connector_name="conn",
        api_auth_username="rapidpro",
        metrics_auth=True,
        **SECRETS,
    ),
    "base_url_path": dict(
        connector_name="conn", base_url_path="/junebug/v1", api_auth_token="token-secret-2"
    ),
    "channels": dict(
        api_auth_username="rapidpro",
        api_auth_password="basic-secret-1",
        channels={
            "sms-za": {"api_auth_token": "za-secret-7", "mo_url_auth_token": "mo-token-secret-3"},
            "ussd-ke": {"api_auth_username": None, "api_auth_password": None},
        },
    ),
    "metrics off, openapi moved": dict(
        connector_name="conn",
        metrics_enabled=False,
        openapi_path="/api/openapi.json",
    ),
}


@pytest.fixture(autouse=True)
def process_state() -> Iterator[None]:
    yield
    set_log_level("INFO")


class Served:
    """A JunebugService for a config, its API over StubTreq."""

    def __init__(self, config: JunebugConfig) -> None:
        self.config = config
        self.service = JunebugService(config, MemoryReactorClock())
        self.service.start_channels()
        self.resource = self.service.site.resource
        self.http = StubTreq(self.resource)

    def call(
        self, method: str, path: str, body: bytes | None = None, headers: dict | None = None
    ) -> tuple[int, Any, Any]:
        """Status, body (JSON if it is) and headers of a request."""
        d = self.http.request(
            method,
            "http://junebug.example" + path,
            data=body,
            headers=headers or {},
            allow_redirects=False,
        )
        self.http.flush()
        response = result_of(d)
        raw = result_of(self.http.content(response))
        try:
            content: Any = json.loads(raw)
        except ValueError:
            content = raw.decode()
        return response.code, content, response.headers

    def document(self, path: str = "/openapi.json") -> dict:
        code, document, headers = self.call("GET", path)
        assert code == 200, document
        assert headers.getRawHeaders(b"Content-Type") == [b"application/json; charset=utf-8"]
        return document


def served(name: str) -> Served:
    return Served(load(**CONFIGS[name]))


def openapi_path(config: JunebugConfig) -> str:
    return config.openapi_path


@pytest.mark.parametrize("name", list(CONFIGS))
def test_the_document_is_valid_and_what_junebug_api_openapi_prints(
    name: str, tmp_path: Path, capsys: Any
) -> None:
    s = served(name)
    document = s.document(openapi_path(s.config))
    validate(document)
    assert document == document_for_config(s.config)
    config_file = tmp_path / "config.yaml"
    config_file.write_text(
        json.dumps({"http_bind": "127.0.0.1:0", "mo_message_url": MO_URL, **CONFIGS[name]})
    )
    cli.main(["--config", str(config_file), "--amqp-url", AMQP_URL])
    assert json.loads(capsys.readouterr().out) == document


@pytest.mark.parametrize("name", list(CONFIGS))
def test_the_document_lists_exactly_the_routes_served(name: str) -> None:
    """Each operation is a rule of the Klein app's URL map, with its method and
    endpoint; every other rule answers 405 (old Junebug's channel changes)."""
    s = served(name)
    document = s.document(openapi_path(s.config))
    documented = {
        (re.sub(r"\{(\w+)\}", r"<\1>", path), method.upper(), operation["operationId"])
        for path, item in document["paths"].items()
        for method, operation in item.items()
        if method in METHODS
    }
    rules = {
        (rule.rule, method, rule.endpoint)
        for rule in s.resource.app.url_map.iter_rules()
        for method in rule.methods - {"HEAD"}
    }
    assert documented <= rules
    for rule, method, _ in rules - documented:
        code, body, headers = s.call(method, re.sub(r"<\w+>", "sms-za", rule), b"{}")
        assert code == 405, (rule, method, body)
        assert headers.getRawHeaders(b"Allow") == [b"GET, HEAD"] or rule.endswith("/restart")


def test_the_paths_follow_the_config() -> None:
    paths = {
        name: set(served(name).document(openapi_path(load(**c)))["paths"])
        for name, c in CONFIGS.items()
    }
    channel_routes = {
        "/channels/",
        "/channels/{channel_id}",
        "/channels/{channel_id}/logs",
        "/channels/{channel_id}/messages",
        "/channels/{channel_id}/messages/{message_id}",
    }
    assert paths["single connector"] == {
        "/messages",
        "/messages/{message_id}",
        *channel_routes,
        "/health",
        "/metrics",
        "/openapi.json",
    }
    assert paths["base_url_path"] == {
        "/junebug/v1/messages",
        "/junebug/v1/messages/{message_id}",
        *channel_routes,
        "/health",
        "/metrics",
        "/openapi.json",
    }
    assert paths["channels"] == {*channel_routes, "/health", "/metrics", "/openapi.json"}
    assert paths["metrics off, openapi moved"] == {
        "/messages",
        "/messages/{message_id}",
        *channel_routes,
        "/health",
        "/api/openapi.json",
    }
    s = served("metrics off, openapi moved")
    assert s.call("GET", "/openapi.json")[0] == 404
    assert s.call("GET", "/metrics")[0] == 404


@pytest.mark.parametrize("name", list(CONFIGS))
def test_no_secret_in_the_document(name: str) -> None:
    s = served(name)
    text = json.dumps(s.document(openapi_path(s.config)))
    for secret in ALL_SECRETS:
        assert secret not in text


def test_security_is_the_auth_configured() -> None:
    single = served("single connector").document()
    assert set(single["components"]["securitySchemes"]) == {"basic", "token"}
    send = single["paths"]["/messages"]["post"]
    assert send["security"] == [{"basic": []}, {"token": []}]
    assert "401" in send["responses"]
    # metrics_auth: the metrics ask for the top-level credentials.
    assert single["paths"]["/metrics"]["get"]["security"] == [{"basic": []}, {"token": []}]
    for open_path in ("/health", "/openapi.json"):
        operation = single["paths"][open_path]["get"]
        assert "security" not in operation and "401" not in operation["responses"]

    channels = served("channels").document()
    # sms-za asks for its token (and the top-level Basic), ussd-ke for nothing.
    send = channels["paths"]["/channels/{channel_id}/messages"]["post"]
    assert send["security"] == [{"basic": []}, {"token": []}, {}]
    assert channels["paths"]["/channels/"]["get"]["security"] == [{"basic": []}]
    assert "security" not in channels["paths"]["/metrics"]["get"]

    moved = served("metrics off, openapi moved").document("/api/openapi.json")
    assert moved["components"]["securitySchemes"] == {}
    assert all(
        "401" not in operation["responses"]
        for item in moved["paths"].values()
        for method, operation in item.items()
        if method in METHODS
    )


def test_the_request_schema_is_the_one_enforced() -> None:
    document = served("single connector").document()
    body = document["paths"]["/messages"]["post"]["requestBody"]["content"]["application/json"]
    assert body["schema"] == {"$ref": "#/components/schemas/OutboundMessage"}
    schema = document["components"]["schemas"]["OutboundMessage"]
    enforced = {k: v for k, v in OUTBOUND_SCHEMA.items() if k != "$schema"}
    assert {k: v for k, v in schema.items() if k != "description"} == enforced


def test_the_channel_rates_are_those_answered() -> None:
    channel_status = SCHEMAS["ChannelStatus"]["properties"]
    assert set(RATE_FIELDS.values()) <= set(channel_status)


def _validator(document: dict, pointer: str) -> jsonschema.Validator:
    registry = Registry().with_resource("urn:doc", DRAFT202012.create_resource(document))
    return jsonschema.Draft202012Validator({"$ref": f"urn:doc#{pointer}"}, registry=registry)


def _responses(document: dict) -> Iterator[tuple[str, dict]]:
    """Each response (shared ones once) with its JSON pointer."""
    for path, item in document["paths"].items():
        escaped = path.replace("~", "~0").replace("/", "~1")
        for method, operation in item.items():
            if method not in METHODS:
                continue
            for status, response in operation["responses"].items():
                if "$ref" not in response:
                    yield f"/paths/{escaped}/{method}/responses/{status}", response
    for name, response in document["components"]["responses"].items():
        yield f"/components/responses/{name}", response


def test_every_example_fits_its_schema() -> None:
    document = served("single connector").document()
    checked = 0
    for pointer, response in _responses(document):
        for media_type, content in response.get("content", {}).items():
            validator = _validator(
                document, f"{pointer}/content/{media_type.replace('/', '~1')}/schema"
            )
            examples = [e["value"] for e in content.get("examples", {}).values()]
            examples += [content["example"]] if "example" in content else []
            for example in examples:
                validator.validate(example)
                checked += 1
    assert checked >= 20
    for name, example in EXAMPLES.items():  # "Health 503": Health's, as answered with 503
        schema = name.split(" ")[0]
        _validator(document, f"/components/schemas/{schema}").validate(example)


TOKEN = {"Authorization": "Token token-secret-2"}
ANSWERS = [
    # (method, documented path, requested path, headers, body, status)
    ("get", "/health", "/health", {}, None, 503),  # no broker here
    ("get", "/channels/", "/channels/", TOKEN, None, 200),
    ("get", "/channels/{channel_id}", "/channels/conn", TOKEN, None, 200),
    ("get", "/channels/{channel_id}", "/channels/nope", TOKEN, None, 404),
    ("get", "/channels/{channel_id}", "/channels//conn", TOKEN, None, 308),
    ("get", "/channels/{channel_id}", "/channels/%ff", TOKEN, None, 400),
    ("post", "/channels/{channel_id}/messages", "/channels/%ff/messages", TOKEN, b"{}", 400),
    ("get", "/channels/{channel_id}/logs", "/channels/conn/logs?n=2", TOKEN, None, 200),
    ("get", "/channels/{channel_id}/logs", "/channels/conn/logs?n=x", TOKEN, None, 400),
    ("get", "/channels/{channel_id}/logs", "/channels/conn/logs", {}, None, 401),
    ("get", "/messages/{message_id}", "/messages/abc", TOKEN, None, 200),
    ("get", "/messages/{message_id}", "/messages/a%2Fb", TOKEN, None, 404),
    ("post", "/messages", "/messages", TOKEN, b"nope", 400),
    ("post", "/messages", "/messages", TOKEN, b'{"to": 1, "content": "x", "colour": 2}', 400),
    ("post", "/messages", "/messages", {}, b'{"to": "1", "content": "x"}', 401),
    ("post", "/channels/{channel_id}/messages", "/channels/nope/messages", TOKEN, b"{}", 404),
    ("get", "/metrics", "/metrics", {}, None, 401),
    ("get", "/metrics", "/metrics", TOKEN, None, 200),
    ("get", "/openapi.json", "/openapi.json", {}, None, 200),
]


@pytest.mark.parametrize(("method", "path", "url", "headers", "body", "status"), ANSWERS)
def test_answers_fit_the_document(
    method: str, path: str, url: str, headers: dict, body: bytes | None, status: int
) -> None:
    s = served("single connector")
    document = s.document()
    code, content, answer_headers = s.call(method.upper(), url, body, headers)
    assert code == status, content
    response = document["paths"][path][method]["responses"][str(code)]
    pointer = response.get("$ref", "").removeprefix("#")
    if pointer:
        response = document["components"]["responses"][pointer.rsplit("/", 1)[1]]
    else:
        escaped = path.replace("~", "~0").replace("/", "~1")
        pointer = f"/paths/{escaped}/{method}/responses/{code}"
    [(media_type, _)] = response["content"].items()
    content_type = answer_headers.getRawHeaders(b"Content-Type")[0].decode()
    assert content_type.split(";")[0] == media_type
    _validator(document, f"{pointer}/content/{media_type.replace('/', '~1')}/schema").validate(
        content
    )
    for name in response.get("headers", {}):
        required = document["components"]["headers"][name]["required"]
        assert answer_headers.hasHeader(name) or not required, name


@pytest.mark.parametrize(
    ("method", "url"),
    [
        ("PUT", "/health"),
        ("DELETE", "/channels/conn"),
        ("POST", "/channels/"),
        ("PATCH", "/messages"),
    ],
)
def test_a_method_not_served_is_405_with_the_methods_served(method: str, url: str) -> None:
    s = served("single connector")
    document = s.document()
    code, content, headers = s.call(method, url, b"{}", TOKEN)
    assert (code, content["result"]["errors"][0]["type"]) == (405, "MethodNotAllowed")
    [allow] = headers.getRawHeaders(b"Allow")
    path = {"/channels/conn": "/channels/{channel_id}"}.get(url, url)
    assert f"`Allow: {allow.decode()}`" in document["paths"][path]["description"]
    _validator(
        document, "/components/responses/MethodNotAllowed/content/application~1json/schema"
    ).validate(content)


def test_openapi_path_false_turns_the_route_off() -> None:
    config = load(connector_name="conn", openapi_path=False)
    s = Served(config)
    code, content, _ = s.call("GET", "/openapi.json")
    assert (code, content["result"]["errors"][0]["type"]) == (404, "NotFound")
    document = document_for_config(config)
    validate(document)
    assert "/openapi.json" not in document["paths"]
    assert {r.rule for r in s.resource.app.url_map.iter_rules()} >= {"/health", "/messages"}


def test_the_served_document_is_rendered_again_only_when_access_changes() -> None:
    routes = api_routes(own_paths={"conn": "/messages"})
    served_document = ServedDocument(routes)
    open_access = api_access((None, None), False, {"conn": (None, None)})
    first = served_document.json(open_access)
    assert served_document.json(api_access((None, None), False, {"conn": (None, None)})) is first
    with_token = served_document.json(api_access((None, None), False, {"conn": (None, "t")}))
    assert json.loads(with_token)["paths"]["/messages"]["post"]["security"] == [{"token": []}]
    assert "security" not in json.loads(first)["paths"]["/messages"]["post"]
