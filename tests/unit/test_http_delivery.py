"""http_delivery: URL credentials and HttpDelivery.post_json against a fake RapidPro."""

from __future__ import annotations

import base64
import json
from collections.abc import Iterator
from typing import Any

import attrs
import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.defer import CancelledError, Deferred, fail
from twisted.internet.error import ConnectionLost, ConnectionRefusedError, DNSLookupError
from twisted.internet.protocol import Protocol, ServerFactory
from twisted.internet.task import Clock
from twisted.python.failure import Failure
from twisted.web.client import ResponseNeverReceived

from junebug_api.delivery.consumer import MessageWorker
from junebug_api.delivery.http_delivery import (
    DeliveryFailed,
    HttpDelivery,
    split_credentials,
)
from junebug_api.delivery.outages import OutageTracker, destination_of
from junebug_api.delivery.outcomes import HandlingFailed
from junebug_api.delivery.retry_policy import RetryPolicy
from junebug_api.testing import FakeRapidPro, RecordingAcker, RecordingPublisher, captured_logs

from .helpers import result_of

UNICODE_TEXT = "Sawubona, ngiyabonga 👋 ñ 漢字"


def basic(user: str, password: str) -> bytes:
    return b"Basic " + base64.b64encode(f"{user}:{password}".encode())


# -- split_credentials ---------------------------------------------------------


def test_url_without_credentials() -> None:
    url = "https://rp.example/c/jn/uuid/receive?x=1"
    assert split_credentials(url) == (url.encode(), None)


def test_url_with_credentials() -> None:
    clean, auth = split_credentials("https://user:pass@rp.example:8443/c/receive?a=b#f")
    assert clean == b"https://rp.example:8443/c/receive?a=b#f"
    assert auth == basic("user", "pass")
    assert auth == b"Basic dXNlcjpwYXNz"


def test_url_credentials_percent_escapes_decoded() -> None:
    url = "http://us%40er:p%3Ass%2Fw%C3%B1rd@rp.example/in"
    clean, auth = split_credentials(url)
    assert clean == b"http://rp.example/in"
    assert auth == basic("us@er", "p:ss/wñrd")


def test_url_with_user_only() -> None:
    clean, auth = split_credentials("https://token@rp.example/in")
    assert clean == b"https://rp.example/in"
    assert auth == basic("token", "")


def test_query_at_sign_is_not_credentials() -> None:
    url = "https://rp.example/in?email=a@b.example"
    assert split_credentials(url) == (url.encode(), None)


# -- HttpDelivery ---------------------------------------------------------------------


def post(rapidpro: FakeRapidPro, url: str, body: bytes, token: str | None = None) -> Deferred[int]:
    delivery = rapidpro.delivery(Clock())
    d = Deferred.fromCoroutine(delivery.post_json(url, body, token, 10.0))
    rapidpro.flush()
    return d


def test_post_json_200_with_token() -> None:
    rapidpro = FakeRapidPro(200)
    body = json.dumps({"content": UNICODE_TEXT}, ensure_ascii=False).encode()
    d = post(rapidpro, "http://rp.example/c/jn/uuid/receive", body, token="t")
    assert result_of(d) == 200
    [seen] = rapidpro.requests
    assert seen.uri == b"/c/jn/uuid/receive"
    assert seen.body == body
    assert json.loads(seen.body) == {"content": UNICODE_TEXT}
    assert seen.header("Content-Type") == [b"application/json; charset=utf-8"]
    assert seen.header("Accept") == [b"application/json"]
    assert seen.header("Authorization") == [b"Token t"]


def test_token_wins_over_url_credentials() -> None:
    rapidpro = FakeRapidPro(201)
    d = post(rapidpro, "http://user:pass@rp.example/in", b"{}", token="tok")
    assert result_of(d) == 201
    assert rapidpro.requests[0].header("Authorization") == [b"Token tok"]


def test_url_credentials_become_basic_auth() -> None:
    rapidpro = FakeRapidPro(200)
    d = post(rapidpro, "http://us%40er:p%3Ass@rp.example/in?x=1", b"{}")
    assert result_of(d) == 200
    [seen] = rapidpro.requests
    assert seen.header("Authorization") == [basic("us@er", "p:ss")]
    assert seen.uri == b"/in?x=1"


def test_no_auth_without_token_or_credentials() -> None:
    rapidpro = FakeRapidPro(204)
    assert result_of(post(rapidpro, "http://rp.example/in", b"{}")) == 204
    assert rapidpro.requests[0].header("Authorization") is None


@pytest.mark.parametrize(
    ("code", "retryable"),
    [
        (500, True),
        (503, True),
        (408, True),
        (502, True),
        (400, False),
        (404, False),
        (401, False),
        (302, False),
    ],
)
def test_non_2xx_raises_delivery_failed(code: int, retryable: bool) -> None:
    rapidpro = FakeRapidPro(code)
    d = post(rapidpro, "http://user:secretpass@rp.example/in", b"{}")
    with pytest.raises(DeliveryFailed) as info:
        result_of(d)
    assert info.value.retryable is retryable
    assert info.value.reason == f"HTTP {code}"
    assert "secretpass" not in str(info.value)
    assert len(rapidpro.requests) == 1  # no redirect followed, no retry here


