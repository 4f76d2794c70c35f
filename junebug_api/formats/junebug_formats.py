"""The Junebug side of the wire: request schema, message translation.

Checks an outbound request (raising the errors of
:mod:`junebug_api.formats.api_errors`), turns it into a vumi message, and turns vumi
inbound messages and events into the JSON RapidPro expects. Knows nothing of
AMQP, HTTP servers or cache storage.
"""

from __future__ import annotations

import json
import math
import re
from typing import Any

import jsonschema

from junebug_api.formats import vumi_messages
from junebug_api.formats.api_errors import ApiUsageError, JsonDecodeError
from junebug_api.formats.vumi_messages import VumiMessage


def _optional_string(description: str) -> dict[str, Any]:
    return {"type": ["string", "null"], "description": description}


#: The body of ``POST .../messages``: what the service enforces, and what the
#: OpenAPI document shows (its descriptions are annotations, not checks).
OUTBOUND_SCHEMA: dict[str, Any] = {
    "$schema": "http://json-schema.org/draft-07/schema#",
    "type": "object",
    "properties": {
        "to": _optional_string("The recipient's address (an MSISDN for SMS and USSD)."),
        "from": _optional_string(
            "The sender's address; default: the channel's default_from_addr."
            " Not used for a reply (it is the inbound message's to)."
        ),
        "group": _optional_string("The group the message is for, if the transport has any."),
        "reply_to": _optional_string(
            "The message_id of the inbound message this replies to (same session)."
        ),
        "content": _optional_string("The text; null for none (e.g. to close a session)."),
        "event_url": _optional_string(
            "An http(s) URL to POST this message's events to, instead of the channel's"
            " default_event_url."
        ),
        "event_auth_token": _optional_string(
            "Sent with those events as `Authorization: Token <event_auth_token>`."
        ),
        "priority": {
            "type": ["integer", "string", "null"],
            "description": "Accepted for old Junebug's clients and not used.",
        },
        "channel_data": {
            "type": ["object", "null"],
            "description": "The transport's own fields (vumi helper_metadata);"
            " session_event (new, resume, close) and, for a reply, continue_session"
            " (false closes the session) are read from it.",
        },
    },
    "required": ["content"],
    "additionalProperties": False,
}

#: The error type of each schema error in a 400 answer.
INVALID_BODY = "invalid_body"

_validator = jsonschema.Draft7Validator(OUTBOUND_SCHEMA)

EVENT_TYPE_NAMES = {"ack": "submitted", "nack": "rejected"}
DELIVERY_STATUS_NAMES = {
    "pending": "delivery_pending",
    "failed": "delivery_failed",
    "delivered": "delivery_succeeded",
}


def parse_outbound_request(body: bytes) -> dict[str, Any]:
    """The JSON body of ``POST .../messages``, checked against the schema.

    Raises JsonDecodeError for anything that is not JSON, and ApiUsageError
    listing every schema error otherwise.
    """
    data = decode_json(body)
    errors = [] if _plainly_valid(data) else schema_errors(_validator, data)
    if errors:
        raise ApiUsageError(errors[0]["message"], errors)
    if data.get("to") is None and data.get("reply_to") is None:
        raise ApiUsageError('Either "to" or "reply_to" must be specified')
    return data


_SURROGATE_ESCAPE = re.compile(rb"\\[uU][dD][89a-fA-F]")


_STRING_FIELDS = ("to", "from", "group", "reply_to", "content", "event_url", "event_auth_token")


def _plainly_valid(data: Any) -> bool:
    """A quick check that ``data`` satisfies OUTBOUND_SCHEMA, for the common case.

    When it says no, the jsonschema validator runs and reports every error in
    the words clients know; when it says yes, jsonschema would find none.
    """
    if type(data) is not dict or "content" not in data:
        return False
    for key, value in data.items():
        if key in _STRING_FIELDS:
            if value is not None and type(value) is not str:
                return False
        elif key == "channel_data":
            if value is not None and type(value) is not dict:
                return False
        elif key == "priority":
            if value is not None and type(value) not in (int, str):
                return False
        else:
            return False
    return True


def _shorten(text: str, limit: int = 500) -> str:
    return text if len(text) <= limit else text[:limit] + "..."


def _refuse_constant(name: str) -> None:
    raise ValueError(f"{name} is not valid JSON")


def _finite_float(text: str) -> float:
    value = float(text)
    if math.isinf(value):
        raise ValueError(f"number {text[:20]} is out of range")
    return value


