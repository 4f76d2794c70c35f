"""junebug_formats: request parsing, event mapping, replies."""

from __future__ import annotations

import json
from typing import Any

import jsonschema
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from junebug_api.formats.api_errors import ApiUsageError, JsonDecodeError
from junebug_api.formats.junebug_formats import (
    OUTBOUND_SCHEMA,
    junebug_event,
    junebug_message,
    outbound_message,
    parse_outbound_request,
    reply_message,
)

INBOUND = {
    "message_id": "in-1",
    "to_addr": "*120#",
    "from_addr": "+27820000001",
    "transport_name": "ussd_transport",
    "transport_type": "ussd",
    "transport_metadata": {"session_id": "s1"},
    "provider": "mtn",
    "group": "grp",
    "to_addr_type": "ussd_code",
    "from_addr_type": "msisdn",
}


# -- parse_outbound_request ---------------------------------------------------------


def test_parse_valid_request() -> None:
    body = {
        "to": "+2782",
        "from": None,
        "content": "hi ñ",
        "priority": 1,
        "channel_data": {"continue_session": True},
        "event_url": "http://rp/e",
        "event_auth_token": None,
    }
    assert parse_outbound_request(json.dumps(body).encode()) == body


def test_parse_reply_only_request() -> None:
    assert parse_outbound_request(b'{"reply_to": "in-1", "content": null}') == {
        "reply_to": "in-1",
        "content": None,
    }


@pytest.mark.parametrize("body", [b"", b"{not json", b"\xff\xfe", b'{"to": "a",}'])
def test_not_json(body: bytes) -> None:
    with pytest.raises(JsonDecodeError) as info:
        parse_outbound_request(body)
    error = info.value
    assert error.status == 400
    assert error.description == "json decode error"
    assert error.errors == [{"type": "JsonDecodeError", "message": str(error)}]
    assert str(error)


def test_json_decode_error_text() -> None:
    with pytest.raises(JsonDecodeError) as info:
        parse_outbound_request(b'{"to": ')
    assert str(info.value) == "Expecting value: line 1 column 8 (char 7)"


def test_schema_errors_sorted_with_schema_path() -> None:
    body = {"to": 5, "content": 7, "priority": 1.5, "channel_data": "x"}
    with pytest.raises(ApiUsageError) as info:
        parse_outbound_request(json.dumps(body).encode())
    errors = info.value.errors
    assert [e["type"] for e in errors] == ["invalid_body"] * 4
    assert [e["schema_path"] for e in errors] == [
        ["properties", "channel_data", "type"],
        ["properties", "content", "type"],
        ["properties", "priority", "type"],
        ["properties", "to", "type"],
    ]
    assert errors[1]["message"] == "7 is not of type 'string', 'null'"
    assert str(info.value) == errors[0]["message"]
    assert info.value.status == 400


def test_schema_missing_content_and_extra_key() -> None:
    with pytest.raises(ApiUsageError) as info:
        parse_outbound_request(b'{"to": "+2782", "colour": "red"}')
    errors = info.value.errors
    paths = sorted(e["schema_path"] for e in errors)
    assert paths == [["additionalProperties"], ["required"]]
    messages = " ".join(e["message"] for e in errors)
    assert "'content' is a required property" in messages
    assert "'colour' was unexpected" in messages


@pytest.mark.parametrize("body", [b"[]", b'"text"', b"null", b"3"])
def test_body_not_an_object(body: bytes) -> None:
    with pytest.raises(ApiUsageError) as info:
        parse_outbound_request(body)
    assert info.value.errors[0]["schema_path"] == ["type"]


def test_to_or_reply_to_required() -> None:
    with pytest.raises(ApiUsageError) as info:
        parse_outbound_request(b'{"content": "hi", "to": null}')
    assert info.value.errors == [
        {"type": "ApiUsageError", "message": 'Either "to" or "reply_to" must be specified'}
    ]


# -- events -------------------------------------------------------------------------


def event(**fields: object) -> dict:
    return {
        "user_message_id": "out-1",
        "timestamp": "2026-11-26 13:23:18.000000",
        **fields,
    }


def test_ack_event() -> None:
    assert junebug_event(event(event_type="ack", sent_message_id="x"), "chan") == {
        "event_type": "submitted",
        "message_id": "out-1",
        "channel_id": "chan",
        "timestamp": "2026-11-26 13:23:18.000000",
        "event_details": {},
    }


def test_nack_event() -> None:
    result = junebug_event(event(event_type="nack", nack_reason="no route"), "chan")
    assert result["event_type"] == "rejected"
    assert result["event_details"] == {"reason": "no route"}


def test_nack_without_reason() -> None:
    assert junebug_event(event(event_type="nack"), "c")["event_details"] == {"reason": None}


@pytest.mark.parametrize(
    ("status", "name"),
    [
        ("pending", "delivery_pending"),
        ("failed", "delivery_failed"),
        ("delivered", "delivery_succeeded"),
    ],
)
def test_delivery_report_event(status: str, name: str) -> None:
    result = junebug_event(event(event_type="delivery_report", delivery_status=status), "c")
    assert result["event_type"] == name
    assert result["event_details"] == {}
    assert result["message_id"] == "out-1"


# -- replies and outbound messages ----------------------------------------------------


