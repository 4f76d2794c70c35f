"""junebug-api-import-channels in process, against an old Junebug answered in
memory: an ``urllib`` opener whose HTTP handler looks the URL up (installed
with ``urllib.request.install_opener``, urllib's own hook for this), so no
socket is opened."""

from __future__ import annotations

import base64
import email.message
import io
import json
import urllib.error
import urllib.request
import urllib.response
from collections.abc import Iterator
from typing import Any

import pytest
import yaml

from junebug_api.cli.import_channels import ImportFailed, import_channels, main

BASE = "http://junebug.example:8080"

CHANNEL = {
    "id": "tel-1",
    "type": "telnet",
    "label": "Telnet ñ",
    "config": {"twisted_endpoint": "tcp:9001", "password": "transport-secret"},
    "metadata": {"team": "ops"},
    "status": {"status": "ok"},
    "mo_url": "http://rapidpro.example/c/jn/abc/receive",
    "mo_url_auth_token": "mo-token",
    "amqp_queue": "extra-queue",
    "rate_limit_count": None,
    "character_limit": 160,
    "public_http": {"enabled": True},
    "colour": "blue",
}


def envelope(result: Any) -> bytes:
    return json.dumps({"status": 200, "code": "OK", "description": "ok", "result": result}).encode()


class OldJunebug(urllib.request.HTTPHandler):
    """Answers ``GET <url>`` from ``routes``: (status, body), or an exception to raise."""

    def __init__(self, routes: dict[str, Any]) -> None:
        super().__init__()
        self.routes = routes
        self.requests: list[urllib.request.Request] = []

    def http_open(self, request: urllib.request.Request) -> Any:
        self.requests.append(request)
        answer = self.routes.get(request.full_url, (404, b'{"status": 404}'))
        if isinstance(answer, Exception):
            raise answer
        status, body = answer
        response = urllib.response.addinfourl(
            io.BytesIO(body), email.message.Message(), request.full_url, status
        )
        response.msg = {200: "OK", 401: "Unauthorized", 404: "Not Found"}[status]
        return response


@pytest.fixture
def junebug() -> Iterator[OldJunebug]:
    handler = OldJunebug(
        {
            f"{BASE}/channels/": (200, envelope(["tel-1", "empty"])),
            f"{BASE}/channels/tel-1": (200, envelope(CHANNEL)),
            f"{BASE}/channels/empty": (200, envelope({"label": None, "metadata": {}})),
        }
    )
    urllib.request.install_opener(urllib.request.build_opener(handler))
    yield handler
    urllib.request.install_opener(None)


def test_channels_become_yaml_with_a_comment_for_each_field_left_behind(
    junebug: OldJunebug,
) -> None:
    text = import_channels(BASE + "/")
    lines = text.splitlines()
    assert lines[0] == f"# Channels of the old Junebug at {BASE}, for junebug-api's config file"
    assert yaml.safe_load(text) == {
        "channels": {
            "empty": {},
            "tel-1": {
                "label": "Telnet ñ",
                "metadata": {"team": "ops"},
                "mo_message_url": "http://rapidpro.example/c/jn/abc/receive",
                "mo_message_url_auth_token": "mo-token",
                "character_limit": 160,
            },
        }
    }
    comments = [line.strip() for line in lines if line.startswith("    #")]
    assert '# type: "telnet" (not carried over: the transport type; junebug-api runs' in (
        " ".join(comments)
    )
    assert any(c.startswith("# config: ... (not carried over") for c in comments)
    assert any(c.startswith('# amqp_queue: "extra-queue" (not carried over') for c in comments)
    assert "# colour: not carried over (junebug-api has no such setting)" in comments
    assert not any("rate_limit_count" in c for c in comments)  # null: nothing to say
    assert "transport-secret" not in text
    assert any("tel-1.outbound, tel-1.inbound, tel-1.event" in c for c in comments)
    assert [r.full_url for r in junebug.requests] == [
        f"{BASE}/channels/",
        f"{BASE}/channels/empty",
        f"{BASE}/channels/tel-1",
    ]
    assert all(r.get_header("Authorization") is None for r in junebug.requests)


