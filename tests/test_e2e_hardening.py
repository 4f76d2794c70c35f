"""Hardening on the real process: slow clients, connection floods, odd configs,
secrets from files."""

from __future__ import annotations

import json
import os
import resource
import select
import selectors
import socket
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest
import yaml

from junebug_api.formats.queue_names import QueueNames

from .support import TWISTD, free_port

MESSAGES = "/channels/test-channel/messages"
MESSAGE = json.dumps({"to": "+1", "from": "2", "content": "x"}).encode()


def post_message(service, headers: dict | None = None, timeout: float = 5) -> int:
    request = urllib.request.Request(
        service.url + MESSAGES, data=MESSAGE, method="POST", headers=headers or {}
    )
    try:
        with urllib.request.urlopen(request, timeout=timeout) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code


# -- one deadline for a whole request ------------------------------------------


def full_request() -> bytes:
    return (
        f"POST {MESSAGES} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(MESSAGE)}\r\n\r\n"
    ).encode() + MESSAGE


@pytest.mark.parametrize("slow_part", ["request line", "headers", "body"])
def test_trickled_request_gets_408_within_read_timeout(make_service, slow_part):
    """One byte a second keeps no part of a request alive past http_read_timeout."""
    read_timeout = 2.0
    service = make_service(http_read_timeout=read_timeout)
    data = full_request()
    head_end = data.index(b"\r\n\r\n") + 4
    line_end = data.index(b"\r\n") + 2
    fast, slow = {
        "request line": (b"", data),
        "headers": (data[:line_end], data[line_end:]),
        "body": (data[: head_end + 1], data[head_end + 1 :]),
    }[slow_part]
    with socket.create_connection(("127.0.0.1", service.port), timeout=10) as s:
        if not fast:
            fast, slow = slow[:1], slow[1:]
        started = time.monotonic()
        s.sendall(fast)
        answer = b""
        # Trickle the rest one byte a second (never the last one) until an answer.
        while time.monotonic() - started < read_timeout + 5:
            readable, _, _ = select.select([s], [], [], 1.0)
            if readable:
                answer = s.recv(65536)
                break
            if len(slow) > 1:
                s.sendall(slow[:1])
                slow = slow[1:]
        elapsed = time.monotonic() - started
    assert answer.startswith(b"HTTP/1.1 408 "), answer
    assert json.loads(answer.split(b"\r\n\r\n", 1)[1])["code"] == "Request Timeout"
    assert read_timeout - 0.2 <= elapsed <= read_timeout + 1.5, elapsed


def test_keep_alive_request_after_idle_pause_is_served(make_service):
    """The deadline counts from a request's first byte, not from the last answer."""
    service = make_service(http_read_timeout=1, http_idle_timeout=10)
    with socket.create_connection(("127.0.0.1", service.port), timeout=10) as s:
        for _ in range(2):
            s.sendall(full_request())
            answer = s.recv(65536)
            assert answer.startswith(b"HTTP/1.1 201 "), answer
            time.sleep(1.5)  # longer than http_read_timeout, idle between requests


# -- connection floods -----------------------------------------------------------


def _raise_own_fd_limit(needed: int) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < needed:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, needed), hard))


def accept_queue(port: int) -> int | None:
    """Connections waiting to be accepted on the listening 127.0.0.1:port."""
    local = f"0100007F:{port:04X}"
    with open("/proc/net/tcp") as f:
        for line in f.readlines()[1:]:
            fields = line.split()
            if fields[1] == local and fields[3] == "0A":  # LISTEN
                return int(fields[4].split(":")[1], 16)
    return None


