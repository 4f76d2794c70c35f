"""``kill -HUP`` on the real process: channels added, changed and removed
from the config file take effect within a second; a broken file and options
that need a restart are one log line each, and the process serves on."""

from __future__ import annotations

import json
import signal
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import pytest_twisted
import treq
import yaml
from twisted.internet import reactor
from twisted.internet.task import deferLater
from twisted.internet.threads import deferToThread

from .support import Broker, ServiceProcess, free_port, inbound_message, wait_for

pytestmark = pytest.mark.e2e

TOKEN = "reload-t0ken-one"
NEW_TOKEN = "reload-t0ken-two"


@pytest.fixture
def ids(channel_id: str, connector: str) -> list[str]:
    """Two channel ids no other test uses (conftest deletes their queues afterwards)."""
    return [channel_id, connector]


@pytest.fixture
def start(tmp_path: Path) -> Iterator[Callable[[dict], ServiceProcess]]:
    started: list[ServiceProcess] = []

    def run(config: dict) -> ServiceProcess:
        service = ServiceProcess(tmp_path, {"http_bind": f"127.0.0.1:{free_port()}", **config})
        started.append(service.start().wait_healthy())
        return service

    yield run
    for service in started:
        service.stop()


def rewrite(service: ServiceProcess, config: dict) -> None:
    """Write the service's config file anew (as an operator edits it) and SIGHUP it."""
    text = yaml.safe_dump({"http_bind": service.config["http_bind"], **config})
    service.config_path.write_text(text, encoding="utf-8")
    service.signal(signal.SIGHUP)


async def post(service: ServiceProcess, channel_id: str, token: str | None = None) -> int:
    headers = {"Authorization": f"Token {token}"} if token else {}
    body = {"to": "+2782", "from": "8110", "content": "hi"}
    response = await treq.post(
        f"{service.url}/channels/{channel_id}/messages",
        json.dumps(body).encode(),
        headers=headers,
    )
    await response.content()
    return response.code


async def listed(service: ServiceProcess) -> list[str]:
    response = await treq.get(service.url + "/channels/")
    return (await response.json())["result"]


def lines(service: ServiceProcess, text: str) -> list[str]:
    return [line for line in service.log().splitlines() if text in line]


@pytest_twisted.ensureDeferred
async def test_sighup_adds_a_channel_and_changes_another(start, ids, sink) -> None:
    a, b = ids
    broker = Broker()
    try:
        config = {"channels": {a: {"mo_url": f"{sink.url}/a", "api_auth_token": TOKEN}}}
        service = start(config)
        assert await post(service, a, TOKEN) == 201
        changed = {"mo_url": f"{sink.url}/a-new", "api_auth_token": NEW_TOKEN}
        rewrite(service, {"channels": {a: changed, b: {"mo_url": f"{sink.url}/b"}}})
        signalled = time.monotonic()

        async def added() -> bool:
            return b in await listed(service)

        while not await added():
            assert time.monotonic() - signalled < 1.0, "channel b not served within 1 s"
        # b sends and receives.
        assert await post(service, b) == 201
        assert (await broker.wait_json(f"{b}.outbound"))["transport_name"] == b
        broker.publish(f"{b}.inbound", inbound_message(b, content="to b"))
        [request] = await wait_for(lambda: sink.at("/b"), 1.0, "b's inbound POST")
        assert request["json"]["content"] == "to b"
        # a takes its new token and URL from the next request and message on.
        assert await post(service, a, TOKEN) == 401
        assert await post(service, a, NEW_TOKEN) == 201
        broker.publish(f"{a}.inbound", inbound_message(a, content="to a"))
        [request] = await wait_for(lambda: sink.at("/a-new"), 2.0, "a's inbound POST")
        assert request["json"]["content"] == "to a" and sink.at("/a") == []
        assert len(lines(service, "SIGHUP: config reloaded")) == 1
        assert NEW_TOKEN not in service.log() and TOKEN not in service.log()
    finally:
        broker.close()