def decode_json(body: bytes) -> Any:
    """A request body's JSON; JsonDecodeError for anything else (bad UTF-8,
    NaN, nesting too deep, an unpaired surrogate)."""
    try:
        data = _decoder.decode(body.decode("utf-8-sig"))
    except (UnicodeDecodeError, ValueError) as e:
        raise JsonDecodeError(str(e)) from None
    except RecursionError:
        raise JsonDecodeError("the JSON is nested too deeply") from None
    if _SURROGATE_ESCAPE.search(body):
        try:
            json.dumps(data, ensure_ascii=False).encode("utf-8")
        except UnicodeEncodeError:
            raise JsonDecodeError("the JSON contains an unpaired UTF-16 surrogate") from None
    return data


def schema_errors(validator: jsonschema.protocols.Validator, data: Any) -> list[dict]:
    """Every error ``validator`` finds in ``data``, as Junebug reports them
    (type ``invalid_body``, with its ``schema_path``)."""
    try:
        return [
            {
                "type": INVALID_BODY,
                "message": _shorten(e.message),
                "schema_path": list(e.schema_path),
            }
            for e in sorted(validator.iter_errors(data), key=lambda e: [str(p) for p in e.path])
        ]
    except RecursionError:
        raise JsonDecodeError("the JSON is nested too deeply") from None


# Built once: json.loads with hooks would build a decoder per request.
_decoder = json.JSONDecoder(parse_constant=_refuse_constant, parse_float=_finite_float)


def _channel_fields(request: dict) -> tuple[dict, str | None, bool | None]:
    """helper_metadata, session_event and continue_session from channel_data."""
    helper_metadata = dict(request.get("channel_data") or {})
    session_event = helper_metadata.pop("session_event", None)
    continue_session = helper_metadata.pop("continue_session", None)
    return helper_metadata, session_event, continue_session


def outbound_message(
    request: dict,
    *,
    connector_name: str,
    transport_type: str,
    default_from_addr: str | None,
) -> VumiMessage:
    """The vumi message for a request that is not a reply."""
    from_addr = request.get("from")
    if from_addr is None:
        from_addr = default_from_addr
    if from_addr is None:
        raise ApiUsageError('"from" must be specified when not replying')
    helper_metadata, session_event, _ = _channel_fields(request)
    return vumi_messages.user_message(
        to_addr=request["to"],
        from_addr=from_addr,
        transport_name=connector_name,
        transport_type=transport_type,
        content=request.get("content"),
        helper_metadata=helper_metadata,
        session_event=session_event,
        group=request.get("group"),
    )


def reply_message(request: dict, inbound: VumiMessage) -> VumiMessage:
    """The vumi reply for a request whose ``reply_to`` is ``inbound``."""
    helper_metadata, session_event, continue_session = _channel_fields(request)
    if session_event is None:
        session_event = "close" if continue_session is False else "resume"
    return vumi_messages.reply_to(
        inbound,
        content=request.get("content"),
        session_event=session_event,
        helper_metadata=helper_metadata,
    )


def junebug_message(message: VumiMessage, channel_id: str) -> dict[str, Any]:
    """A vumi user message as Junebug JSON (inbound POSTs and 201 answers)."""
    channel_data = dict(message.get("helper_metadata") or {})
    if message.get("session_event") is not None:
        channel_data["session_event"] = message["session_event"]
    return {
        "to": message.get("to_addr"),
        "from": message.get("from_addr"),
        "group": message.get("group"),
        "message_id": message["message_id"],
        "channel_id": channel_id,
        "timestamp": message["timestamp"],
        "reply_to": message.get("in_reply_to"),
        "content": message.get("content"),
        "channel_data": channel_data,
    }


def junebug_event(event: VumiMessage, channel_id: str) -> dict[str, Any]:
    """A vumi event as Junebug JSON for the event URL."""
    event_type = event["event_type"]
    details: dict[str, Any] = {}
    if event_type == "delivery_report":
        name = DELIVERY_STATUS_NAMES[event["delivery_status"]]
    else:
        name = EVENT_TYPE_NAMES[event_type]
        if event_type == "nack":
            details = {"reason": event.get("nack_reason")}
    return {
        "event_type": name,
        "message_id": event["user_message_id"],
        "channel_id": channel_id,
        "timestamp": event["timestamp"],
        "event_details": details,
    }


class Unsendable(ValueError):
    """Data that cannot become strict JSON: NaN or Infinity, a lone surrogate,
    nesting too deep."""


# allow_nan=False: NaN and Infinity are no JSON, and RapidPro refuses them.
_strict_encoder = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"), allow_nan=False)


def to_json(data: Any) -> bytes:
    """Compact, strict UTF-8 JSON for an HTTP body; Unsendable if it cannot be."""
    try:
        return _strict_encoder.encode(data).encode("utf-8")
    except UnicodeEncodeError:
        raise Unsendable("it contains an unpaired UTF-16 surrogate") from None
    except RecursionError:
        raise Unsendable("it is nested too deeply") from None
    except ValueError as e:
        raise Unsendable(f"it cannot be JSON: {e}") from None
