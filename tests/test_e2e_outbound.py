"""Outbound: RapidPro POSTs to the real service; the message lands on .outbound."""

from __future__ import annotations

import json

import pytest_twisted
import treq

from .support import UNICODE_TEXT, inbound_message

MESSAGES = "/channels/test-channel/messages"


async def post(service, body, path=MESSAGES, **kwargs):
    if not isinstance(body, (bytes, str)):
        body = json.dumps(body, ensure_ascii=False)
    if isinstance(body, str):
        body = body.encode("utf-8")
    response = await treq.post(service.url + path, data=body, **kwargs)
    return response.code, json.loads(await response.text())


@pytest_twisted.ensureDeferred
async def test_non_reply_is_published_and_answered_201(make_service, broker, connector):
    service = make_service()
    code, answer = await post(
        service,
        {
            "to": "+26612345678",
            "from": "8110",
            "content": UNICODE_TEXT,
            "channel_data": {"foo": "bar"},
        },
    )
    assert code == 201
    assert answer["status"] == 201
    assert answer["code"] == "Created"
    assert answer["description"] == "message submitted"
    result = answer["result"]
    assert set(result) == {
        "to",
        "from",
        "group",
        "message_id",
        "channel_id",
        "timestamp",
        "reply_to",
        "content",
        "channel_data",
    }
    assert result["to"] == "+26612345678"
    assert result["from"] == "8110"
    assert result["content"] == UNICODE_TEXT
    assert result["channel_id"] == connector
    assert result["reply_to"] is None

    props, body = await broker.wait_get(f"{connector}.outbound")
    assert props.delivery_mode == 2
    assert props.content_type == "application/json"
    message = json.loads(body.decode("utf-8"))
    assert message["message_id"] == result["message_id"]
    assert message["content"] == UNICODE_TEXT
    assert message["to_addr"] == "+26612345678"
    assert message["from_addr"] == "8110"
    assert message["transport_name"] == connector
    assert message["transport_type"] == "sms"
    assert message["message_type"] == "user_message"
    assert message["message_version"] == "20110921"
    assert message["in_reply_to"] is None
    assert message["session_event"] is None
    assert message["helper_metadata"] == {"foo": "bar"}
    assert message["routing_metadata"] == {}
    assert message["transport_metadata"] == {}
    assert message["group"] is None
    assert list(message) == [
        "to_addr",
        "from_addr",
        "transport_name",
        "transport_type",
        "message_version",
        "message_type",
        "timestamp",
        "routing_metadata",
        "helper_metadata",
        "message_id",
        "in_reply_to",
        "provider",
        "session_event",
        "content",
        "transport_metadata",
        "group",
        "to_addr_type",
        "from_addr_type",
    ]


@pytest_twisted.ensureDeferred
async def test_trailing_slash_path_group_and_transport_type(make_service, broker, connector):
    service = make_service(transport_type="ussd")
    code, answer = await post(
        service, {"to": "+1", "from": "2", "content": "hi", "group": "g1"}, MESSAGES + "/"
    )
    assert code == 201, answer
    message = await broker.wait_json(f"{connector}.outbound")
    assert message["group"] == "g1"
    assert message["transport_type"] == "ussd"
    assert answer["result"]["group"] == "g1"


@pytest_twisted.ensureDeferred
async def test_message_waits_in_rabbitmq_before_any_transport(make_service, broker, connector):
    """The service declares .outbound itself, so nothing is dropped as unroutable."""
    service = make_service()
    code, _ = await post(service, {"to": "+1", "from": "2", "content": "early"})
    assert code == 201
    assert broker.count(f"{connector}.outbound") == 1


@pytest_twisted.ensureDeferred
async def test_default_from_addr(make_service, broker, connector):
    service = make_service(default_from_addr="8110")
    code, answer = await post(service, {"to": "+1", "content": "hi", "from": None})
    assert code == 201, answer
    assert (await broker.wait_json(f"{connector}.outbound"))["from_addr"] == "8110"


