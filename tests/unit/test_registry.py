"""The channel registry: start, change, restart, stop and apply, each
registering and unregistering a channel's queues, consumers, monitor,
metrics, log routing, redaction and routes; real channels over a Clock, a
RapidPro in memory and a recording AMQP service."""

from __future__ import annotations

import json
from typing import Any

import pytest
from treq.testing import StubTreq
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock

from junebug_api.channels.builder import ChannelBuilder
from junebug_api.channels.registry import ChannelRegistry
from junebug_api.config.channels import ChannelSettings, channel_settings
from junebug_api.config.checks import ConfigError
from junebug_api.config.model import load_config
from junebug_api.delivery.outages import OutageTracker, destination_of
from junebug_api.formats.queue_names import QueueNames
from junebug_api.http.api import ApiCredentials, JunebugApi
from junebug_api.observe.log import Redactor
from junebug_api.observe.metrics import PrometheusMetrics
from junebug_api.state.memory_cache import InMemoryStateCache
from junebug_api.testing import FakeRapidPro, RecordingAcker, RecordingAmqp, captured_logs

from .helpers import result_of

MO = "http://rp.example/a/receive"
MO_NEW = "http://rp.example/a/new-receive"


def inbound(connector: str, message_id: str = "in-1") -> bytes:
    return json.dumps(
        {
            "message_type": "user_message",
            "message_id": message_id,
            "transport_name": connector,
            "to_addr": "8110",
            "from_addr": "+27820000001",
            "content": "hi",
        }
    ).encode()


class Harness:
    def __init__(self, shutdown_timeout: float = 5, amqp: RecordingAmqp | None = None) -> None:
        self.clock = Clock()
        self.clock.advance(1_000_000)
        cli = {
            "http_bind": "127.0.0.1:0",
            "mo_message_url": MO,
            "channels": json.dumps({"a": {}}),
            "shutdown_timeout": str(shutdown_timeout),
        }
        self.config = load_config(None, environ={}, cli=cli)
        self.rapidpro = FakeRapidPro()
        self.amqp = amqp or RecordingAmqp()
        self.metrics = PrometheusMetrics("t", self.clock)
        self.redactor = Redactor()
        self.outages = outages = OutageTracker(self.clock)
        builder = ChannelBuilder(
            self.config,
            InMemoryStateCache(self.clock),
            self.rapidpro.delivery(self.clock, self.metrics, outages),
            self.amqp,
            outages,
            self.clock,
            self.metrics,
        )
        self.registry = ChannelRegistry(
            builder,
            self.amqp,
            self.clock,
            shutdown_timeout=self.config.shutdown_timeout,
            stuck_after=60,
            metrics=self.metrics,
            redactor=self.redactor,
        )
        self.metrics.watch_channels(self.registry.channels)
        api = JunebugApi(
            self.registry,
            lambda: {"health": "ok", "components": {}},
            30,
            self.clock,
            credentials=ApiCredentials(token="list-token"),
        )
        self.http = StubTreq(api.resource())

    def settings(self, channel_id: str, **entry: Any) -> ChannelSettings:
        return channel_settings(channel_id, entry, self.config)

    def run(self, coroutine: Any) -> Any:
        d = Deferred.fromCoroutine(coroutine)
        self.clock.advance(0)
        return result_of(d)

    def start(self, channel_id: str, origin: str = "api", **entry: Any) -> Any:
        return self.run(self.registry.start(self.settings(channel_id, **entry), origin))

    def deliver(self, queue: str, body: bytes) -> RecordingAcker:
        consumer, _ = self.amqp.consumers[queue]
        acker = RecordingAcker()
        consumer(body, acker)
        self.rapidpro.flush()
        self.clock.advance(0)
        return acker

    def post(self, path: str, token: str | None = None) -> int:
        headers = {"Authorization": f"Token {token}"} if token else {}
        body = json.dumps({"to": "+27820000002", "from": "8110", "content": "hi"}).encode()
        d = self.http.request("POST", "http://junebug.example" + path, data=body, headers=headers)
        self.http.flush()
        return result_of(d).code

    def get(self, path: str, token: str = "list-token") -> tuple[int, Any]:
        d = self.http.get(
            "http://junebug.example" + path, headers={"Authorization": f"Token {token}"}
        )
        self.http.flush()
        response = result_of(d)
        return response.code, json.loads(result_of(self.http.content(response)))

    def series(self, name: str) -> list[str]:
        text = self.metrics.render()[0].decode()
        return [line for line in text.splitlines() if line.startswith(name + "{")]


