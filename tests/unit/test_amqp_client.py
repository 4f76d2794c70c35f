"""JunebugAMQPClient's own frame reader and writers, on a StringTransport.

The reader must give the same deliveries and calls however TCP cuts the
stream: split at every byte position, whole, and one byte at a time.
"""

from __future__ import annotations

import struct
from typing import Any

import pytest
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport

from junebug_api.amqp.protocol import (
    JunebugAMQPClient,
    JunebugAMQPFactory,
    decode_frame,
    encode_table,
    load_spec,
)
from junebug_api.amqp.testing import FakeBroker, RecordingConnectionEvents
from junebug_api.testing import captured_logs

from .helpers import amqp_content, amqp_method

UNICODE_BODY = "Sawubona 👋 ñ 漢字".encode()
HEARTBEAT = struct.pack("!BHI", 8, 0, 0) + b"\xce"


def body_frame(channel: int, body: bytes) -> bytes:
    return struct.pack("!BHI", 3, channel, len(body)) + body + b"\xce"


def deliver(channel: int, tag: int, redelivered: bool = False, consumer: str = "q") -> bytes:
    return amqp_method(
        channel,
        "basic",
        "deliver",
        consumer_tag=consumer,
        delivery_tag=tag,
        redelivered=redelivered,
        exchange="vumi",
        routing_key=consumer,
    )


def content_in_two_body_frames(channel: int, body: bytes, headers: dict) -> bytes:
    """A content header and the body cut into two body frames."""
    header = struct.pack("!HHQH", 60, 0, len(body), 0x2000) + encode_table(headers)
    half = len(body) // 2
    return (
        struct.pack("!BHI", 2, channel, len(header))
        + header
        + b"\xce"
        + body_frame(channel, body[:half])
        + body_frame(channel, body[half:])
    )


#: A stream as a broker sends it: deliveries on two channels (one with its
#: body in two frames and headers, one interleaved with another channel's,
#: one with an empty body), confirms, a heartbeat, and frames that take
#: txAMQP's own path (connection.blocked/unblocked).
STREAM = b"".join(
    [
        deliver(3, 1, consumer="c.inbound"),
        content_in_two_body_frames(3, UNICODE_BODY, {"attempt": 2, "x-death": {"count": 1}}),
        HEARTBEAT,
        amqp_method(1, "basic", "ack", delivery_tag=7, multiple=True),
        deliver(4, 1, redelivered=True, consumer="c.event"),
        deliver(3, 2, consumer="c.inbound"),
        amqp_content(3, b""),
        amqp_content(4, b'{"event": 1}'),
        amqp_method(0, "connection", "blocked", reason="low on memory"),
        amqp_method(1, "basic", "nack", delivery_tag=8),
        HEARTBEAT,
        amqp_method(0, "connection", "unblocked"),
    ]
)

EXPECTED = [
    (
        "message_delivered",
        (3, "c.inbound", 1, False, UNICODE_BODY, {"attempt": 2, "x-death": {"count": 1}}),
    ),
    ("publish_confirmed", (7, True, True)),
    ("message_delivered", (3, "c.inbound", 2, False, b"", {})),
    ("message_delivered", (4, "c.event", 1, True, b'{"event": 1}', {})),
    ("broker_blocked", ("low on memory",)),
    ("publish_confirmed", (8, False, False)),
    ("broker_unblocked", ()),
]


def reported(events: RecordingConnectionEvents) -> list[tuple[str, tuple]]:
    """What the client reported after its connection_made."""
    return [e for e in events.events if e[0] != "connection_made"]


def client_recording(
    heartbeat: int = 0,
    clock: Any = None,
    vhost: str = "/",
    name: str = "junebug-api",
    events: RecordingConnectionEvents | None = None,
) -> tuple[JunebugAMQPClient, StringTransport, RecordingConnectionEvents]:
    events = events or RecordingConnectionEvents()
    factory = JunebugAMQPFactory(vhost, heartbeat, clock or Clock(), events, name)
    client = factory.buildProtocol(None)
    transport = StringTransport()
    client.makeConnection(transport)
    return client, transport, events


def test_the_stream_whole() -> None:
    broker = FakeBroker()
    broker.feed(STREAM)
    assert reported(broker.events) == EXPECTED
    assert not broker.transport.disconnecting


def test_the_stream_one_byte_at_a_time() -> None:
    broker = FakeBroker()
    broker.feed_bytewise(STREAM)
    assert reported(broker.events) == EXPECTED


def test_the_stream_split_at_every_byte() -> None:
    for cut in range(len(STREAM) + 1):
        broker = FakeBroker()
        broker.feed(STREAM, [cut])
        assert reported(broker.events) == EXPECTED, f"split at byte {cut}"
        assert not broker.transport.disconnecting


def test_the_stream_split_at_every_pair_of_frame_boundaries_and_bytes() -> None:
    """Three pieces: cut inside a frame and again in a later one."""
    for first in range(0, len(STREAM) + 1, 7):
        for second in range(first, len(STREAM) + 1, 13):
            broker = FakeBroker()
            broker.feed(STREAM, [first, second])
            assert reported(broker.events) == EXPECTED, f"split at bytes {first} and {second}"


def test_the_first_bytes_are_kept_for_explaining_a_failed_set_up() -> None:
    client, _, _ = client_recording()
    client.dataReceived(b"HTTP/1.1 400 Bad")
    client.dataReceived(b" Request\r\n")
    assert client.received == b"HTTP/1.1 400 Bad"


