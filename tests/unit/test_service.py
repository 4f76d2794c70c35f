"""JunebugService: what the service tree holds for a config, and the order of
its shutdown; on a MemoryReactorClock (nothing listens or connects for real)."""

from __future__ import annotations

import gc
import json
from collections.abc import Iterator
from typing import Any

import pytest
from treq.testing import StubTreq
from twisted.application.service import Application
from twisted.internet.error import CannotListenError
from twisted.internet.testing import MemoryReactorClock
from twisted.logger import ILogObserver

from junebug_api.amqp.service import AmqpService
from junebug_api.config.model import load_config
from junebug_api.formats.queue_names import QueueNames
from junebug_api.http.server import ListeningService
from junebug_api.observe.log import set_log_level
from junebug_api.observe.metrics import NO_METRICS, PrometheusMetrics
from junebug_api.service import JunebugService
from junebug_api.state.memory_cache import InMemoryStateCache
from junebug_api.state.redis_cache import RedisStateCache
from junebug_api.testing import RecordingAcker, captured_logs

from .helpers import result_of

MO_URL = "http://127.0.0.1:9/in"
ROLES = ("outbound", "inbound", "event", "inbound_failed", "event_failed")


@pytest.fixture(autouse=True)
def process_state() -> Iterator[None]:
    """startService tunes the garbage collector and sets the log level for
    the process: put both back for the other tests."""
    threshold = gc.get_threshold()
    yield
    gc.unfreeze()
    gc.set_threshold(*threshold)
    set_log_level("INFO")


def config(**options: Any) -> Any:
    cli = {"http_bind": "127.0.0.1:0", "mo_message_url": MO_URL, **options}
    if "channels" not in cli:
        cli.setdefault("connector_name", "conn")
    return load_config(None, environ={}, cli={k: str(v) for k, v in cli.items()})


def service_for(reactor: Any = None, **options: Any) -> JunebugService:
    return JunebugService(config(**options), reactor or MemoryReactorClock())


def with_channels(**options: Any) -> JunebugService:
    """A service whose config file's channels are started (its connections not)."""
    service = service_for(**options)
    service.start_channels()
    return service


def workers(service: JunebugService) -> list[Any]:
    return [w for c in service.registry.channels() for w in c.workers]


# -- what the tree holds ----------------------------------------------------------


def test_one_connector_the_tree_holds_amqp_then_http() -> None:
    service = service_for()
    amqp, http = list(service)
    assert isinstance(amqp, AmqpService) and amqp is service.amqp
    assert isinstance(http, ListeningService) and http is service.http
    assert service.registry.channels() == []  # started with the service
    service.start_channels()
    assert amqp.queues == QueueNames.for_connector("conn").declarations()
    # Its workers consume .inbound and .event; .outbound is the transport's.
    [channel] = service.registry.channels()
    assert sorted(channel.consumers) == ["conn.event", "conn.inbound"]
    assert sorted(channel.consumers.values(), key=id) == sorted(workers(service), key=id)
    assert sorted(w.queue for w in workers(service)) == ["conn.event", "conn.inbound"]
    assert [c.id for c in service.registry.channels()] == ["conn"]
    assert list(service.registry.queue_status()) == list(channel.queues.by_role().values())
    assert isinstance(service.cache, InMemoryStateCache)
    assert isinstance(service.metrics, PrometheusMetrics)
    assert service.sentry is None


def test_each_channel_has_its_queues_workers_and_monitor() -> None:
    service = with_channels(
        channels=json.dumps({"a": {}, "b": {"connector_name": "b-conn"}}),
        metrics_enabled="false",
    )
    assert service.amqp.queues == {
        **QueueNames.for_connector("a").declarations(),
        **QueueNames.for_connector("b-conn").declarations(),
    }
    consumed = ["a.event", "a.inbound", "b-conn.event", "b-conn.inbound"]
    assert sorted(q for c in service.registry.channels() for q in c.consumers) == consumed
    assert sorted(w.queue for w in workers(service)) == consumed
    assert len(workers(service)) == 4
    monitored = {q.split(".")[0] for q in service.registry.queue_status()}
    assert monitored == {"a", "b-conn"}
    assert service.metrics is NO_METRICS
    # Each channel refuses replies to the other's inbound messages.
    a, b = service.registry.channels()
    assert "b-conn" in a.sender.other_connectors and "a" not in a.sender.other_connectors
    assert "a" in b.sender.other_connectors and "b-conn" not in b.sender.other_connectors