@pytest_twisted.ensureDeferred
async def test_reply_to_cached_inbound(make_service, broker, connector, sink):
    service = make_service()
    inbound = inbound_message(connector)
    broker.publish(f"{connector}.inbound", inbound)
    from .support import wait_for

    await wait_for(lambda: sink.at("/inbound"), what="the inbound POST")
    code, answer = await post(
        service,
        {
            "reply_to": inbound["message_id"],
            "content": "menu",
            "channel_data": {"continue_session": True, "extra": 1},
        },
    )
    assert code == 201, answer
    reply = await broker.wait_json(f"{connector}.outbound")
    assert reply["to_addr"] == "+27820000001"
    assert reply["from_addr"] == "8110"
    assert reply["in_reply_to"] == inbound["message_id"]
    assert reply["transport_name"] == connector
    assert reply["transport_type"] == "ussd"
    assert reply["transport_metadata"] == {"aat_ussd": {"provider": "x"}}
    assert reply["provider"] == "x"
    assert reply["group"] is None
    assert reply["session_event"] == "resume"
    assert reply["helper_metadata"] == {"extra": 1}
    assert reply["content"] == "menu"
    assert reply["message_id"] not in (inbound["message_id"], None)
    assert answer["result"]["reply_to"] == inbound["message_id"]
    assert answer["result"]["to"] == "+27820000001"

    code, _ = await post(
        service,
        {
            "reply_to": inbound["message_id"],
            "content": "bye",
            "channel_data": {"continue_session": False},
        },
    )
    assert code == 201
    assert (await broker.wait_json(f"{connector}.outbound"))["session_event"] == "close"

    code, _ = await post(
        service,
        {
            "reply_to": inbound["message_id"],
            "content": "x",
            "channel_data": {"continue_session": False, "session_event": "new"},
        },
    )
    assert code == 201
    assert (await broker.wait_json(f"{connector}.outbound"))["session_event"] == "new"


@pytest_twisted.ensureDeferred
async def test_unknown_reply_to_is_not_found(make_service, broker, connector):
    service = make_service()
    code, answer = await post(service, {"reply_to": "nope", "content": "x"})
    assert code == 400
    assert answer == {
        "status": 400,
        "code": "Bad Request",
        "description": "message not found",
        "result": {
            "errors": [
                {"type": "MessageNotFound", "message": "Inbound message with id nope not found"}
            ]
        },
    }
    code, _ = await post(service, {"reply_to": "nope", "to": "+1", "from": "2", "content": "x"})
    assert code == 400
    assert broker.count(f"{connector}.outbound") == 0


@pytest_twisted.ensureDeferred
async def test_allow_expired_replies_sends_non_reply(make_service, broker, connector):
    service = make_service(allow_expired_replies=True)
    code, answer = await post(
        service, {"reply_to": "gone", "to": "+1", "from": "2", "content": "x"}
    )
    assert code == 201, answer
    message = await broker.wait_json(f"{connector}.outbound")
    assert message["in_reply_to"] is None
    assert message["to_addr"] == "+1"
    code, answer = await post(service, {"reply_to": "gone", "content": "x"})
    assert code == 400
    assert answer["description"] == "message not found"


@pytest_twisted.ensureDeferred
async def test_bad_requests_get_the_junebug_envelope(make_service, broker, connector):
    service = make_service()
    cases = [
        (b"{nope", "json decode error", "JsonDecodeError", None),
        (
            {"to": "+1", "from": "2"},
            "api usage error",
            "invalid_body",
            "'content' is a required property",
        ),
        (
            {"to": "+1", "from": "2", "content": "x", "foo": 1},
            "api usage error",
            "invalid_body",
            "Additional properties are not allowed ('foo' was unexpected)",
        ),
        (
            {"content": "x", "from": "2"},
            "api usage error",
            "ApiUsageError",
            'Either "to" or "reply_to" must be specified',
        ),
        (
            {"to": "+1", "content": "x"},
            "api usage error",
            "ApiUsageError",
            '"from" must be specified when not replying',
        ),
        (
            {"to": 5, "from": "2", "content": "x"},
            "api usage error",
            "invalid_body",
            "5 is not of type 'string', 'null'",
        ),
        ([1, 2], "api usage error", "invalid_body", "[1, 2] is not of type 'object'"),
    ]
    for body, description, error_type, message in cases:
        code, answer = await post(service, body)
        assert code == 400, (body, answer)
        assert answer["status"] == 400
        assert answer["code"] == "Bad Request"
        assert answer["description"] == description, body
        errors = answer["result"]["errors"]
        assert errors[0]["type"] == error_type, body
        if message is not None:
            assert errors[0]["message"] == message, body
    assert broker.count(f"{connector}.outbound") == 0


@pytest_twisted.ensureDeferred
async def test_every_schema_error_is_reported(make_service):
    service = make_service()
    code, answer = await post(service, {"to": 1, "from": 2, "content": 3, "bad": 4})
    assert code == 400
    messages = sorted(e["message"] for e in answer["result"]["errors"])
    assert len(messages) == 4, messages
    assert "Additional properties are not allowed ('bad' was unexpected)" in messages


