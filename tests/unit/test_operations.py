"""Queue monitor, redaction, JSON log lines, Sentry scrubbing and the new options."""

from __future__ import annotations

import json

import pytest
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.logger import LogLevel
from twisted.python.failure import Failure

from junebug_api.config.model import ConfigError, load_config
from junebug_api.observe.error_reporting import scrub
from junebug_api.observe.log import Redactor, json_log_line
from junebug_api.observe.metrics import NO_METRICS, PrometheusMetrics
from junebug_api.observe.queue_health import QueueMonitor

REQUIRED = {
    "connector_name": "c",
    "mo_message_url": "http://rp.example/in",
    "http_bind": "127.0.0.1:8080",
}


class Broker:
    """Scripted answers to the monitor's passive declares."""

    def __init__(self) -> None:
        self.ready: dict[str, int] = {}
        self.down = False

    async def query(self, queue: str) -> tuple[int, int]:
        if self.down:
            raise RuntimeError("not connected to AMQP")
        return self.ready.get(queue, 0), 1


def monitor(broker: Broker, clock: Clock, taken: dict[str, float]) -> QueueMonitor:
    return QueueMonitor(
        {"inbound": "c.inbound", "outbound": "c.outbound", "inbound_failed": "c.inbound.failed"},
        broker.query,
        taken.get,
        clock,
        stuck_after=10,
        interval=1,
    )


def test_queue_with_messages_and_no_progress_is_stuck_after_stuck_after() -> None:
    clock, broker, taken = Clock(), Broker(), {}
    m = monitor(broker, clock, taken)
    broker.ready = {"c.inbound": 5, "c.inbound.failed": 7}
    m.start()
    clock.pump([1] * 9)
    assert not m.any_stuck
    assert m.status()["c.inbound"] == {"messages_ready": 5, "consumers": 1, "stuck": False}
    clock.pump([1] * 2)
    assert m.status()["c.inbound"]["stuck"] is True
    assert m.any_stuck
    # Dead-letter queues are reported, never stuck.
    assert m.status()["c.inbound.failed"] == {"messages_ready": 7, "consumers": 1, "stuck": False}
    # A message taken off the queue by this process un-sticks it.
    taken["c.inbound"] = clock.seconds()
    clock.advance(1)
    assert not m.any_stuck
    m.stop()


def test_a_falling_count_is_progress_and_an_empty_queue_never_stuck() -> None:
    clock, broker = Clock(), Broker()
    m = monitor(broker, clock, {})
    m.start()
    for ready in range(30, 0, -1):  # a transport draining outbound, slowly
        broker.ready["c.outbound"] = ready
        clock.advance(1)
    assert not m.any_stuck
    broker.ready["c.outbound"] = 0
    clock.pump([1] * 30)
    assert not m.any_stuck
    m.stop()


def test_messages_in_work_here_count_as_waiting() -> None:
    """RapidPro down: every message sits in the prefetch window, none ready."""
    clock, broker = Clock(), Broker()
    in_work = {"c.inbound": 4}
    m = QueueMonitor(
        {"inbound": "c.inbound", "outbound": "c.outbound"},
        broker.query,
        lambda q: None,
        clock,
        in_work=in_work.get,
        stuck_after=10,
        interval=1,
    )
    m.start()
    clock.pump([1] * 11)
    assert m.status() == {
        "c.inbound": {"messages_ready": 0, "messages_in_work": 4, "consumers": 1, "stuck": True},
        "c.outbound": {"messages_ready": 0, "consumers": 1, "stuck": False},
    }
    in_work["c.inbound"] = 0
    clock.advance(1)
    assert not m.any_stuck
    m.stop()


def test_messages_in_work_is_what_is_held_now_not_at_the_last_look() -> None:
    """No broker needed: /health shows what this process holds even before
    (or without) a look at the queues."""
    clock, broker = Clock(), Broker()
    broker.down = True
    in_work = {"c.inbound": 3}
    m = QueueMonitor(
        {"inbound": "c.inbound"}, broker.query, lambda q: None, clock, in_work=in_work.get
    )
    assert m.status()["c.inbound"]["messages_in_work"] == 3
    in_work["c.inbound"] = 0
    assert m.status()["c.inbound"]["messages_in_work"] == 0


