"""AmqpService against an in-memory broker: set-up, publishing with confirms,
consuming and acks, blocked publishing, reconnects and failover, queue
queries, pausing consumers, and an orderly stop. No RabbitMQ: the broker is
:class:`~tests.unit.helpers.BrokerServer` over ``iosim`` connections on a
MemoryReactorClock, so every timer (backoff, heartbeats, the connect
timeout) runs on the test's clock."""

from __future__ import annotations

from random import Random

import pytest
from twisted.internet.defer import CancelledError
from twisted.internet.protocol import Factory, Protocol

from junebug_api.amqp.service import PublishFailed, PublishRefused
from junebug_api.config.model import AmqpConfig
from junebug_api.testing import captured_logs

from .helpers import (
    QUEUES,
    AmqpSetup,
    BrokerServerConnection,
    ServerFactory,
    amqp_content,
    amqp_method,
    as_deferred,
    result_of,
)


@pytest.fixture
def setup() -> AmqpSetup:
    return AmqpSetup().start()


def test_both_connections_open_and_declare_the_topology() -> None:
    s = AmqpSetup(queue_arguments={"x-queue-type": "quorum"}, prefetch={"c.event": 3})
    with captured_logs() as events:
        s.start()
    assert result_of(s.service.when_connected()) is None
    assert s.service.connected
    publisher, consumer = s.connection("publish"), s.connection("consume")
    capabilities = publisher.client_properties["capabilities"]
    assert capabilities["publisher_confirms"] is True
    assert capabilities["connection.blocked"] is True
    assert publisher.login == ("PLAIN", "\0guest\0guest")
    assert publisher.vhost == "/"
    assert publisher.confirming == {1}
    assert consumer.confirming == set()
    assert set(s.broker.queues) == set(QUEUES)
    # Each consumer on a channel of its own, with its own prefetch.
    assert consumer.consumers == {"c.inbound": 3, "c.event": 4}
    assert consumer.prefetch == {3: 7, 4: 3}
    assert publisher.consumers == {}
    health = s.service.health()
    assert health["health"] == "ok"
    assert health["state"] == "open"
    assert health["connections"]["consume"]["state"] == "open"
    assert health["unconfirmed_publishes"] == 0
    assert s.service.connection_metrics() == {
        "publish": {"up": 1, "blocked": 0, "unconfirmed": 0},
        "consume": {"up": 1, "blocked": 0, "unconfirmed": 0},
    }
    lines = [e["log_format"] for e in events if e.get("role") == "consume"]
    assert any("connection open" in line for line in lines)
    assert any(e.get("consuming") == ", consuming ['c.event', 'c.inbound']" for e in events)


def test_publish_is_confirmed_by_the_broker(setup: AmqpSetup) -> None:
    d = setup.service.publish("c.outbound", "Sawubona 👋".encode(), message_id="m1")
    assert setup.service.health()["unconfirmed_publishes"] == 1
    assert setup.wait(d) is None
    routing_key, body, properties = setup.broker.published[0]
    assert (routing_key, body) == ("c.outbound", "Sawubona 👋".encode())
    assert properties == {
        "content-type": "application/json",
        "delivery-mode": 2,
        "message-id": "m1",
    }
    assert setup.service.health()["unconfirmed_publishes"] == 0


def test_a_body_larger_than_a_frame_is_sent_in_several(setup: AmqpSetup) -> None:
    body = bytes(range(256)) * 1200  # 300 KiB; the broker's frame_max is 128 KiB
    d = setup.service.publish("c.outbound", body, headers={"attempt": 2})
    assert setup.wait(d) is None
    _, received, properties = setup.broker.published[0]
    assert received == body
    assert properties["headers"] == {"attempt": 2}
    assert len(properties["message-id"]) == 32  # one was generated


