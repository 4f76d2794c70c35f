"""vumi_messages: parsing inbound messages and events, timestamps, serialising."""

from __future__ import annotations

import json
import re
import uuid

import pytest

from junebug_api.formats.message_ids import generate_message_id
from junebug_api.formats.vumi_messages import (
    InvalidMessage,
    normalise_timestamp,
    parse_event,
    parse_user_message,
    reply_source,
    reply_source_from_bytes,
    serialise,
    user_message,
    utc_timestamp,
)

UNICODE_TEXT = "Sawubona, ngiyabonga 👋 ñ 漢字"


def message(**fields: object) -> bytes:
    data = {
        "message_id": "in-1",
        "transport_name": "sms_transport",
        "to_addr": "+2700",
        "from_addr": "+2782",
        "content": UNICODE_TEXT,
        "timestamp": "2026-11-26 13:23:18.123456",
        **fields,
    }
    return json.dumps({k: v for k, v in data.items() if v is not ...}).encode()


def event(**fields: object) -> bytes:
    data = {
        "message_type": "event",
        "user_message_id": "out-1",
        "event_type": "ack",
        "timestamp": "2026-11-26 13:23:18",
        **fields,
    }
    return json.dumps({k: v for k, v in data.items() if v is not ...}).encode()


# -- parse_user_message ---------------------------------------------------------------


def test_user_message_keeps_unknown_fields() -> None:
    parsed = parse_user_message(
        message(future_field={"a": [1]}, message_version="20110921", provider="mtn")
    )
    assert parsed["future_field"] == {"a": [1]}
    assert parsed["provider"] == "mtn"
    assert parsed["content"] == UNICODE_TEXT
    assert parsed["timestamp"] == "2026-11-26 13:23:18.123456"


def test_user_message_null_addresses_allowed() -> None:
    parsed = parse_user_message(message(to_addr=None, from_addr=None))
    assert parsed["to_addr"] is None


def test_user_message_without_timestamp_gets_one() -> None:
    parsed = parse_user_message(message(timestamp=...))
    assert re.fullmatch(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d{6}", parsed["timestamp"])


@pytest.mark.parametrize(
    ("body", "match"),
    [
        (b"{not json", "body is not JSON"),
        (b"\xff\xfe{}", "body is not JSON"),
        (b"[1, 2]", "body is not a JSON object"),
        (b'"text"', "body is not a JSON object"),
        (message(message_id=...), "message_id must be a non-empty string"),
        (message(message_id=""), "message_id must be a non-empty string"),
        (message(message_id=5), "message_id must be a non-empty string"),
        (message(transport_name=None), "transport_name must be a non-empty string"),
        (message(to_addr=...), "to_addr must be a non-empty string"),
        (message(from_addr=5), "from_addr must be a non-empty string"),
        (message(message_type="event"), "message_type must be user_message"),
        (message(content=5), "content must be a str or null"),
        (message(helper_metadata=[]), "helper_metadata must be a dict or null"),
        (message(timestamp="yesterday"), "timestamp 'yesterday' is not in the format"),
        (message(timestamp=12), "timestamp must be a string"),
    ],
)
def test_user_message_rejected(body: bytes, match: str) -> None:
    with pytest.raises(InvalidMessage, match=match):
        parse_user_message(body)


# -- parse_event ------------------------------------------------------------------------


def test_event_keeps_unknown_fields() -> None:
    parsed = parse_event(event(sent_message_id="smsc-1", extra={"x": 1}))
    assert parsed["sent_message_id"] == "smsc-1"
    assert parsed["extra"] == {"x": 1}
    assert parsed["timestamp"] == "2026-11-26 13:23:18.000000"


@pytest.mark.parametrize("status", ["pending", "failed", "delivered"])
def test_delivery_report_statuses(status: str) -> None:
    parsed = parse_event(event(event_type="delivery_report", delivery_status=status))
    assert parsed["delivery_status"] == status


def test_nack_with_reason() -> None:
    assert parse_event(event(event_type="nack", nack_reason="no"))["nack_reason"] == "no"


@pytest.mark.parametrize(
    ("body", "match"),
    [
        (b"nope", "body is not JSON"),
        (b"[]", "body is not a JSON object"),
        (event(user_message_id=...), "user_message_id must be a non-empty string"),
        (event(event_type="bounce"), "event_type must be one of"),
        (event(event_type=...), "event_type must be one of"),
        (event(event_type="delivery_report"), "delivery_status must be one of"),
        (
            event(event_type="delivery_report", delivery_status="lost"),
            "delivery_status must be one of",
        ),
        (event(message_type="user_message"), "message_type must be event"),
        (event(event_type="nack", nack_reason=3), "nack_reason must be a str or null"),
    ],
)
def test_event_rejected(body: bytes, match: str) -> None:
    with pytest.raises(InvalidMessage, match=match):
        parse_event(body)


def test_invalid_message_is_value_error() -> None:
    assert issubclass(InvalidMessage, ValueError)


# -- timestamps -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("2026-11-26 13:23:18", "2026-11-26 13:23:18.000000"),
        ("2026-11-26 13:23:18Z", "2026-11-26 13:23:18.000000"),
        ("2026-11-26T13:23:18", "2026-11-26 13:23:18.000000"),
        ("2026-11-26T13:23:18Z", "2026-11-26 13:23:18.000000"),
        ("2026-11-26 13:23:18.123456", "2026-11-26 13:23:18.123456"),
        ("2026-11-26T13:23:18.5Z", "2026-11-26 13:23:18.500000"),
        ("2026-11-26 13:23:18.123", "2026-11-26 13:23:18.123000"),
        (" 2026-11-26 13:23:18 ", "2026-11-26 13:23:18.000000"),
    ],
)
def test_normalise_timestamp(value: str, expected: str) -> None:
    assert normalise_timestamp(value) == expected


