"""The seam between the AMQP client and AmqpService: ``ConnectionEvents``.

The client is given its listener at construction and reports through that
interface only; the service's listener (one ``AmqpConnection`` per connection)
and the fake of ``junebug_api.testing`` have every method of it, with the
same parameters. A method renamed, missing
or with other parameters on either side fails here.
"""

from __future__ import annotations

import inspect
from unittest import mock

import pytest
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure

from junebug_api.amqp.connection import AmqpConnection
from junebug_api.amqp.protocol import (
    ConnectionEvents,
    JunebugAMQPClient,
    JunebugAMQPFactory,
    JunebugDelegate,
    load_spec,
)
from junebug_api.amqp.testing import RecordingConnectionEvents, confirm_frame, delivery_frames
from junebug_api.config.model import AmqpConfig

EVENTS = sorted(
    name
    for name, value in vars(ConnectionEvents).items()
    if callable(value) and not name.startswith("_")
)


def parameters(function: object) -> list[tuple[str, object]]:
    """Each parameter's name and kind (positional, keyword-only, ...)."""
    return [(p.name, p.kind) for p in inspect.signature(function).parameters.values()]


def test_the_interface_names_every_event_the_client_reports() -> None:
    assert EVENTS == [
        "broker_blocked",
        "broker_unblocked",
        "channel_closed",
        "connection_lost",
        "connection_made",
        "message_delivered",
        "message_returned",
        "publish_confirmed",
    ]


#: Every implementation: the service's, and the public fake of testing.py.
IMPLEMENTATIONS = [AmqpConnection, RecordingConnectionEvents]


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS, ids=lambda c: c.__name__)
@pytest.mark.parametrize("event", EVENTS)
def test_each_implementation_has_each_event_with_its_parameters(
    implementation: type, event: str
) -> None:
    method = getattr(implementation, event, None)
    assert method is not None, f"{implementation.__name__} has no {event}"
    assert parameters(method) == parameters(getattr(ConnectionEvents, event))


def test_a_service_connection_is_connection_events() -> None:
    assert isinstance(AmqpConnection(AmqpConfig(), Clock(), 10), ConnectionEvents)


def test_the_client_reports_through_the_interface_only() -> None:
    """A listener that has the interface's methods and nothing else (an
    autospec: an unknown method or wrong arguments raise) hears every event."""
    events = mock.create_autospec(ConnectionEvents, instance=True)
    factory = JunebugAMQPFactory("/", 0, Clock(), events)
    client = factory.buildProtocol(None)
    assert client.events is events
    client.makeConnection(StringTransport())
    events.connection_made.assert_called_once_with(client)

    confirms = confirm_frame(7, multiple=True) + confirm_frame(8, ok=False)
    delivery = delivery_frames(5, "q", 3, b"hi", redelivered=True)
    client.dataReceived(confirms + delivery[:-10])  # the body frame comes later
    client.dataReceived(delivery[-10:])
    events.publish_confirmed.assert_has_calls(
        [mock.call(7, True, True), mock.call(8, False, False)]
    )
    events.message_delivered.assert_called_once_with(5, "q", 3, True, b"hi", {})

    delegate = JunebugDelegate()
    delegate.client = client
    delegate.connection_blocked(None, mock.Mock(reason="low on memory"))
    delegate.connection_unblocked(None, mock.Mock())
    returned = mock.Mock()
    delegate.basic_return_(None, returned)
    events.broker_blocked.assert_called_once_with("low on memory")
    events.broker_unblocked.assert_called_once_with()
    events.message_returned.assert_called_once_with(returned)

    closed = Failure(ValueError("406"))
    client.channel_failed(mock.Mock(id=4), closed)
    events.channel_closed.assert_called_once_with(4, closed)
    lost = Failure(ConnectionError("gone"))
    client.connectionLost(lost)
    events.connection_lost.assert_called_once_with(lost)


def test_a_client_needs_a_listener() -> None:
    with pytest.raises(TypeError, match="events"):
        JunebugAMQPClient(JunebugDelegate(), "/", load_spec(), clock=Clock())  # type: ignore[call-arg]
