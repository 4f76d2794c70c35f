"""Throughput, latency, CPU and memory of junebug-api, with exactly-once checks.

Not a test and not run by CI. Run it through its wrapper, which makes the
virtualenv and installs nginx-light and wrk when they are missing::

    bench/run [--quick] [--concurrency N] [--inbound N] [--events N] [--keep-tmp]
              [--state-cache memory|redis] [--processes N] [--balancer]
              [--phases outbound,inbound,events,bare,roundtrip] [--event-url] [--no-lazy-queues]
    bench/run --compare-scaling
    bench/run --compare-channels 100 [--quick]
    bench/run --compare-caches [--quick]
    bench/run --compare-metrics [other options]
    bench/run [--tls] [--compare-code REF]

Everything it starts lives in a temporary directory and talks over 127.0.0.1
only; the shared RabbitMQ on 5672 is never touched:

- its own RabbitMQ node (``jbbench-<random>@localhost``, free AMQP and
  distribution ports, data, logs and pid file in the temporary directory, no
  plugins, an empty config file so /etc/rabbitmq/rabbitmq.conf's listener on
  5672 does not apply), pinned to core 1, with a ``queue-mode: lazy`` policy
  on ``bench.outbound``, which nothing consumes during a run (see
  ``RabbitNode.lazy_outbound_queue``; ``--no-lazy-queues`` leaves it out);
- nginx (one worker, core 1) as the RapidPro sink: a front server that logs
  every request body (``escape=json``) to bodies.log and proxies to a backend
  server answering ``200 {}``;
- the service, ``twistd -n junebug-api``, pinned to core 0; wrk on core 1.
  With ``--processes N`` it starts N service processes with the same
  connector_name and config but each its own http_bind port, all of them on
  core 0 (``taskset -c 0``): they share the one core a single process has, so
  the comparison with one process is about the work, not about more CPU.
  Outbound requests then go through a second nginx (one worker, core 1) that
  balances over the processes (upstream keepalive 64), and the same balancer
  in front of one process is measured too, so both figures pay for it
  (``--balancer`` puts it in front of a single process as well).

``--state-cache redis`` configures ``junebug_api.state_cache.RedisStateCache``
with the shared Redis (redis://127.0.0.1:6379/15) and the key prefix
``jbbench:<random>:``; only keys under that prefix are deleted at the end
(SCAN MATCH + DEL), and the Redis round trip is measured on its own: SET+GET
pairs from a Twisted script with the service's client (and txredisapi and
redis-py for comparison), one at a time and 50 in flight.

Phases (``--phases``, default all): a bare twisted.web server
(bench/bare_server.py) under wrk at 1, 16 and 64 connections as the HTTP
ceiling; outbound POSTs under wrk at the same connection counts, each after a
short warm-up run (every answer must be 201, and ``bench.outbound`` must hold
one message per 201: wrk does not count the request each connection has in
flight when time is up, which the service may still publish, so up to one
extra message per connection is reported, loudly, but not as a failure); N
pre-loaded inbound messages drained to nginx by all service processes (each
``message_id`` must arrive exactly once, as the expected Junebug JSON; the
rate counts from the first process's start); N pre-loaded events drained the
same way; the session round trip (below). CPU per op is the sum over the
service processes. It prints one table and writes it to
bench/last-results.txt. The exit status is 1 when a check failed.

``--compare-caches`` runs one process with the in-memory cache and one with
Redis against one RabbitMQ node and sink: outbound with ``event_url`` at 1 and
64 connections, inbound, and the session round trip (``roundtrip`` phase,
bench/roundtrip.py: inbound published at 200 and 1,000 sessions/s and higher
steps, a RapidPro stand-in that replies at once, the time from the inbound's
publish to the reply on ``bench.outbound``), then the Redis/memory ratios.

``--tls`` runs the same phases once more with the service connected over
amqps (the node gets a TLS listener with a certificate from a CA made with
trustme); ``--compare-code REF`` once more with the junebug_api of git ref
REF (``git archive`` into the temporary directory, first on PYTHONPATH), so
two versions are compared against the same node and sink in one run (e.g.
the commit before the separate publish and consume connections).

``--compare-scaling`` runs, against one RabbitMQ node and sink: 1 process with
the in-memory cache, 1 process with Redis, 2 processes with Redis, each for
outbound @64 (through the balancer, with ``event_url`` in every request so
the cache is written) and inbound (20,000 messages), with --quick durations,
then the Redis round trip, and prints one small table.

``--compare-channels N`` runs, against one RabbitMQ node and sink, one process
serving one channel, then one serving that busy channel beside N-1 idle
``channels:`` entries: start-up time (launch to healthy), idle RSS (and so the
RSS per idle channel), outbound @64 and the inbound drain of the busy channel,
and the N-channel rates as a share of the one-channel ones.
``--compare-metrics`` runs the chosen phases twice in one run, against one
RabbitMQ node and sink: with metrics on (the default), then with
``metrics_enabled: false`` (rows marked ``[metrics off]``), and adds a line
per phase with the difference in rate.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import importlib.metadata
import json
import os
import platform
import pwd
import re
import resource
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pika
import pika.spec
import roundtrip
import yaml
from cache_memory import TIMESTAMP, inbound

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "bench"
RESULTS = BENCH / "last-results.txt"
POST_LUA = BENCH / "post.lua"
BARE_SERVER = BENCH / "bare_server.py"
TWISTD = str(Path(sys.executable).with_name("twistd"))
HOST = "127.0.0.1"
SERVICE_CORE = "0"  # the service and the bare server
SPREAD = False  # set by --spread
OTHER_CORE = "1"  # RabbitMQ, nginx, wrk
CLK_TCK = os.sysconf("SC_CLK_TCK")
CONNECTOR = "bench"
BASE_PATH = "/channels/bench"
REDIS_URL = "redis://127.0.0.1:6379/15"  # the shared Redis; only our prefix is touched
REDIS_CLASS = "junebug_api.state_cache.RedisStateCache"
ALL_PHASES = ("outbound", "inbound", "events", "bare", "roundtrip")
HTTP = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # never via a proxy


class BenchError(Exception):
    """Something the benchmark needs did not work; the message says what."""


def say(text: str) -> None:
    print(f"bench: {text}", flush=True)


def shout(text: str) -> None:
    line = "!" * 78
    print(f"{line}\n!!! {text}\n{line}", flush=True)


def run(cmd: list[str], timeout: float, **kwargs: Any) -> subprocess.CompletedProcess:
    return subprocess.run(
        cmd, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=timeout, **kwargs
    )


_used_ports: set[int] = set()


def free_port() -> int:
    for _ in range(100):
        with socket.socket() as s:
            s.bind((HOST, 0))
            port = s.getsockname()[1]
        if port not in _used_ports:
            _used_ports.add(port)
            return port
    raise BenchError("no free port found")


def port_open(port: int) -> bool:
    try:
        socket.create_connection((HOST, port), timeout=1).close()
        return True
    except OSError:
        return False


def http_status(url: str, data: bytes | None = None) -> int | None:
    request = urllib.request.Request(url, data=data)
    if data is not None:
        request.add_header("Content-Type", "application/json")
    try:
        with HTTP.open(request, timeout=2) as r:
            r.read()
            return r.status
    except urllib.error.HTTPError as e:
        return e.code
    except OSError:
        return None


def tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return f"({path} unreadable)"


# --- /proc --------------------------------------------------------------------


def cpu_ticks(pid: int) -> int:
    """utime + stime of a process, in clock ticks (0 once it is gone)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return 0
    fields = stat.rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])


def status_kb(pid: int, key: str) -> int:
    """A ``kB`` line of /proc/<pid>/status (VmRSS, VmHWM)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise BenchError(f"no {key} in /proc/{pid}/status")


def reset_peak_rss(pid: int) -> None:
    Path(f"/proc/{pid}/clear_refs").write_text("5")


def core_times() -> dict[str, tuple[int, int]]:
    """(busy, total) jiffies of each core."""
    times = {}
    for line in Path("/proc/stat").read_text().splitlines():
        name, *values = line.split()
        if re.fullmatch(r"cpu\d+", name):
            numbers = [int(v) for v in values[:8]]
            total = sum(numbers)
            times[name] = (total - numbers[3] - numbers[4], total)
    return times


def children_of(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(entry.name))
    return found


def all_cpu_ticks() -> dict[int, tuple[int, str]]:
    """Every process's CPU ticks and a short description of it."""
    result = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            ticks = cpu_ticks(int(entry.name))
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        result[int(entry.name)] = (ticks, cmdline.strip()[:90])
    return result


@dataclass
class Usage:
    """CPU seconds of named processes, of wrk and busy share of each core."""

    seconds: float
    cpu: dict[str, float]
    cores: dict[str, float]

    @property
    def others(self) -> float:
        """CPU seconds the cores were busy with anything not named here."""
        busy = sum(self.cores.values()) * self.seconds
        return max(0.0, busy - sum(self.cpu.values()))

    def describe(self) -> str:
        cores = ", ".join(f"{name} {busy:.0%}" for name, busy in sorted(self.cores.items()))
        named = [*self.cpu.items(), ("anything else", self.others)]
        procs = ", ".join(f"{name} {value / self.seconds:.0%}" for name, value in named if value)
        return f"cores busy: {cores}; of one core: {procs}"


