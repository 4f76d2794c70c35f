"""Test helpers: the real service process, a RapidPro stand-in, a broker client.

The broker client is pika (an AMQP implementation independent of the one
under test), used synchronously: every call is short, and the service under
test runs in its own process.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pika
import treq
import yaml
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.task import deferLater
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Site

TWISTD = str(Path(sys.executable).with_name("twistd"))
AMQP_PARAMS = pika.ConnectionParameters(
    "127.0.0.1", 5672, "/", pika.PlainCredentials("guest", "guest")
)
UNICODE_TEXT = "Sawubona, ngiyabonga 👋 ñ 漢字"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def wait_for(
    condition: Callable[[], Any], timeout: float = 10.0, what: str = "condition"
) -> Any:
    """Poll ``condition`` while the reactor runs until it is truthy."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await deferLater(reactor, 0.02)


async def pause(seconds: float = 0.05) -> None:
    """Let the reactor run for a moment (between polls of something remote)."""
    await deferLater(reactor, seconds)


class Broker:
    """A pika connection for publishing to, and reading from, the vumi queues."""

    def __init__(self, params: pika.ConnectionParameters = AMQP_PARAMS) -> None:
        self.connection = pika.BlockingConnection(params)
        self.channel = self.connection.channel()
        self.channel.exchange_declare("vumi", "direct", durable=True)

    def close(self) -> None:
        if self.connection.is_open:
            self.connection.close()

    def declare(self, queue: str) -> None:
        self.channel.queue_declare(queue, durable=True)
        self.channel.queue_bind(queue, "vumi", routing_key=queue)

    def delete(self, queue: str) -> None:
        self.channel.queue_delete(queue)

    def publish(self, routing_key: str, body: bytes | str | dict, **properties: Any) -> None:
        if isinstance(body, dict):
            body = json.dumps(body, ensure_ascii=False)
        if isinstance(body, str):
            body = body.encode("utf-8")
        self.channel.basic_publish(
            "vumi",
            routing_key,
            body,
            pika.BasicProperties(delivery_mode=2, content_type="application/json", **properties),
        )

    def get(self, queue: str) -> tuple[Any, bytes] | None:
        method, props, body = self.channel.basic_get(queue, auto_ack=True)
        return None if method is None else (props, body)

    def count(self, queue: str) -> int:
        return self.channel.queue_declare(queue, durable=True, passive=True).method.message_count

    async def wait_get(self, queue: str, timeout: float = 10.0) -> tuple[Any, bytes]:
        return await wait_for(lambda: self.get(queue), timeout, f"a message on {queue}")

    async def wait_json(self, queue: str, timeout: float = 10.0) -> dict:
        _, body = await self.wait_get(queue, timeout)
        return json.loads(body)


class RapidProSink(Resource):
    """A stand-in RapidPro: records every POST, answers with scripted statuses."""

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.requests: list[dict] = []
        self.statuses: list[int] = []
        self.delay: float = 0.0

    def render_POST(self, request: Any) -> Any:
        body = request.content.read()
        record = {
            "path": request.path.decode(),
            "headers": {
                k.decode().lower(): v[0].decode()
                for k, v in request.requestHeaders.getAllRawHeaders()
            },
            "body": body,
        }
        try:
            record["json"] = json.loads(body)
        except ValueError:
            record["json"] = None
        self.requests.append(record)
        status = self.statuses.pop(0) if self.statuses else 200
        request.setResponseCode(status)
        if self.delay:
            # The client may give up first (a timeout, a stopped channel).
            gone: list[Any] = []
            request.notifyFinish().addErrback(gone.append)

            def answer(_: Any) -> None:
                if not gone:
                    request.write(b'{"ok": true}')
                    request.finish()

            deferLater(reactor, self.delay, lambda: None).addCallback(answer)
            return NOT_DONE_YET
        return b'{"ok": true}'

    def at(self, path: str) -> list[dict]:
        return [r for r in self.requests if r["path"] == path]


def start_sink() -> tuple[RapidProSink, Any, str]:
    """A RapidProSink listening on a free local port, and its base URL."""
    sink = RapidProSink()
    port = reactor.listenTCP(0, Site(sink), interface="127.0.0.1")
    return sink, port, f"http://127.0.0.1:{port.getHost().port}"


