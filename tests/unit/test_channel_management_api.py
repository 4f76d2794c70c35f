"""The channel management routes over StubTreq: the real ChannelAdmin and file
store, a registry in memory, a Clock."""

from __future__ import annotations

import base64
import json
from typing import Any

import jsonschema
from openapi_spec_validator import validate
from treq.testing import StubTreq
from twisted.internet.defer import DeferredLock
from twisted.internet.task import Clock

from junebug_api.channels.admin import ChannelAdmin
from junebug_api.channels.channel_api import ChannelApi
from junebug_api.channels.store import FileChannelStore, RedisChannelStore, store_for_config
from junebug_api.config.channel_api import channel_body_schema
from junebug_api.http.api import ApiCredentials, JunebugApi
from junebug_api.http.management import ChannelManagement
from junebug_api.http.openapi import document_for_config
from junebug_api.http.openapi_schemas import SCHEMAS
from junebug_api.state.cache import make_state_cache

from .channel_api_support import ADMIN_TOKEN, FakeRegistry, api_config
from .helpers import result_of

BASE = "http://junebug.example"
BODY = {"type": "smpp", "config": {"system_id": "j", "password": "pw"}}


class Harness:
    def __init__(self, tmp_path: Any, management: bool = True, **options: str) -> None:
        config = api_config(
            tmp_path,
            api_auth_token="channel-secret",
            admin_username="root",
            admin_password="root-pw",
            **options,
        )
        self.registry = FakeRegistry(config)
        clock = Clock()
        admin = ChannelAdmin(store_for_config(config, None), self.registry, config, DeferredLock())
        admin_credentials = ApiCredentials("root", "root-pw", ADMIN_TOKEN)
        self.api = JunebugApi(
            self.registry,
            lambda: {"health": "ok", "components": {"amqp": {"health": "ok"}}},
            30,
            clock,
            credentials=ApiCredentials(token="channel-secret"),
            admin_credentials=admin_credentials,
            management=ChannelManagement(admin, admin_credentials, lambda: {}, 30, clock)
            if management
            else None,
        )
        self.http = StubTreq(self.api.resource())

    def call(
        self, method: str, path: str, body: Any = None, auth: str | None = f"Token {ADMIN_TOKEN}"
    ) -> tuple[int, dict]:
        headers = {"Authorization": auth} if auth else {}
        data = body if isinstance(body, bytes) or body is None else json.dumps(body).encode()
        d = self.http.request(method, BASE + path, data=data, headers=headers)
        self.http.flush()
        response = result_of(d)
        return response.code, json.loads(result_of(self.http.content(response)))


def test_create_modify_restart_delete(tmp_path: Any) -> None:
    h = Harness(tmp_path)
    code, data = h.call("POST", "/channels/", {**BODY, "label": "one"})
    assert (code, data["description"]) == (201, "channel created")
    channel_id = data["result"]["id"]
    assert len(channel_id) == 36 and channel_id.count("-") == 4
    assert data["result"]["label"] == "one"
    assert data["result"]["config"]["password"] != "pw"
    code, data = h.call("POST", f"/channels/{channel_id}", {"label": "two"})
    assert (code, data["description"], data["result"]["label"]) == (200, "channel updated", "two")
    assert data["result"]["type"] == "smpp"
    code, data = h.call("POST", f"/channels/{channel_id}/restart")
    assert (code, data["description"], data["result"]) == (200, "channel restarted", {})
    code, data = h.call("DELETE", f"/channels/{channel_id}")
    assert (code, data["description"], data["result"]) == (200, "channel deleted", {})
    code, data = h.call("DELETE", f"/channels/{channel_id}")
    assert (code, data["result"]["errors"][0]["type"]) == (404, "ChannelNotFound")


def test_admin_credentials_only(tmp_path: Any) -> None:
    h = Harness(tmp_path)
    basic = "Basic " + base64.b64encode(b"root:root-pw").decode()
    assert h.call("POST", "/channels/", BODY, auth=basic)[0] == 201
    for auth in (None, "Token channel-secret", "Token wrong", "Basic " + "eDp5"):
        code, data = h.call("POST", "/channels/", BODY, auth=auth)
        assert (code, data["result"]["errors"][0]["type"]) == (401, "Unauthorized"), auth
        assert h.call("DELETE", "/channels/fixed", auth=auth)[0] == 401
    assert len(h.registry.channels()) == 2


def test_admin_credentials_open_the_read_routes(tmp_path: Any) -> None:
    h = Harness(tmp_path)
    for auth in (f"Token {ADMIN_TOKEN}", "Token channel-secret"):
        assert h.call("GET", "/channels/", auth=auth)[0] == 200
        assert h.call("GET", "/channels/fixed", auth=auth)[0] == 200
        assert h.call("GET", "/channels/fixed/logs", auth=auth)[0] == 200
    assert h.call("GET", "/channels/fixed", auth="Token wrong")[0] == 401


