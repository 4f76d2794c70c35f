"""JunebugApi + OutboundSender over StubTreq, with a fake publish and a Clock."""

from __future__ import annotations

import gc
import json
from typing import Any

import pytest
from treq.testing import StubTreq
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.logger import LogLevel

from junebug_api.amqp.service import PublishFailed, PublishRefused
from junebug_api.delivery.outbound import OutboundSender
from junebug_api.http.api import ApiCredentials, JunebugApi
from junebug_api.http.server import ApiSite
from junebug_api.state.cache import EventInfo
from junebug_api.state.memory_cache import InMemoryStateCache
from junebug_api.testing import FixedChannels, RecordingPublisher, captured_logs

from .helpers import result_of

PATH = "/channels/x/messages"
URL = "http://junebug.example" + PATH
TIMEOUT = 30.0
UNICODE_TEXT = "Sawubona, ngiyabonga 👋 ñ 漢字"


class SenderChannel:
    """The channel ``x`` as the API sees it, sending through ``sender``."""

    id = "x"
    messages_path = PATH
    credentials = ApiCredentials()

    def __init__(self, sender: OutboundSender) -> None:
        self.send = sender.send


class Harness:
    def __init__(
        self,
        publish: RecordingPublisher | None = None,
        health: dict | None = None,
        allow_expired_replies: bool = False,
        default_from_addr: str | None = "+27000000000",
    ) -> None:
        self.clock = Clock()
        self.cache = InMemoryStateCache(self.clock)
        self.publish = publish or RecordingPublisher()
        self.health = health or {"health": "ok", "components": {}}
        sender = OutboundSender(
            connector_name="conn",
            transport_type="sms",
            default_from_addr=default_from_addr,
            allow_expired_replies=allow_expired_replies,
            cache=self.cache,
            publish=self.publish,
        )
        self.api = JunebugApi(
            FixedChannels([SenderChannel(sender)]), lambda: self.health, TIMEOUT, self.clock
        )
        self.http = StubTreq(self.api.resource())

    def request(self, method: str, url: str, body: Any = None) -> Deferred:
        data = body if isinstance(body, bytes) or body is None else json.dumps(body).encode()
        return self.http.request(method, url, data=data)

    def answer(self, d: Deferred) -> tuple[int, dict[str, Any], bytes]:
        """Status, JSON body and content type of a response that has arrived."""
        self.http.flush()
        response = result_of(d)
        content = self.http.content(response)
        self.http.flush()
        raw = result_of(content)
        content_type = response.headers.getRawHeaders(b"Content-Type")
        assert content_type == [b"application/json; charset=utf-8"]
        return response.code, json.loads(raw), raw

    def call(self, method: str, url: str, body: Any = None) -> tuple[int, dict[str, Any]]:
        code, data, _ = self.answer(self.request(method, url, body))
        return code, data

    def post(self, body: Any) -> tuple[int, dict[str, Any]]:
        return self.call("POST", URL, body)


def test_post_message_201_and_publish() -> None:
    h = Harness()
    code, data = h.post(
        {
            "to": "+27820000001",
            "from": "+27000000009",
            "content": UNICODE_TEXT,
            "group": "g",
            "channel_data": {"session_event": "new", "extra": {"k": 1}},
        }
    )
    assert code == 201
    assert len(h.publish.published) == 1
    sent = h.publish.published[0]
    assert sent.routing_key == "conn.outbound"
    assert isinstance(sent.body, bytes)
    message = json.loads(sent.body.decode("utf-8"))
    assert UNICODE_TEXT.encode("utf-8") in sent.body  # UTF-8 on the wire, not \u escapes
    assert (sent.message_id, sent.headers, sent.refuse_if_busy) == (
        message["message_id"],
        None,
        True,
    )
    assert message["to_addr"] == "+27820000001"
    assert message["from_addr"] == "+27000000009"
    assert message["content"] == UNICODE_TEXT
    assert message["transport_name"] == "conn"
    assert message["transport_type"] == "sms"
    assert message["message_type"] == "user_message"
    assert message["message_version"] == "20110921"
    assert message["session_event"] == "new"
    assert message["helper_metadata"] == {"extra": {"k": 1}}
    assert message["group"] == "g"
    assert message["in_reply_to"] is None
    assert len(message["message_id"]) == 32
    assert data == {
        "status": 201,
        "code": "Created",
        "description": "message submitted",
        "result": {
            "to": "+27820000001",
            "from": "+27000000009",
            "group": "g",
            "message_id": message["message_id"],
            "channel_id": "conn",
            "timestamp": message["timestamp"],
            "reply_to": None,
            "content": UNICODE_TEXT,
            "channel_data": {"session_event": "new", "extra": {"k": 1}},
        },
    }


