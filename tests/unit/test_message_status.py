"""message_status: a vumi event kept as old Junebug's status event, and the
answer of GET .../messages/<id> built from those kept."""

from __future__ import annotations

import json

from junebug_api.channels.message_status import message_status, status_event


def event(event_type: str, timestamp: str | None, **fields: str) -> dict:
    return {
        "message_type": "event",
        "event_type": event_type,
        "user_message_id": "m",
        "event_id": f"{event_type}-{timestamp}",
        "timestamp": timestamp,
        **fields,
    }


def test_a_status_event_is_compact_utf8_json_with_five_fields() -> None:
    kept = status_event(event("nack", "2026-11-26 13:23:18.000000", nack_reason="ñ 漢字"), "c")
    assert (
        kept
        == (
            '{"channel_id":"c","message_id":"m","timestamp":"2026-11-26 13:23:18.000000",'
            '"event_type":"rejected","event_details":{"reason":"ñ 漢字"}}'
        ).encode()
    )


def test_events_sort_by_timestamp_and_the_last_one_names_the_status() -> None:
    late = status_event(
        event("delivery_report", "2026-11-26 13:23:20", delivery_status="delivered"), "c"
    )
    early = status_event(event("ack", "2026-11-26 13:23:19"), "c")
    status = message_status("m", [late, early])
    assert [e["event_type"] for e in status["events"]] == ["submitted", "delivery_succeeded"]
    assert status["last_event_type"] == "delivery_succeeded"
    assert status["last_event_timestamp"] == json.loads(late)["timestamp"]


def test_an_event_without_a_timestamp_sorts_first() -> None:
    untimed = json.dumps({"event_type": "submitted", "timestamp": None}).encode()
    timed = status_event(event("ack", "2026-11-26 13:23:19"), "c")
    status = message_status("m", [timed, untimed])
    assert [e["timestamp"] for e in status["events"]] == [None, json.loads(timed)["timestamp"]]


def test_no_events_is_nulls_and_an_empty_list() -> None:
    assert message_status("nope", []) == {
        "id": "nope",
        "last_event_type": None,
        "last_event_timestamp": None,
        "events": [],
    }