class Meter:
    """Measures CPU use between its creation and :meth:`stop`."""

    def __init__(self, pids: dict[str, int | None]) -> None:
        self.pids = {name: pid for name, pid in pids.items() if pid}
        self.started = time.monotonic()
        self.ticks = {name: cpu_ticks(pid) for name, pid in self.pids.items()}
        self.cores = core_times()
        self.children = self._rusage(resource.RUSAGE_CHILDREN)
        self.own = self._rusage(resource.RUSAGE_SELF)

    def add(self, name: str, pid: int) -> None:
        """A process started after the meter: all its CPU counts."""
        self.pids[name] = pid
        self.ticks[name] = 0

    @staticmethod
    def _rusage(who: int) -> float:
        usage = resource.getrusage(who)
        return usage.ru_utime + usage.ru_stime

    def stop(self) -> Usage:
        seconds = time.monotonic() - self.started
        cpu = {
            name: (cpu_ticks(pid) - self.ticks[name]) / CLK_TCK for name, pid in self.pids.items()
        }
        cpu["wrk"] = self._rusage(resource.RUSAGE_CHILDREN) - self.children
        cpu["benchmark.py"] = self._rusage(resource.RUSAGE_SELF) - self.own
        cores = {}
        for name, (busy, total) in core_times().items():
            busy0, total0 = self.cores.get(name, (busy, total))
            cores[name] = (busy - busy0) / max(1, total - total0)
        return Usage(seconds, cpu, cores)


# --- RabbitMQ -----------------------------------------------------------------


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
            f"^{CONNECTOR}\\.outbound$",
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

    def preload(self, queue: str, bodies: Iterable[bytes], n: int, timeout: float) -> float:
        """Publish n persistent messages to the vumi exchange, at most 2000
        unconfirmed at a time (publisher confirms, mandatory); the seconds taken."""
        self.declare(queue)
        source = iter(bodies)
        window = 2000
        props = pika.BasicProperties(delivery_mode=2, content_type="application/json")
        state: dict[str, Any] = {"sent": 0, "confirmed": 0, "error": None, "channel": None}
        unconfirmed: collections.deque[int] = collections.deque()

        def fail(reason: str) -> None:
            if state["error"] is None:
                state["error"] = reason
            if connection.is_open:
                connection.close()
            else:
                connection.ioloop.stop()

        def pump() -> None:
            channel = state["channel"]
            while state["sent"] < n and len(unconfirmed) < window:
                channel.basic_publish("vumi", queue, next(source), props, mandatory=True)
                state["sent"] += 1
                unconfirmed.append(state["sent"])

        def on_confirm(frame: Any) -> None:
            method = frame.method
            if isinstance(method, pika.spec.Basic.Nack):
                fail(f"the broker nacked message {method.delivery_tag}")
                return
            if method.multiple:
                while unconfirmed and unconfirmed[0] <= method.delivery_tag:
                    unconfirmed.popleft()
                    state["confirmed"] += 1
            else:
                unconfirmed.remove(method.delivery_tag)
                state["confirmed"] += 1
            if state["confirmed"] == n:
                connection.close()
            else:
                pump()

        def on_channel(channel: Any) -> None:
            state["channel"] = channel
            channel.add_on_return_callback(lambda *_: fail(f"a message to {queue} was unroutable"))
            channel.add_on_close_callback(lambda _ch, reason: fail(f"channel closed: {reason}"))
            channel.confirm_delivery(on_confirm, callback=lambda _frame: pump())

        started = time.monotonic()
        connection = pika.SelectConnection(
            self.params,
            on_open_callback=lambda conn: conn.channel(on_open_callback=on_channel),
            on_open_error_callback=lambda _conn, error: fail(f"cannot connect: {error}"),
            on_close_callback=lambda conn, _reason: conn.ioloop.stop(),
        )
        connection.ioloop.call_later(timeout, lambda: fail(f"not done after {timeout:g} s"))
        connection.ioloop.start()
        if state["confirmed"] != n:
            raise BenchError(
                f"pre-loading {queue}: {state['confirmed']} of {n} confirmed: {state['error']}"
            )
        return time.monotonic() - started


# --- nginx ----------------------------------------------------------------------

# The part of every nginx config here: one worker, files in the run's folder.
NGINX_HEAD = """\
{user}worker_processes 1;
daemon off;
pid {dir}/nginx.pid;
error_log {dir}/error.log warn;
events {{ worker_connections 4096; }}
http {{
    client_body_temp_path {dir}/client_body;
    proxy_temp_path {dir}/proxy;
    fastcgi_temp_path {dir}/fastcgi;
    uwsgi_temp_path {dir}/uwsgi;
    scgi_temp_path {dir}/scgi;
    access_log off;
    keepalive_timeout 300s;
    keepalive_requests 10000000;
    client_body_buffer_size 64k;
"""

NGINX_CONF = (
    NGINX_HEAD
    + """\
    log_format bodies escape=json '$request_body';
    upstream sink {{
        server {host}:{backend};
        keepalive 64;
        keepalive_requests 10000000;
    }}
    server {{
        listen {host}:{port} backlog=1024;
        location / {{
            proxy_pass http://sink;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            access_log {dir}/bodies.log bodies;
        }}
    }}
    server {{
        listen {host}:{backend} backlog=1024;
        location / {{
            default_type application/json;
            return 200 '{{}}';
        }}
    }}
}}
"""
)


class Nginx:
    """nginx as the RapidPro sink: every request body lands in bodies.log."""

    def __init__(self, tmp: Path) -> None:
        self.dir = tmp / "nginx"
        self.port = free_port()
        self.backend = free_port()
        self.bodies = self.dir / "bodies.log"
        self.process: subprocess.Popen | None = None
        self.worker: int | None = None
        self.binary = shutil.which("nginx") or "/usr/sbin/nginx"

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}"

    def start(self) -> None:
        conf = NGINX_CONF.format(
            user=nginx_user(), dir=self.dir, host=HOST, port=self.port, backend=self.backend
        )
        say(f"starting nginx on port {self.port} (core {OTHER_CORE})")
        self.process, self.worker = launch_nginx(
            self.binary, self.dir, conf, [self.port, self.backend]
        )
        self._self_test()

    def _self_test(self) -> None:
        """A body with quotes, backslashes, control and non-ASCII characters must
        come back from bodies.log unchanged."""
        probe = {"probe": uuid.uuid4().hex, "text": 'a "q" \\ b\n\t\u0001 \u00e9 \U0001f44b'}
        body = json.dumps(probe, ensure_ascii=False).encode()
        status = http_status(self.url + "/probe", body)
        if status != 200:
            raise BenchError(f"nginx sink answered {status} to a test POST")
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            lines = self.read_lines(0)
            if lines:
                break
            time.sleep(0.05)
        decoded = [decode_body(line) for line in self.read_lines(0)]
        if probe not in decoded:
            raise BenchError(f"bodies.log does not give back the POSTed JSON: {decoded!r}")
        say("nginx sink ok: bodies.log gives back the exact JSON POSTed")

    def size(self) -> int:
        try:
            return self.bodies.stat().st_size
        except FileNotFoundError:
            return 0

    def read_lines(self, offset: int) -> list[bytes]:
        with open(self.bodies, "rb") as f:
            f.seek(offset)
            data = f.read()
        return data.split(b"\n")[:-1]

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            say("stopping nginx")
        stop_nginx(self.process)


BALANCER_CONF = (
    NGINX_HEAD
    + """\
    upstream junebug {{
{servers}
        keepalive 64;
        keepalive_requests 10000000;
    }}
    server {{
        listen {host}:{port} backlog=1024;
        location / {{
            proxy_pass http://junebug;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_next_upstream off;
        }}
    }}
}}
"""
)


def nginx_user() -> str:
    return f"user {pwd.getpwuid(os.geteuid()).pw_name};\n" if os.geteuid() == 0 else ""