def test_post_uses_default_from_addr_and_trailing_slash() -> None:
    h = Harness()
    code, _ = h.call("POST", URL + "/", {"to": "+2782", "content": "hi"})
    assert code == 201
    message = json.loads(h.publish.published[0].body)
    assert message["from_addr"] == "+27000000000"


def test_post_without_from_and_without_default_is_400() -> None:
    h = Harness(default_from_addr=None)
    code, data = h.post({"to": "+2782", "content": "hi"})
    assert code == 400
    assert data["description"] == "api usage error"
    assert h.publish.published == []


def test_event_url_is_stored_for_the_message() -> None:
    h = Harness()
    code, data = h.post(
        {
            "to": "+2782",
            "content": "hi",
            "event_url": "https://rp.example/events",
            "event_auth_token": "tok",
        }
    )
    assert code == 201
    message_id = data["result"]["message_id"]
    info = result_of(h.cache.fetch_event_info("conn", message_id))
    assert info == EventInfo("https://rp.example/events", "tok")


def test_reply_to_cached_inbound() -> None:
    h = Harness()
    inbound = {
        "message_id": "in-1",
        "to_addr": "*120#",
        "from_addr": "+27820000001",
        "transport_name": "ussd_transport",
        "transport_type": "ussd",
        "transport_metadata": {"session_id": "s1"},
        "provider": "mtn",
    }
    result_of(h.cache.store_inbound(inbound))
    code, data = h.post(
        {"reply_to": "in-1", "content": "bye", "channel_data": {"continue_session": False}}
    )
    assert code == 201
    message = json.loads(h.publish.published[0].body)
    assert message["to_addr"] == "+27820000001"
    assert message["from_addr"] == "*120#"
    assert message["in_reply_to"] == "in-1"
    assert message["transport_name"] == "ussd_transport"
    assert message["transport_type"] == "ussd"
    assert message["transport_metadata"] == {"session_id": "s1"}
    assert message["provider"] == "mtn"
    assert message["session_event"] == "close"
    assert message["helper_metadata"] == {}
    assert data["result"]["reply_to"] == "in-1"


def test_reply_to_unknown_inbound_is_400() -> None:
    h = Harness()
    code, data = h.post({"reply_to": "gone", "content": "hi"})
    assert code == 400
    assert data["description"] == "message not found"
    assert data["result"]["errors"] == [
        {"type": "MessageNotFound", "message": "Inbound message with id gone not found"}
    ]
    assert h.publish.published == []


def test_expired_reply_with_to_when_allowed() -> None:
    h = Harness(allow_expired_replies=True)
    code, _ = h.post({"reply_to": "gone", "to": "+2782", "content": "hi"})
    assert code == 201
    message = json.loads(h.publish.published[0].body)
    assert message["to_addr"] == "+2782"
    assert message["in_reply_to"] is None


