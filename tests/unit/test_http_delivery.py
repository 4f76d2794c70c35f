"""http_delivery: URL credentials and HttpDelivery.post_json against a fake RapidPro."""

from __future__ import annotations

import base64
import json
from typing import Any

import pytest
from treq.testing import RequestTraversalAgent
from twisted.internet.defer import CancelledError, Deferred, fail
from twisted.internet.error import ConnectionLost, ConnectionRefusedError, DNSLookupError
from twisted.internet.task import Clock
from twisted.python.failure import Failure
from twisted.web.client import ResponseNeverReceived
from twisted.web.resource import Resource

from junebug_api.http_delivery import DeliveryFailed, HttpDelivery, safe_url, split_credentials

from .helpers import result_of

UNICODE_TEXT = "Sawubona, ngiyabonga 👋 ñ 漢字"


def basic(user: str, password: str) -> bytes:
    return b"Basic " + base64.b64encode(f"{user}:{password}".encode())


# -- split_credentials / safe_url ---------------------------------------------------


def test_url_without_credentials() -> None:
    url = "https://rp.example/c/jn/uuid/receive?x=1"
    assert split_credentials(url) == (url.encode(), None)
    assert safe_url(url) == url


def test_url_with_credentials() -> None:
    clean, auth = split_credentials("https://user:pass@rp.example:8443/c/receive?a=b#f")
    assert clean == b"https://rp.example:8443/c/receive?a=b#f"
    assert auth == basic("user", "pass")
    assert auth == b"Basic dXNlcjpwYXNz"


def test_url_credentials_percent_escapes_decoded() -> None:
    url = "http://us%40er:p%3Ass%2Fw%C3%B1rd@rp.example/in"
    clean, auth = split_credentials(url)
    assert clean == b"http://rp.example/in"
    assert auth == basic("us@er", "p:ss/wñrd")
    assert safe_url(url) == "http://rp.example/in"
    assert "p%3Ass" not in safe_url(url)


def test_url_with_user_only() -> None:
    clean, auth = split_credentials("https://token@rp.example/in")
    assert clean == b"https://rp.example/in"
    assert auth == basic("token", "")


def test_query_at_sign_is_not_credentials() -> None:
    url = "https://rp.example/in?email=a@b.example"
    assert split_credentials(url) == (url.encode(), None)


# -- HttpDelivery ---------------------------------------------------------------------


class FakeRapidPro(Resource):
    isLeaf = True

    def __init__(self, code: int = 200) -> None:
        super().__init__()
        self.code = code
        self.requests: list[dict[str, Any]] = []

    def render_POST(self, request: Any) -> bytes:
        self.requests.append(
            {
                "uri": request.uri,
                "body": request.content.read(),
                "content_type": request.requestHeaders.getRawHeaders(b"content-type"),
                "authorization": request.requestHeaders.getRawHeaders(b"authorization"),
                "accept": request.requestHeaders.getRawHeaders(b"accept"),
            }
        )
        request.setResponseCode(self.code)
        return b'{"ok": true}'


def post(rapidpro: FakeRapidPro, url: str, body: bytes, token: str | None = None) -> Deferred[int]:
    agent = RequestTraversalAgent(rapidpro)
    delivery = HttpDelivery(agent, Clock())
    d = Deferred.fromCoroutine(delivery.post_json(url, body, token, 10.0))
    agent.flush()
    return d


def test_post_json_200_with_token() -> None:
    rapidpro = FakeRapidPro(200)
    body = json.dumps({"content": UNICODE_TEXT}, ensure_ascii=False).encode()
    d = post(rapidpro, "http://rp.example/c/jn/uuid/receive", body, token="t")
    assert result_of(d) == 200
    [seen] = rapidpro.requests
    assert seen["uri"] == b"/c/jn/uuid/receive"
    assert seen["body"] == body
    assert json.loads(seen["body"]) == {"content": UNICODE_TEXT}
    assert seen["content_type"] == [b"application/json; charset=utf-8"]
    assert seen["accept"] == [b"application/json"]
    assert seen["authorization"] == [b"Token t"]


