"""Property-based, on the real process: a config with generated values either
starts a service that answers (``/health`` ok, a POST answered without a 5xx
other than 503) or exits 1 with one ``config error`` line; never a traceback."""

from __future__ import annotations

import json
import os
import subprocess
import time
import urllib.error
import urllib.request
import uuid

import pika
import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from .support import AMQP_PARAMS, TWISTD, ServiceProcess, free_port

QUEUE_SUFFIXES = ("outbound", "inbound", "event", "inbound.failed", "event.failed")

numbers = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True),
    st.floats(min_value=0.001, max_value=100),
    st.integers(min_value=-2, max_value=70_000),
)
generated = st.fixed_dictionaries(
    {},
    optional={
        "request_timeout": numbers,
        "mo_message_url_timeout": numbers,
        "http_read_timeout": numbers,
        "http_idle_timeout": numbers,
        "shutdown_timeout": numbers,
        "worker_concurrency": numbers,
        "amqp_heartbeat": numbers,
        "max_request_size": numbers,
        "http_max_connections": numbers,
        "delivery_max_attempts": numbers,
        "state_cache_config": st.fixed_dictionaries({"timeout": numbers}),
        "base_url_path": st.sampled_from(["/c/x", "/c/é", "c", "/a b", "/"]),
        "transport_type": st.text(max_size=10),
        "log_level": st.sampled_from(["DEBUG", "info", "LOUD"]),
        "api_auth_token": st.text(max_size=12),
        "default_event_url": st.sampled_from(
            ["http://127.0.0.1:9/e", "http://127.0.0.1:9/e#x", "ftp://h", "http://h:99999/"]
        ),
    },
)
connector_suffixes = st.one_of(
    st.just(""),
    st.text(max_size=8),
    st.integers(min_value=200, max_value=260).map(lambda n: "n" * n),
)


def healthy_or_exited(service: ServiceProcess, timeout: float = 30) -> bool:
    """True once ``/health`` answers 200, False once the process has exited."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if service.process.poll() is not None:
            return False
        try:
            with urllib.request.urlopen(f"{service.url}/health", timeout=1) as r:
                if r.status == 200:
                    return True
        except OSError:
            pass
        time.sleep(0.05)
    raise AssertionError(f"neither healthy nor exited after {timeout} s:\n{service.log()}")


def post(url: str, headers: dict) -> int:
    body = json.dumps({"to": "+1", "from": "2", "content": "x"}).encode()
    request = urllib.request.Request(url, data=body, method="POST", headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=10) as r:
            return r.status
    except urllib.error.HTTPError as e:
        json.loads(e.read())  # still the Junebug envelope
        return e.code


@pytest.mark.slow  # eight real starts: 20-30 s on a busy 2-core machine
@settings(
    max_examples=8,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(options=generated, suffix=connector_suffixes)
def test_generated_configs_start_or_exit_with_one_line(tmp_path, options, suffix):
    connector = f"jbtest-{uuid.uuid4().hex[:8]}{suffix}"
    config = {
        "connector_name": connector,
        "http_bind": f"127.0.0.1:{free_port()}",
        "mo_message_url": "http://127.0.0.1:9/inbound",
        "amqp_heartbeat": 10,
        **options,
    }
    service = ServiceProcess(tmp_path, config).start()
    try:
        if not healthy_or_exited(service):
            output = service.process.stdout.read().decode()
            lines = output.strip().splitlines()
            assert service.process.returncode == 1, output
            assert len(lines) == 1 and lines[0].startswith("junebug-api: config error: "), output
            return
        path = options.get("base_url_path", "").rstrip("/") + "/messages"
        token = options.get("api_auth_token")
        headers = {"Authorization": f"Token {token}".encode()} if token else {}
        status = post(service.url + path, headers)
        assert status in (201, 400, 401, 503), status
    finally:
        service.stop()  # also fails on a traceback in the log
        try:
            connection = pika.BlockingConnection(AMQP_PARAMS)
            channel = connection.channel()
            for queue in QUEUE_SUFFIXES:
                channel.queue_delete(f"{connector}.{queue}")
            connection.close()
        except (pika.exceptions.AMQPError, ValueError):
            pass  # the service refused the name, so never declared it


def _fifo(tmp_path):
    fifo = tmp_path / "token.fifo"
    os.mkfifo(fifo)
    return {"api_auth_token_file": str(fifo)}


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        (
            {"amqp_url": "amqp://guest:s3cr3t@127.0.0.1:0/"},
            "amqp_url has an invalid port (it must be a number from 1 to 65535)",
        ),
        (
            {"amqp_url": "amqp://guest:s3cr3t%zz@127.0.0.1/"},
            "amqp_url has an invalid percent-escape (a '%' not followed by two hex digits)",
        ),
        (
            {"mo_message_url": "http://127.0.0.1:0/in"},
            "mo_message_url has an invalid port (it must be a number from 1 to 65535)",
        ),
        (
            {"state_cache_config": {"url": "redis://:s3cr3t@127.0.0.1:0/0"}},
            "state_cache_config.url has an invalid port (it must be a number from 1 to 65535)",
        ),
        (_fifo, "api_auth_token_file: '{fifo}' is not a regular file"),
        (
            {"metrics_path": "/channels/x/metrics"},
            "metrics_path must start with '/' and lie outside the API's routes (/health,"
            " /channels/..., /messages...), got '/channels/x/metrics'",
        ),
        (
            {"channel_api": True, "admin_auth_token": "t0k3n"},
            "channel_api needs RedisStateCache (state_cache_class) or channel_api_file"
            " to keep its channels in",
        ),
    ],
    ids=["amqp-port-0", "bad-escape", "mo-port-0", "redis-port-0", "fifo", "metrics", "store"],
)
def test_the_config_mistakes_of_issue_20_exit_at_once_with_one_line(tmp_path, overrides, expected):
    """What the service could not honour is refused before anything starts:
    exit status 1 within seconds (a FIFO no longer blocks the start), one line
    naming the option, never the secret."""
    if callable(overrides):
        overrides = overrides(tmp_path)
        expected = expected.format(fifo=overrides["api_auth_token_file"])
    config = {
        "connector_name": f"jbtest-{uuid.uuid4().hex[:8]}",
        "mo_message_url": "http://127.0.0.1:9/inbound",
        "http_bind": f"127.0.0.1:{free_port()}",
        **overrides,
    }
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config), encoding="utf-8")
    started = time.monotonic()
    result = subprocess.run(
        [TWISTD, "-n", "--pidfile=", "junebug-api", "--config", str(path)],
        capture_output=True,
        text=True,
        timeout=30,
        stdin=subprocess.DEVNULL,
    )
    assert time.monotonic() - started < 15
    assert result.returncode == 1, result
    assert result.stderr == f"junebug-api: config error: {expected}\n", result.stderr
    assert "s3cr3t" not in result.stdout + result.stderr