def test_a_frame_without_its_end_octet_drops_the_connection() -> None:
    bad = HEARTBEAT[:-1] + b"\x00"
    client, transport, events = client_recording()
    with captured_logs() as logged:
        client.dataReceived(deliver(3, 1) + bad + deliver(3, 2))
    assert transport.disconnecting
    assert reported(events) == []
    assert any("framing error" in e["log_format"] for e in logged)


def test_frames_after_the_connection_drops_are_not_handled() -> None:
    """A consumer that drops the connection (say, a channel error) stops the
    reading of the rest of that input."""

    class Dropping(RecordingConnectionEvents):
        def message_delivered(self, *args: Any) -> None:
            super().message_delivered(*args)
            transport.loseConnection()

    client, transport, events = client_recording(events=Dropping())
    client.dataReceived(
        deliver(3, 1) + amqp_content(3, b"one") + deliver(3, 2) + amqp_content(3, b"two")
    )
    assert [args[4] for args in events.named("message_delivered")] == [b"one"]


def test_encode_publish_frames_decode_to_what_was_given() -> None:
    client, _, _ = client_recording()
    client.MAX_LENGTH = 16  # frame_max: 8 bytes of body per body frame
    data = client.encode_publish(
        1,
        "vumi",
        "c.outbound",
        UNICODE_BODY,
        {
            "content-type": "application/json",
            "headers": {"attempt": 3, "ok": True},
            "delivery-mode": 2,
            "message-id": "m-1",
        },
        mandatory=False,
    )
    frames, offset = [], 0
    while offset < len(data):
        (size,) = struct.unpack_from("!I", data, offset + 3)
        frames.append(decode_frame(load_spec(), data[offset : offset + size + 8]))
        offset += size + 8
    method, header, *bodies = frames
    args = dict(
        zip([f.name for f in method.payload.method.fields], method.payload.args, strict=True)
    )
    assert method.payload.method.name == "publish"
    assert (args["exchange"], args["routing-key"], args["mandatory"]) == (
        "vumi",
        "c.outbound",
        False,
    )
    assert header.payload.size == len(UNICODE_BODY)
    assert header.payload.properties == {
        "content-type": "application/json",
        "headers": {"attempt": 3, "ok": True},
        "delivery-mode": 2,
        "message-id": "m-1",
    }
    assert all(len(b.payload.content) <= 8 for b in bodies)
    assert b"".join(b.payload.content for b in bodies) == UNICODE_BODY
    assert {f.channel for f in frames} == {1}


@pytest.mark.parametrize(
    ("properties", "error"),
    [
        ({"message-id": "x" * 256}, ValueError),
        ({"headers": {"rate": 1.5}}, TypeError),
    ],
)
def test_encode_publish_refuses_what_amqp_cannot_carry(properties: dict, error: type) -> None:
    client, _, _ = client_recording()
    with pytest.raises(error):
        client.encode_publish(1, "vumi", "q", b"x", properties)


def test_ack_and_reject_frames() -> None:
    client, transport, _ = client_recording()
    transport.clear()
    client.ack(3, 9, multiple=True)
    client.reject(4, 2, requeue=False)
    client.reject(4, 3)
    data = transport.value()
    methods = []
    while data:
        (size,) = struct.unpack_from("!I", data, 3)
        frame = decode_frame(load_spec(), data[: size + 8])
        methods.append((frame.channel, frame.payload.method.name, *frame.payload.args))
        data = data[size + 8 :]
    assert methods == [(3, "ack", 9, True), (4, "reject", 2, False), (4, "reject", 3, True)]


def test_login_answers_connection_start_with_our_capabilities() -> None:
    client, transport, _ = client_recording(vhost="/vhost", name="svc (publish)")
    assert transport.value()[:4] == b"AMQP" and len(transport.value()) == 8  # the protocol header
    transport.clear()
    client.login("user", "pässword")
    client.dataReceived(amqp_method(0, "connection", "start", mechanisms="PLAIN"))
    frame = decode_frame(load_spec(), transport.value())
    args = dict(zip([f.name for f in frame.payload.method.fields], frame.payload.args, strict=True))
    assert frame.payload.method.name == "start-ok"
    assert args["mechanism"] == "PLAIN"
    assert args["response"] == "\0user\0pässword"
    assert args["client-properties"]["connection_name"] == "svc (publish)"
    assert args["client-properties"]["capabilities"]["authentication_failure_close"] is True
    assert client.vhost == "/vhost"


def test_external_login_sends_an_empty_response() -> None:
    client, transport, _ = client_recording()
    transport.clear()
    client.login("ignored", "ignored", mechanism="EXTERNAL")
    client.dataReceived(amqp_method(0, "connection", "start", mechanisms="EXTERNAL"))
    frame = decode_frame(load_spec(), transport.value())
    assert frame.payload.args[1] == "EXTERNAL"
    assert frame.payload.args[2] == ""


def test_heartbeats_are_sent_and_silence_drops_the_connection() -> None:
    clock = Clock()
    client, transport, _ = client_recording(heartbeat=5, clock=clock)
    client.start(b"\0u\0p", mechanism="PLAIN")
    client.dataReceived(amqp_method(0, "connection", "start"))
    client.dataReceived(amqp_method(0, "connection", "tune", frame_max=4096, heartbeat=5))
    transport.clear()
    clock.advance(5)
    assert transport.value() == HEARTBEAT
    for _ in range(5):  # the broker's heartbeats keep it alive
        clock.advance(4)
        client.dataReceived(HEARTBEAT)
    assert not transport.disconnecting
    with captured_logs() as events:
        clock.advance(15)
    assert transport.disconnecting
    assert any("No AMQP traffic" in e["log_format"] for e in events)
