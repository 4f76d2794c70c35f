"""RabbitMQ nodes a test starts for itself (TLS, alarms, several nodes).

Each node has its own name, ports, data and log directories, config file and
``enabled_plugins`` file, so the machine's broker on 5672 is never touched.
Booting takes seconds: share a node per module (module-scoped fixtures).
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import signal
import subprocess
import tempfile
import time
import uuid
from pathlib import Path

import pika

from .support import Broker, free_port


class RabbitNode:
    """``rabbitmq-server -detached`` with a config of the test's own."""

    def __init__(
        self,
        conf: list[str] | None = None,
        plugins: list[str] | None = None,
        files: dict[str, bytes] | None = None,
    ) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="jbtest-rabbit-"))
        self.name = f"jbtest-{uuid.uuid4().hex[:8]}@localhost"
        self.port = free_port()
        self.tls_port = free_port()
        self.dist_port = free_port()
        self.conf = conf or []
        self.plugins = plugins or []
        self.files = files or {}
        self.pid: int | None = None

    def path(self, name: str) -> str:
        """Where a file given in ``files`` is (for the config)."""
        return str(self.dir / name)

    @property
    def env(self) -> dict[str, str]:
        advanced = self.dir / "advanced.config"  # given in ``files``, if at all
        return dict(
            os.environ,
            **({"RABBITMQ_ADVANCED_CONFIG_FILE": str(advanced)} if advanced.exists() else {}),
            RABBITMQ_NODENAME=self.name,
            RABBITMQ_NODE_IP_ADDRESS="127.0.0.1",
            RABBITMQ_NODE_PORT=str(self.port),
            RABBITMQ_DIST_PORT=str(self.dist_port),
            RABBITMQ_MNESIA_BASE=str(self.dir / "mnesia"),
            RABBITMQ_LOG_BASE=str(self.dir / "log"),
            RABBITMQ_PID_FILE=str(self.dir / "rabbitmq.pid"),
            RABBITMQ_ENABLED_PLUGINS_FILE=str(self.dir / "enabled_plugins"),
            RABBITMQ_CONFIG_FILE=str(self.dir / "rabbitmq.conf"),
        )

    def ctl(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
        return subprocess.run(
            ["rabbitmqctl", "-n", self.name, *args],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout,
        )

    def start(self) -> RabbitNode:
        if shutil.which("rabbitmq-server") is None:
            raise RuntimeError("rabbitmq-server is not installed")
        plugins = ",".join(self.plugins)
        (self.dir / "enabled_plugins").write_text(f"[{plugins}].\n")
        conf = [
            f"listeners.tcp.default = 127.0.0.1:{self.port}",
            "loopback_users = none",
            *self.conf,
        ]
        (self.dir / "rabbitmq.conf").write_text(
            "\n".join(line.replace("{tls_port}", str(self.tls_port)) for line in conf) + "\n"
        )
        for name, data in self.files.items():
            (self.dir / name).write_bytes(data)
        if os.geteuid() == 0:
            # rabbitmq-server runs the node as the rabbitmq user.
            user = pwd.getpwnam("rabbitmq")
            os.chmod(self.dir, 0o755)
            for path in [self.dir, *self.dir.iterdir()]:
                os.chown(path, user.pw_uid, user.pw_gid)
        started = subprocess.run(
            ["rabbitmq-server", "-detached"],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        if started.returncode != 0:
            raise RuntimeError(f"rabbitmq-server -detached failed: {started.stderr}")
        deadline = time.monotonic() + 120
        while True:
            result = self.ctl("await_startup", "--timeout", "60", timeout=90)
            if result.returncode == 0:
                break
            if time.monotonic() > deadline:
                raise RuntimeError(f"node {self.name} did not start:\n{self.log()[-3000:]}")
            time.sleep(0.5)
        self.pid = self._find_pid()
        return self

    def restart_app(self) -> None:
        """``stop_app`` and ``start_app``: every connection drops; durable
        queues and persistent messages stay."""
        for command in ("stop_app", "start_app"):
            result = self.ctl(command, timeout=120)
            if result.returncode != 0:
                raise RuntimeError(f"rabbitmqctl {command}: {result.stdout}{result.stderr}")
        result = self.ctl("await_startup", "--timeout", "60", timeout=90)
        if result.returncode != 0:
            raise RuntimeError(f"node {self.name} did not come back: {result.stdout}")

    def log(self) -> str:
        return "".join(
            p.read_text(errors="replace") for p in sorted((self.dir / "log").glob("*.log"))
        )

    def _find_pid(self) -> int | None:
        with contextlib.suppress(OSError, ValueError):
            return int((self.dir / "rabbitmq.pid").read_text().strip())
        return None

    def stop(self) -> None:
        """Stop the node and wait until its process is gone. SIGTERM stops a
        node as ``rabbitmqctl stop`` does, without booting a second Erlang VM
        for the command (seconds of CPU on a busy 2-core machine)."""
        pid = self.pid or self._find_pid()
        if pid is None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.ctl("stop", timeout=60)
        else:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
            deadline = time.monotonic() + 30
            while Path(f"/proc/{pid}").exists() and time.monotonic() < deadline:
                time.sleep(0.1)
            if Path(f"/proc/{pid}").exists():
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)

    def destroy(self) -> None:
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)

    def pika(self) -> pika.BlockingConnection:
        return pika.BlockingConnection(
            pika.ConnectionParameters(
                "127.0.0.1", self.port, "/", pika.PlainCredentials("guest", "guest")
            )
        )

    def broker(self) -> Broker:
        """A :class:`Broker` on this node, as guest."""
        return Broker(
            pika.ConnectionParameters(
                "127.0.0.1", self.port, "/", pika.PlainCredentials("guest", "guest")
            )
        )

    @property
    def url(self) -> str:
        return f"amqp://guest:guest@127.0.0.1:{self.port}/%2F"