def await_accept_queue_empty(port: int, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while accept_queue(port) != 0:
        assert time.monotonic() < deadline, "the service did not accept the flood"
        time.sleep(0.05)


def test_flood_of_slow_connections_under_1024_descriptors(make_service):
    """2,000 slow connections to a service limited to 1,024 descriptors: a
    normal request is still answered within a second, and nothing runs out."""
    _raise_own_fd_limit(4096)
    service = make_service(command_prefix=["prlimit", "--nofile=1024:1024"], http_read_timeout=60)
    log = service.log()
    assert "Open-file limit 1024 (was 1024, hard limit 1024)" in log
    assert "at most 768 HTTP connections at once" in log
    slow: list[socket.socket] = []
    try:
        for _ in range(2000):
            s = socket.socket()
            s.setblocking(False)
            s.connect_ex(("127.0.0.1", service.port))
            slow.append(s)
        # Each sends part of a request line once connected, and stays.
        selector = selectors.DefaultSelector()
        for s in slow:
            selector.register(s, selectors.EVENT_WRITE)
        pending, deadline = len(slow), time.monotonic() + 30
        while pending and time.monotonic() < deadline:
            for key, _ in selector.select(1.0):
                try:
                    key.fileobj.send(b"POST /chan")
                except OSError:
                    pass  # already closed by the service to make room
                selector.unregister(key.fileobj)
                pending -= 1
        selector.close()
        # The kernel completes connections before the service accepts them:
        # wait until it has taken (and, past the limit, closed) them all.
        await_accept_queue_empty(service.port)
        for attempt in range(3):
            started = time.monotonic()
            assert post_message(service, timeout=5) == 201
            elapsed = time.monotonic() - started
            assert elapsed < 1.0, (attempt, elapsed)
        with urllib.request.urlopen(service.url + "/health", timeout=5) as r:
            assert r.status == 200
    finally:
        for s in slow:
            s.close()
    log = service.log()
    assert "http_max_connections (768) reached" in log
    assert "EMFILE" not in log and "Too many open files" not in log


def test_connection_limit_closes_oldest_idle_first(make_service):
    """Past http_max_connections the oldest connection not awaiting an answer
    is closed; a normal request still gets through."""
    service = make_service(http_max_connections=20)
    idle = [socket.create_connection(("127.0.0.1", service.port)) for _ in range(20)]
    try:
        assert post_message(service) == 201
        # The oldest was closed (aborted: a reset) to make room for the newcomer.
        idle[0].settimeout(5)
        with pytest.raises(ConnectionResetError):
            idle[0].recv(1)
        # The others are still open.
        idle[-1].setblocking(False)
        with pytest.raises(BlockingIOError):
            idle[-1].recv(1)
    finally:
        for s in idle:
            s.close()
    assert "http_max_connections (20) reached" in service.log()


# -- bad configs exit 1 with one line naming the option ----------------------------

BASE = {
    "connector_name": "jbtest-hardening",
    "mo_message_url": "http://127.0.0.1:9/inbound",
    "http_bind": "127.0.0.1:1",
}


def run_twistd(tmp_path: Path, config: dict) -> subprocess.CompletedProcess:
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config, allow_unicode=True), encoding="utf-8")
    return subprocess.run(
        [TWISTD, "-n", "--pidfile=", "junebug-api", "--config", str(path)],
        capture_output=True,
        text=True,
        timeout=30,
        stdin=subprocess.DEVNULL,
    )


def assert_config_error(result: subprocess.CompletedProcess, option: str) -> str:
    assert result.returncode == 1, result
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("junebug-api: config error: "), lines[0]
    assert option in lines[0], lines[0]
    assert "Traceback" not in result.stdout + result.stderr
    return lines[0]


NAN = float("nan")


@pytest.mark.parametrize(
    ("overrides", "option"),
    [
        ({"request_timeout": NAN}, "request_timeout"),
        ({"http_read_timeout": NAN}, "http_read_timeout"),
        ({"http_idle_timeout": NAN}, "http_idle_timeout"),
        ({"state_cache_config": {"timeout": NAN}}, "state_cache_config.timeout"),
        ({"mo_message_url_timeout": NAN}, "mo_message_url_timeout"),
        ({"event_url_timeout": float("inf")}, "event_url_timeout"),
        ({"worker_concurrency": 70000}, "worker_concurrency"),
        ({"amqp_heartbeat": 70000}, "amqp_heartbeat"),
        ({"connector_name": "é"}, "connector_name"),
        ({"connector_name": "x" * 250}, "connector_name"),
        ({"amqp": {"port": 70000}}, "amqp.port"),
        ({"http_bind": "127.0.0.1:70000"}, "http_bind"),
        ({"mo_message_url": "http://127.0.0.1:9/in#part"}, "mo_message_url"),
        ({"http_max_connections": 0}, "http_max_connections"),
        ({"api_auth_token_file": "/nonexistent/token"}, "api_auth_token_file"),
    ],
)
def test_bad_configs_of_the_issue_exit_with_one_line(tmp_path, overrides, option):
    assert_config_error(run_twistd(tmp_path, {**BASE, **overrides}), option)


def test_longest_connector_name_works(make_service, broker):
    """The longest connector_name the check allows declares all its queues."""
    name = "jbtest-" + "n" * 230  # 237 characters: ".inbound.retry.300" makes 255 bytes
    service = make_service(connector_name=name)
    try:
        assert post_message(service) == 201
        assert broker.count(f"{name}.inbound.failed") == 0
        assert broker.count(f"{name}.inbound.retry.300") == 0
    finally:
        service.stop()
        for queue in QueueNames.for_connector(name).all():
            broker.delete(queue)


# -- secrets from files ---------------------------------------------------------------


