"""http_server: one read deadline per request, the connection limit."""

from __future__ import annotations

from twisted.internet.address import IPv4Address
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransportWithDisconnection
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET

from junebug_api.http.server import ApiSite, with_listen_backlog

ADDR = IPv4Address("TCP", "127.0.0.1", 12345)


class Hello(Resource):
    isLeaf = True

    def render_GET(self, request):
        if request.path == b"/slow":
            return NOT_DONE_YET  # its answer never comes: the connection is busy
        return b"hello"


class Transport(StringTransportWithDisconnection):
    aborted = False

    def abortConnection(self):
        self.aborted = True
        self.loseConnection()


def make_site(clock: Clock, **kwargs) -> ApiSite:
    options = {"max_request_size": 1000, "read_timeout": 2.0, "idle_timeout": 60.0}
    options.update(kwargs)
    return ApiSite(Hello(), clock=clock, **options)


def connect(site: ApiSite):
    channel = site.buildProtocol(ADDR)
    if channel is None:
        return None, None
    transport = Transport()
    transport.protocol = channel
    channel.makeConnection(transport)
    return channel, transport


def test_trickled_request_line_times_out_whatever_arrives():
    clock = Clock()
    channel, transport = connect(make_site(clock))
    for byte in b"GET /hello HTTP/1.1\r\nHost: x\r\n"[:15]:
        channel.dataReceived(bytes([byte]))
        clock.advance(0.1)  # 1.5 s of bytes: each would reset an idle timer
    assert transport.value() == b""
    clock.advance(0.5)
    assert transport.value().startswith(b"HTTP/1.1 408 Request Timeout\r\n")
    assert not transport.connected


def test_complete_requests_on_a_kept_alive_connection_each_get_their_own_deadline():
    clock = Clock()
    channel, transport = connect(make_site(clock))
    for _ in range(3):
        channel.dataReceived(b"GET /hello HTTP/1.1\r\nHost: x\r\n\r\n")
        assert transport.value().startswith(b"HTTP/1.1 200 OK"), transport.value()
        transport.clear()
        clock.advance(5)  # idle between requests is not the read deadline
    assert transport.connected
    assert not clock.getDelayedCalls() or all(
        c.getTime() - clock.seconds() > 2 for c in clock.getDelayedCalls()
    )


def test_connection_limit_closes_oldest_not_awaiting_an_answer():
    clock = Clock()
    site = make_site(clock, max_connections=3)
    opened = [connect(site) for _ in range(3)]
    # The oldest is awaiting its answer: a request whose response is pending.
    busy_channel, busy_transport = opened[0]
    busy_channel.dataReceived(b"GET /slow HTTP/1.1\r\nHost: x\r\n\r\n")
    newcomer, _ = connect(site)
    assert newcomer is not None
    assert not busy_transport.aborted
    assert opened[1][1].aborted and not opened[2][1].aborted
    assert site.open_connections == 3


def test_connection_limit_refuses_when_all_await_answers():
    clock = Clock()
    site = make_site(clock, max_connections=2)
    for channel, _ in [connect(site) for _ in range(2)]:
        channel.dataReceived(b"GET /slow HTTP/1.1\r\nHost: x\r\n\r\n")
    assert connect(site) == (None, None)


def test_listen_backlog_added_to_tcp_only():
    assert with_listen_backlog("tcp:8080:interface=127.0.0.1") == (
        "tcp:8080:interface=127.0.0.1:backlog=1024"
    )
    assert with_listen_backlog("tcp:8080:backlog=5") == "tcp:8080:backlog=5"
    assert with_listen_backlog("unix:/tmp/s") == "unix:/tmp/s"