@pytest.mark.parametrize(
    ("confirm", "error"),
    [("nack", r"refused the message \(basic\.nack\)"), ("return", r"unroutable \(312 NO_ROUTE\)")],
)
def test_a_nack_or_a_return_fails_the_publish(setup: AmqpSetup, confirm: str, error: str) -> None:
    setup.broker.confirm = confirm
    d = setup.service.publish("c.nowhere", b"x", message_id="m1")
    with pytest.raises(PublishFailed, match=error):
        setup.wait(d)
    setup.broker.confirm = "ack"
    assert setup.wait(setup.service.publish("c.outbound", b"y", message_id="m1")) is None


def test_a_return_of_a_message_nobody_waits_for_is_logged(setup: AmqpSetup) -> None:
    with captured_logs() as events:
        setup.connection("publish").send(
            amqp_method(
                1, "basic", "return", reply_code=312, reply_text="NO_ROUTE", routing_key="k"
            )
            + amqp_content(1, b"z", message_id="unknown")
        )
        setup.net.flush()
    returned = [e for e in events if "returned message" in e["log_format"]]
    assert [(e["message_id"], e["reason"]) for e in returned] == [("unknown", "312 NO_ROUTE")]
    assert setup.service.connected


def test_a_cancelled_publish_ignores_its_confirm(setup: AmqpSetup) -> None:
    setup.broker.confirm = None
    d = setup.service.publish("c.outbound", b"x", message_id="m1")
    d.addErrback(lambda f: f.trap(CancelledError))
    d.cancel()  # the API client went away before the confirm
    setup.broker.confirm = "ack"
    later = setup.service.publish("c.outbound", b"y", message_id="m2")
    setup.net.flush()
    setup.connection("publish").send(amqp_method(1, "basic", "ack", delivery_tag=2, multiple=True))
    assert setup.wait(later) is None


def test_deliveries_reach_their_consumer_and_acks_are_batched(setup: AmqpSetup) -> None:
    consumer = setup.broker.consumer("c.inbound")
    for n in range(3):
        consumer.deliver("c.inbound", b"in %d" % n)
    consumer.deliver("c.event", b"event", headers={"attempt": 4}, redelivered=True)
    setup.net.flush()
    assert [(q, body) for q, body, _ in setup.received] == [
        ("c.inbound", b"in 0"),
        ("c.inbound", b"in 1"),
        ("c.inbound", b"in 2"),
        ("c.event", b"event"),
    ]
    event_acker = setup.received[3][2]
    assert event_acker.headers == {"attempt": 4}
    assert event_acker.redelivered and event_acker.alive
    for _, _, acker in setup.received[:2]:
        acker.ack()
    event_acker.reject()
    setup.net.flush()
    assert consumer.acks == [(3, 2, True)]  # one ack, multiple, for tags 1 and 2
    assert consumer.rejects == [(4, 1, True)]
    setup.received[2][2].ack()
    setup.net.flush()
    assert consumer.acks[-1] == (3, 3, False)


def test_a_delivery_on_a_channel_without_a_consumer_is_given_back(setup: AmqpSetup) -> None:
    """Deliveries go to the consumer of the channel they come on; one on any
    other channel (here the control channel) goes back to its queue."""
    consume = setup.connection("consume")
    consume.send(
        amqp_method(
            2, "basic", "deliver", consumer_tag="someone-else", delivery_tag=1, routing_key="q"
        )
        + amqp_content(2, b"x")
    )
    setup.net.flush()
    assert setup.received == []
    assert consume.rejects == [(2, 1, True)]


def test_a_blocked_broker_refuses_api_publishes_and_holds_the_others(setup: AmqpSetup) -> None:
    publisher = setup.connection("publish")
    with captured_logs() as events:
        publisher.block("low on memory")
        setup.net.flush()
    assert any("blocks publishing" in e["log_format"] for e in events)
    health = setup.service.health()
    assert (health["health"], health["state"]) == ("down", "blocked")
    assert health["error"] == "the broker blocks publishing (low on memory)"
    assert health["connections"]["publish"]["blocked"] == "low on memory"
    assert setup.service.connection_metrics()["publish"]["blocked"] == 1
    refused = setup.service.publish("c.outbound", b"api", refuse_if_busy=True)
    with pytest.raises(PublishRefused, match="low on memory"):
        result_of(refused)
    held = setup.service.publish("c.outbound.failed", b"dead letter")
    setup.net.flush()
    assert not held.called and setup.broker.published == []
    publisher.unblock()
    assert setup.wait(held) is None
    assert [body for _, body, _ in setup.broker.published] == [b"dead letter"]
    assert setup.service.health()["health"] == "ok"


