"""The benchmark's own RabbitMQ node, and a pika client of it.

The node (``jbbench-<random>@localhost``) has free AMQP and distribution
ports, its data, logs and pid file in the run's temporary directory, no
plugins, and an empty config file so /etc/rabbitmq/rabbitmq.conf's listener
on 5672 does not apply: the shared broker is never touched.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import re
import secrets
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pika

from .console import BenchError, say
from .host import free_port, run
from .settings import HOST, OTHER_CORE, QUEUES


class RabbitNode:
    """A RabbitMQ node of the benchmark's own, in the temporary directory."""

    def __init__(self, tmp: Path) -> None:
        self.dir = tmp / "rabbitmq"
        self.name = f"jbbench-{secrets.token_hex(4)}@localhost"
        self.port = free_port()
        self.dist_port = free_port()
        self.pid: int | None = None
        self.launched = False
        self.tls_port: int | None = None
        self.ca_file: Path | None = None

    def enable_tls(self) -> None:
        """Add an amqps listener with a certificate from a CA made here (trustme);
        ``ca_file`` is what the service trusts. Call before start()."""
        import trustme

        self.tls_port = free_port()
        self.dir.mkdir(exist_ok=True)
        ca = trustme.CA()
        server = ca.issue_cert(HOST)
        self.ca_file = self.dir / "ca.pem"
        self.ca_file.write_bytes(ca.cert_pem.bytes())
        (self.dir / "server.pem").write_bytes(server.cert_chain_pems[0].bytes())
        (self.dir / "server.key").write_bytes(server.private_key_pem.bytes())

    def _conf(self) -> str:
        if self.tls_port is None:
            return ""
        return "\n".join(
            [
                f"listeners.ssl.default = {HOST}:{self.tls_port}",
                f"ssl_options.cacertfile = {self.dir / 'ca.pem'}",
                f"ssl_options.certfile = {self.dir / 'server.pem'}",
                f"ssl_options.keyfile = {self.dir / 'server.key'}",
                "ssl_options.verify = verify_none",
                "",
            ]
        )

    @property
    def env(self) -> dict[str, str]:
        return dict(
            os.environ,
            RABBITMQ_NODENAME=self.name,
            RABBITMQ_NODE_IP_ADDRESS=HOST,
            RABBITMQ_NODE_PORT=str(self.port),
            RABBITMQ_DIST_PORT=str(self.dist_port),
            RABBITMQ_MNESIA_BASE=str(self.dir / "mnesia"),
            RABBITMQ_LOG_BASE=str(self.dir / "log"),
            RABBITMQ_PID_FILE=str(self.dir / "rabbitmq.pid"),
            RABBITMQ_ENABLED_PLUGINS_FILE=str(self.dir / "enabled_plugins"),
            RABBITMQ_CONFIG_FILE=str(self.dir / "rabbitmq.conf"),
        )

    def ctl(self, *args: str, timeout: float = 90) -> subprocess.CompletedProcess:
        return run(["rabbitmqctl", "-n", self.name, *args], timeout, env=self.env)

    def start(self) -> None:
        for tool in ("rabbitmq-server", "rabbitmqctl"):
            if shutil.which(tool) is None:
                raise BenchError(f"{tool} not found: apt-get install rabbitmq-server")
        self.dir.mkdir(exist_ok=True)
        (self.dir / "enabled_plugins").write_text("")
        (self.dir / "rabbitmq.conf").write_text(self._conf())
        if os.geteuid() == 0:
            # rabbitmq-server runs the node as the rabbitmq user (su), which needs
            # to reach and write this directory.
            user = pwd.getpwnam("rabbitmq")
            for path in (self.dir, *self.dir.iterdir()):
                os.chown(path, user.pw_uid, user.pw_gid)
        say(f"starting RabbitMQ node {self.name} on AMQP port {self.port} (core {OTHER_CORE})")
        self.launched = True
        started = run(
            ["taskset", "-c", OTHER_CORE, "rabbitmq-server", "-detached"], 60, env=self.env
        )
        if started.returncode != 0:
            raise BenchError(f"rabbitmq-server -detached failed: {started.stderr.strip()}")
        # -detached returns before the node registers with epmd, and await_startup
        # fails at once for a node epmd does not know: ask again until it answers.
        deadline = time.monotonic() + 120
        while True:
            result = self.ctl("await_startup", "--timeout", "60")
            if result.returncode == 0:
                break
            if time.monotonic() > deadline or "BOOT FAILED" in self._log():
                raise BenchError(
                    f"RabbitMQ node {self.name} did not start: {result.stdout}{result.stderr}"
                    f"\n{self._log()[-3000:]}"
                )
            time.sleep(1)
        self.pid = self._find_pid()
        say(f"RabbitMQ node up (pid {self.pid})")

    def version(self) -> str:
        result = self.ctl("version")
        return result.stdout.strip() if result.returncode == 0 else "unknown"

    def lazy_outbound_queue(self) -> bool:
        """Keep the outbound queue's messages on disk, as classic queues do from RabbitMQ 3.12.

        Nothing consumes the outbound queue here (a transport would), so it
        grows by tens of thousands of messages a run. A 3.10 classic queue keeps them in
        its process's heap, and the Erlang collections of that heap delayed
        publisher confirms by up to 200 ms: the outbound p99 measured the
        broker, not the service. The inbound and event queues keep the default.
        Whether the policy was set.
        """
        result = self.ctl(
            "set_policy",
            "lazy-outbound",
            f"^{re.escape(QUEUES.outbound)}$",
            '{"queue-mode":"lazy"}',
            "--apply-to",
            "queues",
        )
        if result.returncode != 0:
            # A RabbitMQ that no longer knows the key keeps every classic queue lazy anyway.
            say(f"rabbitmqctl set_policy failed: {(result.stdout + result.stderr).strip()}")
            return False
        return True

    def _log(self) -> str:
        return "".join(
            p.read_text(errors="replace") for p in sorted((self.dir / "log").glob("*.log"))
        )

    def _find_pid(self) -> int | None:
        try:
            return int((self.dir / "rabbitmq.pid").read_text().strip())
        except (OSError, ValueError):
            pass
        # No pid file yet: the node's beam is the process with our (random) node name.
        marker = f"RABBITMQ_NODENAME={self.name}".encode()
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit():
                with contextlib.suppress(OSError):
                    if b"beam" in (entry / "cmdline").read_bytes() and marker in (
                        entry / "environ"
                    ).read_bytes().split(b"\0"):
                        return int(entry.name)
        return None

    def stop(self) -> None:
        if not self.launched:
            return
        say(f"stopping RabbitMQ node {self.name}")
        pid = self.pid or self._find_pid()
        try:
            result = self.ctl("stop")
            if result.returncode != 0:
                say(f"rabbitmqctl stop: {(result.stdout + result.stderr).strip()[-300:]}")
        except subprocess.TimeoutExpired:
            say("rabbitmqctl stop timed out")
        pid = pid or self._find_pid()
        if pid is None:
            return
        deadline = time.monotonic() + 60
        while Path(f"/proc/{pid}").exists() and time.monotonic() < deadline:
            time.sleep(0.2)
        if Path(f"/proc/{pid}").exists():
            say(f"RabbitMQ node still running after stop: killing its pid {pid}")
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


