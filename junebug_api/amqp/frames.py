"""AMQP 0-9-1 on the wire: the spec, the field-table codec, frames as bytes.

txAMQP 0.8.2's wheel carries no spec XML (ours is package data, with
RabbitMQ's ``confirm`` class and ``basic.nack``); its decoder turns bodies
into ``str`` and knows only four field-table types, and its encoder counts
characters where AMQP counts bytes. This module holds the replacements the
client (:mod:`junebug_api.amqp.protocol`) uses: :class:`FieldCodec`,
:func:`decode_frame` for a whole frame, and the encoders of the frames it
writes itself (:func:`encode_table`, :func:`frame_bytes`,
:func:`content_frames`).
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from decimal import Decimal
from functools import cache
from importlib.resources import files
from io import BytesIO
from typing import Any

from txamqp import spec as txamqp_spec
from txamqp.codec import Codec
from txamqp.connection import Body, Frame, Header, Heartbeat, Method
from txamqp.protocol import GarbageException

SPEC_FILE = "amqp0-9-1.xml"
FRAME_END = 206
FRAME_METHOD, FRAME_HEADER, FRAME_BODY, FRAME_HEARTBEAT = 1, 2, 3, 8
BASIC = 60  # the basic class; its methods:
BASIC_PUBLISH, BASIC_DELIVER, BASIC_ACK, BASIC_REJECT, BASIC_NACK = 40, 60, 80, 90, 120
HEADERS_FLAG = 0x2000  # the content header's property flag for ``headers``


@cache
def load_spec() -> Any:
    """The AMQP 0-9-1 spec (with RabbitMQ's extensions), loaded once."""
    text = (files("junebug_api.amqp") / SPEC_FILE).read_text(encoding="utf-8")
    return txamqp_spec.load_string(text, specfilename=SPEC_FILE)


class FieldCodec(Codec):
    """txAMQP's codec with every AMQP 0-9-1 field-table type RabbitMQ sends,
    and writing strings and tables right: lengths in bytes (txAMQP counts
    characters, so a non-ASCII queue name or vhost broke the frame), booleans
    as booleans and integers as 64-bit (txAMQP sent both as 32-bit unsigned,
    so ``x-single-active-consumer: true`` was refused)."""

    def enc_str(self, fmt: str, s: str | bytes) -> None:
        data = s if isinstance(s, bytes) else s.encode("utf-8")
        self.pack(fmt, len(data))
        self.write(data)

    def encode_table(self, tbl: dict) -> None:
        self.write(encode_table(tbl or {}))

    def _value(self) -> Any:
        kind = self.read(1)
        reader = _TABLE_READERS.get(kind)
        if reader is None:
            raise ValueError(f"unknown field table type {kind!r}")
        return reader(self)

    def decode_table(self) -> dict:
        size = self.decode_long()
        start = self.nread
        result = {}
        while self.nread - start < size:
            key = self.decode_shortstr()
            result[key] = self._value()
        return result

    def decode_array(self) -> list:
        size = self.decode_long()
        start = self.nread
        values = []
        while self.nread - start < size:
            values.append(self._value())
        return values

    def decode_longstr(self) -> str | bytes:
        data = self.dec_bytes("!L")
        try:
            return data.decode("utf-8")
        except UnicodeDecodeError:
            return data


def _decimal(codec: FieldCodec) -> Decimal:
    scale = codec.decode_octet()
    return Decimal(codec.unpack("!i")).scaleb(-scale)


_TABLE_READERS: dict[bytes, Callable[[FieldCodec], Any]] = {
    b"t": lambda c: c.decode_octet() != 0,
    b"b": lambda c: c.unpack("!b"),
    b"B": lambda c: c.unpack("!B"),
    b"s": lambda c: c.unpack("!h"),
    b"u": lambda c: c.unpack("!H"),
    b"I": lambda c: c.unpack("!i"),
    b"i": lambda c: c.unpack("!I"),
    b"l": lambda c: c.unpack("!q"),
    b"L": lambda c: c.unpack("!Q"),
    b"f": lambda c: c.unpack("!f"),
    b"d": lambda c: c.unpack("!d"),
    b"D": _decimal,
    b"S": FieldCodec.decode_longstr,
    b"x": lambda c: c.dec_bytes("!L"),
    b"A": FieldCodec.decode_array,
    b"T": lambda c: c.unpack("!Q"),
    b"F": FieldCodec.decode_table,
    b"V": lambda c: None,
}


def decode_frame(amqp_spec: Any, data: bytes) -> Frame:
    """One whole frame (header, payload, end octet) as a txAMQP Frame.

    Body payloads stay bytes; methods and headers decode with FieldCodec.
    """
    frame_type = data[0]
    channel, size = struct.unpack_from("!HI", data, 1)
    payload = data[7 : 7 + size]
    if data[7 + size] != FRAME_END:
        raise GarbageException(f"frame error: expected frame end, got {data[7 + size]!r}")
    if frame_type == FRAME_BODY:
        return Frame(channel, Body(payload))
    if frame_type == FRAME_HEARTBEAT:
        return Frame(channel, Heartbeat())
    codec = FieldCodec(BytesIO(payload))
    klass = amqp_spec.classes.byid[codec.decode_short()]
    if frame_type == FRAME_METHOD:
        method = klass.methods.byid[codec.decode_short()]
        args = tuple(codec.decode(field.type) for field in method.fields)
        return Frame(channel, Method(method, *args))
    if frame_type == FRAME_HEADER:
        weight = codec.decode_short()
        body_size = codec.decode_longlong()
        present = []
        while True:
            flags = codec.decode_short()
            present.extend(bool(flags >> bit & 1) for bit in range(15, 0, -1))
            if not flags & 1:
                break
        properties = {
            str(field.name): codec.decode(field.type)
            for is_set, field in zip(present, klass.fields, strict=False)
            if is_set
        }
        return Frame(channel, Header(klass, weight, body_size, **properties))
    raise GarbageException(f"unknown frame type {frame_type}")


def shortstr(text: str) -> bytes:
    """An AMQP short string (its length in bytes, then UTF-8); ValueError past 255 bytes."""
    data = text.encode("utf-8")
    if len(data) > 255:
        raise ValueError(f"AMQP short string too long: {text[:40]!r}...")
    return bytes((len(data),)) + data


def encode_table(table: dict[str, Any]) -> bytes:
    """An AMQP field table of strings, integers, booleans and tables, with
    lengths counted in bytes (txAMQP counts characters)."""
    parts = []
    for key, value in table.items():
        if isinstance(value, bool):
            parts.append(shortstr(key) + b"t" + bytes((1 if value else 0,)))
        elif isinstance(value, int):
            parts.append(shortstr(key) + b"l" + struct.pack("!q", value))
        elif isinstance(value, str):
            data = value.encode("utf-8")
            parts.append(shortstr(key) + b"S" + struct.pack("!I", len(data)) + data)
        elif isinstance(value, dict):
            parts.append(shortstr(key) + b"F" + encode_table(value))
        else:
            raise TypeError(f"field {key!r}: {type(value).__name__} values are not supported")
    payload = b"".join(parts)
    return struct.pack("!I", len(payload)) + payload


def frame_bytes(frame_type: int, channel: int, payload: bytes) -> bytes:
    """One whole frame: type, channel, size, payload and the end octet."""
    return struct.pack("!BHI", frame_type, channel, len(payload)) + payload + b"\xce"


def read_shortstr(data: bytes, offset: int) -> tuple[str, int]:
    size = data[offset]
    end = offset + 1 + size
    return data[offset + 1 : end].decode("utf-8", "replace"), end


def content_frames(channel: int, body: bytes, properties: dict[str, Any], frame_max: int) -> bytes:
    """The content header and body frames of a ``basic`` message: the
    properties a publish of this service carries (``content-type``,
    ``headers``, ``delivery-mode``, ``message-id``), the body cut to fit
    ``frame_max`` (0: no limit). ValueError or TypeError for properties AMQP
    cannot carry."""
    flags = 0
    encoded = []
    if "content-type" in properties:
        flags |= 0x8000
        encoded.append(shortstr(properties["content-type"]))
    if "headers" in properties:
        flags |= HEADERS_FLAG
        encoded.append(encode_table(properties["headers"]))
    if "delivery-mode" in properties:
        flags |= 0x1000
        encoded.append(bytes((properties["delivery-mode"],)))
    if "message-id" in properties:
        flags |= 0x0080
        encoded.append(shortstr(properties["message-id"]))
    header = frame_bytes(
        FRAME_HEADER,
        channel,
        struct.pack("!HHQH", BASIC, 0, len(body), flags) + b"".join(encoded),
    )
    # frame_max 0 means no limit; a body frame then carries the whole body.
    chunk = frame_max - 8 if frame_max > 8 else max(len(body), 1)
    bodies = [
        frame_bytes(FRAME_BODY, channel, body[i : i + chunk]) for i in range(0, len(body), chunk)
    ]
    return b"".join([header, *bodies])


def encode_frame(amqp_spec: Any, frame: Frame) -> bytes:
    """A frame of txAMQP's (set-up, channel methods, heartbeats) as bytes:
    method frames through :class:`FieldCodec`; other payloads encode
    themselves, as in txAMQP."""
    payload = frame.payload
    buffer = BytesIO()
    if isinstance(payload, Method):
        codec = FieldCodec(buffer)
        codec.encode_short(payload.method.klass.id)
        codec.encode_short(payload.method.id)
        for field, arg in zip(payload.method.fields, payload.args, strict=True):
            codec.encode(field.type, arg)
        codec.flush()
        return frame_bytes(FRAME_METHOD, frame.channel, buffer.getvalue())
    codec = Codec(buffer)
    codec.encode_octet(amqp_spec.constants.bypyname[payload.type].id)
    codec.encode_short(frame.channel)
    payload.encode(codec)
    codec.encode_octet(FRAME_END)
    codec.flush()
    return buffer.getvalue()


def body_bytes(message: Any) -> bytes:
    """A delivered message's body as bytes (txAMQP gives ``""`` when empty)."""
    body = message.content.body
    return body.encode("utf-8") if isinstance(body, str) else body