class FailingClient:
    def __init__(self, error: Exception) -> None:
        self.error = error

    def request(self, *args: Any, **kwargs: Any) -> Deferred:
        return fail(self.error)


@pytest.mark.parametrize(
    ("error", "reason"),
    [
        (ConnectionRefusedError("nope"), "connection failed: ConnectionRefusedError"),
        (DNSLookupError("nope"), "connection failed: DNSLookupError"),
        (ResponseNeverReceived([Failure(ConnectionLost("gone"))]), "no response: "),
    ],
)
def test_transport_errors_are_retryable(error: Exception, reason: str) -> None:
    delivery = HttpDelivery(FailingClient(error), Clock())
    d = Deferred.fromCoroutine(
        delivery.post_json("http://user:secretpass@rp.example/in", b"{}", None, 1.5)
    )
    with pytest.raises(DeliveryFailed) as info:
        result_of(d)
    assert info.value.retryable is True
    assert info.value.reason.startswith(reason)
    assert "secretpass" not in info.value.reason


class HangingAgent:
    """An agent whose request never gets an answer; it records cancellation."""

    def __init__(self) -> None:
        self.cancelled = False

    def request(self, *args: Any, **kwargs: Any) -> Deferred:
        def cancel(d: Deferred) -> None:
            self.cancelled = True

        return Deferred(cancel)


def test_no_answer_times_out_once_and_cancels_the_request() -> None:
    clock = Clock()
    agent = HangingAgent()
    delivery = HttpDelivery(agent, clock)
    d = Deferred.fromCoroutine(delivery.post_json("http://rp.example/in", b"{}", None, 7.0))
    assert len(clock.getDelayedCalls()) == 1
    clock.advance(6.9)
    assert not d.called
    clock.advance(0.2)
    with pytest.raises(DeliveryFailed) as info:
        result_of(d)
    assert info.value.retryable is True
    assert info.value.reason == "timed out after 7 s"
    assert agent.cancelled
    assert clock.getDelayedCalls() == []


def test_cancelling_a_delivery_is_not_a_failed_attempt() -> None:
    """A cancel from outside (shutdown) propagates; it is no DeliveryFailed to retry."""
    agent = HangingAgent()
    delivery = HttpDelivery(agent, Clock())
    d = Deferred.fromCoroutine(delivery.post_json("http://rp.example/in", b"{}", None, 7.0))
    d.cancel()
    with pytest.raises(CancelledError):
        result_of(d)
    assert agent.cancelled


# -- outages and aborts ----------------------------------------------------------------


def test_outage_tracking_holds_back_a_down_destination() -> None:
    """Three 503s make the destination down: further POSTs are not made (held,
    no attempt) until a probe is due; its 200 brings the destination back."""
    clock = Clock()
    rapidpro = FakeRapidPro(503)
    outages = OutageTracker(clock, threshold=3, probe_interval=5.0)
    delivery = rapidpro.delivery(clock, outages=outages)
    url = "http://rp.example/in"

    def attempt() -> DeliveryFailed | int:
        d = Deferred.fromCoroutine(delivery.post_json(url, b"{}", None, 10.0))
        rapidpro.flush()
        try:
            return result_of(d)
        except DeliveryFailed as e:
            return e

    results = [attempt() for _ in range(3)]
    assert [(r.outage, r.held) for r in results] == [(True, False), (True, False), (True, True)]
    held = attempt()
    assert held.held and held.retryable
    assert "http://rp.example:80 is down" in held.reason
    assert len(rapidpro.requests) == 3  # no POST for the held one
    clock.advance(5)
    rapidpro.code = 200
    assert attempt() == 200  # the probe
    assert len(rapidpro.requests) == 4
    assert not outages.is_down(destination_of(url))


@pytest.mark.parametrize("code", [400, 404, 408])
def test_an_answer_that_is_no_5xx_is_no_outage(code: int) -> None:
    clock = Clock()
    rapidpro = FakeRapidPro(code)
    outages = OutageTracker(clock, threshold=1)
    delivery = rapidpro.delivery(clock, outages=outages)
    d = Deferred.fromCoroutine(delivery.post_json("http://rp.example/in", b"{}", None, 10.0))
    rapidpro.flush()
    with pytest.raises(DeliveryFailed) as info:
        result_of(d)
    assert not info.value.outage and not info.value.held
    assert not outages.is_down(destination_of("http://rp.example/in"))


class StallingBody(Protocol):
    """A server that answers 200 with a Content-Length it never completes."""

    def connectionMade(self) -> None:
        self.factory.connections.append(self)
        self.lost: Deferred[None] = Deferred()

    def dataReceived(self, data: bytes) -> None:
        if b"\r\n\r\n" in data and not getattr(self, "answered", False):
            self.answered = True
            self.transport.write(
                b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n" + b'{"partial": '
            )

    def connectionLost(self, reason: Any = None) -> None:
        self.lost.callback(None)