class ServiceProcess:
    """``twistd -n junebug-api`` in a subprocess, started as an operator would."""

    def __init__(
        self,
        tmp_path: Path,
        config: dict,
        extra_args: list[str] | None = None,
        env: dict[str, str] | None = None,
        command_prefix: list[str] | None = None,
        allow_log_errors: bool = False,
        twistd: str = TWISTD,
    ) -> None:
        """``command_prefix`` runs twistd under another command (``prlimit ...``);
        ``allow_log_errors`` is for a test that provokes a traceback on purpose:
        otherwise :meth:`stop` fails the test when the log holds one. ``twistd``:
        another virtualenv's (default: the one running the tests)."""
        self.twistd = twistd
        self.config = config
        self.command_prefix = command_prefix or []
        self.allow_log_errors = allow_log_errors
        self.config_path = tmp_path / f"config-{uuid.uuid4().hex[:6]}.yaml"
        self.config_path.write_text(yaml.safe_dump(config), encoding="utf-8")
        self.log_path = tmp_path / f"service-{uuid.uuid4().hex[:6]}.log"
        bind = str(config["http_bind"])
        if bind.startswith("unix:"):
            self.port = 0  # wait_healthy does not apply; the test talks to the socket
        else:
            self.port = int(
                bind.split(":")[1] if bind.startswith("ssl:") else bind.rsplit(":", 1)[1]
            )
        self.url = f"http://127.0.0.1:{self.port}"
        self.extra_args = extra_args or []
        self.env = env
        self.process: subprocess.Popen | None = None

    def start(self) -> ServiceProcess:
        env = dict(os.environ, **(self.env or {}))
        self.process = subprocess.Popen(
            [
                *self.command_prefix,
                self.twistd,
                "-n",
                "--pidfile=",
                f"--logfile={self.log_path}",
                "junebug-api",
                "--config",
                str(self.config_path),
                *self.extra_args,
            ],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            env=env,
        )
        return self

    def wait_healthy(self, timeout: float = 20.0) -> ServiceProcess:
        """Block until ``/health`` says ok (the reactor is not needed for this)."""
        import urllib.request

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise AssertionError(f"service exited {self.process.returncode}:\n{self.log()}")
            try:
                with urllib.request.urlopen(f"{self.url}/health", timeout=1) as r:
                    if r.status == 200:
                        return self
            except OSError:
                pass
            time.sleep(0.05)
        raise AssertionError(f"service not healthy after {timeout} s:\n{self.log()}")

    def log(self) -> str:
        try:
            return self.log_path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return ""

    def signal(self, sig: int) -> None:
        self.process.send_signal(sig)

    def stop(self, timeout: float = 15.0) -> int:
        """SIGTERM and wait; then fail if the log holds an unhandled error or a
        traceback (unless ``allow_log_errors``)."""
        code = self._stop(timeout)
        if not self.allow_log_errors:
            errors = log_errors(self.log())
            if errors:
                raise AssertionError(
                    f"{self.log_path} holds unhandled errors or tracebacks:\n" + "\n".join(errors)
                )
        return code

    def _stop(self, timeout: float) -> int:
        if self.process is None or self.process.poll() is not None:
            return self.process.returncode if self.process else 0
        self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            return self.process.wait()


LOG_ERROR_MARKERS = ("Unhandled Error", "Unhandled error in Deferred", "Traceback")


def log_errors(text: str, context: int = 3) -> list[str]:
    """The lines of a service log that show an unhandled error or a traceback,
    each with the few lines after it."""
    lines = text.splitlines()
    found = []
    for i, line in enumerate(lines):
        if any(marker in line for marker in LOG_ERROR_MARKERS):
            found.append("\n".join(lines[i : i + 1 + context]))
    return found


def inbound_message(connector: str, **fields: Any) -> dict:
    """A vumi inbound user message as a vumi2 USSD transport publishes it."""
    message = {
        "to_addr": "8110",
        "from_addr": "+27820000001",
        "transport_name": connector,
        "transport_type": "ussd",
        "message_version": "20110921",
        "message_type": "user_message",
        "timestamp": "2026-11-26 13:23:18.965428",
        "routing_metadata": {},
        "helper_metadata": {"session_id": "abc"},
        "message_id": uuid.uuid4().hex,
        "in_reply_to": None,
        "provider": "x",
        "session_event": "new",
        "content": "hello",
        "transport_metadata": {"aat_ussd": {"provider": "x"}},
        "group": None,
        "to_addr_type": None,
        "from_addr_type": None,
    }
    message.update(fields)
    return message


def event_message(user_message_id: str, event_type: str, **fields: Any) -> dict:
    """A vumi event for an outbound message."""
    event = {
        "user_message_id": user_message_id,
        "event_type": event_type,
        "message_version": "20110921",
        "message_type": "event",
        "timestamp": "2026-11-26 13:23:18.966336",
        "routing_metadata": {},
        "helper_metadata": {},
        "transport_metadata": {},
        "event_id": uuid.uuid4().hex,
        "sent_message_id": None,
        "nack_reason": None,
        "delivery_status": None,
    }
    event.update(fields)
    return event


async def health(service: ServiceProcess) -> tuple[int, dict]:
    """The service's ``/health``: status code and JSON body."""
    response = await treq.get(service.url + "/health")
    return response.code, json.loads(await response.text())


def as_deferred(coro: Any) -> Deferred:
    return Deferred.fromCoroutine(coro)