def launch_nginx(
    binary: str, directory: Path, conf_text: str, ports: list[int]
) -> tuple[subprocess.Popen, int | None]:
    """Start nginx with conf_text on core 1; its master process and its worker."""
    if not Path(binary).exists():
        raise BenchError("nginx not found: apt-get install nginx-light (bench/run does)")
    directory.mkdir()
    conf = directory / "nginx.conf"
    conf.write_text(conf_text)
    args = [binary, "-p", str(directory), "-c", str(conf), "-e", str(directory / "err.log")]
    check = run([*args, "-t"], 30)
    if check.returncode != 0:
        raise BenchError(f"nginx config test failed: {check.stderr.strip()}")
    with open(directory / "stdout.log", "wb") as out:
        process = subprocess.Popen(
            ["taskset", "-c", OTHER_CORE, *args],
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    deadline = time.monotonic() + 15
    while not all(port_open(port) for port in ports):
        if process.poll() is not None or time.monotonic() > deadline:
            stop_nginx(process)
            raise BenchError(f"nginx did not start:\n{tail(directory / 'error.log')}")
        time.sleep(0.1)
    workers = children_of(process.pid)
    return process, workers[0] if len(workers) == 1 else None


def stop_nginx(process: subprocess.Popen | None) -> None:
    if process is None or process.poll() is not None:
        return
    process.send_signal(signal.SIGQUIT)  # graceful: flush and exit
    try:
        process.wait(15)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(5)


class Balancer:
    """A second nginx (one worker, core 1) balancing over service processes."""

    def __init__(self, tmp: Path, name: str, ports: list[int]) -> None:
        self.dir = tmp / f"balancer-{name}"
        self.port = free_port()
        self.ports = ports
        self.process: subprocess.Popen | None = None
        self.worker: int | None = None
        self.binary = shutil.which("nginx") or "/usr/sbin/nginx"

    def url(self, path: str) -> str:
        return f"http://{HOST}:{self.port}{path}"

    def start(self) -> Balancer:
        servers = "\n".join(f"        server {HOST}:{port};" for port in self.ports)
        conf = BALANCER_CONF.format(
            user=nginx_user(), dir=self.dir, host=HOST, port=self.port, servers=servers
        )
        say(
            f"starting the nginx balancer on port {self.port} (core {OTHER_CORE}) over"
            f" {len(self.ports)} service process(es)"
        )
        self.process, self.worker = launch_nginx(self.binary, self.dir, conf, [self.port])
        return self

    def stop(self) -> None:
        stop_nginx(self.process)


def decode_body(line: bytes) -> Any:
    """The JSON body behind a bodies.log line: undo nginx's escape=json (JSON
    string escaping), then parse the JSON."""
    return json.loads(json.loads(b'"' + line + b'"'))


class LineCounter:
    """Counts bodies.log lines from an offset on, reading only what is new."""

    def __init__(self, path: Path, offset: int) -> None:
        self.path = path
        self.position = offset
        self.count = 0

    def update(self) -> int:
        with open(self.path, "rb") as f:
            f.seek(self.position)
            data = f.read()
        complete = data.rfind(b"\n") + 1
        self.count += data.count(b"\n", 0, complete)
        self.position += complete
        return self.count


# --- processes under test -------------------------------------------------------


class Process:
    """A long-running child (the service or the bare server) on the service core."""

    def __init__(
        self,
        name: str,
        cmd: list[str],
        port: int,
        health_path: str,
        out: Path,
        core: str | None = None,
        env: dict[str, str] | None = None,
    ) -> None:
        self.core = core or SERVICE_CORE
        self.env = env
        self.name = name
        self.cmd = cmd
        self.port = port
        self.health_url = f"http://{HOST}:{port}{health_path}"
        self.out = out
        self.process: subprocess.Popen | None = None
        self.launched_at = 0.0

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def start(self) -> Process:
        with open(self.out, "ab") as out:
            self.launched_at = time.monotonic()
            self.process = subprocess.Popen(
                ["taskset", "-c", self.core, *self.cmd],
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                cwd=ROOT,
                env=None if self.env is None else {**os.environ, **self.env},
            )
        return self

    def wait_healthy(self, timeout: float = 60.0) -> float:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.process is not None
            if self.process.poll() is not None:
                raise BenchError(
                    f"{self.name} exited with {self.process.returncode}:\n{tail(self.out)}"
                )
            if http_status(self.health_url) == 200:
                return time.monotonic() - self.launched_at
            time.sleep(0.05)
        raise BenchError(f"{self.name} not healthy after {timeout:g} s:\n{tail(self.out)}")

    def terminate(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)

    def stop(self, timeout: float = 30.0) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        self.terminate()
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            say(f"{self.name} did not stop within {timeout:g} s of SIGTERM: killing it")
            self.process.kill()
            self.process.wait(10)


class ServiceGroup:
    """N service processes with one config but for http_bind, all on core 0."""

    def __init__(self, processes: list[Process], logs: list[Path]) -> None:
        self.processes = processes
        self.logs = logs

    def __len__(self) -> int:
        return len(self.processes)

    def subset(self, n: int) -> ServiceGroup:
        return ServiceGroup(self.processes[:n], self.logs[:n])

    @property
    def ports(self) -> list[int]:
        return [p.port for p in self.processes]

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self.processes]

    @property
    def launched_at(self) -> float:
        return self.processes[0].launched_at

    def names(self) -> dict[str, int]:
        """Meter names of the running processes: service, or service1, service2..."""
        if len(self.processes) == 1:
            return {"service": self.processes[0].pid}
        return {f"service{i}": p.pid for i, p in enumerate(self.processes, 1)}

    def start(self) -> ServiceGroup:
        for p in self.processes:
            p.start()
        return self

    def wait_healthy(self, timeout: float = 60.0) -> float:
        for p in self.processes:
            p.wait_healthy(timeout)
        return time.monotonic() - self.launched_at

    def exited(self) -> Process | None:
        for p in self.processes:
            if p.process is not None and p.process.poll() is not None:
                return p
        return None

    def stop(self) -> None:
        for p in self.processes:
            p.terminate()  # all shut down at once
        for p in self.processes:
            p.stop()

    def cpu_ticks(self) -> int:
        return sum(cpu_ticks(pid) for pid in self.pids)

    def reset_peak_rss(self) -> None:
        for pid in self.pids:
            reset_peak_rss(pid)

    def peak_kb(self) -> int:
        """The largest VmHWM of the processes."""
        return max(status_kb(pid, "VmHWM") for pid in self.pids)

    def rss_kb(self) -> int:
        """The sum of the processes' VmRSS."""
        return sum(status_kb(pid, "VmRSS") for pid in self.pids)

    def log_offsets(self) -> list[int]:
        return [file_size(log) for log in self.logs]

    def log_problems(self, offsets: list[int]) -> list[str]:
        return [
            line
            for log, offset in zip(self.logs, offsets, strict=True)
            for line in log_problems(log, offset)
        ]


def service_group(
    tmp: Path,
    tag: str,
    n: int,
    rabbit: RabbitNode,
    nginx: Nginx,
    concurrency: int,
    cache: dict[str, Any] | None,
    extra_config: dict[str, Any] | None = None,
    tls: bool = False,
    code: Path | None = None,
    mo_message_url: str | None = None,
) -> ServiceGroup:
    """n service processes, identical but for http_bind; cache: the
    state_cache_class and state_cache_config (None: the in-memory default);
    extra_config: more options (e.g. ``channels``); tls: amqps to the node's
    TLS listener; code: run the junebug_api found there (a git archive of
    another commit) instead of this checkout's."""
    processes, logs = [], []
    for i in range(1, n + 1):
        port = free_port()
        config = {
            "connector_name": CONNECTOR,
            "http_bind": f"{HOST}:{port}",
            "base_url_path": BASE_PATH,
            "mo_message_url": mo_message_url or f"{nginx.url}/inbound",
            "default_event_url": f"{nginx.url}/event",
            "default_from_addr": "8110",
            "amqp": {
                "hostname": HOST,
                "port": rabbit.port,
                "username": "guest",
                "password": "guest",
                "vhost": "/",
            },
            "worker_concurrency": concurrency,
            "log_level": "WARNING",
            "shutdown_timeout": 10,
            **(cache or {}),
            **(extra_config or {}),
        }
        if tls:
            assert rabbit.tls_port is not None and rabbit.ca_file is not None
            del config["amqp"]
            config["amqp_url"] = f"amqps://guest:guest@{HOST}:{rabbit.tls_port}/%2F"
            config["amqp_tls_ca_file"] = str(rabbit.ca_file)
        path = tmp / f"service-{tag}-{i}.yaml"
        path.write_text(yaml.safe_dump(config))
        log = tmp / f"service-{tag}-{i}.log"
        cmd = [
            TWISTD,
            "-n",
            "--pidfile=",
            f"--logfile={log}",
            "junebug-api",
            "--config",
            str(path),
        ]
        out = tmp / f"service-{tag}-{i}.out"
        # --spread: process i on core (i - 1) % 2, so two processes get both cores.
        core = str((i - 1) % 2) if SPREAD else SERVICE_CORE
        env = None if code is None else {"PYTHONPATH": str(code)}
        processes.append(Process(f"junebug-api #{i}", cmd, port, "/health", out, core, env))
        logs.append(log)
    return ServiceGroup(processes, logs)


def log_problems(path: Path, offset: int) -> list[str]:
    """Error lines and tracebacks written to the service log after offset."""
    try:
        with open(path, "rb") as f:
            f.seek(offset)
            text = f.read().decode(errors="replace")
    except FileNotFoundError:
        return []
    return [
        line
        for line in text.splitlines()
        if "#error]" in line or "#critical]" in line or "Traceback" in line
    ]


