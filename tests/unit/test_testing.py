"""junebug_api.testing: the fakes keep to the contracts they stand in for."""

from __future__ import annotations

from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport

from junebug_api.amqp.protocol import ConnectionEvents
from junebug_api.amqp.testing import (
    FRAME_METHOD,
    FakeBroker,
    RecordingConnectionEvents,
    confirm_frame,
    delivery_frames,
    heartbeat_frame,
)
from junebug_api.testing import BreakableStateCache, CuttableSite, FakeRapidPro

from .helpers import result_of

BODY = '{"content": "Sawubona 👋 ñ 漢字"}'.encode()


def test_recording_connection_events_is_connection_events() -> None:
    assert isinstance(RecordingConnectionEvents(), ConnectionEvents)


def test_the_client_hears_a_delivery_fed_whole_and_one_fed_in_pieces() -> None:
    broker = FakeBroker()
    assert broker.events.named("connection_made") == [(broker.client,)]
    broker.feed(delivery_frames(3, "conn.inbound", 1, BODY))
    stream = delivery_frames(
        3,
        "conn.inbound",
        2,
        BODY,
        redelivered=True,
        headers={"x-junebug-attempts": 2},
        frame_max=16,
    )
    broker.feed(stream, cuts=[1, 7, 12, len(stream) - 1])
    assert broker.events.named("message_delivered") == [
        (3, "conn.inbound", 1, False, BODY, {}),
        (3, "conn.inbound", 2, True, BODY, {"x-junebug-attempts": 2}),
    ]


def test_confirms_heartbeats_and_what_the_client_writes() -> None:
    broker = FakeBroker(clock=Clock())
    broker.clear()
    broker.feed_bytewise(
        heartbeat_frame() + confirm_frame(4, multiple=True) + confirm_frame(5, ok=False)
    )
    assert broker.events.named("publish_confirmed") == [(4, True, True), (5, False, False)]
    broker.client.ack(3, 9)
    [(kind, channel, payload)] = broker.written_frames()
    assert (kind, channel, payload[:4]) == (FRAME_METHOD, 3, b"\x00\x3c\x00\x50")  # basic.ack


def test_fake_rapidpro_answers_the_codes_it_is_told_then_its_default() -> None:
    rapidpro = FakeRapidPro(204)
    rapidpro.answer(503, 408)
    delivery = rapidpro.delivery(Clock())
    codes = []
    for _ in range(3):
        outcome = Deferred.fromCoroutine(delivery.post_json("http://rp/in", b"{}", None, 5.0))
        rapidpro.flush()
        outcome.addErrback(lambda f: f.value.reason)
        codes.append(result_of(outcome))
    assert codes == ["HTTP 503", "HTTP 408", 204]
    assert rapidpro.bodies == [b"{}"] * 3


def test_fake_rapidpro_can_leave_requests_unanswered() -> None:
    rapidpro = FakeRapidPro()
    rapidpro.hold = True
    d = Deferred.fromCoroutine(rapidpro.delivery(Clock()).post_json("http://rp/in", b"{}", None, 5))
    rapidpro.flush()
    assert not d.called
    [request] = rapidpro.held
    request.setResponseCode(201)
    request.finish()
    rapidpro.flush()
    assert result_of(d) == 201


def test_a_broken_state_cache_fails_everything_and_says_so_until_mended() -> None:
    cache = BreakableStateCache(Clock())
    message = {"message_id": "m", "from_addr": "a", "to_addr": "b", "transport_name": "t"}
    result_of(cache.store_inbound(message))
    cache.break_with(ConnectionError("down"))
    failure = []
    cache.fetch_inbound("m").addErrback(failure.append)
    assert failure[0].check(ConnectionError)
    assert cache.health() == {"state_cache": {"health": "down", "error": "down"}}
    cache.mend()
    assert result_of(cache.fetch_inbound("m"))["from_addr"] == "a"
    assert cache.health() == {}  # the in-memory cache has no component to report


def test_cuttable_site_aborts_every_connection_it_built() -> None:
    site = CuttableSite(FakeRapidPro())
    transports = []
    for port in (1, 2):
        protocol = site.buildProtocol(IPv4Address("TCP", "127.0.0.1", port))
        transport = StringTransport()
        protocol.makeConnection(transport)
        transports.append(transport)
    assert len(site.connections) == 2
    site.cut()
    assert [t.disconnecting for t in transports] == [True, True]
