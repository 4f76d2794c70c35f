"""A RabbitMQ node a test starts for itself (own name, ports and data directory).

For tests that must reconfigure or restart a broker: the machine's shared
broker stays untouched. The recipe is bench/benchmark.py's ``RabbitNode``;
``rabbitmq_conf`` and ``advanced_config`` go into the node's config files.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import secrets
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

import pika

from .support import free_port


class OwnRabbitNode:
    def __init__(self, rabbitmq_conf: str = "", advanced_config: str = "") -> None:
        # Not under pytest's tmp_path: its folders are private to root, and the
        # node runs as the rabbitmq user.
        self.dir = Path(tempfile.mkdtemp(prefix="jbtest-rabbitmq-"))
        self.dir.chmod(0o755)
        self.name = f"jbtest-{secrets.token_hex(4)}@localhost"
        self.port = free_port()
        self.dist_port = free_port()
        self.rabbitmq_conf = rabbitmq_conf
        self.advanced_config = advanced_config
        self.pid: int | None = None

    @property
    def env(self) -> dict[str, str]:
        return dict(
            os.environ,
            RABBITMQ_NODENAME=self.name,
            RABBITMQ_NODE_IP_ADDRESS="127.0.0.1",
            RABBITMQ_NODE_PORT=str(self.port),
            RABBITMQ_DIST_PORT=str(self.dist_port),
            RABBITMQ_MNESIA_BASE=str(self.dir / "mnesia"),
            RABBITMQ_LOG_BASE=str(self.dir / "log"),
            RABBITMQ_PID_FILE=str(self.dir / "rabbitmq.pid"),
            RABBITMQ_ENABLED_PLUGINS_FILE=str(self.dir / "enabled_plugins"),
            RABBITMQ_CONFIG_FILE=str(self.dir / "rabbitmq.conf"),
            RABBITMQ_ADVANCED_CONFIG_FILE=str(self.dir / "advanced.config"),
        )

    @property
    def params(self) -> pika.ConnectionParameters:
        return pika.ConnectionParameters(
            "127.0.0.1", self.port, "/", pika.PlainCredentials("guest", "guest")
        )

    def ctl(self, *args: str, timeout: float = 90) -> subprocess.CompletedProcess:
        return subprocess.run(
            ["rabbitmqctl", "-n", self.name, *args],
            capture_output=True,
            text=True,
            timeout=timeout,
            env=self.env,
        )

    def log(self) -> str:
        return "".join(
            p.read_text(errors="replace") for p in sorted((self.dir / "log").glob("*.log"))
        )

    def start(self) -> OwnRabbitNode:
        if shutil.which("rabbitmq-server") is None:
            raise RuntimeError("rabbitmq-server not found: apt-get install rabbitmq-server")
        files = {
            "enabled_plugins": "[].\n",
            "rabbitmq.conf": self.rabbitmq_conf,
            "advanced.config": self.advanced_config or "[].\n",
        }
        for name, text in files.items():
            (self.dir / name).write_text(text)
        if os.geteuid() == 0:
            user = pwd.getpwnam("rabbitmq")
            for path in (self.dir, *(self.dir / name for name in files)):
                os.chown(path, user.pw_uid, user.pw_gid)
        started = subprocess.run(
            ["rabbitmq-server", "-detached"],
            capture_output=True,
            text=True,
            timeout=60,
            env=self.env,
        )
        if started.returncode != 0:
            raise RuntimeError(f"rabbitmq-server -detached failed: {started.stderr}")
        self.await_startup()
        with contextlib.suppress(OSError, ValueError):
            self.pid = int((self.dir / "rabbitmq.pid").read_text().strip())
        return self

    def await_startup(self, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while True:
            result = self.ctl("await_startup", "--timeout", "60")
            if result.returncode == 0:
                return
            if time.monotonic() > deadline or "BOOT FAILED" in self.log():
                raise RuntimeError(
                    f"RabbitMQ node {self.name} did not start:\n{self.log()[-3000:]}"
                )
            time.sleep(1)

    def restart_app(self) -> None:
        """Stop and start the broker application (connections drop; durable
        queues and persistent messages stay)."""
        for command in ("stop_app", "start_app"):
            result = self.ctl(command)
            if result.returncode != 0:
                raise RuntimeError(f"rabbitmqctl {command}: {result.stdout}{result.stderr}")
        self.await_startup()

    def stop(self) -> None:
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.ctl("stop", timeout=60)
        pid = self.pid
        if pid is not None:
            deadline = time.monotonic() + 30
            while Path(f"/proc/{pid}").exists() and time.monotonic() < deadline:
                time.sleep(0.2)
            if Path(f"/proc/{pid}").exists():
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        shutil.rmtree(self.dir, ignore_errors=True)
