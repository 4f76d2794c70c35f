"""The vumi message wire format: parse, serialise, build replies.

Messages stay plain dicts, as they are on the wire: parsing checks the fields
this service relies on and keeps every other field a peer sent, so vumi 0.6
and vumi2 transports (and their future fields) pass through untouched.
"""

from __future__ import annotations

import json
import re
from datetime import UTC, datetime
from typing import Any

from junebug_api.formats.json_bodies import compact_json
from junebug_api.formats.message_ids import generate_message_id

VumiMessage = dict[str, Any]

MESSAGE_VERSION = "20110921"
TIMESTAMP_FORMAT = "%Y-%m-%d %H:%M:%S.%f"
# Most peers send exactly this shape; such a timestamp needs no reparsing.
_CANONICAL_TIMESTAMP = re.compile(
    r"\d{4}-(0[1-9]|1[0-2])-(0[1-9]|[12]\d|3[01]) ([01]\d|2[0-3]):[0-5]\d:[0-5]\d\.\d{6}"
)
EVENT_TYPES = ("ack", "nack", "delivery_report")
DELIVERY_STATUSES = ("pending", "failed", "delivered")

# The inbound fields a reply needs; all the state cache keeps of an inbound.
REPLY_SOURCE_FIELDS = (
    "message_id",
    "to_addr",
    "from_addr",
    "transport_name",
    "transport_type",
    "transport_metadata",
    "provider",
    "group",
    "to_addr_type",
    "from_addr_type",
)


class InvalidMessage(ValueError):
    """A body from AMQP that is not a usable vumi message."""


def format_timestamp(when: datetime) -> str:
    """``when`` in vumi's timestamp format (isoformat is strftime's equal, faster)."""
    return when.isoformat(" ", "microseconds")


def utc_timestamp() -> str:
    """The current UTC time in vumi's timestamp format."""
    return format_timestamp(datetime.now(UTC).replace(tzinfo=None))


def normalise_timestamp(value: Any) -> str:
    """A timestamp from a peer in vumi's format, fraction included.

    Accepts ``%Y-%m-%d %H:%M:%S.%f``, the same without the fraction, either
    with a trailing ``Z`` or a ``T`` separator.
    """
    if not isinstance(value, str):
        raise InvalidMessage(f"timestamp must be a string, got {value!r}")
    if _CANONICAL_TIMESTAMP.fullmatch(value):
        return value
    text = value.strip().removesuffix("Z").replace("T", " ", 1)
    for fmt in (TIMESTAMP_FORMAT, "%Y-%m-%d %H:%M:%S"):
        try:
            return format_timestamp(datetime.strptime(text, fmt))
        except ValueError:
            continue
    raise InvalidMessage(f"timestamp {value!r} is not in the format {TIMESTAMP_FORMAT}")


def _decode(body: bytes) -> dict:
    try:
        data = json.loads(body)
    except (UnicodeDecodeError, ValueError) as e:
        raise InvalidMessage(f"body is not JSON: {e}") from None
    except RecursionError:
        raise InvalidMessage("body is nested too deeply") from None
    if not isinstance(data, dict):
        raise InvalidMessage("body is not a JSON object")
    return data


def _require_str(data: dict, name: str, nullable: bool = False) -> None:
    value = data.get(name)
    if value is None and nullable and name in data:
        return
    if not isinstance(value, str) or (not nullable and not value):
        raise InvalidMessage(f"{name} must be a non-empty string, got {value!r}")


def _optional(data: dict, name: str, kind: type) -> None:
    value = data.get(name)
    if value is not None and not isinstance(value, kind):
        raise InvalidMessage(f"{name} must be a {kind.__name__} or null, got {value!r}")