def test_reply_defaults_to_resume() -> None:
    reply = reply_message({"reply_to": "in-1", "content": "hi"}, INBOUND)
    assert reply["session_event"] == "resume"
    assert reply["to_addr"] == "+27820000001"
    assert reply["from_addr"] == "*120#"
    assert reply["to_addr_type"] == "msisdn"
    assert reply["from_addr_type"] == "ussd_code"
    assert reply["in_reply_to"] == "in-1"
    assert reply["transport_name"] == "ussd_transport"
    assert reply["transport_type"] == "ussd"
    assert reply["transport_metadata"] == {"session_id": "s1"}
    assert reply["provider"] == "mtn"
    assert reply["group"] == "grp"
    assert reply["content"] == "hi"
    assert reply["helper_metadata"] == {}
    assert reply["message_id"] != "in-1"


@pytest.mark.parametrize(
    ("channel_data", "session_event"),
    [
        ({"continue_session": False}, "close"),
        ({"continue_session": True}, "resume"),
        ({"continue_session": None}, "resume"),
        ({"session_event": "new", "continue_session": False}, "new"),
        ({"session_event": "close", "continue_session": True}, "close"),
        (None, "resume"),
    ],
)
def test_reply_session_event_rules(channel_data: dict | None, session_event: str) -> None:
    request = {"reply_to": "in-1", "content": "hi", "channel_data": channel_data}
    assert reply_message(request, INBOUND)["session_event"] == session_event


def test_reply_helper_metadata_excludes_session_keys() -> None:
    channel_data = {"session_event": "close", "continue_session": False, "voice": {"speed": 1}}
    request = {"reply_to": "in-1", "content": "hi", "channel_data": channel_data}
    reply = reply_message(request, INBOUND)
    assert reply["helper_metadata"] == {"voice": {"speed": 1}}
    # The request's channel_data is not modified.
    assert channel_data == {
        "session_event": "close",
        "continue_session": False,
        "voice": {"speed": 1},
    }


def test_outbound_message() -> None:
    request = {"to": "+2782", "content": "hi", "channel_data": {"continue_session": False}}
    message = outbound_message(
        request, connector_name="conn", transport_type="sms", default_from_addr="+2700"
    )
    assert message["from_addr"] == "+2700"
    assert message["to_addr"] == "+2782"
    assert message["session_event"] is None
    assert message["helper_metadata"] == {}
    assert message["transport_name"] == "conn"


def test_outbound_from_wins_over_default() -> None:
    request = {"to": "+2782", "from": "+2711", "content": "hi"}
    message = outbound_message(
        request, connector_name="c", transport_type="sms", default_from_addr="+2700"
    )
    assert message["from_addr"] == "+2711"


def test_outbound_needs_a_from() -> None:
    with pytest.raises(ApiUsageError, match='"from" must be specified'):
        outbound_message(
            {"to": "+2782", "content": "hi"},
            connector_name="c",
            transport_type="sms",
            default_from_addr=None,
        )


def test_junebug_message_channel_data_has_session_event() -> None:
    reply = reply_message({"reply_to": "in-1", "content": "hi", "channel_data": {"x": 1}}, INBOUND)
    result = junebug_message(reply, "chan")
    assert result["channel_data"] == {"x": 1, "session_event": "resume"}
    assert result["reply_to"] == "in-1"
    assert result["channel_id"] == "chan"
    assert result["to"] == "+27820000001"


_json = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=5),
    lambda children: (
        st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=5), children, max_size=3)
    ),
    max_leaves=8,
)
_FIELDS = [*OUTBOUND_SCHEMA["properties"], "other"]  # "other": not allowed
# Requests of nearly the right shape: each field often of its own type.
_own_type = {
    "priority": st.integers() | st.text(max_size=5),
    "channel_data": st.dictionaries(st.text(max_size=5), _json, max_size=2),
}
_requests = st.fixed_dictionaries(
    {"content": st.none() | st.text(max_size=5)},
    optional={
        name: st.none() | _own_type.get(name, st.text(max_size=5)) | _json
        for name in OUTBOUND_SCHEMA["properties"]
        if name != "content"
    },
)


_jsonschema = jsonschema.Draft7Validator(OUTBOUND_SCHEMA)


@given(st.one_of(_json, st.dictionaries(st.sampled_from(_FIELDS), _json, max_size=6), _requests))
@example({"to": "+27", "content": "hi", "priority": True})  # a bool is no integer
@example({"to": "+27", "content": "hi", "priority": 1.5})
@example({"to": "+27", "content": "hi", "channel_data": []})
@example({"to": 27, "content": "hi"})
@settings(max_examples=500, deadline=None)
def test_the_schema_check_agrees_with_jsonschema(data) -> None:
    """A request is refused with exactly the errors jsonschema finds: the
    quick check for the common case never calls valid what jsonschema rejects."""
    expected = list(_jsonschema.iter_errors(data))
    try:
        parse_outbound_request(json.dumps(data).encode())
        found = []
    except ApiUsageError as e:
        found = [error for error in e.errors if error["type"] == "invalid_body"]
    assert len(found) == len(expected)


# -- strict outgoing JSON ------------------------------------------------------------


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        ({"x": float("nan")}, "cannot be JSON"),
        ({"x": float("inf")}, "cannot be JSON"),
        ({"x": "\ud800"}, "unpaired UTF-16 surrogate"),
    ],
)
def test_to_json_refuses_what_is_no_strict_json(data: Any, reason: str) -> None:
    from junebug_api.formats.junebug_formats import Unsendable, to_json

    with pytest.raises(Unsendable, match=reason):
        to_json(data)


def test_to_json_refuses_too_deep_nesting() -> None:
    from junebug_api.formats.junebug_formats import Unsendable, to_json

    deep: Any = []
    for _ in range(100_000):
        deep = [deep]
    with pytest.raises(Unsendable, match="nested too deeply"):
        to_json(deep)
