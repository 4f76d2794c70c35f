"""amqp_protocol.decode_frame and FieldCodec on hand-built frames."""

from __future__ import annotations

import struct
from decimal import Decimal
from io import BytesIO
from unittest import mock

import pytest
from txamqp.connection import Body, Header, Heartbeat, Method
from txamqp.protocol import GarbageException

from junebug_api.amqp.frames import FieldCodec, decode_frame, load_spec

from .helpers import result_of

FRAME_END = b"\xce"
UNICODE_TEXT = "Sawubona, ngiyabonga 👋 ñ 漢字"


def frame(frame_type: int, channel: int, payload: bytes, end: bytes = FRAME_END) -> bytes:
    return struct.pack("!BHI", frame_type, channel, len(payload)) + payload + end


def shortstr(text: str) -> bytes:
    data = text.encode("utf-8")
    return struct.pack("!B", len(data)) + data


def longstr(data: bytes) -> bytes:
    return struct.pack("!I", len(data)) + data


def table(items: list[tuple[str, bytes]]) -> bytes:
    """A field table from (name, type octet + encoded value) pairs."""
    body = b"".join(shortstr(name) + value for name, value in items)
    return struct.pack("!I", len(body)) + body


def array(values: list[bytes]) -> bytes:
    body = b"".join(values)
    return struct.pack("!I", len(body)) + body


def test_spec_is_cached_and_has_rabbitmq_extensions() -> None:
    spec = load_spec()
    assert load_spec() is spec
    basic = spec.classes.byid[60]
    assert basic.name == "basic"
    assert "nack" in [m.name for m in basic.methods]
    assert "confirm" in [c.name for c in spec.classes]


def test_body_frame_with_non_ascii_utf8_stays_exact_bytes() -> None:
    body = UNICODE_TEXT.encode("utf-8")
    assert len(body) != len(UNICODE_TEXT)
    decoded = decode_frame(load_spec(), frame(3, 1, body))
    assert decoded.channel == 1
    assert isinstance(decoded.payload, Body)
    assert isinstance(decoded.payload.content, bytes)
    assert decoded.payload.content == body


def test_body_frame_that_is_not_utf8_stays_bytes() -> None:
    body = b"\xff\xfe\x00caf\xe9 \x80"
    decoded = decode_frame(load_spec(), frame(3, 2, body))
    assert decoded.channel == 2
    assert decoded.payload.content == body
    assert isinstance(decoded.payload.content, bytes)


def test_ascii_body_frame_stays_bytes() -> None:
    decoded = decode_frame(load_spec(), frame(3, 1, b'{"a": 1}'))
    assert decoded.payload.content == b'{"a": 1}'


def test_empty_body_frame() -> None:
    assert decode_frame(load_spec(), frame(3, 1, b"")).payload.content == b""


def test_heartbeat_frame() -> None:
    decoded = decode_frame(load_spec(), frame(8, 0, b""))
    assert decoded.channel == 0
    assert isinstance(decoded.payload, Heartbeat)


def test_content_header_with_every_table_type() -> None:
    x_death = table(
        [
            ("count", b"l" + struct.pack("!q", 3)),
            ("reason", b"S" + longstr(b"expired")),
            ("queue", b"S" + longstr("c.inbound ñ".encode())),
        ]
    )
    headers = table(
        [
            ("bool-true", b"t" + b"\x01"),
            ("bool-false", b"t" + b"\x00"),
            ("short-short", b"b" + struct.pack("!b", -5)),
            ("short", b"s" + struct.pack("!h", -300)),
            ("int", b"I" + struct.pack("!i", -70000)),
            ("long", b"l" + struct.pack("!q", -(2**40))),
            ("double", b"d" + struct.pack("!d", 2.5)),
            ("decimal", b"D" + struct.pack("!Bi", 2, 12345)),
            ("string", b"S" + longstr(UNICODE_TEXT.encode("utf-8"))),
            ("not-utf8", b"S" + longstr(b"\xff\x00")),
            ("bytes", b"x" + longstr(b"\x00\xffabc")),
            (
                "array",
                b"A" + array([b"S" + longstr(b"a"), b"I" + struct.pack("!i", 7), b"t\x00", b"V"]),
            ),
            ("x-death", b"A" + array([b"F" + x_death])),
            ("timestamp", b"T" + struct.pack("!Q", 1_764_163_398)),
            ("nested", b"F" + table([("inner", b"F" + table([("n", b"B\xff")]))])),
            ("void", b"V"),
        ]
    )
    # Property flags: bit 15 content-type, bit 13 headers, bit 12 delivery-mode.
    flags = (1 << 15) | (1 << 13) | (1 << 12)
    payload = (
        struct.pack("!HHQH", 60, 0, 1234, flags)
        + shortstr("application/json")
        + headers
        + struct.pack("!B", 2)
    )
    decoded = decode_frame(load_spec(), frame(2, 1, payload))
    header = decoded.payload
    assert isinstance(header, Header)
    assert decoded.channel == 1
    assert header.klass.id == 60
    assert header.weight == 0
    assert header.size == 1234
    assert header.properties == {
        "content-type": "application/json",
        "headers": {
            "bool-true": True,
            "bool-false": False,
            "short-short": -5,
            "short": -300,
            "int": -70000,
            "long": -(2**40),
            "double": 2.5,
            "decimal": Decimal("123.45"),
            "string": UNICODE_TEXT,
            "not-utf8": b"\xff\x00",
            "bytes": b"\x00\xffabc",
            "array": ["a", 7, False, None],
            "x-death": [{"count": 3, "reason": "expired", "queue": "c.inbound ñ"}],
            "timestamp": 1_764_163_398,
            "nested": {"inner": {"n": 255}},
            "void": None,
        },
        "delivery-mode": 2,
    }
    assert type(header.properties["headers"]["bool-true"]) is bool
    assert type(header.properties["headers"]["double"]) is float