def test_the_state_cache_is_the_configured_class() -> None:
    service = service_for(
        state_cache_class="junebug_api.redis_state_cache.RedisStateCache",
        state_cache_config=json.dumps({"url": "redis://127.0.0.1:1/0", "key_prefix": "t-fakes"}),
    )
    assert isinstance(service.cache, RedisStateCache)


def test_health_is_down_until_amqp_connects_and_shows_every_channel() -> None:
    service = with_channels(channels=json.dumps({"a": {}, "b": {}}))
    health = service.health()
    assert health["health"] == "down"
    assert health["components"]["amqp"]["health"] != "ok"
    assert health["components"]["amqp"]["stuck"] is False
    assert "deliveries" in health["components"]
    assert sorted(health["channels"]) == ["a", "b"]


# -- start ------------------------------------------------------------------------


def test_start_listens_connects_and_warns_of_an_open_api() -> None:
    reactor = MemoryReactorClock()
    service = service_for(reactor, middlewares=json.dumps([{"x": "y"}]))
    with captured_logs() as logged:
        service.privilegedStartService()
        service.startService()
    assert [port for port, *_ in reactor.tcpServers] == [0]
    assert len(reactor.tcpClients) == 2  # the AMQP connections: publish and consume
    warnings = [e["log_format"] for e in logged if e.get("log_namespace") == "junebug_api.service"]
    assert any("The messages API is open for channel(s) {channels}" in w for w in warnings)
    assert any("middlewares are not supported" in w for w in warnings)
    reactor.advance(0)
    stopped = service.stopService()
    reactor.advance(1)
    assert stopped.called


class PortTaken(MemoryReactorClock):
    def listenTCP(self, port: int, factory: Any, backlog: int = 50, interface: str = "") -> Any:
        raise CannotListenError(interface, port, OSError(98, "Address already in use"))


def test_a_port_taken_is_one_line_and_exit_status_1(capfd: Any) -> None:
    service = service_for(PortTaken())
    with captured_logs() as logged, pytest.raises(SystemExit) as info:
        service.privilegedStartService()
    assert info.value.code == 1
    line = "junebug-api: cannot listen on 127.0.0.1:0: Address already in use"
    # On the terminal (and here, Twisted's stderr fallback for critical events
    # before logging has begun also prints the log line).
    assert set(capfd.readouterr().err.splitlines()) == {line}
    assert [e["line"] for e in logged if "line" in e] == [line.removeprefix("junebug-api: ")]


# -- shutdown order ---------------------------------------------------------------


def inbound_body(message_id: str) -> bytes:
    return json.dumps(
        {
            "message_type": "user_message",
            "message_id": message_id,
            "transport_name": "conn",
            "to_addr": "8110",
            "from_addr": "+27820000001",
            "content": "hi",
        }
    ).encode()


def test_shutdown_stops_listening_then_lets_work_finish_then_closes_amqp() -> None:
    """SIGTERM: the port closes first; messages in work get shutdown_timeout
    to finish while AMQP stays open (their acks need it); only then does the
    AMQP service stop, and what did not finish goes back to its queue."""
    reactor = MemoryReactorClock()
    service = service_for(reactor, shutdown_timeout=5, mo_message_url_timeout=30)
    service.privilegedStartService()
    service.startService()
    worker = next(w for w in workers(service) if w.queue == "conn.inbound")
    acker = RecordingAcker()
    worker(inbound_body("in-1"), acker)  # its POST to RapidPro never gets an answer
    assert worker.in_flight == 1

    with captured_logs() as logged:
        stopped = service.stopService()
        assert not service.http.running  # stopped listening at once
        assert service.amqp.running
        reactor.advance(0.5)  # the HTTP drain's grace period
        reactor.advance(4.9)
        assert worker.in_flight == 1  # still given its time...
        assert service.amqp.running  # ...with AMQP open
        assert not stopped.called
        reactor.advance(0.1)  # shutdown_timeout after the workers' drain began
        assert worker.in_flight == 0
        assert not service.amqp.running
        reactor.advance(0)
    assert result_of(stopped) is None
    assert (acker.acks, acker.rejects) == (0, 1)  # back to its queue
    lines = [e["log_format"] for e in logged if e.get("log_namespace") == "junebug_api.service"]
    assert lines[-2].startswith("{count} message(s) still in work after {timeout} s")
    assert lines[-1] == "junebug-api stopped"
    assert not service.running