def test_publish_failed_is_503_and_event_info_deleted() -> None:
    publish = RecordingPublisher(auto_confirm=False)
    h = Harness(publish=publish)
    d = h.request(
        "POST", URL, {"to": "+2782", "content": "hi", "event_url": "http://rp.example/events"}
    )
    h.http.flush()
    [sent] = publish.pending
    # It was stored before the publish was answered...
    assert result_of(h.cache.fetch_event_info("conn", sent.message_id)) == EventInfo(
        "http://rp.example/events", None
    )
    publish.nack(PublishFailed("broker down"))
    code, data, _ = h.answer(d)
    assert code == 503
    assert data["status"] == 503
    assert data["code"] == "Service Unavailable"
    assert data["description"] == "service unavailable"
    assert data["result"]["errors"] == [
        {"type": "ServiceUnavailable", "message": "message not sent: broker down"}
    ]
    # ... and is gone again.
    assert result_of(h.cache.fetch_event_info("conn", sent.message_id)) is None


def test_publish_refused_is_503_with_retry_after() -> None:
    h = Harness()
    h.publish.failure = PublishRefused("the broker blocks publishing", 5)
    d = h.request("POST", URL, {"to": "+2782", "content": "hi"})
    h.http.flush()
    response = result_of(d)
    assert response.code == 503
    assert response.headers.getRawHeaders(b"Retry-After") == [b"5"]
    content = h.http.content(response)
    h.http.flush()
    data = json.loads(result_of(content))
    assert data["result"]["errors"][0]["message"] == (
        "message not sent: the broker blocks publishing"
    )


def test_publish_failed_has_no_retry_after() -> None:
    h = Harness()
    h.publish.failure = PublishFailed("broker down")
    d = h.request("POST", URL, {"to": "+2782", "content": "hi"})
    h.http.flush()
    assert result_of(d).headers.getRawHeaders(b"Retry-After") is None


def test_publish_never_confirmed_is_503_after_request_timeout() -> None:
    h = Harness(publish=RecordingPublisher(auto_confirm=False))
    d = h.request("POST", URL, {"to": "+2782", "content": "hi"})
    answered: list[Any] = []
    d.addBoth(lambda r: answered.append(r) or r)
    h.http.flush()
    assert answered == []
    h.clock.advance(TIMEOUT - 1)
    h.http.flush()
    assert answered == []
    assert len(h.publish.published) == 1
    with captured_logs() as logged:
        h.clock.advance(1)
    code, data, _ = h.answer(d)
    assert code == 503
    message_id = json.loads(h.publish.published[0].body)["message_id"]
    unanswered = [e for e in logged if e.get("message_id") == message_id]
    assert len(unanswered) == 1 and "unanswered" in unanswered[0]["log_format"]
    assert unanswered[0]["log_level"] == LogLevel.error
    assert data["code"] == "Service Unavailable"
    assert data["description"] == "service unavailable"
    assert data["result"]["errors"] == [
        {"type": "RequestTimeout", "message": "request not handled within 30 s"}
    ]
    assert h.publish.published[0].confirmed.called  # the publish wait was cancelled
    assert h.clock.getDelayedCalls() == []


def test_event_url_not_http_is_400() -> None:
    h = Harness()
    for url in ("ftp://rp.example/events", "rp.example/events", "http://"):
        code, data = h.post({"to": "+2782", "content": "hi", "event_url": url})
        assert code == 400, url
        assert data["description"] == "api usage error"
        assert data["result"]["errors"] == [
            {
                "type": "ApiUsageError",
                "message": '"event_url" must be an http:// or https:// URL',
            }
        ]
    assert h.publish.published == []


def test_invalid_json_is_400() -> None:
    h = Harness()
    code, data = h.post(b"{not json")
    assert code == 400
    assert data["description"] == "json decode error"
    assert data["result"]["errors"][0]["type"] == "JsonDecodeError"


def test_schema_error_is_400() -> None:
    h = Harness()
    code, data = h.post({"to": "+2782", "content": 5})
    assert code == 400
    assert data["result"]["errors"][0]["type"] == "invalid_body"
    assert data["result"]["errors"][0]["schema_path"] == ["properties", "content", "type"]