def test_start_declares_consumes_monitors_and_serves() -> None:
    h = Harness()
    channel = h.start("a", api_auth_token="a-token-secret")
    names = QueueNames.for_connector("a")
    assert h.amqp.queues == names.declarations()
    assert sorted(h.amqp.consumers) == ["a.event", "a.inbound"]
    assert h.amqp.consumers["a.inbound"][1] == channel.prefetch
    assert h.registry.get("a") is channel and h.registry.channels() == [channel]
    assert h.registry.origin("a") == "api" and h.registry.origin("b") is None
    assert set(h.registry.queue_status()) == set(names.by_role().values())
    assert "a-token-secret" in h.redactor.secrets
    assert h.post("/channels/a/messages", "a-token-secret") == 201
    assert h.get("/channels/")[1]["result"] == ["a"]
    assert any('channel="a"' in line for line in h.series("junebug_channel_messages_total"))
    # Delivered with its settings; its log events are filed under it.
    acker = h.deliver("a.inbound", inbound("a"))
    assert acker.acks == 1 and h.rapidpro.requests[-1].uri == b"/a/receive"
    with captured_logs():
        h.registry.log_router({"channel": "a", "log_format": "about a", "log_level": None})
    assert channel.logs(1)[0]["message"] == "about a"


def test_a_taken_id_connector_or_origin_is_one_line() -> None:
    h = Harness()
    h.start("a")
    with pytest.raises(ConfigError, match=r"^channels\.a: a channel with this id runs already$"):
        h.start("a")
    with pytest.raises(ConfigError, match=r"connector_name 'a' is already the connector"):
        h.start("b", connector_name="a")
    with pytest.raises(ValueError, match="origin"):
        h.start("c", origin="sighup")
    assert [c.id for c in h.registry.channels()] == ["a"]


def test_change_applies_from_the_next_message_while_work_in_hand_finishes() -> None:
    h = Harness()
    old = h.start("a", mo_url_auth_token="old-token-secret")
    h.rapidpro.hold = True
    in_work = h.deliver("a.inbound", inbound("a", "before"))
    old.rates.hit("outbound")
    new = h.run(h.registry.change(h.settings("a", mo_url=MO_NEW, mo_url_auth_token="new-t0ken")))
    assert new is not old and h.registry.get("a") is new
    assert new.rates.totals["outbound"] == 1  # counts carried over
    # Its consumers were replaced: cancelled, then added anew.
    assert h.amqp.cancelled == ["a.inbound", "a.event"]
    assert h.amqp.consumers["a.inbound"][0] is new.consumers["a.inbound"]
    assert h.amqp.queues == QueueNames.for_connector("a").declarations()
    # The message in work finishes as it began, to the old URL...
    assert h.rapidpro.requests[-1].uri == b"/a/receive"
    h.rapidpro.hold = False
    request = h.rapidpro.held.pop()
    request.setResponseCode(200)
    request.finish()
    h.rapidpro.flush()
    h.clock.advance(0)
    assert in_work.acks == 1
    # ...the next one goes to the new.
    after = h.deliver("a.inbound", inbound("a", "after"))
    assert after.acks == 1 and h.rapidpro.requests[-1].uri == b"/a/new-receive"
    auth = h.rapidpro.requests[-1].header("Authorization")
    assert auth == [b"Token new-t0ken"]
    assert "new-t0ken" in h.redactor.secrets and "old-token-secret" not in h.redactor.secrets


def test_change_of_connector_moves_the_consumers_and_keeps_the_old_queues() -> None:
    h = Harness()
    h.start("a")
    h.run(h.registry.change(h.settings("a", connector_name="a2")))
    assert sorted(h.amqp.consumers) == ["a2.event", "a2.inbound"]
    assert h.amqp.queues == QueueNames.for_connector("a2").declarations()
    with pytest.raises(KeyError):
        h.run(h.registry.change(h.settings("zz")))


def test_stop_answers_404_at_once_and_releases_work_after_the_timeout() -> None:
    h = Harness(shutdown_timeout=5)
    h.start("a", api_auth_token="a-token-secret")
    h.start("b")
    h.rapidpro.hold = True
    in_work = h.deliver("a.inbound", inbound("a"))
    stopped = Deferred.fromCoroutine(h.registry.stop("a"))
    assert h.registry.get("a") is None
    assert h.post("/channels/a/messages", "a-token-secret") == 404
    assert h.get("/channels/")[1]["result"] == ["b"]
    assert sorted(h.amqp.consumers) == ["b.event", "b.inbound"]
    assert h.amqp.queues == QueueNames.for_connector("b").declarations()
    assert not any('channel="a"' in line for line in h.series("junebug_channel_messages_total"))
    assert set(h.registry.queue_status()) == set(QueueNames.for_connector("b").by_role().values())
    assert h.registry.in_work() == 1  # still settling
    h.clock.advance(4.9)
    assert not stopped.called and in_work.rejects == 0
    with captured_logs() as logged:
        h.clock.advance(0.1)
    assert result_of(stopped) is None
    assert (in_work.acks, in_work.rejects) == (0, 1)  # back to its queue
    assert any("went back to their queue" in e["log_format"] for e in logged)
    assert "a-token-secret" not in h.redactor.secrets
    with pytest.raises(KeyError):
        h.run(h.registry.stop("a"))


