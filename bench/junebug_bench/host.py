"""The local machine as the benchmark uses it: commands with a timeout, free
ports, HTTP probes and the ends of log files."""

from __future__ import annotations

import socket
import subprocess
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from .console import BenchError
from .settings import HOST

HTTP = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # never via a proxy


def run(cmd: list[str], timeout: float, **kwargs: Any) -> subprocess.CompletedProcess:
    """cmd to its end, no stdin, output captured as text."""
    return subprocess.run(
        cmd, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=timeout, **kwargs
    )


_used_ports: set[int] = set()


def free_port() -> int:
    """A free port on HOST, never one this run handed out before."""
    for _ in range(100):
        with socket.socket() as s:
            s.bind((HOST, 0))
            port = s.getsockname()[1]
        if port not in _used_ports:
            _used_ports.add(port)
            return port
    raise BenchError("no free port found")


def port_open(port: int) -> bool:
    """Whether something accepts connections on HOST:port."""
    try:
        socket.create_connection((HOST, port), timeout=1).close()
        return True
    except OSError:
        return False


def http_status(url: str, data: bytes | None = None) -> int | None:
    """The status of a GET (or a JSON POST of data); None when nothing answers."""
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
    """The last lines of a log, for an error message."""
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return f"({path} unreadable)"


def file_size(path: Path) -> int:
    """The size of path, 0 while it does not exist (a log not written yet)."""
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0
