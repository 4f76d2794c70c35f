"""The channel management routes over StubTreq: the real ChannelAdmin and file
store, a registry in memory, a Clock."""

from __future__ import annotations

import base64
import json
from typing import Any

from treq.testing import StubTreq
from twisted.internet.defer import DeferredLock
from twisted.internet.task import Clock

from junebug_api.channels.admin import ChannelAdmin
from junebug_api.channels.store import store_for_config
from junebug_api.http.api import ApiCredentials, JunebugApi
from junebug_api.http.management import ChannelManagement

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
            self.registry.channels(),
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