def test_connection_metrics_per_connection(setup: AmqpSetup) -> None:
    setup.broker.confirm = None
    setup.service.publish("c.outbound", b"x", message_id="m")
    for connection in setup.broker.open_connections:
        connection.block("disk")
    setup.net.flush()
    assert setup.service.connection_metrics() == {
        "publish": {"up": 1, "blocked": 1, "unconfirmed": 1},
        "consume": {"up": 1, "blocked": 0, "unconfirmed": 0},  # it publishes nothing
    }
    setup.connection("consume").drop()
    setup.net.flush()
    assert setup.service.connection_metrics()["consume"] == {
        "up": 0,
        "blocked": 0,
        "unconfirmed": 0,
    }


class BlockedAtOpen(BrokerServerConnection):
    """A broker under a resource alarm that says so as soon as the connection
    is open: ``connection.blocked`` before the client has opened a channel."""

    def on_connection_open(self, channel: int, args: dict) -> None:
        super().on_connection_open(channel, args)
        self.block("low on disk")


def test_a_broker_blocking_during_the_set_up_blocks_publishing() -> None:
    """A ``connection.blocked`` that arrives before the publish channel is in
    confirm mode counts as well: the connection hears it from its first byte
    (it is the client's ``ConnectionEvents`` from construction). Before the
    refactor of issue 16 the blocked callbacks were set only after
    ``confirm.select``, so such a notice was dropped and publishes written
    into a blocked connection; the consuming connection ignores it, as before."""
    s = AmqpSetup(listen=())
    s.net.listen(5672, ServerFactory(BlockedAtOpen, s.broker))
    s.start()
    assert s.service.connected
    health = s.service.health()
    assert health["connections"]["publish"]["blocked"] == "low on disk"
    assert health["connections"]["consume"]["state"] == "open"
    refused = s.service.publish("c.outbound", b"api", refuse_if_busy=True)
    with pytest.raises(PublishRefused, match="low on disk"):
        result_of(refused)
    s.connection("publish").unblock()
    s.net.flush()
    assert s.wait(s.service.publish("c.outbound", b"api", refuse_if_busy=True)) is None


def test_a_lost_connection_fails_its_publishes_and_is_made_again(setup: AmqpSetup) -> None:
    setup.broker.confirm = None
    unconfirmed = setup.service.publish("c.outbound", b"x")
    setup.net.flush()
    setup.broker.consumer("c.inbound").deliver("c.inbound", b"in")
    setup.net.flush()
    stale = setup.received[0][2]
    with captured_logs() as events:
        for connection in setup.broker.open_connections:
            connection.drop()
        setup.net.flush()
    with pytest.raises(PublishFailed, match="lost before the broker confirmed"):
        result_of(unconfirmed)
    assert not stale.alive
    health = setup.service.health()
    assert health["health"] == "down"
    assert health["error"] == "the connection to 127.0.0.1:5672 was closed"
    assert health["connections"]["publish"] == {
        "state": "closed",
        "broker": "127.0.0.1:5672",
        "error": "the connection to 127.0.0.1:5672 was closed",
    }
    assert any("lost" in e["log_format"] for e in events)
    with pytest.raises(PublishFailed, match="not connected"):
        result_of(setup.service.publish("c.outbound", b"y"))
    # Lost within seconds of opening: a backoff of about half a second first.
    setup.net.advance(0.3)
    assert not setup.service.connected
    setup.net.advance(0.4)
    assert setup.service.connected
    stale.ack()  # an acker of the old connection does nothing
    setup.net.flush()
    assert all(c.acks == [] for c in setup.broker.connections)