def test_stop_lets_work_in_hand_finish() -> None:
    h = Harness()
    h.start("a")
    h.rapidpro.hold = True
    in_work = h.deliver("a.inbound", inbound("a"))
    stopped = Deferred.fromCoroutine(h.registry.stop("a"))
    request = h.rapidpro.held.pop()
    request.setResponseCode(200)
    request.finish()
    h.rapidpro.flush()
    h.clock.advance(0)
    assert result_of(stopped) is None
    assert (in_work.acks, in_work.rejects) == (1, 0)


def test_stop_forgets_the_channels_queue_series() -> None:
    h = Harness()
    h.start("a")
    h.clock.advance(0)
    assert any('channel="a"' in line for line in h.series("junebug_queue_messages_ready"))
    h.run(h.registry.stop("a"))
    assert h.series("junebug_queue_messages_ready") == []


def test_restart_serves_throughout_and_builds_the_channel_anew() -> None:
    h = Harness()
    old = h.start("a")
    h.run(h.registry.restart("a"))
    assert h.registry.get("a") is not old
    assert h.registry.origin("a") == "api"
    assert sorted(h.amqp.consumers) == ["a.event", "a.inbound"]


def test_other_connectors_follow_the_running_channels() -> None:
    h = Harness()
    a = h.start("a")
    assert "b-conn" not in a.sender.other_connectors
    h.start("b", connector_name="b-conn")
    assert "b-conn" in a.sender.other_connectors and "a" not in a.sender.other_connectors
    h.run(h.registry.stop("b"))
    assert "b-conn" not in a.sender.other_connectors


def test_apply_reconciles_one_origin_and_a_bad_channel_is_one_line() -> None:
    h = Harness()
    h.start("keep", origin="config")
    h.start("gone", origin="config")
    h.start("change", origin="config")
    h.start("mine", origin="api")
    wanted = [
        h.settings("keep"),
        h.settings("change", character_limit=10),
        h.settings("new"),
        h.settings("mine"),  # the API's: not the config file's to take
        h.settings("clash", connector_name="keep"),
    ]
    keep = h.registry.get("keep")
    with captured_logs() as logged:
        h.run(h.registry.apply(wanted, "config"))
    assert [c.id for c in h.registry.channels()] == ["keep", "change", "mine", "new"]
    assert h.registry.get("keep") is keep
    assert h.registry.get("change").settings.character_limit == 10
    assert h.registry.origin("mine") == "api" and h.registry.origin("new") == "config"
    errors = [e for e in logged if e.get("log_namespace") == "junebug_api.channels.registry"]
    lines = [e["log_format"] for e in errors if e["log_level"].name in ("error", "critical")]
    assert len(lines) == 2
    assert sum("is not started: the {other} has" in line for line in lines) == 1
    assert sum("could not be {what}" in line for line in lines) == 1


def test_stop_all_stops_every_channel_and_counts_what_went_back() -> None:
    h = Harness(shutdown_timeout=5)
    h.start("a")
    h.start("b")
    h.rapidpro.hold = True
    acker = h.deliver("a.inbound", inbound("a"))
    stopped = Deferred.fromCoroutine(h.registry.stop_all(1))
    h.clock.advance(1)
    assert result_of(stopped) == 1
    assert acker.rejects == 1
    assert h.registry.channels() == [] and h.amqp.consumers == {}
    with pytest.raises(ConfigError, match="stopping"):
        h.start("c")


def test_api_channels_with_a_path_of_their_own_404_once_stopped() -> None:
    """The top-level connector's <base_url_path>/messages is looked up per request too."""
    h = Harness()
    api = JunebugApi(
        h.registry,
        lambda: {"health": "ok", "components": {}},
        30,
        h.clock,
        own_paths={"top": "/v1/messages"},
    )
    http = StubTreq(api.resource())

    def post() -> int:
        d = http.request(
            "POST", "http://j.example/v1/messages", data=b'{"to": "1", "from": "2", "content": "x"}'
        )
        http.flush()
        return result_of(d).code

    assert post() == 404
    h.start("top", origin="config")
    assert post() == 201
    h.run(h.registry.stop("top"))
    assert post() == 404


