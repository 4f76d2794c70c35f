"""The queue naming rule: vumi's names, plus the dead-letter and delay queues."""

from __future__ import annotations

import pytest

from junebug_api.formats.queue_names import EXCHANGE, QueueNames, delay_queues, failed_queue


def test_a_connectors_queues_follow_vumis_names() -> None:
    names = QueueNames.for_connector("conn")
    assert names.by_role() == {
        "outbound": "conn.outbound",
        "inbound": "conn.inbound",
        "event": "conn.event",
        "inbound_failed": "conn.inbound.failed",
        "event_failed": "conn.event.failed",
    }
    assert failed_queue("conn.inbound") == names.inbound_failed


def test_delay_queues_are_named_by_their_delay() -> None:
    names = QueueNames.for_connector("conn")
    assert names.delay_queues("event") == {
        5: "conn.event.retry.5",
        20: "conn.event.retry.20",
        60: "conn.event.retry.60",
        300: "conn.event.retry.300",
    }
    assert delay_queues("conn.inbound") == names.delay_queues("inbound")
    with pytest.raises(ValueError):
        names.delay_queues("outbound")


def test_every_declared_queue_is_in_all() -> None:
    names = QueueNames.for_connector("conn")
    assert names.all() == [
        "conn.outbound",
        "conn.inbound",
        "conn.event",
        "conn.inbound.failed",
        "conn.event.failed",
        *(f"conn.inbound.retry.{d}" for d in (5, 20, 60, 300)),
        *(f"conn.event.retry.{d}" for d in (5, 20, 60, 300)),
    ]
    assert names.all()[5:] == names.all_delay_queues()


def test_a_delay_queue_sends_its_messages_back_after_its_delay() -> None:
    arguments = QueueNames.for_connector("conn").delay_queue_arguments()
    assert set(arguments) == set(QueueNames.for_connector("conn").all_delay_queues())
    assert arguments["conn.event.retry.20"] == {
        "x-message-ttl": 20_000,
        "x-dead-letter-exchange": EXCHANGE,
        "x-dead-letter-routing-key": "conn.event",
    }


def test_without_retry_delays_there_are_no_delay_queues() -> None:
    names = QueueNames.for_connector("conn", retry_delays=())
    assert names.delay_queues("inbound") == {}
    assert names.all() == list(names.by_role().values())


def test_declarations_are_every_queue_with_its_arguments() -> None:
    names = QueueNames.for_connector("conn")
    declarations = names.declarations()
    assert list(declarations) == names.all()
    assert declarations["conn.inbound.failed"] == {}
    assert (
        declarations["conn.inbound.retry.5"]
        == names.delay_queue_arguments()["conn.inbound.retry.5"]
    )