def test_secrets_from_files(make_service, tmp_path, sink, broker, connector):
    """api_auth_password_file, api_auth_token_file and amqp.password_file are read
    (trailing newline stripped) and work; the secrets stay out of the log."""
    files = {}
    for name, value in [("password", "pässword-1"), ("token", "tok-file-9"), ("amqp", "guest")]:
        files[name] = tmp_path / f"{name}.secret"
        files[name].write_text(value + "\n", encoding="utf-8")
    service = make_service(
        api_auth_username="rapidpro",
        api_auth_password_file=str(files["password"]),
        api_auth_token_file=str(files["token"]),
        amqp={"password_file": str(files["amqp"])},
    )
    import base64

    basic = base64.b64encode("rapidpro:pässword-1".encode()).decode()
    assert post_message(service, {"Authorization": f"Basic {basic}"}) == 201
    assert post_message(service, {"Authorization": "Token tok-file-9"}) == 201
    assert post_message(service) == 401
    assert broker.count(f"{connector}.outbound") == 2
    log = service.log()
    assert "pässword-1" not in log and "tok-file-9" not in log


def test_wrong_amqp_password_from_file_is_reported(make_service, tmp_path):
    """The password from amqp.password_file is the one used: a wrong one is
    reported as such on /health, without the password."""
    secret = tmp_path / "amqp.secret"
    secret.write_text("not-the-password\n", encoding="utf-8")
    service = make_service(wait=False, amqp={"password_file": str(secret)})
    deadline = time.monotonic() + 20
    health = None
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(service.url + "/health", timeout=1):
                raise AssertionError("healthy with a wrong password")
        except urllib.error.HTTPError as e:
            assert e.code == 503
            health = json.loads(e.read())
            if "authentication failed" in (health["components"]["amqp"].get("error") or ""):
                break
        except OSError:
            pass
        time.sleep(0.1)
    assert "authentication failed for user guest" in health["components"]["amqp"]["error"], health
    assert "not-the-password" not in service.log() + json.dumps(health)


def test_unreadable_secret_file_names_the_option(tmp_path):
    unreadable = tmp_path / "secret"
    unreadable.write_text("x")
    unreadable.chmod(0)
    directory = tmp_path / "dir"
    directory.mkdir()
    for overrides, option in [
        (
            {"api_auth_username": "u", "api_auth_password_file": str(directory)},
            "api_auth_password_file",
        ),
        ({"amqp": {"password_file": "/nonexistent"}}, "amqp.password_file"),
        ({"amqp_url_file": "/nonexistent"}, "amqp_url_file"),
        ({"mo_message_url_auth_token_file": "/nonexistent"}, "mo_message_url_auth_token_file"),
        ({"default_event_auth_token_file": "/nonexistent"}, "default_event_auth_token_file"),
        (
            {"state_cache_config": {"password_file": "/nonexistent"}},
            "state_cache_config.password_file",
        ),
        ({"api_auth_token": "a", "api_auth_token_file": str(unreadable)}, "api_auth_token"),
    ]:
        line = assert_config_error(run_twistd(tmp_path, {**BASE, **overrides}), option)
        assert "Traceback" not in line
    if os.geteuid() != 0:  # root reads any file
        line = assert_config_error(
            run_twistd(tmp_path, {**BASE, "api_auth_token_file": str(unreadable)}),
            "api_auth_token_file",
        )
        assert "Permission denied" in line


def test_redis_url_from_file(make_service, tmp_path):
    """state_cache_config.url_file: the Redis URL (with any password) from a file."""
    secret = tmp_path / "redis-url"
    secret.write_text("redis://127.0.0.1:6379/0\n", encoding="utf-8")
    service = make_service(
        state_cache_class="junebug_api.state_cache.RedisStateCache",
        state_cache_config={"url_file": str(secret), "key_prefix": f"jbtest-{free_port()}:"},
    )
    with urllib.request.urlopen(service.url + "/health", timeout=5) as r:
        health = json.loads(r.read())
    assert health["components"]["redis"]["health"] == "ok"


def test_port_in_use_exits_with_one_line(tmp_path):
    """A port another process holds: exit 1 with one line, no traceback."""
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        result = run_twistd(tmp_path, {**BASE, "http_bind": f"127.0.0.1:{port}"})
    assert result.returncode == 1, result
    assert result.stderr.strip() == (
        f"junebug-api: cannot listen on 127.0.0.1:{port}: Address already in use"
    )
    assert "Traceback" not in result.stdout and "Unhandled" not in result.stdout


def test_unix_socket_in_a_missing_directory_exits_with_one_line(tmp_path):
    """unix: in a directory that does not exist: exit 1 with one line, no traceback."""
    bind = f"unix:{tmp_path}/missing/junebug.sock"
    result = run_twistd(tmp_path, {**BASE, "http_bind": bind})
    assert result.returncode == 1, result
    assert result.stderr.strip() == (
        f"junebug-api: cannot listen on {bind}: No such file or directory"
    ), result.stderr
    assert "Traceback" not in result.stdout and "Unhandled" not in result.stdout
