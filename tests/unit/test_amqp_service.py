"""AmqpService bookkeeping: confirm tags, returns, batched acks, blocked and
busy publishing; no broker."""

from __future__ import annotations

import struct

import pytest
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport

from junebug_api.amqp_protocol import JunebugAMQPClient, JunebugDelegate, load_spec
from junebug_api.amqp_service import (
    CONTROL_CHANNEL,
    AmqpConnection,
    AmqpService,
    PublishFailed,
    PublishRefused,
)
from junebug_api.config import AmqpConfig, AmqpConnectionSettings
from junebug_api.testing import captured_logs

from .helpers import result_of


def connected_service(
    max_unconfirmed: int = 5000,
) -> tuple[AmqpService, AmqpConnection, StringTransport, Clock]:
    clock = Clock()
    settings = AmqpConnectionSettings(max_unconfirmed=max_unconfirmed)
    service = AmqpService(settings, [], {}, 10, clock)
    # One connection both publishes and consumes in this fake.
    connection = AmqpConnection(
        AmqpConfig(), clock, max_unconfirmed, publishing=True, consumer_for=lambda queue: None
    )
    client = JunebugAMQPClient(JunebugDelegate(), "/", load_spec(), clock=clock, events=connection)
    transport = StringTransport()
    client.makeConnection(transport)
    transport.clear()
    publisher, consumer = service.links
    publisher.connection = consumer.connection = connection
    return service, connection, transport, clock


def frames(data: bytes) -> list[tuple[int, int, bytes]]:
    """(type, channel, payload) of every frame in ``data``."""
    out, offset = [], 0
    while offset < len(data):
        kind, channel, size = struct.unpack_from("!BHI", data, offset)
        out.append((kind, channel, data[offset + 7 : offset + 7 + size]))
        assert data[offset + 7 + size] == 0xCE
        offset += 8 + size
    return out


def test_confirms_resolve_their_own_publish_and_multiple_covers_earlier() -> None:
    service, connection, _, _ = connected_service()
    first = service.publish("q", b"1", message_id="a")
    second = service.publish("q", b"2", message_id="b")
    third = service.publish("q", b"3", message_id="c")
    assert list(connection.pending) == [1, 2, 3]
    connection.publish_confirmed(2, True, True)
    assert result_of(first) is None
    assert result_of(second) is None
    assert not third.called
    connection.publish_confirmed(3, False, False)
    with pytest.raises(PublishFailed, match=r"basic\.nack"):
        result_of(third)


def test_a_too_long_message_id_is_replaced_and_keeps_tags_in_step() -> None:
    service, connection, transport, _ = connected_service()
    long_id = "x" * 300
    d = service.publish("q", "Sawubona 👋".encode(), message_id=long_id)
    _, header, body = frames(transport.value())
    assert body[2] == "Sawubona 👋".encode()
    assert long_id.encode() not in header[2]
    assert list(connection.pending) == [1]
    connection.publish_confirmed(1, False, True)
    assert result_of(d) is None


def test_unencodable_headers_fail_without_taking_a_tag() -> None:
    service, connection, transport, _ = connected_service()
    bad = service.publish("q", b"x", headers={"h": 1.5})
    with pytest.raises(PublishFailed, match="cannot encode"):
        result_of(bad)
    assert transport.value() == b""
    good = service.publish("q", b"y", message_id="m")
    assert list(connection.pending) == [1]
    connection.publish_confirmed(1, False, True)
    assert result_of(good) is None


def test_acks_are_batched_with_multiple_for_a_leading_run() -> None:
    _, connection, transport, clock = connected_service()
    ackers = {tag: connection.track(3, tag, False, {}) for tag in (1, 2, 3, 4, 5)}
    other = connection.track(4, 1, False, {})
    for tag in (2, 1, 3, 5):
        ackers[tag].ack()
    other.ack()
    assert transport.value() == b""  # gathered until the end of the reactor turn
    clock.advance(0)
    acks = [
        (channel, struct.unpack("!HHQB", payload))
        for _, channel, payload in frames(transport.value())
    ]
    assert acks == [(3, (60, 80, 3, 1)), (3, (60, 80, 5, 0)), (4, (60, 80, 1, 0))]
    assert list(connection.unacked[3]) == [4]
    assert list(connection.unacked[4]) == []


def test_lost_connection_fails_pending_publishes() -> None:
    from twisted.python.failure import Failure

    service, connection, _, _ = connected_service()
    d = service.publish("q", b"x", message_id="m")
    connection.connection_lost(Failure(ConnectionError("gone")))
    with pytest.raises(PublishFailed, match="connection lost"):
        result_of(d)
    assert not service.connected