def test_health_ok() -> None:
    h = Harness(health={"health": "ok", "components": {"amqp": {"health": "ok"}}})
    code, data = h.call("GET", "http://junebug.example/health")
    assert code == 200
    assert data == {"health": "ok", "components": {"amqp": {"health": "ok"}}}


def test_health_down_is_503() -> None:
    health = {"health": "down", "components": {"amqp": {"health": "down", "error": "x"}}}
    h = Harness(health=health)
    code, data = h.call("GET", "http://junebug.example/health")
    assert code == 503
    assert data == health


def test_unknown_path_is_404_envelope() -> None:
    h = Harness()
    code, data = h.call("GET", "http://junebug.example/nope")
    assert code == 404
    assert data["description"] == "not found"
    assert data["result"]["errors"][0]["type"] == "NotFound"


def test_wrong_method_is_405_envelope() -> None:
    h = Harness()
    code, data = h.call("GET", URL)
    assert code == 405
    assert data["description"] == "method not allowed"
    assert data["result"]["errors"][0]["message"] == "method GET is not allowed here"


def test_wrong_method_names_the_allowed_ones() -> None:
    h = Harness()
    d = h.request("DELETE", "http://junebug.example/health")
    h.http.flush()
    response = result_of(d)
    assert response.code == 405
    assert response.headers.getRawHeaders(b"Allow") == [b"GET, HEAD"]


def test_health_with_trailing_slash() -> None:
    h = Harness()
    code, data = h.call("GET", "http://junebug.example/health/")
    assert code == 200
    assert data["health"] == "ok"


def test_repeated_slashes_redirect_to_the_path_with_single_ones() -> None:
    h = Harness()
    url = "http://junebug.example/channels//x/messages?a=1&b=%20"
    d = h.http.request("POST", url, data=b"{}", allow_redirects=False)
    h.http.flush()
    response = result_of(d)
    assert response.code == 308
    location = "/channels/x/messages?a=1&b=%20"
    assert response.headers.getRawHeaders(b"Location") == [location.encode()]
    body = json.loads(result_of(h.http.content(response)))
    assert body["result"] == {"location": location}
    assert h.publish.published == []


def test_leading_repeated_slashes_redirect_too() -> None:
    """werkzeug strips leading slashes before matching; they get the 308 too."""
    h = Harness()
    for path, location in [
        ("//channels/x/messages", "/channels/x/messages"),
        ("///channels//x/messages?q=1", "/channels/x/messages?q=1"),
        ("//health", "/health"),
    ]:
        d = h.http.request(
            "POST", "http://junebug.example" + path, data=b"{}", allow_redirects=False
        )
        h.http.flush()
        response = result_of(d)
        assert response.code == 308, path
        assert response.headers.getRawHeaders(b"Location") == [location.encode()]
    assert h.publish.published == []


def test_path_that_is_not_utf8_is_400_envelope() -> None:
    h = Harness()
    code, data = h.call("POST", "http://junebug.example/channels/%ff/messages", {})
    assert code == 400
    assert data["result"]["errors"] == [
        {"type": "ApiUsageError", "message": "the URL path is not UTF-8"}
    ]


def test_unexpected_error_is_500_envelope() -> None:
    h = Harness()
    h.publish.failure = ZeroDivisionError()
    code, data = h.post({"to": "+2782", "from": "8110", "content": "hi"})
    assert code == 500
    assert data["result"]["errors"][0]["type"] == "InternalError"


@pytest.mark.parametrize(
    "event_url", ["http://[x/", "http://rp.example:port/e", "ftp://rp/e", "/e"]
)
def test_bad_event_urls_are_400(event_url: str) -> None:
    h = Harness()
    d = h.request(
        "POST", URL, {"to": "+2782", "from": "8110", "content": "hi", "event_url": event_url}
    )
    h.http.flush()
    code, data, _ = h.answer(d)
    assert code == 400
    assert (
        data["result"]["errors"][0]["message"] == '"event_url" must be an http:// or https:// URL'
    )
    assert h.publish.published == []