def test_token_wins_over_url_credentials() -> None:
    rapidpro = FakeRapidPro(201)
    d = post(rapidpro, "http://user:pass@rp.example/in", b"{}", token="tok")
    assert result_of(d) == 201
    assert rapidpro.requests[0]["authorization"] == [b"Token tok"]


def test_url_credentials_become_basic_auth() -> None:
    rapidpro = FakeRapidPro(200)
    d = post(rapidpro, "http://us%40er:p%3Ass@rp.example/in?x=1", b"{}")
    assert result_of(d) == 200
    [seen] = rapidpro.requests
    assert seen["authorization"] == [basic("us@er", "p:ss")]
    assert seen["uri"] == b"/in?x=1"


def test_no_auth_without_token_or_credentials() -> None:
    rapidpro = FakeRapidPro(204)
    assert result_of(post(rapidpro, "http://rp.example/in", b"{}")) == 204
    assert rapidpro.requests[0]["authorization"] is None


@pytest.mark.parametrize(
    ("code", "retryable"),
    [
        (500, True),
        (503, True),
        (408, True),
        (429, True),
        (502, True),
        (400, False),
        (404, False),
        (401, False),
        (302, False),
    ],
)
def test_non_2xx_raises_delivery_failed(code: int, retryable: bool) -> None:
    rapidpro = FakeRapidPro(code)
    d = post(rapidpro, "http://user:secretpass@rp.example/in", b"{}")
    with pytest.raises(DeliveryFailed) as info:
        result_of(d)
    assert info.value.retryable is retryable
    assert info.value.reason == f"HTTP {code}"
    assert "secretpass" not in str(info.value)
    assert len(rapidpro.requests) == 1  # no redirect followed, no retry here


class FailingClient:
    def __init__(self, error: Exception) -> None:
        self.error = error

    def request(self, *args: Any, **kwargs: Any) -> Deferred:
        return fail(self.error)


@pytest.mark.parametrize(
    ("error", "reason"),
    [
        (ConnectionRefusedError("nope"), "connection failed: ConnectionRefusedError"),
        (DNSLookupError("nope"), "connection failed: DNSLookupError"),
        (ResponseNeverReceived([Failure(ConnectionLost("gone"))]), "no response: "),
    ],
)
def test_transport_errors_are_retryable(error: Exception, reason: str) -> None:
    delivery = HttpDelivery(FailingClient(error), Clock())
    d = Deferred.fromCoroutine(
        delivery.post_json("http://user:secretpass@rp.example/in", b"{}", None, 1.5)
    )
    with pytest.raises(DeliveryFailed) as info:
        result_of(d)
    assert info.value.retryable is True
    assert info.value.reason.startswith(reason)
    assert "secretpass" not in info.value.reason


class HangingAgent:
    """An agent whose request never gets an answer; it records cancellation."""

    def __init__(self) -> None:
        self.cancelled = False

    def request(self, *args: Any, **kwargs: Any) -> Deferred:
        def cancel(d: Deferred) -> None:
            self.cancelled = True

        return Deferred(cancel)


def test_no_answer_times_out_once_and_cancels_the_request() -> None:
    clock = Clock()
    agent = HangingAgent()
    delivery = HttpDelivery(agent, clock)
    d = Deferred.fromCoroutine(delivery.post_json("http://rp.example/in", b"{}", None, 7.0))
    assert len(clock.getDelayedCalls()) == 1
    clock.advance(6.9)
    assert not d.called
    clock.advance(0.2)
    with pytest.raises(DeliveryFailed) as info:
        result_of(d)
    assert info.value.retryable is True
    assert info.value.reason == "timed out after 7 s"
    assert agent.cancelled
    assert clock.getDelayedCalls() == []


def test_cancelling_a_delivery_is_not_a_failed_attempt() -> None:
    """A cancel from outside (shutdown) propagates; it is no DeliveryFailed to retry."""
    agent = HangingAgent()
    delivery = HttpDelivery(agent, Clock())
    d = Deferred.fromCoroutine(delivery.post_json("http://rp.example/in", b"{}", None, 7.0))
    d.cancel()
    with pytest.raises(CancelledError):
        result_of(d)
    assert agent.cancelled