def test_a_refused_login_is_said_in_one_sentence() -> None:
    s = AmqpSetup()
    s.broker.refuse_login = True
    with captured_logs() as events:
        s.start()
        waiting = s.service.when_connected(failures=1)
        s.net.flush()
    with pytest.raises(PublishFailed, match=r"^authentication failed for user guest$"):
        result_of(waiting)
    assert s.service.health()["error"] == "authentication failed for user guest"
    errors = [e for e in events if e.get("error") == "authentication failed for user guest"]
    assert errors and all(e["log_level"].name == "error" for e in errors)
    with pytest.raises(PublishFailed, match="authentication failed"):
        result_of(s.service.when_connected(failures=1))


def test_failover_to_the_next_broker_then_back_off_after_a_round() -> None:
    brokers = (AmqpConfig(port=5673), AmqpConfig(port=5672))
    s = AmqpSetup(brokers=brokers, listen=(5672,))
    s.service.startService()
    s.net.refuse()
    s.net.refuse()  # both connections' first attempts, at the broker that is down
    s.net.advance(0.3)  # HostnameEndpoint gives up on its address
    assert result_of(s.service.when_connected()) is None
    assert s.service.health()["host"] == "127.0.0.1:5672"

    # Now every broker refuses: a whole round fails, then the backoff applies.
    t = AmqpSetup(brokers=brokers, listen=())
    t.service.startService()
    waiting = t.service.when_connected(failures=2)
    for _ in range(2):
        t.net.refuse()
        t.net.refuse()
        t.net.advance(0.3)
    with pytest.raises(PublishFailed, match=r"^connection refused by 127.0.0.1:5672$"):
        result_of(waiting)
    assert t.net.reactor.tcpClients == []  # waiting out the backoff (0.4 to 0.6 s)
    t.net.advance(0.7)
    assert [port for _, port, *_ in t.net.reactor.tcpClients] == [5673, 5673]
    assert result_of(t.stop()) is None


def tried_brokers(s: AmqpSetup, attempts: int) -> dict[str, list[int]]:
    """The port of the broker each of the two connections tried, attempt by
    attempt, over its first ``attempts``; every attempt is refused."""
    tried: dict[str, list[int]] = {link.role: [] for link in s.service.links}
    s.service.startService()
    while any(len(ports) < attempts for ports in tried.values()):
        for link in s.service.links:
            if link.attempts > len(tried[link.role]):
                tried[link.role].append(link.broker.port)
        if s.net.reactor.tcpClients:
            s.net.refuse()  # one attempt at a time, so each is seen above
        s.net.advance(0.1)  # the backoff after a round, too
    assert result_of(s.stop()) is None
    return {role: ports[:attempts] for role, ports in tried.items()}


def test_brokers_in_order_or_shuffled_per_round() -> None:
    brokers = tuple(AmqpConfig(port=port) for port in (5672, 5673, 5674))
    in_order = tried_brokers(AmqpSetup(brokers=brokers, listen=()), attempts=5)
    assert in_order == {
        "publish": [5672, 5673, 5674, 5672, 5673],
        "consume": [5672, 5673, 5674, 5672, 5673],
    }
    shuffled = tried_brokers(
        AmqpSetup(brokers=brokers, listen=(), failover="shuffle", random=Random(4)), attempts=12
    )
    for ports in shuffled.values():
        rounds = [tuple(ports[i : i + 3]) for i in range(0, 12, 3)]
        assert all(sorted(r) == [5672, 5673, 5674] for r in rounds)  # each round: all
        assert len(set(rounds[1:])) > 1  # in a new order each round, not once


def test_a_broker_that_never_answers_times_out() -> None:
    s = AmqpSetup(brokers=(AmqpConfig(port=5674),), listen=(), connect_timeout=4)
    s.net.listen(5674, Factory.forProtocol(Protocol))
    s.start()
    waiting = s.service.when_connected(failures=1)
    s.net.advance(4)
    with pytest.raises(PublishFailed, match=r"^no AMQP answer within 4 s from 127.0.0.1:5674$"):
        result_of(waiting)


