"""junebug-api-import-channels against a local HTTP server answering as old Junebug."""

from __future__ import annotations

import base64
import json
import subprocess
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import yaml

from junebug_api.config.channels import resolve_channels
from junebug_api.config.model import load_config

from .support import free_port

SCRIPT = str(Path(sys.executable).with_name("junebug-api-import-channels"))

# Old Junebug 0.2.0's answers, as its docs/http_api.rst documents them.
CHANNELS = {
    "bc5c3a6c-5f0d-4a8a-9c8e-3b0f8a2c4d11": {
        "id": "bc5c3a6c-5f0d-4a8a-9c8e-3b0f8a2c4d11",
        "type": "telnet",
        "label": "My Telnet Channel",
        "config": {"twisted_endpoint": "tcp:9001", "password": "transport-secret"},
        "metadata": {"team": "ops", "region": "za"},
        "status": {"status": "ok", "components": {}, "inbound_message_rate": 1.5},
        "mo_url": "http://rapidpro.example/c/jn/abc/receive",
        "mo_url_auth_token": "mo-token",
        "amqp_queue": "extra-queue",
        "rate_limit_count": 500,
        "rate_limit_window": 10,
        "character_limit": 160,
        "public_http": {"enabled": True, "web_path": "/api/v1/telnet", "web_port": 8081},
    },
    "ussd-1": {
        "id": "ussd-1",
        "type": "vumi.transports.ussd.dmark_ussd.DmarkUssdTransport",
        "label": None,
        "config": {},
        "metadata": {},
        "status": {},
        "mo_url": "http://rapidpro.example/c/jn/def/receive",
        "character_limit": None,
        "status_url": "http://status.example/",
    },
}


def envelope(description: str, result: Any) -> bytes:
    return json.dumps(
        {"status": 200, "code": "OK", "description": description, "result": result}
    ).encode()


class OldJunebug(BaseHTTPRequestHandler):
    auth: str | None = None
    not_junebug = False

    def do_GET(self) -> None:
        if self.auth and self.headers.get("Authorization") != self.auth:
            self.send_response(401)
            self.end_headers()
            return
        if self.not_junebug:
            body, status = b"<html>hello</html>", 200
        elif self.path == "/channels/":
            body, status = envelope("channels listed", sorted(CHANNELS)), 200
        elif self.path.startswith("/channels/") and self.path[10:] in CHANNELS:
            body, status = envelope("channel found", CHANNELS[self.path[10:]]), 200
        else:
            body, status = b'{"status": 404}', 404
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def old_junebug() -> Iterator[Any]:
    def serve(**attrs: Any) -> str:
        handler = type("Handler", (OldJunebug,), attrs)
        server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        return f"http://127.0.0.1:{server.server_address[1]}"

    servers: list[ThreadingHTTPServer] = []
    yield serve
    for server in servers:
        server.shutdown()
        server.server_close()


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([SCRIPT, *args], capture_output=True, text=True, timeout=30)


def test_writes_channels_yaml_with_comments(old_junebug, tmp_path):
    url = old_junebug()
    result = run(url)
    assert result.returncode == 0, result.stderr
    text = result.stdout
    data = yaml.safe_load(text)
    telnet = data["channels"]["bc5c3a6c-5f0d-4a8a-9c8e-3b0f8a2c4d11"]
    assert telnet == {
        "label": "My Telnet Channel",
        "metadata": {"team": "ops", "region": "za"},
        "mo_message_url": "http://rapidpro.example/c/jn/abc/receive",
        "mo_message_url_auth_token": "mo-token",
        "character_limit": 160,
    }
    assert data["channels"]["ussd-1"] == {
        "mo_message_url": "http://rapidpro.example/c/jn/def/receive"
    }
    # A comment on every setting not carried over; the transport's config is not copied.
    for comment in (
        '# type: "telnet" (not carried over',
        "# config: ... (not carried over: the transport's own settings",
        "# public_http: ... (not carried over",
        '# amqp_queue: "extra-queue" (not carried over',
        "# rate_limit_count: 500 (not carried over",
        "# rate_limit_window: 10 (not carried over",
        '# status_url: "http://status.example/" (not carried over',
    ):
        assert comment in text, comment
    assert "transport-secret" not in text
    # junebug-api takes the output as it is.
    config_path = tmp_path / "config.yaml"
    config_path.write_text(text + "http_bind: 127.0.0.1:8080\n", encoding="utf-8")
    config = load_config(str(config_path), environ={})
    channels = resolve_channels(config)
    assert [c.id for c in channels] == sorted(CHANNELS)
    assert channels[0].connector_name == "bc5c3a6c-5f0d-4a8a-9c8e-3b0f8a2c4d11"
    assert channels[0].ignored.keys() == set()  # ignored options stay comments


def test_basic_auth(old_junebug):
    token = "Basic " + base64.b64encode(b"admin:pw").decode()
    url = old_junebug(auth=token)
    result = run(url)
    assert result.returncode == 1
    assert result.stderr == (
        f"junebug-api-import-channels: GET {url}/channels/ answered 401 Unauthorized"
        " (give --username and --password)\n"
    )
    result = run(url, "--username", "admin", "--password", "pw")
    assert result.returncode == 0, result.stderr
    assert "ussd-1" in result.stdout


def test_unreachable_url_is_one_line(old_junebug):
    port = free_port()
    result = run(f"http://127.0.0.1:{port}")
    assert result.returncode == 1
    assert result.stdout == ""
    assert result.stderr.startswith(
        f"junebug-api-import-channels: cannot reach http://127.0.0.1:{port}/channels/:"
    )
    assert "Connection refused" in result.stderr
    assert len(result.stderr.splitlines()) == 1
    assert "Traceback" not in result.stderr


def test_non_junebug_url_is_one_line(old_junebug):
    url = old_junebug(not_junebug=True)
    result = run(url + "/")
    assert result.returncode == 1
    assert result.stderr == (
        f"junebug-api-import-channels: {url}/channels/ is not an old Junebug:"
        " its answer is not JSON\n"
    )


def test_not_a_url_is_one_line():
    result = run("nonsense")
    assert result.returncode == 1
    assert result.stderr == (
        "junebug-api-import-channels: nonsense is not an http:// or https:// URL\n"
    )
    assert len(result.stderr.splitlines()) == 1
    assert "Traceback" not in result.stderr
