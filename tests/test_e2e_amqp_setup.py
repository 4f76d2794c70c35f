"""AMQP set-up that says what went wrong (issue 12), against the real process.

A broker that accepts TCP and never answers (heartbeats off), a wrong
password, a missing vhost, a closed port: each is one log line with a plain
sentence, ``/health``'s ``error`` holds the same sentence, the service keeps
trying, and nothing in the log is a traceback or an unhandled error.
"""

from __future__ import annotations

import json
import time

import pytest_twisted
import treq
from twisted.internet import protocol, reactor
from twisted.internet.error import ConnectionRefusedError

from .support import free_port, health, pause, wait_for

MESSAGES = "/channels/test-channel/messages"


class Silent(protocol.Protocol):
    """Accepts and never says a word."""

    def connectionMade(self) -> None:
        self.factory.accepted += 1


class SilentFactory(protocol.ServerFactory):
    protocol = Silent
    accepted = 0


async def wait_error(service, timeout: float = 20.0) -> dict:
    """The amqp component of /health once it reports an error."""
    answers: list = []
    deadline = time.monotonic() + timeout
    while True:
        assert service.process.poll() is None, service.log()
        try:
            code, body = await health(service)
        except ConnectionRefusedError:
            code, body = None, None  # not listening yet
        else:
            answers.append((code, body))
            amqp = body["components"]["amqp"]
            if code == 503 and amqp.get("error"):
                return amqp
        assert time.monotonic() < deadline, answers[-1:]
        await pause(0.1)


def assert_clean(log: str) -> None:
    for bad in (
        "Traceback",
        "Unhandled Error",
        "Unhandled error",
        "NoTransition",
        "Failure instance",
    ):
        assert bad not in log, log


async def post_is_503(service) -> None:
    body = json.dumps({"to": "+1", "from": "2", "content": "x"}).encode()
    response = await treq.post(service.url + MESSAGES, data=body)
    assert response.code == 503
    await response.text()


@pytest_twisted.ensureDeferred
async def test_silent_broker_with_heartbeats_off_is_reported_and_retried(make_service):
    factory = SilentFactory()
    port = reactor.listenTCP(0, factory, interface="127.0.0.1")
    try:
        address = f"127.0.0.1:{port.getHost().port}"
        service = make_service(
            wait=False,
            amqp_url=f"amqp://guest:guest@{address}/%2F",
            amqp_heartbeat=0,
            amqp_connect_timeout=1,
        )
        amqp = await wait_error(service)
        assert amqp["error"] == f"no AMQP answer within 1 s from {address}"
        assert amqp["connections"]["publish"]["state"] == "closed"
        await post_is_503(service)
        # Both connections tried, gave up and tried again.
        await wait_for(lambda: factory.accepted >= 4, timeout=20, what="retries")
        await wait_for(
            lambda: service.log().count(f"failed: no AMQP answer within 1 s from {address}") >= 4,
            what="a log line per attempt",
        )
        assert_clean(service.log())
    finally:
        await port.stopListening()


@pytest_twisted.ensureDeferred
async def test_wrong_password_is_reported_as_one(make_service):
    service = make_service(wait=False, amqp_url="amqp://guest:wrong-secret@127.0.0.1:5672/%2F")
    amqp = await wait_error(service)
    assert amqp["error"] == "authentication failed for user guest"
    await post_is_503(service)
    await wait_for(
        lambda: service.log().count("failed: authentication failed for user guest") >= 3,
        timeout=20,
        what="retries",
    )
    log = service.log()
    assert "wrong-secret" not in log
    assert_clean(log)


@pytest_twisted.ensureDeferred
async def test_missing_vhost_and_closed_port_are_sentences(make_service):
    service = make_service(wait=False, amqp_url="amqp://guest:guest@127.0.0.1:5672/no-such-vhost")
    amqp = await wait_error(service)
    assert amqp["error"] == "vhost no-such-vhost not found on 127.0.0.1:5672"
    closed = free_port()
    other = make_service(wait=False, amqp_urls=[f"amqp://127.0.0.1:{closed}"])
    amqp = await wait_error(other)
    assert amqp["error"] == f"connection refused by 127.0.0.1:{closed}"
    assert_clean(service.log() + other.log())


@pytest_twisted.ensureDeferred
async def test_next_broker_of_amqp_urls_from_the_environment(make_service, broker, connector):
    closed = free_port()
    service = make_service(
        wait=False,
        env={"AMQP_URLS": f"amqp://127.0.0.1:{closed}/%2F,amqp://guest:guest@127.0.0.1:5672/%2F"},
    )
    service.wait_healthy()
    _, body = await health(service)
    amqp = body["components"]["amqp"]
    assert amqp["connections"]["publish"]["broker"] == "127.0.0.1:5672"
    assert amqp["connections"]["consume"]["broker"] == "127.0.0.1:5672"
    log = service.log()
    # The first broker refused; the second was tried at once, without a backoff.
    assert f"failed: connection refused by 127.0.0.1:{closed}" in log
    assert "publish connection open to 127.0.0.1:5672" in log
    body = json.dumps({"to": "+1", "from": "2", "content": "via the second"}).encode()
    response = await treq.post(service.url + MESSAGES, data=body)
    assert response.code == 201
    assert (await broker.wait_json(f"{connector}.outbound"))["content"] == "via the second"
    assert_clean(log)