def test_broker_unreachable_means_unknown_depths() -> None:
    clock, broker = Clock(), Broker()
    broker.down = True
    m = monitor(broker, clock, {})
    m.start()
    clock.advance(1)
    assert m.status()["c.inbound"] == {"messages_ready": None, "consumers": None, "stuck": False}
    m.stop()


def test_monitor_never_runs_two_looks_at_once() -> None:
    clock = Clock()
    waiting: list[Deferred] = []
    calls = []

    async def slow(queue: str) -> tuple[int, int]:
        calls.append(queue)
        d: Deferred = Deferred()
        waiting.append(d)
        return await d

    m = QueueMonitor({"inbound": "c.inbound"}, slow, lambda q: None, clock, interval=1)
    m.start()
    clock.pump([1] * 5)
    assert calls == ["c.inbound"]
    waiting[0].callback((1, 1))
    clock.advance(1)
    assert calls == ["c.inbound", "c.inbound"]
    m.stop()


def test_redactor_takes_out_url_credentials_and_config_secrets() -> None:
    cfg = load_config(
        None,
        environ={},
        cli={
            **REQUIRED,
            "mo_message_url": "https://user:url-secret-1@rp.example/in",
            "mo_message_url_auth_token": "tokensecret2",
            "api_auth_token": "apisecret3",
        },
    )
    r = Redactor.for_config(cfg)
    text = r.text(
        "POST to https://user:url-secret-1@rp.example/in failed; token tokensecret2,"
        " ftp://a:b@x/, apisecret3"
    )
    for secret in ("url-secret-1", "tokensecret2", "apisecret3", "a:b@"):
        assert secret not in text
    assert "https://***@rp.example/in" in text
    assert r.value({"k": ["x apisecret3", 1, None]}) == {"k": ["x ***", 1, None]}


def test_json_log_line_has_fields_and_error_text() -> None:
    r = Redactor(("sekrit-value",))
    event = {
        "log_format": "Attempt {attempt} for {message_id} failed: {reason}",
        "log_level": LogLevel.warn,
        "log_namespace": "junebug_api.delivery.consumer",
        "log_time": 0.0,
        "attempt": 2,
        "message_id": "abc",
        "reason": "POST to http://u:sekrit-value@h/ failed",
        "obj": object(),
    }
    record = json.loads(json_log_line(event, r))
    assert record["time"] == "1970-01-01T00:00:00.000+00:00"
    assert record["level"] == "warn"
    assert record["logger"] == "junebug_api.delivery.consumer"
    assert record["message_id"] == "abc"
    assert record["attempt"] == 2
    assert "sekrit" not in json.dumps(record)
    assert record["message"].startswith("Attempt 2 for abc failed: POST to http://***@h/")
    assert record["error"] == record["reason"] == "POST to http://***@h/ failed"
    assert record["obj"].startswith("<object")
    try:
        raise ValueError("broken")
    except ValueError:
        failure = Failure()
    line = json_log_line(
        {"log_format": "oops", "log_level": LogLevel.critical, "log_failure": failure}, r
    )
    record = json.loads(line)
    assert record["error"] == "ValueError: broken"
    assert "Traceback" in record["traceback"]
    assert line.endswith("\n") and line.count("\n") == 1


def test_sentry_scrub_filters_secret_keys_and_text() -> None:
    r = Redactor(("tok-123456",))
    event = {
        "extra": {"log_message": "sent with tok-123456 to https://a:b@h/"},
        "request": {"headers": {"Authorization": "Basic eHg6eXk=", "Accept": "*/*"}},
        "contexts": {"x": {"api_key": "k", "password": "p", "count": 3}},
        "breadcrumbs": [("token", "t")],
    }
    clean = scrub(event, r)
    text = json.dumps(clean)
    assert "tok-123456" not in text and "a:b@" not in text and "eHg6" not in text
    assert clean["request"]["headers"]["Accept"] == "*/*"
    assert clean["contexts"]["x"] == {"api_key": "[Filtered]", "password": "[Filtered]", "count": 3}