@pytest.mark.parametrize(
    "value", ["", "2026-11-26", "26/11/2026 13:23:18", "2026-11-26 25:00:00", "2026-11-26 13:23"]
)
def test_normalise_timestamp_rejects(value: str) -> None:
    with pytest.raises(InvalidMessage):
        normalise_timestamp(value)


def test_utc_timestamp_format() -> None:
    timestamp = utc_timestamp()
    assert re.fullmatch(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d{6}", timestamp)
    assert normalise_timestamp(timestamp) == timestamp


# -- building and serialising ---------------------------------------------------------


def test_serialise_is_compact_utf8() -> None:
    raw = serialise({"content": UNICODE_TEXT, "n": 1})
    assert raw == ('{"content":"' + UNICODE_TEXT + '","n":1}').encode()


def test_user_message_fields() -> None:
    msg = user_message(
        to_addr="+2782",
        from_addr="+2700",
        transport_name="conn",
        transport_type="sms",
        content="hi",
        helper_metadata={},
    )
    assert msg["message_type"] == "user_message"
    assert msg["message_version"] == "20110921"
    assert msg["transport_metadata"] == {}
    assert msg["routing_metadata"] == {}
    assert re.fullmatch(r"[0-9a-f]{32}", msg["message_id"])
    assert parse_user_message(serialise(msg)) == msg


def test_reply_source_round_trip() -> None:
    parsed = parse_user_message(message(transport_metadata={"s": UNICODE_TEXT}))
    source = reply_source_from_bytes(reply_source(parsed))
    assert source["message_id"] == "in-1"
    assert source["transport_metadata"] == {"s": UNICODE_TEXT}
    assert "content" not in source


def test_generated_message_ids_are_version_4_uuids() -> None:
    ids = {generate_message_id() for _ in range(1000)}
    assert len(ids) == 1000
    for message_id in ids:
        parsed = uuid.UUID(message_id)
        assert parsed.hex == message_id
        assert parsed.version == 4
        assert parsed.variant == uuid.RFC_4122