def test_passive_declare_of_a_missing_queue_fails_the_set_up() -> None:
    s = AmqpSetup(declare="passive")
    s.broker.queues = {"c.inbound": [], "c.event": []}
    s.start()
    waiting = s.service.when_connected(failures=1)
    s.net.flush()
    with pytest.raises(PublishFailed, match=r"queue c.outbound does not exist \(amqp_declare"):
        result_of(waiting)


def test_an_exchange_with_other_arguments_fails_the_set_up() -> None:
    s = AmqpSetup()
    s.broker.exchange_error = (406, "PRECONDITION_FAILED - inequivalent arg 'type'")
    s.start()
    waiting = s.service.when_connected(failures=1)
    s.net.flush()
    with pytest.raises(PublishFailed, match=r"^exchange vumi exists with other arguments"):
        result_of(waiting)


def test_queue_status_and_a_missing_queue(setup: AmqpSetup) -> None:
    setup.broker.queues["c.outbound"] = [b"a", b"b"]
    assert setup.wait(setup.service.queue_status("c.outbound")) == (2, 0)
    assert setup.wait(setup.service.queue_info("c.inbound")) == (0, 1)
    assert setup.wait(setup.service.count("c.outbound")) == 2
    missing = as_deferred(setup.service.queue_status("c.gone"))
    setup.net.flush()
    with pytest.raises(Exception, match="404"):
        result_of(missing)
    # The broker closed the query channel: the next query opens another.
    assert setup.service.connected
    assert setup.wait(setup.service.count("c.outbound")) == 2


def test_a_closed_control_channel_keeps_the_connection(setup: AmqpSetup) -> None:
    """The broker closing the channel for declarations and queries (as a
    passive declare of a missing queue does) leaves the connection open; it
    closing any other channel starts the connection over."""
    publisher = setup.connection("publish")
    publisher.close_channel(2, 404, "NOT_FOUND - no queue 'c.gone'")
    setup.net.flush()
    assert not publisher.closed
    assert setup.service.connected
    publisher.close_channel(1, 406, "PRECONDITION_FAILED - unknown delivery tag 9")
    setup.net.flush()
    assert publisher.closed
    assert not setup.service.connected


def test_get_takes_one_message_and_its_acker_acks_it(setup: AmqpSetup) -> None:
    assert setup.wait(setup.service.get("c.inbound")) is None
    setup.broker.queues["c.inbound.failed"] = [b"poison"]
    body, properties, acker = setup.wait(setup.service.get("c.inbound.failed"))
    assert body == b"poison"
    assert properties["headers"] == {"attempt": 2}
    assert acker.headers == {"attempt": 2}
    acker.ack()
    setup.net.flush()
    assert setup.connection("consume").acks == [(2, 1, False)]


def test_queries_need_a_connection() -> None:
    s = AmqpSetup(listen=())
    with pytest.raises(PublishFailed, match="not connected"):
        result_of(as_deferred(s.service.queue_status("c.inbound")))


def test_add_queues_declares_now_and_on_every_connect(setup: AmqpSetup) -> None:
    args = {"x-message-ttl": 5000, "x-dead-letter-exchange": "vumi"}
    assert setup.wait(setup.service.add_queues({"c.inbound.delay": args})) is None
    assert "c.inbound.delay" in setup.broker.queues
    del setup.broker.queues["c.inbound.delay"]
    setup.drop_all()
    setup.net.advance(1)
    assert setup.service.connected
    assert "c.inbound.delay" in setup.broker.queues


def test_many_queues_are_declared_over_several_channels() -> None:
    queues = [f"c{n}.inbound" for n in range(60)]
    s = AmqpSetup(queues=queues, consumed=("c0.inbound",)).start()
    assert s.service.connected
    assert set(queues) <= set(s.broker.queues)
    publisher = s.connection("publish")
    lanes = {channel for channel, name in publisher.methods if name == "queue.declare"}
    assert lanes == {2, 3, 4}  # the control channel and two more (60 queues / 20)
    assert publisher.channels == {1, 2}  # the lanes were closed again