def test_metrics_off_does_nothing_and_on_counts() -> None:
    assert not NO_METRICS.enabled
    NO_METRICS.publish_done(NO_METRICS.now(), confirmed=True)
    assert NO_METRICS.render() == (b"", "text/plain; version=0.0.4; charset=utf-8")
    clock = Clock()
    metrics = PrometheusMetrics("c", clock)
    started = metrics.now()
    clock.advance(0.003)
    metrics.publish_done(started, confirmed=True)
    metrics.publish_done(started, confirmed=False)
    metrics.outbound_request(201)
    text = metrics.render()[0].decode()
    assert 'junebug_outbound_requests_total{code="201"} 1.0' in text
    assert "junebug_publish_confirm_seconds_count 1.0" in text
    assert 'junebug_publish_confirm_seconds_bucket{le="0.005"} 1.0' in text
    assert 'junebug_publish_confirm_seconds_bucket{le="0.0025"} 0.0' in text
    assert 'junebug_publish_confirm_seconds_bucket{le="+Inf"} 1.0' in text
    assert "junebug_publish_failures_total 1.0" in text


def test_reconnects_count_opens_after_the_first_per_connection() -> None:
    metrics = PrometheusMetrics("c", Clock())
    metrics.amqp_connected("publish")
    metrics.amqp_connected("consume")
    text = metrics.render()[0].decode()
    assert 'junebug_amqp_reconnects_total{connection="publish"} 0.0' in text
    assert 'junebug_amqp_reconnects_total{connection="consume"} 0.0' in text
    metrics.amqp_connected("publish")
    metrics.amqp_connected("publish")
    text = metrics.render()[0].decode()
    assert 'junebug_amqp_reconnects_total{connection="publish"} 2.0' in text
    assert 'junebug_amqp_reconnects_total{connection="consume"} 0.0' in text
    assert 'junebug_amqp_connections_opened_total{connection="publish"} 3.0' in text


@pytest.mark.parametrize(
    ("options", "error"),
    [
        ({"log_format": "xml"}, "log_format must be text or json, got 'xml'"),
        ({"health_stuck_after": "0"}, "health_stuck_after must be from 0.01 to 86400"),
        ({"metrics_path": "/health"}, "metrics_path must start with '/'"),
        ({"metrics_path": "metrics"}, "metrics_path must start with '/'"),
        ({"metrics_path": "/messages"}, "metrics_path must start with '/'"),
        ({"metrics_auth": "true"}, "metrics_auth needs api_auth_username"),
        ({"sentry_dsn": "https://sentry.example/1"}, "sentry_dsn must look like"),
        ({"sentry_dsn": "not a dsn"}, "sentry_dsn must look like"),
    ],
)
def test_bad_operations_options(options: dict, error: str) -> None:
    with pytest.raises(ConfigError, match="^" + error.replace("(", r"\(")) as e:
        load_config(None, environ={}, cli={**REQUIRED, **options})
    assert "sentry.example" not in str(e.value)


def test_operations_defaults() -> None:
    cfg = load_config(None, environ={}, cli=REQUIRED)
    assert cfg.metrics_enabled is True
    assert cfg.metrics_path == "/metrics"
    assert cfg.metrics_auth is False
    assert cfg.log_format == "text"
    assert cfg.health_stuck_after == 300
    assert cfg.sentry is None
    assert cfg.sentry_environment is None


def test_peek_message_id_for_log_lines() -> None:
    from junebug_api.delivery.watchdog import peek_message_id

    assert peek_message_id(b'{"message_id": "m1"}') == "m1"
    event = b'{"message_type": "event", "user_message_id": "u1", "message_id": "e1"}'
    assert peek_message_id(event) == "u1"
    assert peek_message_id(b"\xff not json") is None
    assert peek_message_id(b"[1]") is None
    assert peek_message_id(b'{"message_id": 5}') is None
