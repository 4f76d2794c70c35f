"""What junebug_api relies on from Twisted where no public API says it, and
the public replacements for private APIs it used to take.

Each test fails when a library release changes the behaviour under us:
the order in which twisted.web's HTTPChannel calls a request, the quiet
HTTP client pool, listening that fails at once, a disconnect seen through
``notifyFinish()``.
"""

from __future__ import annotations

from typing import Any

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import TCP4ServerEndpoint
from twisted.internet.error import CannotListenError
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransportWithDisconnection
from twisted.web.resource import Resource
from twisted.web.server import Site

from junebug_api.delivery.http_delivery import HttpDelivery
from junebug_api.http.server import ApiSite, ListeningService
from junebug_api.testing import captured_logs

ADDR = IPv4Address("TCP", "127.0.0.1", 12345)


class Accepted(Resource):
    isLeaf = True

    def render_POST(self, request: Any) -> bytes:
        request.setHeader(b"Connection", b"close")
        return b"{}"


def post_with_expect_continue(length: int) -> bytes:
    """What an ApiSite answers to headers announcing a ``length`` body with
    ``Expect: 100-continue`` (the body not yet sent)."""
    site = ApiSite(
        Accepted(), clock=Clock(), max_request_size=1000, read_timeout=2.0, idle_timeout=60.0
    )
    channel = site.buildProtocol(ADDR)
    transport = StringTransportWithDisconnection()
    transport.protocol = channel
    channel.makeConnection(transport)
    channel.dataReceived(
        b"POST /x HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\n"
        b"Content-Length: %d\r\n\r\n" % length
    )
    return transport.value()


def test_a_body_over_the_limit_gets_a_413_and_no_100_continue() -> None:
    """LimitedRequest.gotLength refuses before HTTPChannel answers
    ``Expect: 100-continue``: twisted.web calls gotLength first."""
    answer = post_with_expect_continue(5000)
    assert answer.startswith(b"HTTP/1.1 413 ")
    assert b"100 Continue" not in answer


def test_a_body_within_the_limit_still_gets_its_100_continue() -> None:
    assert post_with_expect_continue(10) == b"HTTP/1.1 100 Continue\r\n\r\n"


@pytest_twisted.ensureDeferred
async def test_delivery_connections_log_no_factory_lines() -> None:
    """The pool's client factory is noisy; HttpDelivery's endpoints wrap it
    quietly (no "Starting factory" line per connection), with public APIs."""
    port = reactor.listenTCP(0, Site(Accepted()), interface="127.0.0.1")
    try:
        with captured_logs() as events:
            delivery = HttpDelivery.create(reactor, 2)
            url = f"http://127.0.0.1:{port.getHost().port}/in"
            assert await delivery.post_json(url, b"{}", None, 5) == 200
    finally:
        await port.stopListening()
    assert not [e for e in events if "factory" in str(e.get("log_format", ""))]


def test_listening_that_fails_raises_at_start() -> None:
    """twistd must hear of a port it cannot listen on from
    privilegedStartService (Twisted's StreamServerEndpointService only logs
    it, unless a private flag is set)."""
    taken = reactor.listenTCP(0, Factory.forProtocol(Protocol), interface="127.0.0.1")
    try:
        endpoint = TCP4ServerEndpoint(reactor, taken.getHost().port, interface="127.0.0.1")
        service = ListeningService(endpoint, Factory.forProtocol(Protocol))
        with pytest.raises(CannotListenError):
            service.privilegedStartService()
    finally:
        taken.stopListening()


@pytest_twisted.ensureDeferred
async def test_listening_service_listens_until_stopped() -> None:
    endpoint = TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1")
    service = ListeningService(endpoint, Factory.forProtocol(Protocol))
    service.startService()
    assert service.running
    await service.stopService()
    assert not service.running


class LaterEndpoint:
    """An endpoint whose listen answers later (fails, here)."""

    def __init__(self) -> None:
        self.listening: Deferred[Any] = Deferred()

    def listen(self, factory: Any) -> Deferred[Any]:
        return self.listening


def test_a_later_listening_failure_is_logged_and_a_stop_is_quiet() -> None:
    with captured_logs() as events:
        later = LaterEndpoint()
        service = ListeningService(later, Factory.forProtocol(Protocol))
        service.privilegedStartService()
        later.listening.errback(CannotListenError("127.0.0.1", 80, OSError("denied")))
        stopped = service.stopService()
        assert stopped.called
        quiet = ListeningService(LaterEndpoint(), Factory.forProtocol(Protocol))
        quiet.startService()
        assert quiet.stopService().called  # cancelled while waiting: no error logged
    failures = [e for e in events if e.get("log_failure") is not None]
    assert [e["log_failure"].type for e in failures] == [CannotListenError]