def test_pause_and_resume_a_consumer_across_a_reconnect(setup: AmqpSetup) -> None:
    assert setup.wait(setup.service.pause_consumer("c.inbound")) is None
    assert "c.inbound" not in setup.connection("consume").consumers
    setup.drop_all()
    setup.net.advance(1)
    consume = setup.connection("consume")
    assert list(consume.consumers) == ["c.event"]  # still paused
    assert setup.wait(setup.service.resume_consumer("c.inbound")) is None
    assert set(consume.consumers) == {"c.inbound", "c.event"}
    assert setup.wait(setup.service.resume_consumer("c.inbound")) is None  # not paused: no-op
    assert setup.wait(setup.service.stop_consuming()) is None
    assert consume.consumers == {}


def test_pausing_while_disconnected_takes_effect_on_connect() -> None:
    s = AmqpSetup()
    assert result_of(as_deferred(s.service.pause_consumer("c.event"))) is None
    assert result_of(as_deferred(s.service.resume_consumer("c.inbound"))) is None
    s.start()
    assert list(s.connection("consume").consumers) == ["c.inbound"]
    assert s.wait(s.service.resume_consumer("c.event")) is None
    assert set(s.connection("consume").consumers) == {"c.inbound", "c.event"}


@pytest.mark.parametrize("how", ["cancel", "close"])
def test_a_consumer_cancelled_or_closed_by_the_broker_reconnects(
    setup: AmqpSetup, how: str
) -> None:
    consume = setup.connection("consume")
    with captured_logs() as events:
        if how == "cancel":
            consume.cancel_consumer("c.inbound")
        else:
            consume.close_channel(3, 406, "PRECONDITION_FAILED - unknown delivery tag 9")
        setup.net.flush()
    assert consume.closed
    assert any(e.get("tag") == "c.inbound" or e.get("channel") == 3 for e in events)
    setup.net.advance(1)
    assert set(setup.connection("consume").consumers) == {"c.inbound", "c.event"}


def test_silence_beyond_the_heartbeat_drops_the_connection() -> None:
    s = AmqpSetup(heartbeat=2).start()
    consume = s.connection("consume")
    s.net.advance(5)
    assert not consume.closed  # heartbeats flowing (the client sends them)
    with captured_logs() as events:
        s.net.advance(2)  # 3 intervals without a byte from the broker
    assert consume.closed
    assert any("No AMQP traffic" in e["log_format"] for e in events)


def test_stop_sends_pending_acks_closes_and_fails_waiters(setup: AmqpSetup) -> None:
    consumer = setup.broker.consumer("c.inbound")
    consumer.deliver("c.inbound", b"x")
    setup.net.flush()
    setup.received[0][2].ack()  # not yet flushed: the stop must send it
    stopped = setup.stop()
    assert result_of(stopped) is None
    assert consumer.acks == [(3, 1, False)]
    assert all(c.closed for c in setup.broker.connections)
    assert "connection.close" in {name for _, name in consumer.methods}
    assert not setup.service.connected

    s = AmqpSetup(listen=())
    s.service.startService()
    waiting = s.service.when_connected()
    assert result_of(s.stop()) is None
    with pytest.raises(PublishFailed, match="stopped"):
        result_of(waiting)


def test_a_stop_during_a_connection_attempt_logs_no_failure() -> None:
    """Stopping cuts the attempts in progress short: that is no failed set-up
    (no error line, no "ConnectingCancelledError" at every shutdown)."""
    s = AmqpSetup(listen=())
    with captured_logs() as events:
        s.service.startService()
        assert len(s.net.reactor.tcpClients) == 2  # publish and consume, both connecting
        stopped = s.service.stopService()
        s.net.reactor.advance(0)
        assert stopped.called
    errors = [e for e in events if e.get("log_namespace") == "junebug_api.amqp.service"]
    assert errors == [], errors
