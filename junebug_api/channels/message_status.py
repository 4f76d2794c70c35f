"""Message status: the events of an outbound message, as old Junebug answered them.

Each vumi event consumed from a channel's ``.event`` queue is kept (in the
state cache, for ``outbound_message_ttl`` seconds) as old Junebug's status
event: ``{"channel_id", "message_id", "timestamp", "event_type",
"event_details"}``, mapped as for the event URL (``ack`` -> ``submitted``,
``nack`` -> ``rejected`` with its reason, delivery reports ->
``delivery_pending|failed|succeeded``). ``GET .../messages/<message_id>``
answers them sorted by timestamp.
"""

from __future__ import annotations

import json
from typing import Any

from junebug_api.formats.json_bodies import compact_json
from junebug_api.formats.junebug_formats import junebug_event
from junebug_api.formats.vumi_messages import VumiMessage


def status_event(event: VumiMessage, channel_id: str) -> bytes:
    """One vumi event as the compact JSON of old Junebug's status event."""
    mapped = junebug_event(event, channel_id)
    return compact_json(
        {
            "channel_id": mapped["channel_id"],
            "message_id": mapped["message_id"],
            "timestamp": mapped["timestamp"],
            "event_type": mapped["event_type"],
            "event_details": mapped["event_details"],
        }
    )


def message_status(message_id: str, events: list[bytes]) -> dict[str, Any]:
    """The ``result`` of ``GET .../messages/<message_id>``: every event sorted
    by timestamp, the last one's type and time; ``null``s and ``[]`` for an
    unknown or expired message, as old Junebug answered."""
    parsed = sorted((json.loads(e) for e in events), key=lambda e: e.get("timestamp") or "")
    last = parsed[-1] if parsed else None
    return {
        "id": message_id,
        "last_event_type": last["event_type"] if last else None,
        "last_event_timestamp": last["timestamp"] if last else None,
        "events": parsed,
    }