def test_content_header_without_properties() -> None:
    payload = struct.pack("!HHQH", 60, 0, 0, 0)
    header = decode_frame(load_spec(), frame(2, 1, payload)).payload
    assert header.properties == {}
    assert header.size == 0


def test_content_header_later_properties() -> None:
    # message-id (bit 7) and app-id (bit 3).
    flags = (1 << 7) | (1 << 3)
    payload = struct.pack("!HHQH", 60, 0, 5, flags) + shortstr("m-1") + shortstr("junebug")
    header = decode_frame(load_spec(), frame(2, 1, payload)).payload
    assert header.properties == {"message-id": "m-1", "app-id": "junebug"}


def test_bad_frame_end_octet() -> None:
    data = frame(3, 1, b"body", end=b"\x00")
    with pytest.raises(GarbageException):
        decode_frame(load_spec(), data)


def test_unknown_frame_type() -> None:
    with pytest.raises(GarbageException):
        decode_frame(load_spec(), frame(7, 1, struct.pack("!H", 60)))


def test_basic_deliver_method_frame() -> None:
    payload = (
        struct.pack("!HH", 60, 60)
        + shortstr("ctag-1")
        + struct.pack("!Q", 42)
        + b"\x01"  # redelivered
        + shortstr("vumi")
        + shortstr("conn.inbound")
    )
    decoded = decode_frame(load_spec(), frame(1, 2, payload))
    method = decoded.payload
    assert isinstance(method, Method)
    assert decoded.channel == 2
    assert method.method.name == "deliver"
    assert method.method.klass.name == "basic"
    names = [f.name for f in method.method.fields]
    assert dict(zip(names, method.args, strict=True)) == {
        "consumer-tag": "ctag-1",
        "delivery-tag": 42,
        "redelivered": True,
        "exchange": "vumi",
        "routing-key": "conn.inbound",
    }


def test_basic_deliver_not_redelivered() -> None:
    payload = (
        struct.pack("!HH", 60, 60)
        + shortstr("c")
        + struct.pack("!Q", 1)
        + b"\x00"
        + shortstr("vumi")
        + shortstr("k")
    )
    method = decode_frame(load_spec(), frame(1, 1, payload)).payload
    assert method.args[2] is False


def test_decode_table_unknown_type() -> None:
    data = table([("weird", b"Z\x00")])
    with pytest.raises(ValueError, match="unknown field table type"):
        FieldCodec(BytesIO(data)).decode_table()


def test_decode_empty_table() -> None:
    codec = FieldCodec(BytesIO(table([]) + b"rest"))
    assert codec.decode_table() == {}
    assert codec.nread == 4


def test_method_frames_count_bytes_and_keep_booleans() -> None:
    """txAMQP's channel methods reach the wire through the client's
    send_frame, encoded by FieldCodec (txAMQP's own codec would count
    characters and send booleans as integers)."""
    from twisted.internet.task import Clock
    from twisted.internet.testing import StringTransport

    from junebug_api.amqp.protocol import ConnectionEvents, JunebugAMQPClient, JunebugDelegate

    events = mock.create_autospec(ConnectionEvents, instance=True)
    client = JunebugAMQPClient(JunebugDelegate(), "/", load_spec(), clock=Clock(), events=events)
    transport = StringTransport()
    client.makeConnection(transport)
    transport.clear()
    spec = load_spec()
    declare = spec.classes.byname["queue"].methods.byname["declare"]
    channel = result_of(client.channel(1))
    channel.queue_declare(
        queue="résumé.inbound",
        durable=True,
        arguments={
            "x-single-active-consumer": True,
            "x-message-ttl": 2**40,
            "x-queue-type": "quorum",
        },
    )
    data = transport.value()
    frame = decode_frame(spec, data)
    assert frame.channel == 1
    decoded = dict(zip([f.name for f in declare.fields], frame.payload.args, strict=True))
    assert decoded["queue"] == "résumé.inbound"
    assert decoded["durable"] is True
    assert decoded["arguments"] == {
        "x-single-active-consumer": True,
        "x-message-ttl": 2**40,
        "x-queue-type": "quorum",
    }


def test_heartbeat_and_content_frames_encode_as_txamqp_does() -> None:
    from twisted.internet.task import Clock
    from txamqp.connection import Frame

    from junebug_api.amqp.protocol import ConnectionEvents, JunebugAMQPClient, JunebugDelegate

    events = mock.create_autospec(ConnectionEvents, instance=True)
    client = JunebugAMQPClient(JunebugDelegate(), "/", load_spec(), clock=Clock(), events=events)
    assert client.encode_frame(Frame(0, Heartbeat())) == frame(8, 0, b"")
    body = "Sawubona 👋".encode()
    assert client.encode_frame(Frame(3, Body(body))) == frame(3, 3, body)
    assert decode_frame(load_spec(), client.encode_frame(Frame(3, Body(body)))).payload.content == (
        body
    )