def file_size(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0


# --- wrk ------------------------------------------------------------------------


@dataclass
class WrkResult:
    requests: int
    seconds: float
    rate: float
    p50: float
    p90: float
    p99: float
    created: int
    non201: int
    last_non201: int
    socket_errors: int
    output: str


_UNITS_MS = {"us": 0.001, "ms": 1.0, "s": 1000.0, "m": 60000.0, "h": 3600000.0}


def run_wrk(url: str, connections: int, duration: int, script: Path = POST_LUA) -> WrkResult:
    cmd = ["taskset", "-c", OTHER_CORE, "wrk", "-t1", f"-c{connections}", f"-d{duration}s"]
    cmd += ["--latency", "-s", str(script), url]
    result = run(cmd, duration + 60)
    out = result.stdout
    if result.returncode != 0 or "Requests/sec" not in out:
        raise BenchError(f"wrk failed ({result.returncode}): {out}{result.stderr}")
    percentiles = {
        int(m[1]): float(m[2]) * _UNITS_MS[m[3]]
        for m in re.finditer(r"^\s+(\d+)%\s+([\d.]+)(us|ms|s|m|h)\s*$", out, re.M)
    }
    done = re.search(r"(\d+) requests in ([\d.]+)(us|ms|s|m|h)", out)
    lua = re.search(r"wrk-lua: status201=(\d+) non201=(\d+) last_non201=(\d+)", out)
    errors = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    if done is None or lua is None or not {50, 90, 99} <= percentiles.keys():
        raise BenchError(f"cannot parse the wrk output:\n{out}")
    return WrkResult(
        requests=int(done[1]),
        seconds=float(done[2]) * _UNITS_MS[done[3]] / 1000,
        rate=float(re.search(r"Requests/sec:\s+([\d.]+)", out)[1]),
        p50=percentiles[50],
        p90=percentiles[90],
        p99=percentiles[99],
        created=int(lua[1]),
        non201=int(lua[2]),
        last_non201=int(lua[3]),
        socket_errors=sum(int(x) for x in errors.groups()) if errors else 0,
        output=out,
    )


# --- results --------------------------------------------------------------------


@dataclass
class Row:
    name: str
    unit: str
    rate: float | None = None
    p50: float | None = None
    p90: float | None = None
    p99: float | None = None
    cpu_ms: float | None = None
    peak_mb: float | None = None
    ceiling: float | None = None
    status: str = "not run"
    notes: list[str] = field(default_factory=list)


def http_row(name: str, wrk: WrkResult, cpu_seconds: float, peak_kb: int) -> Row:
    row = Row(name, "req/s", wrk.rate, wrk.p50, wrk.p90, wrk.p99)
    row.cpu_ms = cpu_seconds * 1000 / max(1, wrk.requests)
    row.peak_mb = peak_kb / 1024
    row.status = "ok"
    if wrk.non201 or wrk.socket_errors:
        row.status = "not 201"
        row.notes.append(
            f"{wrk.non201} answer(s) not 201 (last {wrk.last_non201}),"
            f" {wrk.socket_errors} socket error(s)"
        )
        shout(f"{name}: {wrk.non201} answer(s) not 201, {wrk.socket_errors} socket error(s)")
    return row


def fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def render(rows: list[Row], extra: list[str]) -> str:
    header = [
        "row",
        "rate",
        "unit",
        "p50 ms",
        "p90 ms",
        "p99 ms",
        "CPU ms/op",
        "peak RSS MiB",
        "of ceiling",
        "status",
    ]
    body = [
        [
            r.name,
            fmt(r.rate, ",.0f"),
            r.unit,
            fmt(r.p50, ".2f"),
            fmt(r.p90, ".2f"),
            fmt(r.p99, ".2f"),
            fmt(r.cpu_ms, ".3f"),
            fmt(r.peak_mb, ".1f"),
            fmt(r.ceiling, ".0%"),
            r.status,
        ]
        for r in rows
    ]
    widths = [max(len(line[i]) for line in [header, *body]) for i in range(len(header))]
    left = {0, 2, 9}

    def line(cells: list[str]) -> str:
        return "  ".join(
            c.ljust(w) if i in left else c.rjust(w)
            for i, (c, w) in enumerate(zip(cells, widths, strict=True))
        ).rstrip()

    out = [line(header), line(["-" * w for w in widths])]
    out += [line(cells) for cells in body]
    return "\n".join([*out, *extra])


# --- phases ---------------------------------------------------------------------


def bare_phase(tmp: Path, connections: list[int], duration: int, warmup: int) -> list[Row]:
    port = free_port()
    bare = Process(
        "bare twisted.web",
        [sys.executable, str(BARE_SERVER), str(port)],
        port,
        "/",
        tmp / "bare.out",
    )
    rows = []
    try:
        bare.start().wait_healthy(30)
        url = f"http://{HOST}:{port}/channels/bench/messages"
        run_wrk(url, 16, warmup)
        for c in connections:
            name = f"bare twisted.web @{c}"
            say(f"{name}: wrk {duration} s")
            reset_peak_rss(bare.pid)
            meter = Meter({"bare": bare.pid})
            wrk = run_wrk(url, c, duration)
            usage = meter.stop()
            row = http_row(name, wrk, usage.cpu["bare"], status_kb(bare.pid, "VmHWM"))
            row.notes.append(usage.describe())
            say(f"{name}: {wrk.rate:,.0f} req/s, p99 {wrk.p99:.2f} ms; {usage.describe()}")
            rows.append(row)
    finally:
        bare.stop()
    return rows


def outbound_phase(
    group: ServiceGroup,
    url: str,
    tag: str,
    broker: Broker,
    meter_pids: dict[str, int | None],
    connections: list[int],
    duration: int,
    warmup: int,
    ceilings: dict[int, float],
    script: Path,
) -> list[Row]:
    """wrk against url (a service process, or the balancer in front of group)."""
    queue = f"{CONNECTOR}.outbound"
    run_wrk(url, 16, warmup, script)
    broker.settled_count(queue)
    rows = []
    for c in connections:
        name = f"outbound @{c}{tag}"
        broker.purge(queue)
        say(f"{name}: wrk {duration} s against {url}")
        group.reset_peak_rss()
        meter = Meter({**group.names(), **meter_pids})
        wrk = run_wrk(url, c, duration, script)
        usage = meter.stop()
        peak = group.peak_kb()
        service_cpu = sum(usage.cpu[key] for key in group.names())
        row = http_row(name, wrk, service_cpu, peak)
        row.cpu_ms = service_cpu * 1000 / max(1, wrk.created)
        row.ceiling = wrk.rate / ceilings[c] if ceilings.get(c) else None
        queued = broker.settled_count(queue)
        # wrk counts a request only once its answer arrived; when the time is up
        # each connection has one request in flight, which the service may still
        # publish (the client is gone, but the message was sent to the broker).
        extra = queued - wrk.created
        if extra == 0:
            row.notes.append(f"{queued} on {queue} = {wrk.created} answers 201")
        elif 0 < extra <= c + wrk.socket_errors:
            row.notes.append(
                f"{queued} on {queue} = {wrk.created} answers 201 + {extra} request(s) in"
                f" flight when wrk stopped (at most one per connection: {c}); not equal"
            )
            say(
                f"!!! {name}: NOT EQUAL: {queued} messages on {queue}, {wrk.created} answers"
                f" 201; the {extra} extra are requests in flight when wrk stopped (wrk does not"
                f" count them; at most one per connection, {c})"
            )
        else:
            row.status = "lost" if extra < 0 else "count mismatch"
            row.notes.append(f"{queued} on {queue} but {wrk.created} answers 201")
            shout(f"{name}: COUNT MISMATCH: {queued} messages on {queue}, {wrk.created} x 201")
        row.notes.append(usage.describe())
        say(
            f"{name}: {wrk.rate:,.0f} req/s, p50 {wrk.p50:.2f} p99 {wrk.p99:.2f} ms,"
            f" {row.cpu_ms:.3f} CPU ms/req, {queued} queued for {wrk.created} x 201;"
            f" {usage.describe()}"
        )
        rows.append(row)
    broker.purge(queue)
    return rows


def inbound_body(message_id: str) -> bytes:
    """A vumi inbound user message as a vumi2 USSD transport publishes it."""
    return json.dumps(inbound(message_id, transport_name=CONNECTOR)).encode()


def inbound_expected(message_id: str) -> dict:
    """The Junebug JSON RapidPro must receive for inbound_body(message_id)."""
    return {
        "to": "8110",
        "from": "+27820000001",
        "group": None,
        "message_id": message_id,
        "channel_id": CONNECTOR,
        "timestamp": TIMESTAMP,
        "reply_to": None,
        "content": "hello",
        "channel_data": {"session_id": "abc", "session_event": "new"},
    }


def event_body(message_id: str) -> bytes:
    """A vumi ack for outbound message message_id."""
    return json.dumps(
        {
            "user_message_id": message_id,
            "event_type": "ack",
            "message_version": "20110921",
            "message_type": "event",
            "timestamp": TIMESTAMP,
            "routing_metadata": {},
            "helper_metadata": {},
            "transport_metadata": {},
            "event_id": uuid.uuid4().hex,
            "sent_message_id": "smsc-" + message_id[:8],
            "nack_reason": None,
            "delivery_status": None,
        }
    ).encode()


def event_expected(message_id: str) -> dict:
    return {
        "event_type": "submitted",
        "message_id": message_id,
        "channel_id": CONNECTOR,
        "timestamp": TIMESTAMP,
        "event_details": {},
    }


@dataclass
class DrainResult:
    row: Row
    rss_after_kb: int


def drain_phase(
    name: str,
    kind: str,
    n: int,
    make_body: Callable[[str], bytes],
    expected: Callable[[str], dict],
    group: ServiceGroup,
    broker: Broker,
    nginx: Nginx,
    meter_pids: dict[str, int | None],
) -> DrainResult:
    """Pre-load n messages on <connector>.<kind>, start the service processes,
    time how long until nginx saw n bodies, then check each arrived exactly
    once, unchanged."""
    queue = f"{CONNECTOR}.{kind}"
    ids = [uuid.uuid4().hex for _ in range(n)]
    say(f"{name}: pre-loading {n:,} messages on {queue}")
    seconds = broker.preload(queue, (make_body(i) for i in ids), n, timeout=max(120, n / 200))
    queued = broker.count(queue)
    say(f"{name}: pre-loaded in {seconds:.1f} s ({n / seconds:,.0f} msg/s); {queued:,} on {queue}")
    if queued != n:
        raise BenchError(f"{queue} holds {queued} messages after pre-loading {n}")
    log_offsets = group.log_offsets()
    bodies_offset = nginx.size()
    counter = LineCounter(nginx.bodies, bodies_offset)
    row = Row(name, "msg/s")
    meter = Meter(meter_pids)
    group.start()
    for key, pid in group.names().items():
        meter.add(key, pid)
    first_at = first_count = first_ticks = None
    last_progress = time.monotonic()
    last_report = time.monotonic()
    last_count = 0
    stall_limit = 60.0
    while True:
        count = counter.update()
        now = time.monotonic()
        gone = group.exited()
        if gone is not None:
            raise BenchError(f"{gone.name} exited during {name}:\n{tail(gone.out)}")
        if count and first_at is None:
            first_at, first_count, first_ticks = now, count, group.cpu_ticks()
        if count != last_count:
            last_count, last_progress = count, now
        if count >= n:
            break
        if now - last_progress > stall_limit:
            shout(f"{name}: no progress for {stall_limit:g} s at {count:,} of {n:,}; giving up")
            break
        if now - last_report >= 5:
            last_report = now
            say(f"{name}: {count:,} of {n:,} delivered")
        time.sleep(0.05)
    done_at = time.monotonic()
    done_ticks = group.cpu_ticks()
    usage = meter.stop()
    time.sleep(2)  # anything still coming (a duplicate, a late retry) arrives now
    rss_after = group.rss_kb()
    row.peak_mb = group.peak_kb() / 1024
    elapsed = done_at - group.launched_at
    row.rate = min(count, n) / elapsed
    if first_at is not None and done_at > first_at and count > first_count:
        steady = (count - first_count) / (done_at - first_at)
        row.cpu_ms = (done_ticks - first_ticks) / CLK_TCK * 1000 / (count - first_count)
        row.notes.append(
            f"first body {first_at - group.launched_at:.2f} s after the first service process"
            f" started; {steady:,.0f} msg/s from then on (CPU ms/op, summed over"
            f" {len(group)} process(es), measured over that window)"
        )
    row.notes.append(usage.describe())
    group.stop()
    left = broker.count(queue)
    failed = broker.count(f"{queue}.failed")

    lines = nginx.read_lines(bodies_offset)
    seen: collections.Counter[str] = collections.Counter()
    malformed = 0
    wanted = set(ids)
    for line in lines:
        try:
            body = decode_body(line)
            message_id = body["message_id"]
        except (ValueError, TypeError, KeyError):
            malformed += 1
            continue
        if message_id not in wanted or body != expected(message_id):
            malformed += 1
            continue
        seen[message_id] += 1
    duplicates = sum(c - 1 for c in seen.values() if c > 1)
    missing = n - len(seen)
    problems = group.log_problems(log_offsets)
    status = []
    if missing:
        status.append("lost")
    if duplicates:
        status.append("duplicates")
    if malformed or left or failed:
        status.append("count mismatch")
    row.status = " + ".join(status) or "ok"
    check = (
        f"{len(lines):,} bodies: {len(seen):,} distinct expected ids, {duplicates} duplicate(s),"
        f" {missing} missing, {malformed} unexpected/malformed; {left} left on {queue},"
        f" {failed} on {queue}.failed; {len(problems)} error line(s) in the service log"
    )
    row.notes.insert(0, check)
    if row.status != "ok":
        shout(f"{name}: {check}")
    for line in problems[:5]:
        say(f"{name}: service log: {line[:200]}")
    say(
        f"{name}: {row.rate:,.0f} msg/s from start, {fmt(row.cpu_ms, '.3f')} CPU ms/msg,"
        f" peak RSS {row.peak_mb:.1f} MiB; {check}"
    )
    return DrainResult(row, rss_after)


# --- Redis ----------------------------------------------------------------------


class RedisKeys:
    """The shared Redis, seen only through the benchmark's key prefix."""

    def __init__(self, url: str, prefix: str) -> None:
        import redis

        self.url = url
        self.prefix = prefix
        self.client = redis.Redis.from_url(url, socket_timeout=10, socket_connect_timeout=5)

    def check(self) -> None:
        try:
            self.client.ping()
        except Exception as e:
            raise BenchError(f"Redis at {self.url} does not answer: {e}") from None

    def count(self, kind: str = "") -> int:
        return sum(1 for _ in self.client.scan_iter(match=f"{self.prefix}{kind}*", count=1000))

    def delete(self) -> int:
        """Delete every key under the prefix (SCAN MATCH + DEL); how many."""
        deleted = 0
        batch: list[bytes] = []
        for key in self.client.scan_iter(match=f"{self.prefix}*", count=1000):
            batch.append(key)
            if len(batch) >= 1000:
                deleted += self.client.delete(*batch)
                batch = []
        if batch:
            deleted += self.client.delete(*batch)
        return deleted

    def cleanup(self) -> None:
        try:
            deleted = self.delete()
            left = self.count()
        except Exception as e:
            shout(f"could not delete the keys under {self.prefix} in {self.url}: {e}")
            return
        say(f"Redis: deleted {deleted:,} key(s) under {self.prefix}; {left} left")


def redis_server_pid() -> int | None:
    """The shared redis-server's pid, for its CPU share (None if not visible)."""
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                if (entry / "cmdline").read_bytes().startswith(b"redis-server"):
                    return int(entry.name)
    return None


REDIS_RTT_SCRIPT = '''\
"""SET+GET pairs against Redis: with the service's own client
(junebug_api.redis_client: one pipelining connection), and for comparison with
txredisapi (a pool of 10, as the service used before) and blocking redis-py.
Written and run by bench/benchmark.py:
    python redis_rtt.py URL PREFIX N IN_FLIGHT
prints one JSON line: wall and CPU seconds, one pair at a time and IN_FLIGHT
pairs in flight."""

import json
import resource
import sys
import time

import txredisapi
from twisted.internet import defer, reactor, task

from junebug_api.redis_client import FixedLocator, RedisClient
from junebug_api.redis_state_cache import parse_redis_url


def cpu():
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


async def pairs(set_, get, keys, value, in_flight):
    keys = iter(keys)

    async def worker():
        for key in keys:
            await set_(key, value)
            got = await get(key)
            if got not in (value, value.encode()):
                raise RuntimeError(f"GET {key} gave {got!r}")

    started, cpu0 = time.monotonic(), cpu()
    await defer.gatherResults(
        [defer.Deferred.fromCoroutine(worker()) for _ in range(in_flight)], consumeErrors=True
    )
    return time.monotonic() - started, cpu() - cpu0


async def measure(set_, get, prefix, n, in_flight):
    value = "x" * 300  # about a cached inbound
    await pairs(set_, get, [f"{prefix}warm:{i}" for i in range(500)], value, 1)
    sequential = await pairs(set_, get, [f"{prefix}seq:{i}" for i in range(n)], value, 1)
    concurrent = await pairs(
        set_, get, [f"{prefix}con:{i}" for i in range(n)], value, in_flight
    )
    return sequential, concurrent


async def main(reactor, url, prefix, n, in_flight):
    args = parse_redis_url(url)
    args.pop("tls")
    result = {}
    client = RedisClient(
        reactor,
        FixedLocator(args["host"], args["port"]),
        dbid=args["dbid"],
        username=args["username"],
        password=args["password"],
    )
    client.start()
    await client.command(b"PING")
    result["ours"] = await measure(
        lambda k, v: client.command(b"SET", k, v, b"EX", 600),
        lambda k: client.command(b"GET", k),
        f"{prefix}rtt:ours:",
        n,
        in_flight,
    )
    await client.stop()
    redis = await txredisapi.ConnectionPool(
        poolsize=10, reconnect=False, charset="utf-8", convertNumbers=False, **args
    )
    result["txredisapi"] = await measure(
        lambda k, v: redis.set(k, v, expire=600),
        redis.get,
        f"{prefix}rtt:tx:",
        n,
        in_flight,
    )
    await redis.disconnect()
    # The same pairs with the blocking redis-py client: what any client pays here.
    import redis as redis_py

    blocking = redis_py.Redis.from_url(url)
    started, cpu0 = time.monotonic(), cpu()
    for i in range(n):
        blocking.set(f"{prefix}rtt:py:{i}", "x" * 300, ex=600)
        blocking.get(f"{prefix}rtt:py:{i}")
    result["redis-py"] = (time.monotonic() - started, cpu() - cpu0)
    blocking.close()
    print(json.dumps(result), flush=True)


url, prefix, n, in_flight = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
task.react(lambda reactor: defer.ensureDeferred(main(reactor, url, prefix, n, in_flight)))
'''


def redis_round_trips(
    tmp: Path, redis: RedisKeys, n: int = 10_000, in_flight: int = 50
) -> list[str]:
    """Time n SET+GET pairs one at a time and n with in_flight pairs in flight,
    from a Twisted script on the service core; lines for the report."""
    script = tmp / "redis_rtt.py"
    script.write_text(REDIS_RTT_SCRIPT)
    say(f"Redis round trips: {n:,} SET+GET pairs one at a time, then {in_flight} in flight")
    cmd = ["taskset", "-c", SERVICE_CORE, sys.executable, str(script), redis.url, redis.prefix]
    result = run([*cmd, str(n), str(in_flight)], 300, cwd=ROOT)
    try:
        data = json.loads(result.stdout.strip().splitlines()[-1])
    except (IndexError, ValueError):
        raise BenchError(
            f"the Redis round-trip script failed ({result.returncode}):"
            f" {result.stdout}{result.stderr[-2000:]}"
        ) from None
    lines = [
        f"Redis round trip (300-byte values, client on core {SERVICE_CORE}, {redis.url};"
        " CPU is the client's own):"
    ]
    for key, label in (
        ("ours", "the service's client (one pipelining connection)"),
        ("txredisapi", "txredisapi, pool of 10 (the service before)"),
    ):
        for (wall, cpu), how in zip(
            data[key], ("one at a time", f"{in_flight} in flight"), strict=True
        ):
            trips = 2 * n
            lines.append(
                f"  {label}, {how}: {wall * 1e6 / trips:.1f} us per round trip wall"
                f" ({trips / wall:,.0f} commands/s), client CPU {cpu * 1e6 / trips:.1f} us"
                " per command"
            )
    wall, cpu = data["redis-py"]
    lines.append(
        f"  for reference, blocking redis-py one at a time: {wall * 1e6 / (2 * n):.1f} us wall,"
        f" client CPU {cpu * 1e6 / (2 * n):.1f} us per command"
    )
    return lines


# --- main -----------------------------------------------------------------------


def machine_line() -> str:
    model = "unknown CPU"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            model = line.split(":", 1)[1].strip()
            break
    twisted_version = importlib.metadata.version("twisted")
    return (
        f"machine: nproc {os.cpu_count()}, {model}; Python {platform.python_version()},"
        f" Twisted {twisted_version}; load average at start {os.getloadavg()[0]:.2f}"
    )


def other_load(before: dict[int, tuple[int, str]], ours: set[int], seconds: float) -> str:
    after = all_cpu_ticks()
    used = []
    for pid, (ticks, cmd) in after.items():
        if pid in ours or pid == os.getpid():
            continue
        delta = (ticks - before.get(pid, (0, ""))[0]) / CLK_TCK
        if delta >= 1:
            used.append((delta, pid, cmd))
    used.sort(reverse=True)
    if not used:
        return "other processes alive at the end: none used a second of CPU during the run"
    top = "; ".join(f"pid {pid} {delta:.0f} s ({cmd[:60]})" for delta, pid, cmd in used[:3])
    return f"CPU of other processes alive at the end, during the {seconds:.0f} s run: {top}"


@dataclass
class Setup:
    """One configuration of the service under test."""

    key: str  # in file names
    label: str  # in the scaling table
    processes: int
    cache: str  # memory or redis
    balancer: bool  # outbound through the nginx balancer
    tls: bool = False  # amqps to the node (--tls)
    code: str | None = None  # a git ref whose code runs instead (--compare-code)
    metrics: bool = True  # metrics_enabled (--compare-metrics runs both)

    def tag(self, processes: int | None = None, outbound: bool = False) -> str:
        """The suffix of row names; none for one process, memory, no balancer,
        metrics on."""
        n = self.processes if processes is None else processes
        marks = [
            m
            for m in (
                "tls" if self.tls else "",
                self.code or "",
                "" if self.metrics else "metrics off",
            )
            if m
        ]
        if n == 1 and self.cache == "memory" and not self.balancer:
            return f" [{', '.join(marks)}]" if marks else ""
        lb = ", lb" if outbound and self.balancer else ""
        more = "".join(f", {m}" for m in marks)
        return f" [{n}p {self.cache}{lb}{more}]"


@dataclass
class Context:
    """What every configuration shares."""

    tmp: Path
    stack: contextlib.ExitStack
    rabbit: RabbitNode
    nginx: Nginx
    broker: Broker
    meter_pids: dict[str, int | None]
    ours: set[int]
    redis: RedisKeys | None
    phases: set[str]
    connections: list[int]
    duration: int
    warmup: int
    n_inbound: int
    n_events: int
    concurrency: int
    script: Path
    ceilings: dict[int, float]
    single_via_balancer: bool  # with N > 1, also 1 process through the balancer


@dataclass
class SetupResult:
    setup: Setup
    rows: list[Row] = field(default_factory=list)
    extra: list[str] = field(default_factory=list)
    outbound: dict[int, list[Row]] = field(default_factory=dict)  # by process count
    inbound: Row | None = None


def checkout(tmp: Path, ref: str) -> Path:
    """The tree of git ref ``ref`` of this repository, unpacked under tmp."""
    target = tmp / f"code-{re.sub(r'[^A-Za-z0-9_.-]', '_', ref)}"
    if not target.exists():
        target.mkdir()
        archive = subprocess.run(
            ["git", "-C", str(ROOT), "archive", "--format=tar", ref],
            capture_output=True,
            timeout=60,
        )
        if archive.returncode != 0:
            raise BenchError(f"git archive {ref}: {archive.stderr.decode(errors='replace')}")
        subprocess.run(["tar", "-x", "-C", str(target)], input=archive.stdout, check=True)
        say(f"code of {ref} unpacked to {target} (its junebug_api runs for the [{ref}] rows)")
    return target


def run_setup(ctx: Context, setup: Setup) -> SetupResult:
    result = SetupResult(setup)
    cache = None
    if setup.cache == "redis":
        assert ctx.redis is not None
        cache = {
            "state_cache_class": REDIS_CLASS,
            "state_cache_config": {"url": ctx.redis.url, "key_prefix": ctx.redis.prefix},
        }
    if not setup.metrics:
        cache = {**(cache or {}), "metrics_enabled": False}
    code = checkout(ctx.tmp, setup.code) if setup.code else None
    group = service_group(
        ctx.tmp,
        setup.key,
        setup.processes,
        ctx.rabbit,
        ctx.nginx,
        ctx.concurrency,
        cache,
        tls=setup.tls,
        code=code,
    )
    ctx.stack.callback(group.stop)
    say(
        f"=== {setup.processes} service process(es), {setup.cache} state cache, all on core"
        f" {SERVICE_CORE} (taskset -c {SERVICE_CORE})"
        + (", outbound through the nginx balancer" if setup.balancer else "")
    )
    top = ctx.ceilings.get(max(ctx.connections)) if ctx.connections else None

    if "outbound" in ctx.phases:
        groups = [group]
        if setup.balancer and setup.processes > 1 and ctx.single_via_balancer:
            groups.insert(0, group.subset(1))
        for g in groups:
            g.start()
            took = g.wait_healthy()
            ctx.ours.update(g.pids)
            say(
                f"{len(g)} service process(es) healthy after {took:.1f} s"
                f" (worker_concurrency {ctx.concurrency} each)"
            )
            balancer = None
            meter_pids = dict(ctx.meter_pids)
            url = f"http://{HOST}:{g.ports[0]}{BASE_PATH}/messages"
            try:
                if setup.balancer:
                    balancer = Balancer(ctx.tmp, f"{setup.key}-{len(g)}", g.ports).start()
                    ctx.ours.update(p for p in (balancer.worker, balancer.process.pid) if p)
                    meter_pids["balancer"] = balancer.worker
                    url = balancer.url(f"{BASE_PATH}/messages")
                offsets = g.log_offsets()
                rows = outbound_phase(
                    g,
                    url,
                    setup.tag(len(g), outbound=True),
                    ctx.broker,
                    meter_pids,
                    ctx.connections,
                    ctx.duration,
                    ctx.warmup,
                    ctx.ceilings,
                    ctx.script,
                )
                for line in g.log_problems(offsets)[:5]:
                    say(f"outbound: service log: {line[:200]}")
            finally:
                if balancer is not None:
                    balancer.stop()
                g.stop()
            result.outbound[len(g)] = rows
            result.rows += rows
        if ctx.redis is not None and setup.cache == "redis":
            events = ctx.redis.count("event:")
            rows[-1].notes.append(f"Redis: {events:,} event-info keys under the prefix")

    drains = [
        (kind, n, name, make, expect)
        for kind, n, name, make, expect in (
            ("inbound", ctx.n_inbound, "inbound", inbound_body, inbound_expected),
            ("event", ctx.n_events, "events", event_body, event_expected),
        )
        if name in ctx.phases
    ]
    baseline_kb = 0
    if "inbound" in ctx.phases:
        group.start()
        group.wait_healthy()
        ctx.ours.update(group.pids)
        time.sleep(1)
        baseline_kb = group.rss_kb()
        say(f"fresh service process(es) with empty queues: VmRSS {baseline_kb / 1024:.1f} MiB")
        group.stop()
    for kind, n, name, make, expect in drains:
        if ctx.redis is not None and setup.cache == "redis" and kind == "inbound":
            before = ctx.redis.count("inbound:")
        drained = drain_phase(
            name + setup.tag(),
            kind,
            n,
            make,
            expect,
            group,
            ctx.broker,
            ctx.nginx,
            ctx.meter_pids,
        )
        ctx.ours.update(group.pids)
        row = drained.row
        row.ceiling = row.rate / top if row.rate and top else None
        result.rows.append(row)
        if kind == "inbound":
            result.inbound = row
            per = (drained.rss_after_kb - baseline_kb) * 1024 / n
            where = " (the cache is in Redis)" if setup.cache == "redis" else ""
            result.extra.append(
                f"RSS per cached inbound{setup.tag()}: {per:,.0f} bytes{where} (VmRSS"
                f" {drained.rss_after_kb / 1024:.1f} MiB after {n:,} delivered, baseline"
                f" {baseline_kb / 1024:.1f} MiB; summed over {len(group)} process(es))"
            )
            if ctx.redis is not None and setup.cache == "redis":
                stored = ctx.redis.count("inbound:") - before
                row.notes.append(
                    f"Redis: {stored:,} new inbound keys under the prefix (one per message: {n:,})"
                )
                if stored != n:
                    shout(f"{row.name}: {stored:,} inbound keys in Redis for {n:,} messages")
    if "roundtrip" in ctx.phases:
        result.rows += roundtrip_rows(ctx, setup, cache, code)
    if ctx.redis is not None and setup.cache == "redis":
        ctx.redis.cleanup()
    return result


# --- many channels in one process (--compare-channels) ----------------------------


def idle_channels(n: int, nginx: Nginx) -> dict[str, Any]:
    """``channels:`` entries for n idle channels (their queues stay empty)."""
    return {f"idle-{i:03d}": {"mo_url": f"{nginx.url}/inbound-idle"} for i in range(1, n + 1)}


def compare_channels(ctx: Context, n_channels: int) -> tuple[list[Row], list[str]]:
    """One busy channel alone, then beside n_channels - 1 idle ones, in one run.

    The busy channel is the top-level connector (``bench``, the queues and
    path every phase uses); the idle ones are ``channels:`` entries, each with
    its own queues and consumers (two AMQP channels with their own prefetch).
    Measures start-up time (launch to healthy /health), idle RSS, outbound @64
    and the inbound drain of the busy channel, and how the N-channel figures
    compare with the one-channel ones.
    """
    rows: list[Row] = []
    figures: dict[int, dict[str, float]] = {}
    connections = max(ctx.connections)
    for count in (1, n_channels):
        tag = f" [{count} ch]"
        extra = {"channels": idle_channels(count - 1, ctx.nginx)} if count > 1 else None
        group = service_group(
            ctx.tmp, f"ch{count}", 1, ctx.rabbit, ctx.nginx, ctx.concurrency, None, extra
        )
        ctx.stack.callback(group.stop)
        say(f"=== {count} channel(s) in one process")
        group.start()
        startup = group.wait_healthy(timeout=120)
        ctx.ours.update(group.pids)
        time.sleep(1)
        rss_kb = group.rss_kb()
        say(
            f"{count} channel(s): healthy {startup:.2f} s after launch,"
            f" VmRSS {rss_kb / 1024:.1f} MiB"
        )
        url = f"http://{HOST}:{group.ports[0]}{BASE_PATH}/messages"
        try:
            outbound = outbound_phase(
                group,
                url,
                tag,
                ctx.broker,
                ctx.meter_pids,
                [connections],
                ctx.duration,
                ctx.warmup,
                ctx.ceilings,
                ctx.script,
            )[0]
        finally:
            group.stop()
        inbound_row = drain_phase(
            "inbound" + tag,
            "inbound",
            ctx.n_inbound,
            inbound_body,
            inbound_expected,
            group,
            ctx.broker,
            ctx.nginx,
            ctx.meter_pids,
        ).row
        rows += [outbound, inbound_row]
        figures[count] = {
            "startup": startup,
            "rss_kb": rss_kb,
            "outbound": outbound.rate or 0.0,
            "inbound": inbound_row.rate or 0.0,
        }
    one, many = figures[1], figures[n_channels]
    per_idle = (many["rss_kb"] - one["rss_kb"]) * 1024 / max(1, n_channels - 1)
    extra_lines = [
        f"channels: start-up (launch to healthy) {one['startup']:.2f} s with 1 channel,"
        f" {many['startup']:.2f} s with {n_channels}",
        f"channels: idle VmRSS {one['rss_kb'] / 1024:.1f} MiB with 1 channel,"
        f" {many['rss_kb'] / 1024:.1f} MiB with {n_channels}: {per_idle:,.0f} bytes per idle"
        " channel",
    ]
    for kind in ("outbound", "inbound"):
        ratio = many[kind] / one[kind] if one[kind] else 0.0
        verdict = "at least 90%: yes" if ratio >= 0.9 else "at least 90%: NO"
        extra_lines.append(
            f"channels: busy channel {kind} {many[kind]:,.0f} with {n_channels} channels vs"
            f" {one[kind]:,.0f} alone: {ratio:.0%} of the one-channel rate ({verdict})"
        )
    return rows, extra_lines


def roundtrip_rows(
    ctx: Context, setup: Setup, cache: dict[str, Any] | None, code: Path | None
) -> list[Row]:
    """The session round trip (bench/roundtrip.py) for one configuration."""

    def start(mo_url: str) -> ServiceGroup:
        group = service_group(
            ctx.tmp,
            f"{setup.key}-rt",
            1,
            ctx.rabbit,
            ctx.nginx,
            ctx.concurrency,
            cache,
            tls=setup.tls,
            code=code,
            mo_message_url=mo_url,
        )
        group.start().wait_healthy()
        ctx.ours.update(group.pids)
        return group

    def purge(queue: str) -> None:
        ctx.broker.declare(queue)
        ctx.broker.purge(queue)

    plan = roundtrip.RoundTripPlan(
        tmp=ctx.tmp,
        amqp_port=ctx.rabbit.port,
        other_core=OTHER_CORE,
        seconds=ctx.duration,
        start_service=start,
        service_url=lambda g: f"http://{HOST}:{g.ports[0]}{BASE_PATH}/messages",
        service_cpu=lambda g: g.cpu_ticks() / CLK_TCK,
        stop_service=lambda g: g.stop(),
        purge=purge,
        say=say,
        free_port=free_port,
        broker_pid=ctx.rabbit.pid,
    )
    try:
        trips = roundtrip.roundtrip_phase(plan, setup.tag(1), BENCH)
    except RuntimeError as e:
        raise BenchError(str(e)) from None
    rows = []
    for name, trip in trips:
        row = Row(name, "ses/s", trip.rate, trip.p50, trip.p90, trip.p99)
        row.cpu_ms = trip.cpu_seconds * 1000 / max(1, trip.replied)
        row.status = "ok" if trip.replied == trip.published else "lost"
        row.notes.append(
            f"{trip.published:,} inbound published at {trip.offered:,.0f}/s, {trip.replied:,}"
            f" replies on {CONNECTOR}.outbound within {roundtrip.GRACE:g} s of the last;"
            f" round trip = inbound publish to reply consumed (driver's clock)"
            + (
                ""
                if trip.sustained
                else f"; not sustained (p99 > {roundtrip.SUSTAINED_P99_MS:g} ms, replies"
                " missing, or the driver could not publish at that rate)"
            )
        )
        if trip.legs:
            row.notes.append(trip.legs)
        if trip.replied != trip.published and "max" not in name:
            row.status = "not sustained"
        rows.append(row)
    return rows


def cache_ratios(results: list[SetupResult]) -> list[str]:
    """Redis rate / memory rate for each row both configurations have."""
    by_cache = {r.setup.cache: r for r in results}
    if not {"memory", "redis"} <= by_cache.keys():
        return []
    memory = {row.name: row for row in by_cache["memory"].rows}
    tag = by_cache["redis"].setup.tag()
    lines = ["Redis / memory (same run, one process; the issue's target: 0.90 or more):"]
    for row in by_cache["redis"].rows:
        base = memory.get(row.name.replace(tag, ""))
        if base is None or not base.rate or not row.rate or row.unit == "ses/s":
            continue
        lines.append(
            f"  {row.name.replace(tag, '')}: {row.rate:,.0f} / {base.rate:,.0f} ="
            f" {row.rate / base.rate:.2f}"
        )
    return lines


def render_scaling(results: list[SetupResult], connections: int) -> str:
    header = [
        "configuration",
        f"outbound req/s @{connections}",
        "p99 ms",
        "out CPU ms/req",
        "inbound msg/s",
        "in CPU ms/msg",
        "checks",
    ]
    body = []
    for r in results:
        out_rows = r.outbound.get(r.setup.processes) or [None]
        out = out_rows[-1]
        status = {row.status for row in r.rows} or {"not run"}
        body.append(
            [
                r.setup.label,
                fmt(out.rate if out else None, ",.0f"),
                fmt(out.p99 if out else None, ".1f"),
                fmt(out.cpu_ms if out else None, ".3f"),
                fmt(r.inbound.rate if r.inbound else None, ",.0f"),
                fmt(r.inbound.cpu_ms if r.inbound else None, ".3f"),
                " + ".join(sorted(status)),
            ]
        )
    widths = [max(len(line[i]) for line in [header, *body]) for i in range(len(header))]

    def line(cells: list[str]) -> str:
        return "  ".join(
            c.ljust(w) if i in (0, 6) else c.rjust(w)
            for i, (c, w) in enumerate(zip(cells, widths, strict=True))
        ).rstrip()

    return "\n".join([line(header), line(["-" * w for w in widths]), *map(line, body)])


def metrics_cost(results: list[SetupResult]) -> list[str]:
    """How much slower each phase ran with metrics on than off (--compare-metrics)."""
    on = {r.name.replace(" [metrics off]", ""): r for r in results[0].rows}
    lines = []
    for off in results[1].rows:
        name = off.name.replace(" [metrics off]", "")
        row = on.get(name)
        if row is None or not row.rate or not off.rate:
            continue
        rate = (row.rate - off.rate) / off.rate * 100
        cpu = ""
        if row.cpu_ms and off.cpu_ms:
            cpu = (
                f"; CPU {row.cpu_ms:.3f} vs {off.cpu_ms:.3f} ms/{row.unit.split('/')[0]}"
                f" ({(row.cpu_ms - off.cpu_ms) / off.cpu_ms * 100:+.1f}%)"
            )
        lines.append(
            f"metrics on vs off, {name}: {row.rate:,.0f} vs {off.rate:,.0f} {row.unit}"
            f" ({rate:+.1f}%){cpu}"
        )
    return lines


def event_url_script(tmp: Path, nginx: Nginx) -> Path:
    """post.lua with an event_url in every request, so the cache is written."""
    text = POST_LUA.read_text()
    old = """wrk.body = '{"to": "+27820000001", "from": "8110", "content": "hello"}'"""
    if old not in text:
        raise BenchError(f"{POST_LUA} has no wrk.body line to add event_url to")
    new = old[:-2] + f', "event_url": "{nginx.url}/event"}}\''
    script = tmp / "post-event-url.lua"
    script.write_text(text.replace(old, new))
    return script


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="5 s wrk runs, 20,000 inbound")
    parser.add_argument("--concurrency", type=int, default=20, help="worker_concurrency")
    parser.add_argument("--duration", type=int, help="seconds per wrk run (15; --quick 5)")
    parser.add_argument("--inbound", type=int, help="inbound messages (100,000; --quick 20,000)")
    parser.add_argument("--events", type=int, default=20_000, help="events (20,000)")
    parser.add_argument("--connections", default="1,16,64", help="wrk connection counts")
    parser.add_argument("--keep-tmp", action="store_true", help="keep the temporary directory")
    parser.add_argument(
        "--state-cache", choices=("memory", "redis"), default="memory", help="(memory)"
    )
    parser.add_argument("--processes", type=int, default=1, help="service processes (1)")
    parser.add_argument(
        "--spread",
        action="store_true",
        help="pin service process i to core (i-1) %% 2 instead of all to core 0",
    )
    parser.add_argument(
        "--balancer", action="store_true", help="outbound through nginx even with 1 process"
    )
    parser.add_argument(
        "--phases",
        default=",".join(ALL_PHASES),
        help="subset of outbound,inbound,events,bare,roundtrip",
    )
    parser.add_argument(
        "--event-url",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="event_url in every outbound request (default: only with --compare-scaling)",
    )
    parser.add_argument(
        "--lazy-queues",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="a queue-mode=lazy policy on the unconsumed outbound queue, as RabbitMQ 3.12+"
        " always has (default: on)",
    )
    parser.add_argument(
        "--tls",
        action="store_true",
        help="also run the phases with the service on amqps (rows marked [tls])",
    )
    parser.add_argument(
        "--compare-code",
        metavar="REF",
        help="also run the phases with the junebug_api of git ref REF (rows marked [REF]),"
        " e.g. the commit before the two AMQP connections",
    )
    parser.add_argument(
        "--compare-scaling",
        action="store_true",
        help="1 process memory, 1 process Redis, 2 processes Redis: outbound @64, inbound",
    )
    parser.add_argument(
        "--compare-channels",
        type=int,
        metavar="N",
        help="one busy channel alone and beside N-1 idle ones: start-up, RSS, outbound, inbound",
    )
    parser.add_argument(
        "--compare-caches",
        action="store_true",
        help="memory and Redis side by side, one process: outbound with event_url @1 and @64,"
        " inbound, session round trip (--phases and --connections narrow it)",
    )
    parser.add_argument(
        "--compare-metrics",
        action="store_true",
        help="every phase with metrics on, then again with metrics_enabled: false",
    )
    args = parser.parse_args()
    global SPREAD
    SPREAD = args.spread
    phases = {p.strip() for p in args.phases.split(",") if p.strip()}
    if not phases or not phases <= set(ALL_PHASES):
        parser.error(f"--phases: a subset of {','.join(ALL_PHASES)}")
    if args.processes < 1:
        parser.error("--processes must be at least 1")
    if args.compare_channels is not None and args.compare_channels < 2:
        parser.error("--compare-channels must be at least 2")
    if args.compare_channels:
        phases = {"outbound", "inbound"} | (phases & {"bare"})
        if args.connections == "1,16,64":
            args.connections = "64"
    if args.compare_scaling:
        args.quick = True
        phases = {"outbound", "inbound"}
        connections = [64]
        setups = [
            Setup("mem1", "1 process, memory cache", 1, "memory", True),
            Setup("redis1", "1 process, Redis cache", 1, "redis", True),
            Setup("redis2", "2 processes, Redis cache", 2, "redis", True),
        ]
        event_url = args.event_url is not False
    elif args.compare_caches:
        if args.phases == parser.get_default("phases"):
            phases = {"outbound", "inbound", "roundtrip"}
        if args.connections == parser.get_default("connections"):
            args.connections = "1,64"
        connections = [int(c) for c in args.connections.split(",")]
        setups = [Setup(k, f"1 process, {k} cache", 1, k, False) for k in ("memory", "redis")]
        event_url = args.event_url is not False
    else:
        connections = [int(c) for c in args.connections.split(",")]
        setups = [
            Setup(
                "main",
                f"{args.processes} process(es), {args.state_cache} cache",
                args.processes,
                args.state_cache,
                args.balancer or args.processes > 1,
            )
        ]
        if args.tls:
            setups.append(Setup("tls", "amqps", 1, "memory", False, tls=True))
        if args.compare_code:
            setups.append(
                Setup("code", args.compare_code, 1, "memory", False, code=args.compare_code)
            )
        event_url = bool(args.event_url)
        if args.compare_metrics:
            main_setup = setups[0]
            setups.append(
                Setup(
                    "nometrics",
                    main_setup.label + ", metrics off",
                    main_setup.processes,
                    main_setup.cache,
                    main_setup.balancer,
                    metrics=False,
                )
            )
    duration = args.duration or (5 if args.quick else 15)
    warmup = 1 if args.quick else 3
    n_inbound = args.inbound or (20_000 if args.quick else 100_000)
    n_events = args.events
    for tool in ("wrk", "taskset"):
        if shutil.which(tool) is None:
            raise BenchError(f"{tool} not found (bench/run installs wrk)")
    if (os.cpu_count() or 1) < 2:
        raise BenchError("needs at least 2 cores (it pins to cores 0 and 1)")

    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    started = time.monotonic()
    before = all_cpu_ticks()
    machine = machine_line()
    rows: list[Row] = []
    results: list[SetupResult] = []
    extra: list[str] = []
    ours: set[int] = set()
    failed = False
    tmp = Path(tempfile.mkdtemp(prefix="jbbench-"))
    tmp.chmod(0o755)  # the RabbitMQ node runs as the rabbitmq user
    say(f"temporary directory {tmp}")
    with contextlib.ExitStack() as stack:
        if args.keep_tmp:
            stack.callback(say, f"kept {tmp}")
        else:
            stack.callback(shutil.rmtree, tmp, ignore_errors=True)
        redis: RedisKeys | None = None
        try:
            if any(s.cache == "redis" for s in setups):
                redis = RedisKeys(REDIS_URL, f"jbbench:{secrets.token_hex(4)}:")
                redis.check()
                stack.callback(redis.cleanup)
                say(f"Redis {REDIS_URL}, key prefix {redis.prefix} (deleted at the end)")
            rabbit = RabbitNode(tmp)
            if args.tls:
                rabbit.enable_tls()
            stack.callback(rabbit.stop)
            rabbit.start()
            if not args.lazy_queues:
                policy = "no queue policy (--no-lazy-queues)"
            elif rabbit.lazy_outbound_queue():
                policy = (
                    f"policy queue-mode=lazy on {CONNECTOR}.outbound, which nothing consumes"
                    " (--no-lazy-queues: without)"
                )
            else:
                policy = "the queue-mode=lazy policy could not be set (see the log above)"
            extra.append(f"RabbitMQ {rabbit.version()}, {policy}")
            nginx = Nginx(tmp)
            stack.callback(nginx.stop)
            nginx.start()
            ours.update(p for p in (rabbit.pid, nginx.worker) if p)
            if nginx.process:
                ours.add(nginx.process.pid)
            broker = Broker(rabbit.port)
            stack.callback(broker.close)
            meter_pids = {"rabbitmq": rabbit.pid, "nginx": nginx.worker}
            if redis is not None:
                meter_pids["redis-server"] = redis_server_pid()

            ceilings: dict[int, float] = {}
            if "bare" in phases:
                bare_rows = bare_phase(tmp, connections, duration, warmup)
                rows += bare_rows
                ceilings = {
                    c: r.rate for c, r in zip(connections, bare_rows, strict=True) if r.rate
                }

            ctx = Context(
                tmp=tmp,
                stack=stack,
                rabbit=rabbit,
                nginx=nginx,
                broker=broker,
                meter_pids=meter_pids,
                ours=ours,
                redis=redis,
                phases=phases,
                connections=connections,
                duration=duration,
                warmup=warmup,
                n_inbound=n_inbound,
                n_events=n_events,
                concurrency=args.concurrency,
                script=event_url_script(tmp, nginx) if event_url else POST_LUA,
                ceilings=ceilings,
                single_via_balancer=not args.compare_scaling,
            )
            if args.compare_channels:
                channel_rows, channel_lines = compare_channels(ctx, args.compare_channels)
                rows += channel_rows
                extra += channel_lines
            for setup in setups if not args.compare_channels else []:
                result = run_setup(ctx, setup)
                results.append(result)
                rows += result.rows
                extra += result.extra
            if args.compare_caches:
                extra += cache_ratios(results)
            if redis is not None and (args.compare_scaling or "outbound" in phases):
                extra += redis_round_trips(tmp, redis)
            if args.compare_metrics:
                extra += metrics_cost(results)
        except BenchError as e:
            shout(f"benchmark aborted: {e}")
            failed = True
        finally:
            if rows:
                processes = max(s.processes for s in setups)
                balanced = any(s.balancer for s in setups)
                shared = (
                    f"{processes} process(es) share that one core"
                    if processes > 1
                    else "one process"
                )
                where = (
                    "service process i on core (i-1) % 2 (--spread)"
                    if SPREAD
                    else f"every service process on core {SERVICE_CORE} (taskset -c"
                    f" {SERVICE_CORE}; {shared})"
                )
                extra.append(
                    f"pinning: {where}; RabbitMQ node, nginx sink"
                    + (", nginx balancer" if balanced else "")
                    + f" and wrk on core {OTHER_CORE}"
                    + ("; the shared Redis is not pinned" if redis is not None else "")
                )
                if balanced:
                    extra.append(
                        "outbound through the nginx balancer (one worker, upstream keepalive 64)"
                        " in front of every process count measured"
                    )
                if event_url:
                    extra.append(
                        "outbound requests carry an event_url, so each writes event info to the"
                        " state cache"
                    )
                extra.append(machine)
                extra.append(other_load(before, ours, time.monotonic() - started))
                notes = [f"  {r.name}: {note}" for r in rows for note in r.notes]
                extra += ["notes:", *notes]
                extra.append(
                    "of ceiling: rate / bare twisted.web at the same connections (inbound,"
                    " events: / bare @64); rates of inbound/events count from the first service"
                    " process's start; CPU ms/op is summed over the service processes; peak RSS"
                    " is the largest VmHWM of them"
                )
                extra.append(f"total run time: {time.monotonic() - started:.0f} s")
                if args.compare_scaling:
                    table = render_scaling(results, connections[0]) + "\n" + "\n".join(extra)
                else:
                    table = render(rows, extra)
                print("\n" + table, flush=True)
                RESULTS.write_text(table + "\n")
                say(f"written to {RESULTS.relative_to(ROOT)}")
    failed = failed or any(r.status != "ok" for r in rows)
    return 1 if failed else 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except BenchError as e:
        shout(str(e))
        sys.exit(1)