def test_blocked_refuses_api_publishes_and_holds_others_until_unblocked() -> None:
    service, connection, transport, _ = connected_service()
    written = service.publish("q", b"before", message_id="a")
    connection.broker_blocked("low on memory")
    assert service.health()["state"] == "blocked"
    assert service.health()["health"] == "down"
    transport.clear()
    refused = service.publish("q", b"api", message_id="b", refuse_if_busy=True)
    with pytest.raises(PublishRefused, match="blocks publishing") as e:
        result_of(refused)
    assert e.value.retry_after > 0
    held = service.publish("q.failed", b"dead letter", message_id="c")
    assert transport.value() == b""  # nothing new is written while blocked
    assert not held.called and not written.called
    connection.broker_unblocked()
    assert len(frames(transport.value())) == 3  # the held publish: method, header, body
    connection.publish_confirmed(2, True, True)
    assert result_of(written) is None
    assert result_of(held) is None
    assert service.health()["health"] == "ok"


def test_max_unconfirmed_refuses_and_a_confirm_makes_room() -> None:
    service, connection, _, _ = connected_service(max_unconfirmed=2)
    first = service.publish("q", b"1", message_id="a")
    service.publish("q", b"2", message_id="b")
    with pytest.raises(PublishRefused, match="amqp_max_unconfirmed 2"):
        result_of(service.publish("q", b"3", message_id="c", refuse_if_busy=True))
    held = service.publish("q", b"4", message_id="d")
    assert list(connection.pending) == [1, 2]
    connection.publish_confirmed(1, False, True)
    assert result_of(first) is None
    assert list(connection.pending) == [2, 3]  # the held one went out, as tag 3
    connection.publish_confirmed(3, False, True)
    assert result_of(held) is None


def test_lost_connection_fails_held_publishes() -> None:
    from twisted.python.failure import Failure

    service, connection, _, _ = connected_service()
    connection.broker_blocked("disk")
    held = service.publish("q", b"x", message_id="m")
    connection.connection_lost(Failure(ConnectionError("gone")))
    with pytest.raises(PublishFailed, match="before the message was sent"):
        result_of(held)


def test_a_closed_control_channel_keeps_the_connection() -> None:
    from twisted.python.failure import Failure

    _, connection, transport, _ = connected_service()
    connection.control = type("Channel", (), {"id": CONTROL_CHANNEL, "closed": False})()
    connection.channel_closed(CONTROL_CHANNEL, Failure(ValueError("404")))
    assert connection.control is None
    assert not transport.disconnecting
    connection.channel_closed(1, Failure(ValueError("406")))
    assert transport.disconnecting


def test_connection_metrics_per_connection() -> None:
    service, connection, _, _ = connected_service()
    service.publish("q", b"x", message_id="m")
    connection.broker_blocked("disk")
    assert service.connection_metrics() == {
        "publish": {"up": 1, "blocked": 1, "unconfirmed": 1},
        "consume": {"up": 1, "blocked": 1, "unconfirmed": 1},  # one connection in this fake
    }
    _, consumer = service.links
    consumer.connection = None
    assert service.connection_metrics()["consume"] == {"up": 0, "blocked": 0, "unconfirmed": 0}


def test_a_stop_during_a_connection_attempt_logs_no_failure() -> None:
    """Stopping cuts the attempts in progress short: that is no failed set-up
    (no error line, no "ConnectingCancelledError" at every shutdown)."""
    from twisted.internet.testing import MemoryReactorClock

    with captured_logs() as events:
        reactor = MemoryReactorClock()
        service = AmqpService(AmqpConnectionSettings(), [], {}, 1, reactor)
        service.startService()
        assert len(reactor.tcpClients) == 2  # publish and consume, both connecting
        stopped = service.stopService()
        reactor.advance(0)
        assert stopped.called
    errors = [e for e in events if e.get("log_namespace") == "junebug_api.amqp_service"]
    assert errors == [], errors


def test_a_consumer_added_before_start_gets_the_deliveries_of_its_queue() -> None:
    """Consumers built after the service (they need its ``publish``) are
    registered with add_consumer; the consuming connection hands them their
    queue's deliveries. Once started, no consumer can be added."""
    from twisted.internet.testing import MemoryReactorClock

    reactor = MemoryReactorClock()
    service = AmqpService(AmqpConnectionSettings(), [], {}, 1, reactor)
    got: list[tuple[bytes, int]] = []
    service.add_consumer("q", lambda body, acker: got.append((body, acker.delivery_tag)), 7)
    service.startService()
    try:
        consuming = reactor.tcpClients[1][2]  # publish connects first, then consume
        client = consuming.buildProtocol(None)
        client.makeConnection(StringTransport())
        deliver = struct.pack("!HH", 60, 60) + b"\x01q" + struct.pack("!QB", 9, 0) + b"\x00\x00"
        header = struct.pack("!HHQH", 60, 0, 2, 0)
        client.dataReceived(
            b"".join(
                struct.pack("!BHI", kind, 3, len(payload)) + payload + b"\xce"
                for kind, payload in ((1, deliver), (2, header), (3, b"hi"))
            )
        )
        assert got == [(b"hi", 9)]
        with pytest.raises(RuntimeError, match="after the AMQP service started"):
            service.add_consumer("other", lambda body, acker: None)
    finally:
        service.stopService()
        reactor.advance(0)