class Broker:
    """A pika connection to the benchmark's node."""

    def __init__(self, port: int) -> None:
        self.params = pika.ConnectionParameters(
            HOST,
            port,
            "/",
            pika.PlainCredentials("guest", "guest"),
            connection_attempts=3,
            retry_delay=1,
            socket_timeout=5,
            blocked_connection_timeout=60,
        )
        self.connection = pika.BlockingConnection(self.params)
        self.channel = self.connection.channel()

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.connection.close()

    def declare(self, queue: str) -> None:
        """The queue as the service declares it, bound to the vumi exchange."""
        self.channel.exchange_declare("vumi", "direct", durable=True)
        self.channel.queue_declare(queue, durable=True)
        self.channel.queue_bind(queue, "vumi", routing_key=queue)

    def count(self, queue: str) -> int:
        return self.channel.queue_declare(queue, durable=True, passive=True).method.message_count

    def purge(self, queue: str) -> None:
        self.channel.queue_purge(queue)

    def settled_count(self, queue: str, timeout: float = 15.0) -> int:
        """The queue's count once it stopped changing for a second."""
        deadline = time.monotonic() + timeout
        last, stable = self.count(queue), 0
        while stable < 4 and time.monotonic() < deadline:
            time.sleep(0.25)
            now = self.count(queue)
            stable = stable + 1 if now == last else 0
            last = now
        return last
