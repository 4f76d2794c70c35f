"""AmqpService's publishing and ack bookkeeping: which confirm settles which
publish, message ids, acks batched per reactor turn, blocked and busy
publishing, publishes a lost connection fails. The service connects, as it would to RabbitMQ, to the
in-memory broker of :mod:`tests.unit.helpers` (:class:`AmqpSetup`), which
here leaves the confirms to the test: each one is a frame the test sends."""

from __future__ import annotations

from typing import Any

import pytest

from junebug_api.amqp.service import PublishFailed, PublishRefused

from .helpers import AmqpSetup, amqp_method, result_of


def connected(**settings: Any) -> AmqpSetup:
    """A service connected to the in-memory broker, which confirms nothing
    by itself (see :func:`confirm`)."""
    s = AmqpSetup(**settings).start()
    s.broker.confirm = None
    return s


def confirm(s: AmqpSetup, tag: int, multiple: bool = False, ok: bool = True) -> None:
    """The broker confirms (``basic.ack``) or refuses (``basic.nack``) the
    publish ``tag`` (with every earlier one if ``multiple``)."""
    method = "ack" if ok else "nack"
    s.connection("publish").send(
        amqp_method(1, "basic", method, delivery_tag=tag, multiple=multiple)
    )
    s.net.flush()


def written(s: AmqpSetup) -> list[bytes]:
    """The bodies of every publish the broker has received, in order."""
    s.net.flush()
    return [body for _, body, _ in s.broker.published]


def unconfirmed(s: AmqpSetup) -> int:
    return s.service.connection_metrics()["publish"]["unconfirmed"]


def test_confirms_resolve_their_own_publish_and_multiple_covers_earlier() -> None:
    s = connected()
    first = s.service.publish("c.outbound", b"1", message_id="a")
    second = s.service.publish("c.outbound", b"2", message_id="b")
    third = s.service.publish("c.outbound", b"3", message_id="c")
    assert written(s) == [b"1", b"2", b"3"]
    assert unconfirmed(s) == 3
    confirm(s, 2, multiple=True)
    assert result_of(first) is None
    assert result_of(second) is None
    assert not third.called
    confirm(s, 3, ok=False)
    with pytest.raises(PublishFailed, match=r"basic\.nack"):
        result_of(third)


def test_a_too_long_message_id_is_replaced_and_keeps_tags_in_step() -> None:
    s = connected()
    long_id = "x" * 300
    d = s.service.publish("c.outbound", "Sawubona 👋".encode(), message_id=long_id)
    assert written(s) == ["Sawubona 👋".encode()]
    message_id = s.broker.published[0][2]["message-id"]
    assert message_id != long_id
    assert len(message_id) == 32  # a generated one
    assert unconfirmed(s) == 1
    confirm(s, 1)
    assert result_of(d) is None


def test_unencodable_headers_fail_without_taking_a_tag() -> None:
    s = connected()
    bad = s.service.publish("c.outbound", b"x", headers={"h": 1.5})
    with pytest.raises(PublishFailed, match="cannot encode"):
        result_of(bad)
    assert written(s) == []
    assert "basic.publish" not in {name for _, name in s.connection("publish").methods}
    good = s.service.publish("c.outbound", b"y", message_id="m")
    assert written(s) == [b"y"]
    confirm(s, 1)  # the broker's count: this is its first publish
    assert result_of(good) is None


@pytest.mark.parametrize(
    "value", [2**64, -(2**63) - 1], ids=["over an unsigned long long", "under a long long"]
)
def test_a_header_struct_cannot_pack_is_a_failed_publish(value: int) -> None:
    """struct.error (no TypeError or ValueError) is PublishFailed too: the
    caller's error path, never an unhandled exception."""
    s = connected()
    bad = s.service.publish("c.outbound", b"x", headers={"x-junebug-attempts": value})
    with pytest.raises(PublishFailed, match="cannot encode the message: "):
        result_of(bad)
    assert written(s) == []


def test_acks_are_batched_with_multiple_for_a_leading_run() -> None:
    s = connected()
    consume = s.connection("consume")
    for n in range(1, 6):
        consume.deliver("c.inbound", b"%d" % n)  # on channel 3
    consume.deliver("c.event", b"event")  # on channel 4
    s.net.flush()
    ackers = {acker.delivery_tag: acker for queue, _, acker in s.received if queue == "c.inbound"}
    [other] = [acker for queue, _, acker in s.received if queue == "c.event"]
    for tag in (2, 1, 3, 5):
        ackers[tag].ack()
    other.ack()
    s.net.pump()
    assert consume.acks == []  # gathered until the end of the reactor turn
    s.net.flush()
    assert consume.acks == [(3, 3, True), (3, 5, False), (4, 1, False)]
    ackers[4].ack()
    s.net.flush()
    assert consume.acks[3:] == [(3, 4, False)]  # tag 4 alone was left unacked


def test_a_lost_connection_fails_pending_and_held_publishes() -> None:
    s = connected()
    pending = s.service.publish("c.outbound", b"written", message_id="a")
    s.connection("publish").block("disk")
    s.net.flush()
    held = s.service.publish("c.outbound", b"held", message_id="b")
    assert written(s) == [b"written"]
    s.connection("publish").drop()
    s.net.flush()
    with pytest.raises(PublishFailed, match="connection lost before the broker confirmed"):
        result_of(pending)
    with pytest.raises(PublishFailed, match="connection lost before the message was sent"):
        result_of(held)
    assert not s.service.connected


def test_blocked_refuses_api_publishes_and_holds_others_until_unblocked() -> None:
    s = connected()
    before = s.service.publish("c.outbound", b"before", message_id="a")
    s.connection("publish").block("low on memory")
    s.net.flush()
    assert s.service.health()["state"] == "blocked"
    assert s.service.health()["health"] == "down"
    refused = s.service.publish("c.outbound", b"api", message_id="b", refuse_if_busy=True)
    with pytest.raises(PublishRefused, match="blocks publishing") as e:
        result_of(refused)
    assert e.value.retry_after > 0
    held = s.service.publish("c.outbound.failed", b"dead letter", message_id="c")
    assert written(s) == [b"before"]  # nothing new is written while blocked
    assert not held.called and not before.called
    s.connection("publish").unblock()
    assert written(s) == [b"before", b"dead letter"]  # the held publish
    confirm(s, 2, multiple=True)
    assert result_of(before) is None
    assert result_of(held) is None
    assert s.service.health()["health"] == "ok"


def test_max_unconfirmed_refuses_and_a_confirm_makes_room() -> None:
    s = connected(max_unconfirmed=2)
    first = s.service.publish("c.outbound", b"1", message_id="a")
    s.service.publish("c.outbound", b"2", message_id="b")
    with pytest.raises(PublishRefused, match="amqp_max_unconfirmed 2"):
        result_of(s.service.publish("c.outbound", b"3", message_id="c", refuse_if_busy=True))
    held = s.service.publish("c.outbound", b"4", message_id="d")
    assert written(s) == [b"1", b"2"]
    confirm(s, 1)
    assert result_of(first) is None
    assert written(s) == [b"1", b"2", b"4"]  # the held one went out, as tag 3
    assert unconfirmed(s) == 2
    confirm(s, 3)
    assert result_of(held) is None