def test_no_channels(junebug: OldJunebug) -> None:
    junebug.routes[f"{BASE}/channels/"] = (200, envelope([]))
    assert import_channels(BASE).splitlines()[-1] == "channels: {}"
    assert yaml.safe_load(import_channels(BASE)) == {"channels": {}}


def test_basic_auth_through_main(junebug: OldJunebug, capsys: Any) -> None:
    main([BASE, "--username", "admin", "--password", "pä55"])
    token = base64.b64encode("admin:pä55".encode()).decode()
    assert {r.get_header("Authorization") for r in junebug.requests} == {f"Basic {token}"}
    out, err = capsys.readouterr()
    assert '"tel-1":' in out and err == ""


@pytest.mark.parametrize(
    ("route", "answer", "error"),
    [
        (
            "/channels/",
            (401, b""),
            f"GET {BASE}/channels/ answered 401 Unauthorized (give --username and --password)",
        ),
        ("/channels/tel-1", (404, b""), f"GET {BASE}/channels/tel-1 answered 404 Not Found"),
        (
            "/channels/",
            urllib.error.URLError("[Errno 111] Connection refused"),
            f"cannot reach {BASE}/channels/: [Errno 111] Connection refused",
        ),
        (
            "/channels/",
            (200, b"<html>hello</html>"),
            f"{BASE}/channels/ is not an old Junebug: its answer is not JSON",
        ),
        (
            "/channels/",
            (200, b'{"result": []}'),
            f"{BASE}/channels/ is not an old Junebug: its answer is no Junebug envelope",
        ),
        (
            "/channels/",
            (200, envelope({"tel-1": {}})),
            f"{BASE} is not an old Junebug: GET /channels/ listed no channel ids",
        ),
        ("/channels/tel-1", (200, envelope(["x"])), "GET /channels/tel-1 answered no channel"),
    ],
)
def test_each_failure_is_one_line_and_exit_status_1(
    junebug: OldJunebug, capsys: Any, route: str, answer: Any, error: str
) -> None:
    junebug.routes[BASE + route] = answer
    with pytest.raises(ImportFailed) as e:
        import_channels(BASE)
    assert str(e.value) == error
    with pytest.raises(SystemExit) as exit:
        main([BASE])
    assert exit.value.code == 1
    out, err = capsys.readouterr()
    assert (out, err) == ("", f"junebug-api-import-channels: {error}\n")


def test_a_password_in_the_url_is_never_printed(junebug: OldJunebug, capsys: Any) -> None:
    with pytest.raises(SystemExit):
        main(["http://admin:s3cret@junebug.example:8080"])
    _, err = capsys.readouterr()
    assert "s3cret" not in err
    assert "GET http://***@junebug.example:8080/channels/ answered 404" in err


@pytest.mark.parametrize("url", ["junebug:8080", "ftp://junebug/", "http://", "http://[::1"])
def test_not_an_http_url(url: str) -> None:
    with pytest.raises(ImportFailed, match="is not an http:// or https:// URL"):
        import_channels(url)


def test_an_unexpected_error_is_one_line_too(junebug: OldJunebug, capsys: Any) -> None:
    junebug.routes[f"{BASE}/channels/"] = RuntimeError("boom")
    with pytest.raises(SystemExit):
        main([BASE])
    assert capsys.readouterr().err == "junebug-api-import-channels: RuntimeError: boom\n"


def test_username_and_password_go_together(capsys: Any) -> None:
    with pytest.raises(SystemExit) as exit:
        main([BASE, "--username", "admin"])
    assert exit.value.code == 2
    assert "--username and --password go together" in capsys.readouterr().err
