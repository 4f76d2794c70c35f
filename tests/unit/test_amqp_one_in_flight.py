"""AMQP 0-9-1's rule, one synchronous method in flight per channel, kept for
every caller on one connection (issue 20 item 1).

The in-memory broker of :mod:`tests.unit.helpers` holds its answers
(``holding``) and sends whatever it holds in one write, so the client reads
the answers to methods sent at once in one go: with two ``basic.get`` in
flight on a channel, txAMQP handed the second caller the first one's content
header. The broker also records any synchronous method that came on a
channel while the previous one was unanswered (``overlaps``).
"""

from __future__ import annotations

from typing import Any

import pytest
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from txamqp.client import Closed

from junebug_api.amqp.channel import ChannelGone
from junebug_api.amqp.frames import load_spec
from junebug_api.amqp.protocol import JunebugAMQPClient, JunebugDelegate
from junebug_api.amqp.testing import RecordingConnectionEvents

from .helpers import AmqpSetup, as_deferred, result_of

GETS = [f"get{n}" for n in range(8)]
COUNTED = [f"counted{n}" for n in range(8)]


def racing() -> AmqpSetup:
    """A connected service whose broker holds its answers; queue ``get<n>``
    holds n + 1 messages, ``counted<n>`` n + 10."""
    s = AmqpSetup(queues=["c.inbound", "c.event", *GETS, *COUNTED]).start()
    for n, queue in enumerate(GETS):
        s.broker.queues[queue] = [f"{queue}: {i}".encode() for i in range(n + 1)]
    for n, queue in enumerate(COUNTED):
        s.broker.queues[queue] = [b"x"] * (n + 10)
    s.broker.holding = True
    return s


def test_racing_synchronous_methods_each_get_their_own_answer() -> None:
    """Gets, passive declares, declares, consumer cancels and consumes, all
    asked at once on one connection's channels: the broker never sees two in
    flight on a channel, and each caller has its own answer."""
    s = racing()
    service = s.service
    gets = [as_deferred(service.get(queue)) for queue in GETS * 2]
    counts = [as_deferred(service.queue_status(queue)) for queue in COUNTED]
    declared = service.add_queues({f"new{n}": {} for n in range(5)})
    toggles = [
        as_deferred(service.pause_consumer("c.inbound")),
        as_deferred(service.resume_consumer("c.inbound")),
        as_deferred(service.pause_consumer("c.inbound")),
        as_deferred(service.resume_consumer("c.inbound")),
    ]
    s.answer_held()
    consume = s.connection("consume")
    assert s.broker.overlaps == []
    taken = [result_of(d) for d in gets]
    # Each caller has a message of its own queue, in the queue's order
    # (get0 holds one message: its second get finds it empty)...
    assert [got and got[0] for got in taken] == [
        *(f"{q}: 0".encode() for q in GETS),
        None,
        *(f"{q}: 1".encode() for q in GETS[1:]),
    ]
    ackers = [got[2] for got in taken if got is not None]
    # ... with the delivery tag the broker gave that very message.
    for body, _, acker in filter(None, taken):
        assert consume.gotten[(2, acker.delivery_tag)] == body
    assert [result_of(d) for d in counts] == [(n + 10, 0) for n in range(len(COUNTED))]
    assert result_of(declared) is None
    assert {f"new{n}" for n in range(5)} <= set(s.broker.queues)
    assert [result_of(d) for d in toggles] == [None] * 4
    assert "c.inbound" in consume.consumers
    # Each ack goes to the message it belongs to: all of them, once.
    s.broker.holding = False
    for acker in ackers:
        acker.ack()
    s.net.flush()
    assert consume.acks == [(2, len(ackers), True)]


def test_the_rule_is_kept_for_set_up_too() -> None:
    """A connection's own set-up (channel.open, confirm.select, qos,
    consume, the declares, over several lanes) with the answers held."""
    s = AmqpSetup(queues=[f"q{n}" for n in range(45)])
    s.broker.holding = True
    s.service.startService()
    s.answer_held()
    assert s.service.connected
    assert s.broker.overlaps == []


def test_a_caller_that_stops_waiting_leaves_its_answer_to_nobody_else() -> None:
    s = racing()
    first = as_deferred(s.service.get("get1"))
    second = as_deferred(s.service.get("get2"))
    s.net.flush()  # the first get is on the wire, the second waits its turn
    first.cancel()
    with pytest.raises(CancelledError):
        result_of(first)
    s.answer_held()
    assert result_of(second)[0] == b"get2: 0"
    consume = s.connection("consume")
    # The message the first get took went back to its queue at once.
    assert [consume.gotten[(2, tag)] for channel, tag, _ in consume.rejects] == [b"get1: 0"]
    assert s.broker.overlaps == []


def test_a_caller_cancelled_before_its_turn_sends_nothing() -> None:
    s = racing()
    first = as_deferred(s.service.queue_status("counted0"))
    second = as_deferred(s.service.queue_status("counted1"))
    third = as_deferred(s.service.queue_status("counted2"))
    s.net.flush()
    second.cancel()
    s.answer_held()
    assert result_of(first) == (10, 0)
    assert result_of(third) == (12, 0)
    with pytest.raises(CancelledError):
        result_of(second)
    declares = [name for _, name in s.connection("publish").methods if name == "queue.declare"]
    assert len(declares) == len(s.service.queues) + 2  # set-up, then first and third


def test_callers_in_line_behind_a_method_that_closed_the_channel_move_on() -> None:
    """A passive declare of a missing queue makes the broker close the
    control channel; the callers waiting behind it were never sent, and go
    on a new control channel instead of failing with its 404."""
    s = racing()
    missing = as_deferred(s.service.queue_status("missing"))
    after = [as_deferred(s.service.queue_status(q)) for q in COUNTED[:3]]
    s.answer_held()
    with pytest.raises(Exception, match="404"):
        result_of(missing)
    assert [result_of(d) for d in after] == [(10, 0), (11, 0), (12, 0)]
    assert s.service.connected
    assert s.broker.overlaps == []


def test_a_method_whose_turn_comes_on_a_closed_channel_is_not_sent() -> None:
    client = JunebugAMQPClient(
        JunebugDelegate(), "/", load_spec(), clock=Clock(), events=RecordingConnectionEvents()
    )
    transport = StringTransport()
    client.makeConnection(transport)
    transport.clear()  # the protocol header
    channel = client.new_channel(5)
    first = channel.queue_declare(queue="a", passive=True)
    second = channel.queue_declare(queue="b", passive=True)
    sent = transport.value()
    assert b"\x01a" in sent and b"\x01b" not in sent  # the second waits its turn
    channel.close(Exception("closed by the broker"))
    assert isinstance(outcome(first), Closed)
    assert isinstance(outcome(second), ChannelGone)
    assert transport.value() == sent  # never sent
    # Its number is free again once closed.
    assert client.new_channel(5) is not channel


def outcome(d: Deferred) -> Any:
    """What ``d`` fired with: its result, or its failure's exception."""
    results: list[Any] = []
    d.addBoth(results.append)
    assert results, "not fired"
    return getattr(results[0], "value", results[0])