def test_the_json_log_observer_is_given_to_twistds_application() -> None:
    """twistd looks the log observer up on the application it loads."""
    events: list[dict[str, Any]] = []
    observer = events.append
    service = JunebugService(config(), MemoryReactorClock(), log_observer=observer)
    application = Application("junebug-api")
    service.setServiceParent(application)
    assert application.getComponent(ILogObserver) is observer


# -- SIGHUP -----------------------------------------------------------------------


class ReactorWithThreads(MemoryReactorClock):
    """callFromThread runs at once (the signal handler's way into the reactor)."""

    def callFromThread(self, f: Any, *args: Any) -> None:
        f(*args)


class Source:
    def __init__(self, config: Any) -> None:
        self.config = config
        self.next = config

    def load(self) -> Any:
        return self.next


def test_sighup_reloads_channels_and_the_top_level_credentials() -> None:
    """The handler is installed while the service runs and put back on stop."""
    import signal

    reactor = ReactorWithThreads()
    source = Source(config(channels=json.dumps({"a": {}}), api_auth_token="top-token-1"))
    service = JunebugService(source.config, reactor, config_source=source)
    before = signal.getsignal(signal.SIGHUP)
    service.privilegedStartService()
    service.startService()
    try:
        handler = signal.getsignal(signal.SIGHUP)
        assert callable(handler) and handler != before
        source.next = config(channels=json.dumps({"b": {}}), api_auth_token="top-token-2")
        handler(signal.SIGHUP, None)  # as the signal would
        reactor.advance(0)
        assert [c.id for c in service.registry.channels()] == ["b"]
        assert "top-token-2" in service.redactor.secrets  # b's own token (inherited)
        http = StubTreq(service.site.resource)
        d = http.get("http://j.example/channels/", headers={"Authorization": "Token top-token-2"})
        http.flush()
        assert result_of(d).code == 200
    finally:
        stopped = service.stopService()
        reactor.advance(1)
        assert stopped.called
    assert signal.getsignal(signal.SIGHUP) == before


def test_a_sighup_while_messages_in_work_finish_on_stop_is_ignored() -> None:
    """logrotate's ``kill -HUP`` during a graceful stop: the process keeps its
    handler (SIGHUP's default action would end it at once, messages already
    delivered then unacked and delivered again) until the stop is over, and
    the signal changes no channel."""
    import signal

    reactor = ReactorWithThreads()
    source = Source(
        config(channels=json.dumps({"a": {}}), shutdown_timeout=5, mo_message_url_timeout=30)
    )
    service = JunebugService(source.config, reactor, config_source=source)
    before = signal.getsignal(signal.SIGHUP)
    service.privilegedStartService()
    service.startService()
    worker = next(w for w in workers(service) if w.queue == "a.inbound")
    worker(inbound_body("in-1"), RecordingAcker())  # its POST never gets an answer
    with captured_logs() as logged:
        stopped = service.stopService()
        reactor.advance(0.5)  # the HTTP drain is over; messages in work finish now
        assert not stopped.called
        handler = signal.getsignal(signal.SIGHUP)
        assert callable(handler) and handler not in (before, signal.SIG_DFL)
        source.next = config(channels=json.dumps({"b": {}}))
        handler(signal.SIGHUP, None)
        reactor.advance(0)
        reactor.advance(5)
    assert result_of(stopped) is None
    assert signal.getsignal(signal.SIGHUP) == before
    lines = [e["log_format"] for e in logged]
    assert "SIGHUP ignored: the service is stopping" in lines
    assert not [line for line in lines if "could not be" in line or "config reloaded" in line]


def test_a_sighup_redacts_the_new_top_level_secrets_at_once() -> None:
    """The top-level ``api_auth_token`` a reload brings (``GET /channels/``'s)
    is redacted from then on, though every channel has a token of its own;
    the old one stays redacted too (a log line may still quote it)."""
    import signal

    reactor = ReactorWithThreads()
    channels = json.dumps({"a": {"api_auth_token": "a-own-token"}})
    source = Source(config(channels=channels, api_auth_token="top-token-1"))
    service = JunebugService(source.config, reactor, config_source=source)
    service.privilegedStartService()
    service.startService()
    try:
        source.next = config(channels=channels, api_auth_token="top-token-2")
        signal.getsignal(signal.SIGHUP)(signal.SIGHUP, None)
        reactor.advance(0)
        assert service.redactor.text("top-token-2 top-token-1") == "*** ***"
    finally:
        stopped = service.stopService()
        reactor.advance(1)
        assert stopped.called