def test_requests_leave_no_cyclic_garbage() -> None:
    """A finished request is freed at once, not left for the cycle collector.

    Each request pinned in a cycle used to cost about 40 objects of cyclic
    garbage and, under load, collector pauses of 100 ms and more. werkzeug's
    URL matcher still leaves one small cycle per request: its recursive
    closure, with the cells and the set it holds (8 objects).
    """
    h = Harness()
    site = ApiSite(
        h.api.resource(), clock=h.clock, max_request_size=1000, read_timeout=5, idle_timeout=60
    )
    channel = site.buildProtocol(None)
    transport = StringTransport()
    channel.makeConnection(transport)
    body = json.dumps({"to": "+2782", "from": "8110", "content": "hi"}).encode()
    request = b"POST %s HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n%s" % (
        PATH.encode(),
        len(body),
        body,
    )
    channel.dataReceived(request)  # warm up: first-use caches are not garbage
    gc.collect()
    gc.disable()
    try:
        for _ in range(100):
            channel.dataReceived(request)
        garbage = gc.collect()
    finally:
        gc.enable()
    assert transport.value().count(b"HTTP/1.1 201 Created") == 101
    assert len(h.publish.published) == 101
    assert garbage <= 8 * 100


def test_shutdown_drain_answers_in_flight_requests_then_closes() -> None:
    """Draining: a request waiting for its confirm is answered (with
    Connection: close) and its connection closes after the answer; an idle
    kept-alive connection is closed cleanly after the grace period."""
    h = Harness(RecordingPublisher(auto_confirm=False))
    site = ApiSite(
        h.api.resource(), clock=h.clock, max_request_size=1000, read_timeout=5, idle_timeout=60
    )
    body = json.dumps({"to": "+2782", "from": "8110", "content": "hi"}).encode()
    request = b"POST %s HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n%s" % (
        PATH.encode(),
        len(body),
        body,
    )
    busy_channel, idle_channel = site.buildProtocol(None), site.buildProtocol(None)
    busy, idle = StringTransport(), StringTransport()
    busy_channel.makeConnection(busy)
    idle_channel.makeConnection(idle)
    idle_channel.dataReceived(request)
    h.publish.confirm()
    assert idle.value().startswith(b"HTTP/1.1 201 Created")
    busy_channel.dataReceived(request)
    assert busy.value() == b""  # waiting for its confirm

    drained = Deferred.fromCoroutine(site.drain(10))
    assert not idle.disconnecting  # the grace period: a request may be on its way
    h.clock.advance(0.5)
    assert idle.disconnecting  # idle after the grace period: closed
    assert not busy.disconnecting
    assert not drained.called
    h.publish.confirm()
    answer = busy.value()
    assert answer.startswith(b"HTTP/1.1 201 Created")
    assert b"\r\nConnection: close\r\n" in answer
    assert busy.disconnecting  # closed after its answer
    assert result_of(drained) == 0


def test_shutdown_drain_cuts_what_is_not_answered_in_time() -> None:
    h = Harness(RecordingPublisher(auto_confirm=False))
    site = ApiSite(
        h.api.resource(), clock=h.clock, max_request_size=1000, read_timeout=5, idle_timeout=60
    )
    body = json.dumps({"to": "+2782", "from": "8110", "content": "hi"}).encode()
    channel = site.buildProtocol(None)
    transport = StringTransport()
    channel.makeConnection(transport)
    channel.dataReceived(
        b"POST %s HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n%s"
        % (PATH.encode(), len(body), body)
    )
    drained = Deferred.fromCoroutine(site.drain(3))
    h.clock.advance(0.5)
    h.clock.advance(2.4)
    assert not drained.called
    h.clock.advance(0.2)
    assert result_of(drained) == 1
