"""Consumers and queues added and removed while AmqpService runs (issue 21
item 6): at once on the open connections, on every reconnect, during a
reconnect, and while other methods are in flight. Against the in-memory
broker of :mod:`tests.unit.helpers`."""

from __future__ import annotations

from typing import Any

import pytest

from junebug_api.amqp.connect import SetupFailed

from .helpers import AmqpSetup, amqp_method, as_deferred, result_of


@pytest.fixture
def setup() -> AmqpSetup:
    return AmqpSetup().start()


def consumer_of(received: list[tuple[bytes, Any]]) -> Any:
    return lambda body, acker: received.append((body, acker))


def channel_of(s: AmqpSetup, queue: str) -> int:
    return s.connection("consume").consumers[queue]


def test_a_consumer_added_while_running_consumes_at_once_and_after_a_reconnect(
    setup: AmqpSetup,
) -> None:
    received: list[tuple[bytes, Any]] = []
    setup.service.add_consumer("c.new", consumer_of(received), prefetch=3)
    setup.net.flush()
    consume = setup.connection("consume")
    channel = channel_of(setup, "c.new")
    assert channel not in (channel_of(setup, "c.inbound"), channel_of(setup, "c.event"))
    assert consume.prefetch[channel] == 3
    consume.deliver("c.new", b"one")
    setup.net.flush()
    assert [body for body, _ in received] == [b"one"]
    received[0][1].ack()
    setup.net.flush()
    assert consume.acks == [(channel, 1, False)]
    setup.drop_all()
    setup.net.advance(1)
    assert set(setup.connection("consume").consumers) == {"c.inbound", "c.event", "c.new"}
    setup.connection("consume").deliver("c.new", b"two")
    setup.net.flush()
    assert [body for body, _ in received] == [b"one", b"two"]


def test_a_queue_has_one_consumer(setup: AmqpSetup) -> None:
    with pytest.raises(ValueError, match=r"c\.inbound has a consumer already"):
        setup.service.add_consumer("c.inbound", lambda body, acker: None)


def test_remove_fires_on_cancel_ok_and_deliveries_in_hand_stay_ackable(
    setup: AmqpSetup,
) -> None:
    consume = setup.connection("consume")
    channel = channel_of(setup, "c.inbound")
    for body in (b"a", b"b"):
        consume.deliver("c.inbound", body)
    setup.net.flush()
    in_hand = [acker for queue, _, acker in setup.received if queue == "c.inbound"]
    setup.broker.holding = True
    removed = setup.service.remove_consumer("c.inbound")
    setup.net.flush()
    assert (channel, "basic.cancel") in consume.methods
    assert not removed.called  # until the broker confirmed the cancel
    setup.answer_held()
    assert result_of(removed) is None
    setup.broker.holding = False
    assert "c.inbound" not in consume.consumers
    # The deliveries handed out still settle on their channel, which closes
    # once the last is done (and not before).
    in_hand[0].ack()
    setup.net.flush()
    assert consume.acks == [(channel, 1, False)]
    assert channel in consume.channels
    in_hand[1].reject()
    setup.net.flush()
    assert consume.rejects == [(channel, 2, True)]
    assert channel not in consume.channels
    assert (channel, "channel.close") in consume.methods
    # Nothing is deleted or purged, and it is not consumed after a reconnect.
    assert not [name for _, name in consume.methods if name in ("queue.delete", "queue.purge")]
    setup.drop_all()
    setup.net.advance(1)
    assert set(setup.connection("consume").consumers) == {"c.event"}


def test_a_removed_consumer_with_nothing_in_hand_closes_its_channel_at_once(
    setup: AmqpSetup,
) -> None:
    consume = setup.connection("consume")
    channel = channel_of(setup, "c.event")
    assert setup.wait(setup.service.remove_consumer("c.event")) is None
    assert channel not in consume.channels
    # Its number is free for the next channel.
    setup.service.add_consumer("c.other", lambda body, acker: None)
    setup.net.flush()
    assert channel_of(setup, "c.other") == channel


def test_add_and_remove_while_disconnected_take_effect_on_connect() -> None:
    s = AmqpSetup()
    assert result_of(s.service.remove_consumer("c.event")) is None  # not connected: at once
    s.service.add_consumer("c.late", lambda body, acker: None)
    assert result_of(s.service.add_queues({"c.late": {}})) is None
    s.start()
    assert set(s.connection("consume").consumers) == {"c.inbound", "c.late"}
    assert "c.late" in s.broker.queues
    s.drop_all()
    s.service.remove_consumer("c.inbound")
    s.service.add_consumer("c.event", lambda body, acker: None)
    s.net.advance(1)
    assert set(s.connection("consume").consumers) == {"c.late", "c.event"}


@pytest.mark.parametrize("rounds", [0, 3, 6, 11, 12, 13, 14])
def test_add_and_remove_during_a_reconnect_s_set_up(rounds: int) -> None:
    """The broker answers the new connection's set-up a step at a time;
    consumers and queues added and removed after ``rounds`` steps (before
    the connection, during its declares, while its consumers start, after)
    end as asked."""
    s = AmqpSetup().start()
    s.broker.holding = True
    s.drop_all()
    s.net.advance(1)  # reconnecting
    for _ in range(rounds):
        s.net.flush()
        for connection in s.broker.connections:
            connection.release()
    s.service.add_consumer("c.new", lambda body, acker: None)
    declared = s.service.add_queues({"c.new": {}})
    removed = s.service.remove_consumer("c.inbound")
    s.answer_held()
    s.broker.holding = False
    assert s.service.connected
    assert set(s.connection("consume").consumers) == {"c.event", "c.new"}
    assert "c.new" in s.broker.queues
    assert result_of(removed) is None
    assert result_of(declared) is None
    assert s.broker.overlaps == []