def test_log_router_files_nothing_for_a_stopped_channel() -> None:
    h = Harness()
    a = h.start("a")
    h.run(h.registry.stop("a"))
    h.registry.log_router({"channel": "a", "log_format": "late", "log_level": None})
    h.registry.log_router({"queue": "a.inbound", "log_format": "late", "log_level": None})
    assert a.logs() == []


def test_other_connectors_is_true_while_another_channel_runs() -> None:
    from junebug_api.channels.registry import OtherConnectors

    connectors = {"conn-a": "a"}
    others = OtherConnectors(connectors, "a")
    assert not others  # a alone: its event lookups may read legacy event info
    connectors["conn-b"] = "b"
    assert others and "conn-b" in others and "conn-a" not in others
    del connectors["conn-b"]
    assert not others


def test_stop_all_waits_for_a_stop_under_way() -> None:
    h = Harness(shutdown_timeout=5)
    h.start("a")
    h.rapidpro.hold = True
    acker = h.deliver("a.inbound", inbound("a"))
    stopping = Deferred.fromCoroutine(h.registry.stop("a"))
    stopped = Deferred.fromCoroutine(h.registry.stop_all(5))
    assert not stopped.called
    h.clock.advance(5)
    assert result_of(stopping) is None and result_of(stopped) == 0
    assert acker.rejects == 1


def test_a_channel_whose_queues_are_refused_is_one_line_and_declares_nothing() -> None:
    h = Harness()
    h.amqp.refused.add("b.inbound")
    with pytest.raises(ConfigError, match=r"^channels\.b: the broker refused queue b\.inbound$"):
        h.start("b")
    assert h.registry.get("b") is None and h.amqp.queues == {} and h.amqp.consumers == {}


def test_options_stored_but_not_acted_on_are_named_as_a_channel_starts() -> None:
    h = Harness()
    with captured_logs() as logged:
        h.start("a", amqp_queue="copy-here")
        h.run(h.registry.change(h.settings("a", amqp_queue="copy-here", character_limit=5)))
    ignored = [e for e in logged if "is ignored" in e.get("log_format", "")]
    assert [(e["channel"], e["option"]) for e in ignored] == [("a", "amqp_queue")]


class SlowDeclaringAmqp(RecordingAmqp):
    """Declares a queue once told to (``declared``), as a connection still opening does."""

    def __init__(self) -> None:
        super().__init__()
        self.waiting: list[Deferred[None]] = []

    def add_queues(self, queues: Any) -> Deferred[None]:
        super().add_queues(queues)
        d: Deferred[None] = Deferred()
        self.waiting.append(d)
        return d

    def declared(self) -> None:
        while self.waiting:
            self.waiting.pop(0).callback(None)


@pytest.mark.parametrize("wanted", [[{"character_limit": 10}], []])
def test_a_sighup_while_the_config_files_channels_still_start_applies_to_them(
    wanted: list[dict[str, Any]],
) -> None:
    """A reload soon after the start, its queues still being declared: channel
    ``a`` (still starting) is changed or stopped as the new file says, not
    started twice ("runs already") nor left as it was."""
    amqp = SlowDeclaringAmqp()
    h = Harness(amqp=amqp)
    started = Deferred.fromCoroutine(h.registry.start(h.settings("a"), "config"))
    with captured_logs() as logged:
        applied = Deferred.fromCoroutine(
            h.registry.apply([h.settings("a", **entry) for entry in wanted], "config")
        )
        for _ in range(3):
            amqp.declared()
            h.clock.advance(0)
        h.clock.advance(5)
    result_of(started)
    assert result_of(applied) is None
    errors = [e for e in logged if e["log_level"].name in ("error", "critical")]
    assert errors == []
    if wanted:
        assert h.registry.get("a").settings.character_limit == 10
    else:
        assert h.registry.get("a") is None


def test_a_channel_changed_while_its_rapidpro_is_down_starts_paused() -> None:
    """A token rotated (or a restart) while RapidPro is down and the inbound
    queue paused: the new consumer is paused at once and probes, rather than
    taking a prefetch window of messages only to give each back."""
    h = Harness()
    old = h.start("a", mo_url_auth_token="old-token-secret")
    for _ in range(h.outages.threshold):
        h.outages.failed(destination_of(MO))
    h.clock.advance(0)
    assert old.inbound_gate.paused
    new = h.run(h.registry.change(h.settings("a", mo_url_auth_token="new-t0ken")))
    assert new.inbound_gate.paused
    assert h.amqp.calls == ["pause a.inbound", "pause a.inbound"]
    h.clock.advance(h.config.delivery_probe_interval)
    assert h.amqp.calls[-1] == "get a.inbound"  # the new gate probes
