"""The service processes under test (``twistd -n junebug-api``, each with its
own config file, log and http_bind port) and the bare server, pinned to cores."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import yaml

from .accounting import cpu_ticks, reset_peak_rss, status_kb
from .console import BenchError, say
from .host import file_size, free_port, http_status, tail
from .nginx import Nginx
from .rabbitmq import RabbitNode
from .settings import BASE_PATH, CONNECTOR, HOST, ROOT, SERVICE_CORE, TWISTD


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
    spread: bool = False,
) -> ServiceGroup:
    """n service processes, identical but for http_bind; cache: the
    state_cache_class and state_cache_config (None: the in-memory default);
    extra_config: more options (e.g. ``channels``); tls: amqps to the node's
    TLS listener; code: run the junebug_api found there (a git archive of
    another commit) instead of this checkout's; spread: process i on core
    (i - 1) % 2 instead of all on the service core (--spread)."""
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
        core = str((i - 1) % 2) if spread else SERVICE_CORE
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