def parse_user_message(body: bytes) -> VumiMessage:
    """An inbound user message from its AMQP body; raises InvalidMessage."""
    data = _decode(body)
    message_type = data.get("message_type", "user_message")
    if message_type != "user_message":
        raise InvalidMessage(f"message_type must be user_message, got {message_type!r}")
    for name in ("message_id", "transport_name"):
        _require_str(data, name)
    for name in ("to_addr", "from_addr"):
        _require_str(data, name, nullable=True)
    for name in ("content", "session_event", "group", "in_reply_to", "transport_type"):
        _optional(data, name, str)
    for name in ("helper_metadata", "transport_metadata", "routing_metadata"):
        _optional(data, name, dict)
    timestamp = data.get("timestamp")
    data["timestamp"] = utc_timestamp() if timestamp is None else normalise_timestamp(timestamp)
    return data


def parse_event(body: bytes) -> VumiMessage:
    """An event from its AMQP body; raises InvalidMessage."""
    data = _decode(body)
    message_type = data.get("message_type", "event")
    if message_type != "event":
        raise InvalidMessage(f"message_type must be event, got {message_type!r}")
    _require_str(data, "user_message_id")
    event_type = data.get("event_type")
    if event_type not in EVENT_TYPES:
        raise InvalidMessage(f"event_type must be one of {EVENT_TYPES}, got {event_type!r}")
    if event_type == "delivery_report" and data.get("delivery_status") not in DELIVERY_STATUSES:
        raise InvalidMessage(
            f"delivery_status must be one of {DELIVERY_STATUSES}, "
            f"got {data.get('delivery_status')!r}"
        )
    _optional(data, "nack_reason", str)
    timestamp = data.get("timestamp")
    data["timestamp"] = utc_timestamp() if timestamp is None else normalise_timestamp(timestamp)
    return data


def user_message(
    *,
    to_addr: str | None,
    from_addr: str | None,
    transport_name: str,
    transport_type: str,
    content: str | None,
    helper_metadata: dict,
    session_event: str | None = None,
    in_reply_to: str | None = None,
    provider: str | None = None,
    group: str | None = None,
    transport_metadata: dict | None = None,
    to_addr_type: str | None = None,
    from_addr_type: str | None = None,
) -> VumiMessage:
    """A new user message with every field vumi2 writes, in its order."""
    return {
        "to_addr": to_addr,
        "from_addr": from_addr,
        "transport_name": transport_name,
        "transport_type": transport_type,
        "message_version": MESSAGE_VERSION,
        "message_type": "user_message",
        "timestamp": utc_timestamp(),
        "routing_metadata": {},
        "helper_metadata": helper_metadata,
        "message_id": generate_message_id(),
        "in_reply_to": in_reply_to,
        "provider": provider,
        "session_event": session_event,
        "content": content,
        "transport_metadata": transport_metadata if transport_metadata is not None else {},
        "group": group,
        "to_addr_type": to_addr_type,
        "from_addr_type": from_addr_type,
    }


def reply_to(
    inbound: VumiMessage,
    content: str | None,
    session_event: str,
    helper_metadata: dict,
) -> VumiMessage:
    """The reply to ``inbound``: addresses swapped, transport fields copied."""
    return user_message(
        to_addr=inbound.get("from_addr"),
        from_addr=inbound.get("to_addr"),
        transport_name=inbound["transport_name"],
        transport_type=inbound.get("transport_type"),
        content=content,
        helper_metadata=helper_metadata,
        session_event=session_event,
        in_reply_to=inbound["message_id"],
        provider=inbound.get("provider"),
        group=inbound.get("group"),
        transport_metadata=inbound.get("transport_metadata") or {},
        to_addr_type=inbound.get("from_addr_type"),
        from_addr_type=inbound.get("to_addr_type"),
    )


def serialise(message: VumiMessage) -> bytes:
    """The AMQP body of a message: compact UTF-8 JSON."""
    return compact_json(message)


def reply_source(message: VumiMessage) -> bytes:
    """What a reply needs of an inbound message, compactly, for the state cache."""
    return serialise([message.get(name) for name in REPLY_SOURCE_FIELDS])


def reply_source_from_bytes(data: bytes) -> VumiMessage:
    """The inbound fields stored by :func:`reply_source`, as a message dict."""
    return dict(zip(REPLY_SOURCE_FIELDS, json.loads(data), strict=True))