def test_bad_bodies_are_400_invalid_body(tmp_path: Any) -> None:
    h = Harness(tmp_path)
    for body, kind in [
        (b"{not json", "JsonDecodeError"),
        ({"config": {}}, "invalid_body"),
        ({**BODY, "character_limit": "ten"}, "invalid_body"),
        ({**BODY, "colour": "red"}, "invalid_body"),
        ([1], "invalid_body"),
        ({**BODY, "mo_url": "http://"}, "invalid_body"),
    ]:
        code, data = h.call("POST", "/channels/", body)
        assert (code, data["result"]["errors"][0]["type"]) == (400, kind), body
    code, data = h.call("POST", "/channels/fixed", {"label": 1})
    assert code == 400


def test_config_channels_are_403(tmp_path: Any) -> None:
    h = Harness(tmp_path)
    for method, path in [
        ("POST", "/channels/fixed"),
        ("DELETE", "/channels/fixed"),
        ("POST", "/channels/fixed/restart"),
    ]:
        code, data = h.call(method, path, {"label": "x"} if method == "POST" else None)
        assert (code, data["result"]["errors"][0]["type"]) == (403, "ChannelInConfigFile"), path
    assert h.registry.calls == []


def test_without_channel_api_the_routes_are_405(tmp_path: Any) -> None:
    h = Harness(tmp_path, management=False)
    assert h.call("POST", "/channels/", BODY)[0] == 405
    assert h.call("DELETE", "/channels/fixed")[0] == 405


def test_other_methods_are_405_with_allow(tmp_path: Any) -> None:
    h = Harness(tmp_path)
    d = h.http.request("PUT", BASE + "/channels/fixed", data=b"{}")
    h.http.flush()
    response = result_of(d)
    assert response.code == 405
    assert response.headers.getRawHeaders("Allow") == ["DELETE, GET, HEAD, POST"]


def test_the_document_has_the_management_routes_only_with_channel_api(tmp_path: Any) -> None:
    config = api_config(
        tmp_path, admin_username="root", admin_password="root-pw", api_auth_token="t"
    )
    document = document_for_config(config)
    validate(document)
    operations = {
        (path, method): operation
        for path, item in document["paths"].items()
        for method, operation in item.items()
        if isinstance(operation, dict) and "operationId" in operation
    }
    management = {
        ("/channels/", "post"): "NewChannel",
        ("/channels/{channel_id}", "post"): "ChannelChanges",
        ("/channels/{channel_id}", "delete"): None,
        ("/channels/{channel_id}/restart", "post"): None,
    }
    for key, body in management.items():
        operation = operations[key]
        assert operation["security"] == [{"basic": []}, {"token": []}]
        assert "401" in operation["responses"]
        if body is not None:
            content = operation["requestBody"]["content"]["application/json"]
            assert content["schema"] == {"$ref": f"#/components/schemas/{body}"}
            for example in content["examples"].values():
                jsonschema.validate(example["value"], channel_body_schema(body == "NewChannel"))
    assert {"403", "404", "503"} <= set(
        operations[("/channels/{channel_id}", "delete")]["responses"]
    )
    assert operations[("/channels/", "post")]["responses"].keys() >= {"201", "400", "503"}
    # The admin credentials open the read routes too.
    assert operations[("/channels/", "get")]["security"] == [{"basic": []}, {"token": []}]
    assert "channel management" in {tag["name"] for tag in document["tags"]}
    without = document_for_config(api_config(tmp_path, channel_api="false"))
    validate(without)
    assert ("/channels/", "post") not in {
        (path, method) for path, item in without["paths"].items() for method in item
    }
    assert "channel management" not in {tag["name"] for tag in without["tags"]}


def test_the_body_schemas_are_those_enforced() -> None:
    for name, create in (("NewChannel", True), ("ChannelChanges", False)):
        shown = {k: v for k, v in SCHEMAS[name].items() if k != "description"}
        assert shown == {k: v for k, v in channel_body_schema(create).items()}


def test_channel_api_for_config_picks_the_store(tmp_path: Any) -> None:
    config = api_config(tmp_path)
    registry = FakeRegistry(config)
    assert isinstance(
        ChannelApi.for_config(config, None, registry, Clock()).store, FileChannelStore
    )
    redis = api_config(tmp_path, state_cache_class="junebug_api.state_cache.RedisStateCache")
    cache = make_state_cache(redis.state_cache_class, {}, clock=Clock(), connector_name="c")
    api = ChannelApi.for_config(redis, cache, registry, Clock())
    assert isinstance(api.store, RedisChannelStore)
    management = api.management(lambda: {})
    assert isinstance(management, ChannelManagement)
