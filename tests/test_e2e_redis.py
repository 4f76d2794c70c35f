"""Scale-out: two real processes sharing Redis; Redis going away and coming back."""

from __future__ import annotations

import json
import subprocess
import time
import uuid

import pytest
import pytest_twisted
import treq

from .support import event_message, free_port, inbound_message, pause, wait_for
from .test_state_caches import REDIS_URL, RedisKeys

MESSAGES = "/channels/test-channel/messages"


@pytest.fixture
def redis_prefix():
    keys = RedisKeys(f"jbtest:{uuid.uuid4().hex[:8]}:")
    yield keys
    keys.clean()


async def post(service, body):
    response = await treq.post(service.url + MESSAGES, data=json.dumps(body).encode())
    return response.code, json.loads(await response.text())


@pytest_twisted.ensureDeferred
async def test_two_processes_share_replies_and_events(
    make_service, broker, connector, sink, redis_prefix
):
    redis_config = {
        "state_cache_class": "junebug_api.state_cache.RedisStateCache",
        "state_cache_config": {"url": REDIS_URL, "key_prefix": redis_prefix.prefix},
        "worker_concurrency": 2,
    }
    first, second = make_service(**redis_config), make_service(**redis_config)
    inbounds = [inbound_message(connector) for _ in range(10)]
    for message in inbounds:
        broker.publish(f"{connector}.inbound", message)
    await wait_for(lambda: len(sink.at("/inbound")) == 10, what="all inbound POSTs")
    # Each inbound, whichever process consumed it, can be replied to through both.
    for message in inbounds:
        for service in (first, second):
            code, answer = await post(service, {"reply_to": message["message_id"], "content": "r"})
            assert code == 201, answer
            reply = await broker.wait_json(f"{connector}.outbound")
            assert reply["in_reply_to"] == message["message_id"]

    # Events for messages sent through one process reach their event_url via either.
    message_ids = []
    for i in range(10):
        code, answer = await post(
            first if i % 2 else second,
            {"to": "+1", "from": "2", "content": "x", "event_url": f"{sink.url}/event/{i}"},
        )
        assert code == 201
        message_ids.append(answer["result"]["message_id"])
    for message_id in message_ids:
        broker.publish(f"{connector}.event", event_message(message_id, "ack"))
    await wait_for(
        lambda: len([r for r in sink.requests if r["path"].startswith("/event/")]) == 10,
        what="all events",
    )
    for i, message_id in enumerate(message_ids):
        [request] = sink.at(f"/event/{i}")
        assert request["json"]["message_id"] == message_id
    logs = first.log() + second.log()
    assert "Redis at redis://127.0.0.1:6379/9 is reachable" in logs

    # A restarted process has lost nothing.
    first.stop()
    third = make_service(**redis_config)
    code, answer = await post(third, {"reply_to": inbounds[0]["message_id"], "content": "r"})
    assert code == 201, answer
    health = json.loads(await (await treq.get(third.url + "/health")).text())
    assert health["components"]["redis"]["health"] == "ok"


class OwnRedis:
    """A redis-server of the test's own, on its own port, to stop and start."""

    def __init__(self) -> None:
        self.port = free_port()
        self.process: subprocess.Popen | None = None

    def start(self) -> None:
        self.process = subprocess.Popen(
            [
                "redis-server",
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
            ],
            stdout=subprocess.DEVNULL,
        )
        import socket

        deadline = time.monotonic() + 10
        while True:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                return
            except OSError:
                assert time.monotonic() < deadline, "redis-server did not start"
                time.sleep(0.05)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(10)


@pytest.fixture
def own_redis():
    server = OwnRedis()
    server.start()
    yield server
    server.stop()


@pytest_twisted.ensureDeferred
async def test_redis_going_away_and_coming_back(make_service, broker, connector, sink, own_redis):
    service = make_service(
        state_cache_class="junebug_api.state_cache.RedisStateCache",
        state_cache_config={"url": f"redis://127.0.0.1:{own_redis.port}/0", "operation_timeout": 1},
        request_timeout=3,
        delivery_max_attempts=1000,
    )
    known = inbound_message(connector)
    broker.publish(f"{connector}.inbound", known)
    await wait_for(lambda: sink.at("/inbound"), what="the first inbound")

    own_redis.stop()

    async def health():
        response = await treq.get(service.url + "/health")
        return response.code, json.loads(await response.text())

    deadline = time.monotonic() + 20
    while (answer := await health())[0] != 503:
        assert time.monotonic() < deadline, answer
        await pause()
    code, body = answer
    assert body["components"]["redis"]["health"] == "down"
    assert body["components"]["amqp"]["health"] == "ok"

    started = time.monotonic()
    code, answer = await post(service, {"reply_to": known["message_id"], "content": "r"})
    assert code == 503, answer
    assert answer["description"] == "service unavailable"
    assert time.monotonic() - started < 3.5

    waiting = inbound_message(connector)
    broker.publish(f"{connector}.inbound", waiting)
    await wait_for(lambda: "state cache unavailable" in service.log(), what="a retry")
    assert len(sink.at("/inbound")) == 1  # not delivered before it could be cached
    assert broker.count(f"{connector}.inbound.failed") == 0

    own_redis.start()  # same port, empty: an in-memory Redis restart forgets
    await wait_for(
        lambda: any(r["json"]["message_id"] == waiting["message_id"] for r in sink.requests),
        timeout=30,
        what="the delayed inbound",
    )
    deadline = time.monotonic() + 20
    while (answer := await health())[0] != 200:
        assert time.monotonic() < deadline, answer
        await pause()
    code, answer = await post(service, {"reply_to": waiting["message_id"], "content": "r"})
    assert code == 201, answer


@pytest_twisted.ensureDeferred
async def test_rediss_with_own_ca(tmp_path):
    """rediss:// to a TLS-only redis-server whose certificate the test made."""
    from twisted.internet import reactor

    from junebug_api.state.cache import EventInfo, make_state_cache

    from .test_e2e_security import make_certificate

    cert, key = make_certificate(tmp_path)
    port = free_port()
    server = subprocess.Popen(
        [
            "redis-server",
            "--port",
            "0",
            "--tls-port",
            str(port),
            "--bind",
            "127.0.0.1",
            "--tls-cert-file",
            str(cert),
            "--tls-key-file",
            str(key),
            "--tls-ca-cert-file",
            str(cert),
            "--tls-auth-clients",
            "no",
            "--save",
            "",
        ],
        stdout=subprocess.DEVNULL,
    )
    try:
        cache = make_state_cache(
            "junebug_api.state_cache.RedisStateCache",
            {
                "url": f"rediss://127.0.0.1:{port}/0",
                "tls_ca_file": str(cert),
                "key_prefix": "jbtest-tls:",
            },
            clock=reactor,
            connector_name="c",
        )
        cache.start()
        try:
            await wait_for(
                lambda: cache.health()["redis"]["health"] == "ok",
                timeout=15,
                what="a TLS connection",
            )
            await cache.store_event_info("ch", "m1", EventInfo("http://rp/e", "t"))
            assert await cache.fetch_event_info("ch", "m1") == EventInfo("http://rp/e", "t")
        finally:
            await cache.close()
    finally:
        server.terminate()
        server.wait(10)