@pytest_twisted.ensureDeferred
async def test_unknown_path_and_method(make_service):
    service = make_service()
    response = await treq.get(service.url + MESSAGES)
    assert response.code == 405
    assert json.loads(await response.text())["status"] == 405
    assert response.headers.getRawHeaders(b"Allow") == [b"POST"]
    response = await treq.post(service.url + "/nowhere", data=b"{}")
    assert response.code == 404
    assert json.loads(await response.text())["description"] == "not found"


@pytest_twisted.ensureDeferred
async def test_repeated_slashes_redirect_to_a_path_that_works(make_service, broker, connector):
    service = make_service()
    url = service.url + MESSAGES.replace("/messages", "//messages")
    body = json.dumps({"to": "+1", "from": "2", "content": "via 308"}).encode()
    response = await treq.post(url, data=body, allow_redirects=False)
    assert response.code == 308
    assert response.headers.getRawHeaders(b"Location") == [MESSAGES.encode()]
    await response.text()
    assert broker.count(f"{connector}.outbound") == 0
    code, answer = await post(service, body, MESSAGES)  # what a client following it sends
    assert code == 201, answer
    message = await broker.wait_json(f"{connector}.outbound")
    assert message["content"] == "via 308"


@pytest_twisted.ensureDeferred
async def test_health(make_service):
    service = make_service()
    response = await treq.get(service.url + "/health")
    assert response.code == 200
    health = json.loads(await response.text())
    assert health["health"] == "ok"
    assert health["components"]["amqp"]["health"] == "ok"
    assert health["components"]["amqp"]["state"] == "open"


@pytest_twisted.ensureDeferred
async def test_the_spec_example_request(make_service, broker, connector):
    """The spec's example (its trailing comma removed), with allow_expired_replies:
    uuid-1234 is unknown, so the message goes out as a non-reply to "to"."""
    service = make_service(allow_expired_replies=True)
    code, answer = await post(
        service,
        {
            "to": "+26612345678",
            "from": "8110",
            "reply_to": "uuid-1234",
            "event_url": "http://example.com/events/msg-1234",
            "content": "Hello world!",
            "channel_data": {"continue_session": True},
        },
    )
    assert code == 201, answer
    assert answer["status"] == 201
    assert answer["description"] == "message submitted"
    assert answer["result"]["message_id"]
    message = await broker.wait_json(f"{connector}.outbound")
    assert message["to_addr"] == "+26612345678"
    assert message["from_addr"] == "8110"
    assert message["content"] == "Hello world!"
    assert message["in_reply_to"] is None
    assert message["helper_metadata"] == {}


def test_unix_socket_http_bind(make_service, tmp_path, broker, connector):
    import socket as socket_module
    import time

    path = tmp_path / "junebug.sock"
    service = make_service(wait=False, http_bind=f"unix:{path}")
    deadline = time.monotonic() + 20
    while not path.exists():
        assert service.process.poll() is None, service.log()
        assert time.monotonic() < deadline, service.log()
        time.sleep(0.05)

    def exchange(request: bytes) -> bytes:
        with socket_module.socket(socket_module.AF_UNIX) as s:
            s.connect(str(path))
            s.sendall(request)
            answer = b""
            while chunk := s.recv(65536):
                answer += chunk
        return answer

    health = b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    while not exchange(health).startswith(b"HTTP/1.1 200 "):
        assert time.monotonic() < deadline, service.log()
        time.sleep(0.05)
    body = json.dumps({"to": "+1", "from": "2", "content": "over a unix socket"}).encode()
    answer = exchange(
        (
            f"POST {MESSAGES} HTTP/1.1\r\nHost: x\r\nContent-Length: {len(body)}\r\n"
            "Connection: close\r\n\r\n"
        ).encode()
        + body
    )
    assert answer.startswith(b"HTTP/1.1 201 "), answer
    assert b'"description":"message submitted"' in answer  # (a chunked body)
    message = await_sync_json(broker, f"{connector}.outbound")
    assert message["content"] == "over a unix socket"


def await_sync_json(broker, queue: str, timeout: float = 10.0) -> dict:
    """The next message on ``queue``, polled without the reactor."""
    import time

    deadline = time.monotonic() + timeout
    while (got := broker.get(queue)) is None:
        assert time.monotonic() < deadline, f"nothing on {queue}"
        time.sleep(0.05)
    return json.loads(got[1])
