"""Property-based tests against the running service: hostile input never hurts it.

Any JSON value in any field (and any bytes as a body) gets a 4xx in the Junebug
envelope or a 201, never a 5xx or a dropped connection; any bytes on the
``.inbound`` and ``.event`` queues are dead-lettered while later messages flow.
"""

from __future__ import annotations

import http.client
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import ClassVar

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from .support import Broker, inbound_message

MESSAGES = "/channels/test-channel/messages"
FIELDS = [
    "to",
    "from",
    "group",
    "reply_to",
    "content",
    "event_url",
    "event_auth_token",
    "priority",
    "channel_data",
]

json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children, max_size=4)
    ),
    max_leaves=12,
)
plausible = st.one_of(st.text(max_size=20), st.none(), json_values)
requests = st.one_of(
    st.fixed_dictionaries({}, optional={name: plausible for name in FIELDS}).flatmap(
        lambda body: st.dictionaries(st.text(max_size=8), json_values, max_size=2).map(
            lambda extra: {**extra, **body}
        )
    ),
    json_values,
)
FUZZ = settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


@pytest.fixture
def service(make_service):
    return make_service(default_from_addr=None, allow_expired_replies=True)


def check_answer(connection: http.client.HTTPConnection, body: bytes) -> int:
    connection.request("POST", MESSAGES, body=body, headers={"Content-Type": "application/json"})
    response = connection.getresponse()
    raw = response.read()
    assert response.status in (201, 400), (response.status, body[:200], raw[:500])
    answer = json.loads(raw)
    assert answer["status"] == response.status
    assert isinstance(answer["description"], str)
    if response.status == 400:
        assert answer["result"]["errors"], answer
        assert all(isinstance(e["message"], str) for e in answer["result"]["errors"])
    return response.status


@FUZZ
@given(body=requests)
def test_any_json_gets_a_4xx_envelope_or_201(service, body):
    connection = http.client.HTTPConnection("127.0.0.1", service.port, timeout=10)
    try:
        check_answer(connection, json.dumps(body, ensure_ascii=False).encode("utf-8"))
    finally:
        connection.close()


@FUZZ
@given(body=st.binary(max_size=300))
def test_any_bytes_get_a_4xx_envelope_or_201(service, body):
    connection = http.client.HTTPConnection("127.0.0.1", service.port, timeout=10)
    try:
        check_answer(connection, body)
    finally:
        connection.close()


@pytest.mark.parametrize(
    "body",
    [
        b"[" * 100_000 + b"]" * 100_000,
        b'{"to": "1", "from": "2", "content": "x", "channel_data": '
        + b'{"a": ' * 5000
        + b"1"
        + b"}" * 5001,
        b'{"to": "1", "from": "2", "content": "\\ud800"}',
        b'{"to": "1", "from": "2", "content": NaN}',
        b'{"to": "1", "from": "2", "content": "x", "priority": 1e999}',
        b'{"to": "1", "from": "2", "content": "x", "priority": ' + b"9" * 5000 + b"}",
        b'{"to": "1", "to": 2, "from": "2", "content": "x"}',
        b'{"to": "' + b"x" * 500_000 + b'", "from": 1, "content": "x"}',
        b"\xff\xfe\x00",
        b"",
        b"null",
        b'"just a string"',
    ],
)
def test_hostile_bodies(service, body):
    connection = http.client.HTTPConnection("127.0.0.1", service.port, timeout=30)
    try:
        assert check_answer(connection, body) == 400
        # The same connection still serves a good request.
        good = json.dumps({"to": "1", "from": "2", "content": "x"}).encode()
        assert check_answer(connection, good) == 201
    finally:
        connection.close()


class _Sink(BaseHTTPRequestHandler):
    received: ClassVar[list[dict]] = []

    def do_POST(self):
        body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        _Sink.received.append(json.loads(body))
        self.send_response(200)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args):
        pass


@pytest.fixture
def threaded_sink():
    _Sink.received = []
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Sink)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def test_any_bytes_on_the_queues(make_service, connector, threaded_sink):
    import time

    make_service(
        mo_message_url=f"{threaded_sink}/inbound", default_event_url=f"{threaded_sink}/event"
    )
    broker = Broker()
    published = {"inbound": [], "event": []}

    @settings(max_examples=60, deadline=None)
    @given(body=st.binary(max_size=200), kind=st.sampled_from(["inbound", "event"]))
    def publish_garbage(body, kind):
        broker.publish(f"{connector}.{kind}", body)
        published[kind].append(body)

    publish_garbage()
    later = inbound_message(connector)
    broker.publish(f"{connector}.inbound", later)
    deadline = time.monotonic() + 30
    while not any(m.get("message_id") == later["message_id"] for m in _Sink.received):
        assert time.monotonic() < deadline, "a later message did not flow"
        time.sleep(0.05)
    for kind, bodies in published.items():
        while broker.count(f"{connector}.{kind}.failed") < len(bodies):
            assert time.monotonic() < deadline, f"{kind} garbage not all dead-lettered"
            time.sleep(0.05)
        failed = []
        while (got := broker.get(f"{connector}.{kind}.failed")) is not None:
            failed.append(got[1])
        assert sorted(failed) == sorted(bodies)
    broker.close()