@pytest_twisted.ensureDeferred
async def test_sighup_removes_a_channel_and_keeps_its_messages(start, ids, sink) -> None:
    a, b = ids
    broker = Broker()
    try:
        sink.delay = 2.0  # a's message stays in work until the stop gives up on it
        both = {a: {"mo_url": f"{sink.url}/a"}, b: {"mo_url": f"{sink.url}/b"}}
        service = start({"shutdown_timeout": 0.5, "channels": both})
        broker.publish(f"{a}.inbound", inbound_message(a, content="in work"))
        await wait_for(lambda: sink.at("/a"), 5.0, "a's inbound POST")
        rewrite(service, {"shutdown_timeout": 0.5, "channels": {b: both[b]}})
        signalled = time.monotonic()
        while await post(service, a) != 404:
            assert time.monotonic() - signalled < 1.0, "channel a still served after 1 s"
        assert await listed(service) == [b]
        # Its message in work goes back to its queue; what comes later waits there.
        broker.publish(f"{a}.inbound", inbound_message(a, content="later"))
        await wait_for(lambda: broker.count(f"{a}.inbound") == 2, 3.0, "a's messages queued")
        assert await post(service, b) == 201
        await wait_for(lambda: lines(service, "went back to their queue"), 2.0, "the log line")
    finally:
        broker.close()


@pytest_twisted.ensureDeferred
async def test_sighup_with_a_broken_file_or_a_restart_option_is_one_line(start, ids, sink) -> None:
    a, _ = ids
    config = {"request_timeout": 60, "channels": {a: {"mo_url": f"{sink.url}/a"}}}
    service = start(config)
    service.config_path.write_text("channels: [\n", encoding="utf-8")
    service.signal(signal.SIGHUP)
    await wait_for(lambda: lines(service, "SIGHUP"), 2.0, "the reload's log line")
    [line] = lines(service, "SIGHUP")
    assert "config not reloaded, the running configuration stays" in line
    assert await post(service, a) == 201
    # An option that needs a restart: named once, left as it was; the rest applies.
    rewrite(service, {**config, "request_timeout": 5, "character_limit": 1})
    await wait_for(lambda: lines(service, "SIGHUP: config reloaded"), 2.0, "the reload")
    [line] = lines(service, "need(s) a restart")
    assert "request_timeout" in line and "character_limit" not in line
    assert await post(service, a) == 400  # "hi" is now over the limit of 1


@pytest_twisted.ensureDeferred
async def test_sighup_during_a_graceful_stop_does_not_end_the_process(start, ids, sink) -> None:
    """logrotate's ``kill -HUP`` while SIGTERM's stop lets a message in work
    finish: the process is not ended by SIGHUP's default action; the stop
    runs its course (its message back to its queue) as without it."""
    a, _ = ids
    broker = Broker()
    try:
        sink.delay = 5.0  # a's message stays in work through the stop
        service = start({"shutdown_timeout": 2, "channels": {a: {"mo_url": f"{sink.url}/a"}}})
        broker.publish(f"{a}.inbound", inbound_message(a, content="in work"))
        await wait_for(lambda: sink.at("/a"), 5.0, "a's inbound POST")
        service.signal(signal.SIGTERM)
        # Past the HTTP drain (0.5 s), inside the 2 s given to the message in work.
        await deferLater(reactor, 1.0, lambda: None)
        service.signal(signal.SIGHUP)
        # twistd ends itself with the signal that stopped it, once the stop is done.
        assert await deferToThread(service.process.wait, 10) == -signal.SIGTERM
        assert lines(service, "SIGHUP ignored: the service is stopping")
        assert lines(service, "junebug-api stopped")
        await wait_for(lambda: broker.count(f"{a}.inbound") == 1, 3.0, "a's message queued")
    finally:
        broker.close()
