"""nginx as the RapidPro sink (every request body logged), and as the balancer
in front of several service processes; both one worker on the other core."""

from __future__ import annotations

import json
import os
import pwd
import shutil
import signal
import subprocess
import time
import uuid
from pathlib import Path
from typing import Any

from .accounting import children_of
from .console import BenchError, say
from .host import free_port, http_status, port_open, run, tail
from .settings import HOST, OTHER_CORE

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
