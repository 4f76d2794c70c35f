"""The vumi messages the benchmark pre-loads, and the Junebug JSON RapidPro must
receive for each (the exactly-once checks compare bodies with these)."""

from __future__ import annotations

import json
import uuid

from cache_memory import TIMESTAMP, inbound

from .settings import CONNECTOR


def inbound_body(message_id: str) -> bytes:
    """A vumi inbound user message as a vumi2 USSD transport publishes it."""
    return json.dumps(inbound(message_id, transport_name=CONNECTOR)).encode()


def inbound_expected(message_id: str) -> dict:
    """The Junebug JSON RapidPro must receive for inbound_body(message_id)."""
    return {
        "to": "8110",
        "from": "+27820000001",
        "group": None,
        "message_id": message_id,
        "channel_id": CONNECTOR,
        "timestamp": TIMESTAMP,
        "reply_to": None,
        "content": "hello",
        "channel_data": {"session_id": "abc", "session_event": "new"},
    }


def event_body(message_id: str) -> bytes:
    """A vumi ack for outbound message message_id."""
    return json.dumps(
        {
            "user_message_id": message_id,
            "event_type": "ack",
            "message_version": "20110921",
            "message_type": "event",
            "timestamp": TIMESTAMP,
            "routing_metadata": {},
            "helper_metadata": {},
            "transport_metadata": {},
            "event_id": uuid.uuid4().hex,
            "sent_message_id": "smsc-" + message_id[:8],
            "nack_reason": None,
            "delivery_status": None,
        }
    ).encode()


def event_expected(message_id: str) -> dict:
    return {
        "event_type": "submitted",
        "message_id": message_id,
        "channel_id": CONNECTOR,
        "timestamp": TIMESTAMP,
        "event_details": {},
    }