@pytest_twisted.ensureDeferred
async def test_timeout_during_the_body_aborts_the_connection() -> None:
    """The timeout fires while the body is arriving: the connection is
    closed by us at once, not left open until the peer gives up."""
    factory = ServerFactory.forProtocol(StallingBody)
    factory.connections = []
    port = reactor.listenTCP(0, factory, interface="127.0.0.1")
    try:
        delivery = HttpDelivery.create(reactor, 2)
        url = f"http://127.0.0.1:{port.getHost().port}/in"
        started = reactor.seconds()
        with pytest.raises(DeliveryFailed) as info:
            await delivery.post_json(url, b"{}", None, 0.5)
        assert info.value.reason == "timed out after 0.5 s"
        assert info.value.outage
        (server_side,) = factory.connections
        await server_side.lost.addTimeout(3, reactor)  # the client closed it
        assert reactor.seconds() - started < 5
    finally:
        await port.stopListening()


class SilentServer(Protocol):
    """A server that reads the request and never answers."""

    def connectionMade(self) -> None:
        self.factory.requests.append(Deferred())

    def dataReceived(self, data: bytes) -> None:
        if b"\r\n\r\n" in data and not self.factory.requests[-1].called:
            self.factory.requests[-1].callback(None)


@attrs.frozen
class Silent:
    """A SilentServer's URL, the requests it got, and a delivery with outage tracking."""

    url: str
    requests: list[Deferred]
    delivery: HttpDelivery
    outages: OutageTracker


@pytest.fixture
def silent() -> Iterator[Silent]:
    factory = ServerFactory.forProtocol(SilentServer)
    factory.requests = []
    port = reactor.listenTCP(0, factory, interface="127.0.0.1")
    outages = OutageTracker(reactor, threshold=1, probe_interval=5.0)
    yield Silent(
        f"http://127.0.0.1:{port.getHost().port}/in",
        factory.requests,
        HttpDelivery.create(reactor, 2, outages=outages),
        outages,
    )
    port.stopListening()


@pytest_twisted.ensureDeferred
async def test_a_cancelled_post_is_cancelled_not_a_failure_nor_an_outage(silent: Silent) -> None:
    """The shutdown drain cancels a POST in flight: Twisted's client fails it
    with ResponseNeverReceived wrapping CancelledError. That is no failed
    attempt, no outage of the destination and no "timed out": it is
    CancelledError, and the message goes back to its queue unacked."""
    d = Deferred.fromCoroutine(silent.delivery.post_json(silent.url, b"{}", None, 30.0))
    await wait_until(lambda: silent.requests and silent.requests[0].called)
    d.cancel()
    with pytest.raises(CancelledError):
        await d
    assert not silent.outages.is_down(destination_of(silent.url))


@pytest_twisted.ensureDeferred
async def test_no_answer_to_the_request_is_timed_out_and_an_outage(silent: Silent) -> None:
    """Our own timeout, while the answer's headers are awaited, is "timed
    out" (though Twisted's client reports the cancelled request as
    ResponseNeverReceived)."""
    with pytest.raises(DeliveryFailed) as info:
        await silent.delivery.post_json(silent.url, b"{}", None, 0.3)
    assert info.value.reason == "timed out after 0.3 s"
    assert silent.outages.is_down(destination_of(silent.url))


@pytest_twisted.ensureDeferred
async def test_a_delivery_the_drain_cancels_mid_post_is_no_attempt_no_outage(
    silent: Silent,
) -> None:
    """The shutdown drain cancels a delivery whose POST waits for its answer:
    nothing is published (no delay queue, no .failed: no attempt counted), the
    delivery is neither acked nor rejected (the closing connection gives it
    back to its queue), its destination is not down, and no log line says
    "timed out"."""

    async def handler(body: bytes) -> None:
        try:
            await silent.delivery.post_json(silent.url, body, None, 30.0)
        except DeliveryFailed as e:
            raise HandlingFailed(e.reason, retryable=e.retryable, held=e.held) from None

    publish = RecordingPublisher()
    worker = MessageWorker(
        "conn.inbound", handler, publish, RetryPolicy(1.0, 60.0, 5, max_hold=20), reactor
    )
    acker = RecordingAcker()
    with captured_logs() as logged:
        worker(b'{"message_id": "m-1"}', acker)
        await wait_until(lambda: silent.requests and silent.requests[0].called)
        assert await Deferred.fromCoroutine(worker.drain(0)) == 1
    assert publish.published == []
    assert (acker.acks, acker.rejects) == (0, 0)
    assert worker.in_flight == 0
    assert not silent.outages.is_down(destination_of(silent.url))
    assert not [e for e in logged if "timed out" in str(e.get("log_format", ""))]


async def wait_until(condition: Any, timeout: float = 5.0) -> None:
    from twisted.internet.task import deferLater

    deadline = reactor.seconds() + timeout
    while not condition():
        assert reactor.seconds() < deadline, "condition not met"
        await deferLater(reactor, 0.01)
