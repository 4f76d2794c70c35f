"""The process as an operator runs it: twistd options, config sources, errors."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import pytest_twisted
import treq
import yaml

from .support import TWISTD, ServiceProcess, free_port, pause

BASE = {
    "connector_name": "jbtest-config",
    "mo_message_url": "http://127.0.0.1:9/inbound",
    "http_bind": "127.0.0.1:1",
}


def run_twistd(tmp_path: Path, config: dict | str | None, *args: str, env=None):
    command = [TWISTD, "-n", "--pidfile=", "junebug-api"]
    if config is not None:
        path = tmp_path / "config.yaml"
        path.write_text(config if isinstance(config, str) else yaml.safe_dump(config))
        command += ["--config", str(path)]
    return subprocess.run(
        command + list(args),
        capture_output=True,
        text=True,
        timeout=30,
        env=dict(os.environ, **(env or {})),
        stdin=subprocess.DEVNULL,
    )


@pytest.mark.parametrize(
    ("config", "args", "expected"),
    [
        (
            {k: v for k, v in BASE.items() if k != "connector_name"},
            [],
            "connector_name is required",
        ),
        ({**BASE, "colour": "blue"}, [], "unknown option colour"),
        ({**BASE, "amqp": {"port": "many"}}, [], "amqp.port must be an integer"),
        ({**BASE, "worker_concurrency": "x"}, [], "worker_concurrency must be an integer"),
        ({**BASE, "amqp": {"hots": "x"}}, [], "unknown option amqp.hots"),
        (BASE, ["--amqp-port", "x"], "--amqp-port must be an integer"),
        (
            {**BASE, "state_cache_config": {"timeout": "soon"}},
            [],
            "state_cache_config.timeout must be of type float",
        ),
        ({**BASE, "state_cache_class": "no.such.Cache"}, [], "state_cache_class 'no.such.Cache'"),
        ({**BASE, "http_bind": "nonsense"}, [], "http_bind must be"),
        ({**BASE, "amqp_url": "http://x"}, [], "amqp_url must start with amqp://"),
        (
            {**BASE, "amqp_url": "amqp://guest:guest@h/?heartbeat=5"},
            [],
            "amqp_url must not have a query string ('heartbeat=5')",
        ),
        (BASE, ["--amqp-urls", "amqp://a/,ftp://b/"], "amqp_urls[1] must start with amqp://"),
        ({**BASE, "amqp_failover": "random"}, [], "amqp_failover must be in_order or shuffle"),
        ({**BASE, "amqp_tls_ca_file": "/no/ca.pem"}, [], "cannot read amqp_tls_ca_file"),
        ({**BASE, "mo_message_url": "ftp://x"}, [], "mo_message_url must be an http"),
        ("key: [unclosed", [], "config file"),
    ],
)
def test_bad_config_exits_with_one_line(tmp_path, config, args, expected):
    result = run_twistd(tmp_path, config, *args)
    assert result.returncode == 1, result
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("junebug-api: config error: ")
    assert expected in lines[0]
    assert "Traceback" not in result.stdout + result.stderr


def test_unreadable_config_file(tmp_path):
    result = subprocess.run(
        [TWISTD, "-n", "--pidfile=", "junebug-api", "--config", str(tmp_path / "missing.yaml")],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [
        f"junebug-api: config error: cannot read config file {tmp_path / 'missing.yaml'}:"
        " No such file or directory"
    ]


def test_dropin_imports_no_reactor():
    code = (
        "import sys; import twisted.plugins.junebug_api_plugin as p; "
        "assert p.junebug_api.tapname == 'junebug-api'; "
        "bad = [m for m in ('twisted.internet.reactor', 'treq', 'klein', 'junebug_api.tap',"
        " 'sentry_sdk', 'prometheus_client')"
        " if m in sys.modules]; assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=30)


def test_fresh_dropin_cache_and_epoll_reactor():
    import twisted.plugins

    for folder in twisted.plugins.__path__:
        cache = Path(folder) / "dropin.cache"
        if cache.exists() and os.access(folder, os.W_OK):
            cache.unlink()
    result = subprocess.run(
        [TWISTD, "-r", "epoll", "junebug-api", "--help"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert "--connector-name" in result.stdout
    assert "--amqp-hostname" in result.stdout
    listing = subprocess.run([TWISTD, "--help"], capture_output=True, text=True, timeout=60)
    assert "junebug-api" in listing.stdout


def _wait_health(url: str, timeout: float = 20) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=1) as r:
                return json.loads(r.read())
        except OSError:
            time.sleep(0.05)
    raise AssertionError(f"no answer from {url}")


def test_daemonises_with_pidfile_and_logfile(tmp_path, connector):
    port = free_port()
    config = tmp_path / "config.yaml"
    config.write_text(
        yaml.safe_dump({**BASE, "connector_name": connector, "http_bind": f"127.0.0.1:{port}"})
    )
    pidfile, logfile = tmp_path / "junebug.pid", tmp_path / "junebug.log"
    result = subprocess.run(
        [
            TWISTD,
            f"--pidfile={pidfile}",
            f"--logfile={logfile}",
            "junebug-api",
            "--config",
            str(config),
        ],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 0, result.stderr
    try:
        health = _wait_health(f"http://127.0.0.1:{port}/health")
        assert health["components"]["amqp"]["state"] in ("open", "closed")
        pid = int(pidfile.read_text())
    finally:
        if pidfile.exists():
            os.kill(int(pidfile.read_text()), signal.SIGTERM)
    deadline = time.monotonic() + 15
    while pidfile.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not pidfile.exists()
    assert "Starting junebug-api" in logfile.read_text()

    def gone() -> bool:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        return False

    while not gone() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert gone()


def test_env_file_and_cli_layering(tmp_path, connector):
    """VUMI_CONFIG_FILE, then prefixed env vars, then CLI options, later wins."""
    env_port, cli_port = free_port(), free_port()
    config = tmp_path / "config.yaml"
    config.write_text(
        yaml.safe_dump({**BASE, "connector_name": "from-file", "base_url_path": "/file"})
    )
    service = ServiceProcess(
        tmp_path,
        {**BASE, "http_bind": f"127.0.0.1:{cli_port}"},
        extra_args=["--http-bind", f"127.0.0.1:{cli_port}", "--base-url-path", "/cli"],
    )
    # Run without --config: the file comes from VUMI_CONFIG_FILE.
    process = subprocess.Popen(
        [
            TWISTD,
            "-n",
            "--pidfile=",
            f"--logfile={service.log_path}",
            "junebug-api",
            "--http-bind",
            f"127.0.0.1:{cli_port}",
            "--base-url-path",
            "/cli",
        ],
        env=dict(
            os.environ,
            VUMI_CONFIG_FILE=str(config),
            VUMI_CONFIG_PREFIX="JB",
            JB_CONNECTOR_NAME=connector,
            JB_HTTP_BIND=f"127.0.0.1:{env_port}",
            JB_BASE_URL_PATH="/env",
        ),
        stdin=subprocess.DEVNULL,
    )
    service.process = process
    try:
        _wait_health(f"http://127.0.0.1:{cli_port}/health")
        log = service.log()
        assert f"'connector_name': '{connector}'" in log
        assert "outbound messages at /cli/messages" in log
    finally:
        service.stop()


@pytest_twisted.ensureDeferred
async def test_health_down_and_503_without_broker(make_service):
    dead_port = free_port()
    service = make_service(wait=False, amqp={"port": dead_port})

    async def health():
        try:
            response = await treq.get(service.url + "/health")
        except Exception:
            return None
        return response.code, json.loads(await response.text())

    code, body = None, None
    for _ in range(200):
        answer = await health()
        if answer is not None:
            code, body = answer
            break
        await pause()
    assert code == 503
    assert body["health"] == "down"
    assert body["components"]["amqp"]["health"] == "down"
    assert body["components"]["amqp"]["state"] == "closed"
    response = await treq.post(
        service.url + "/channels/test-channel/messages",
        data=json.dumps({"to": "+1", "from": "2", "content": "x"}).encode(),
    )
    assert response.code == 503
    answer = json.loads(await response.text())
    assert answer["description"] == "service unavailable"
    assert answer["status"] == 503


def test_no_sentry_import_without_a_dsn():
    """Building the whole service without sentry_dsn loads neither sentry-sdk nor
    prometheus_client's Twisted module (which imports the reactor)."""
    code = (
        "import sys\n"
        "from twisted.internet.testing import MemoryReactorClock\n"
        "from junebug_api.config.model import load_config\n"
        "from junebug_api.service import JunebugService\n"
        "cfg = load_config(None, environ={}, cli={'connector_name': 'c',"
        " 'mo_message_url': 'http://127.0.0.1:9/', 'http_bind': '127.0.0.1:0'})\n"
        "service = JunebugService(cfg, MemoryReactorClock())\n"
        "assert service.metrics.enabled\n"
        "bad = [m for m in ('sentry_sdk', 'prometheus_client.twisted') if m in sys.modules]\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=30)