def test_add_and_remove_while_a_get_and_a_publish_are_in_flight(setup: AmqpSetup) -> None:
    setup.broker.queues["c.probe"] = [b"probe"]
    setup.broker.confirm = None
    setup.broker.holding = True
    got = as_deferred(setup.service.get("c.probe"))
    published = setup.service.publish("c.outbound", b"out", message_id="m1")
    setup.net.flush()
    declared = setup.service.add_queues({"c.extra": {"x-message-ttl": 1000}})
    setup.service.add_consumer("c.extra", lambda body, acker: None)
    removed = setup.service.remove_consumer("c.event")
    setup.answer_held()
    setup.broker.holding = False
    body, _, acker = result_of(got)
    assert body == b"probe"
    assert result_of(declared) is None
    assert result_of(removed) is None
    assert set(setup.connection("consume").consumers) == {"c.inbound", "c.extra"}
    assert not published.called  # the broker has not confirmed it
    setup.connection("publish").send(amqp_method(1, "basic", "ack", delivery_tag=1))
    setup.net.flush()
    assert result_of(published) is None
    acker.ack()
    setup.net.flush()
    assert setup.connection("consume").acks == [(2, 1, False)]
    assert setup.broker.overlaps == []


def test_removed_queues_are_no_longer_declared_nor_deleted(setup: AmqpSetup) -> None:
    assert setup.wait(setup.service.add_queues({"c.extra": {}})) is None
    setup.service.remove_queues(["c.extra", "c.event"])
    assert "c.extra" not in setup.service.queues
    setup.broker.queues["c.extra"] = [b"kept"]
    del setup.broker.queues["c.event"]
    setup.drop_all()
    setup.net.advance(1)
    assert setup.service.connected
    assert setup.broker.queues["c.extra"] == [b"kept"]
    assert "c.event" not in setup.broker.queues  # not declared again


def test_a_queue_the_broker_refuses_is_named_and_not_kept() -> None:
    s = AmqpSetup(declare="passive")
    s.broker.queues.update({queue: [] for queue in ("c.inbound", "c.event", "c.outbound")})
    s.start()
    assert s.service.connected
    refused = s.service.add_queues({"c.there": {}, "c.missing": {}})
    s.broker.queues["c.there"] = []
    s.net.flush()
    with pytest.raises(SetupFailed, match=r"queue c\.missing does not exist"):
        result_of(refused)
    assert "c.missing" not in s.service.queues
    assert "c.there" in s.service.queues
    assert s.service.connected  # one refused queue costs no connection
    s.drop_all()
    s.net.advance(1)
    assert s.service.connected


def test_channel_numbers_are_used_again_as_consumers_come_and_go(setup: AmqpSetup) -> None:
    for n in range(30):
        setup.service.add_consumer(f"c.churn{n}", lambda body, acker: None)
        setup.net.flush()
        assert setup.wait(setup.service.remove_consumer(f"c.churn{n}")) is None
    consume = setup.connection("consume")
    assert max(channel for channel, _ in consume.methods) <= 5
    assert set(consume.consumers) == {"c.inbound", "c.event"}


def test_an_acker_of_a_closed_channel_does_nothing_when_its_number_is_used_again(
    setup: AmqpSetup,
) -> None:
    setup.broker.queues["c.probe"] = [b"first", b"second"]
    _, _, stale = setup.wait(setup.service.get("c.probe"))
    consume = setup.connection("consume")
    consume.close_channel(2, 406, "PRECONDITION_FAILED - something")
    setup.net.flush()
    assert not stale.alive
    _, _, fresh = setup.wait(setup.service.get("c.probe"))  # on a new channel 2
    assert fresh.delivery_tag == stale.delivery_tag == 1
    stale.ack()
    setup.net.flush()
    assert consume.acks == []  # the stale ack did not ack the new delivery
    fresh.ack()
    setup.net.flush()
    assert consume.acks == [(2, 1, False)]


def test_queues_added_as_the_connection_drops_are_declared_on_the_next(
    setup: AmqpSetup,
) -> None:
    setup.broker.holding = True
    declared = setup.service.add_queues({"c.late": {}})
    setup.net.flush()  # the declare is on the wire
    for connection in setup.broker.open_connections:
        connection.drop()
    setup.broker.holding = False
    setup.net.flush()
    assert result_of(declared) is None  # not refused: the next connection declares it
    assert "c.late" in setup.service.queues
    setup.broker.queues.pop("c.late", None)
    setup.net.advance(1)
    assert setup.service.connected
    assert "c.late" in setup.broker.queues


def test_after_stop_consuming_no_consumer_starts(setup: AmqpSetup) -> None:
    assert setup.wait(setup.service.stop_consuming()) is None
    setup.service.add_consumer("c.late", lambda body, acker: None)
    setup.net.flush()
    consume = setup.connection("consume")
    assert consume.consumers == {}
    assert any(name == "basic.qos" for _, name in consume.methods[-3:])  # set up, not consuming
    setup.drop_all()
    setup.net.advance(1)
    assert setup.connection("consume").consumers == {}
