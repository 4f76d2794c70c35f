"""The channel API against the real ``twistd junebug-api``: old Junebug's
create, modify, delete and restart, the admin credentials, the stores (a
channels file across a restart, one Redis shared by two processes), and
channels created and deleted while another channel takes outbound load."""

from __future__ import annotations

import json
import os
import stat
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
import treq
from twisted.internet.defer import Deferred, gatherResults

from junebug_api.formats.queue_names import QueueNames

from .support import Broker, ServiceProcess, free_port, inbound_message, pause, wait_for
from .test_state_caches import REDIS_URL, RedisKeys

ADMIN = "admin-s3cret-token"
CHANNEL_TOKEN = "channel-s3cret-token"
NEW_TOKEN = "channel-s3cret-new"
TRANSPORT_PASSWORD = "smpp-s3cret-pw"
SECRETS = (ADMIN, CHANNEL_TOKEN, NEW_TOKEN, TRANSPORT_PASSWORD)
BODY = {"type": "smpp", "config": {"system_id": "jb", "password": TRANSPORT_PASSWORD}}


@pytest.fixture
def created() -> Iterator[list[str]]:
    """The channels a test creates: their queues are deleted afterwards."""
    ids: list[str] = []
    yield ids
    broker = Broker()
    for channel_id in ids:
        for queue in QueueNames.for_connector(channel_id).all():
            broker.delete(queue)
    broker.close()


@pytest.fixture
def start(tmp_path: Path, sink: Any, channel_id: str) -> Iterator[Callable[..., ServiceProcess]]:
    """Start a process with the channel API, a config channel ``channel_id``."""
    started: list[ServiceProcess] = []

    def run(config_path: Path | None = None, **options: Any) -> ServiceProcess:
        config = {
            "http_bind": f"127.0.0.1:{free_port()}",
            "mo_message_url": f"{sink.url}/inbound",
            "amqp_heartbeat": 10,
            "delivery_retry_delay": 0.1,
            "channels": {channel_id: {"api_auth_token": CHANNEL_TOKEN}},
            "channel_api": True,
            "admin_auth_token": ADMIN,
            "channel_api_file": str(tmp_path / "channels.yaml"),
            **options,
        }
        service = ServiceProcess(tmp_path, config).start().wait_healthy()
        started.append(service)
        return service

    yield run
    for service in started:
        service.stop()
        for secret in SECRETS:
            assert secret not in service.log(), "a secret in the log"


async def call(
    service: ServiceProcess, method: str, path: str, body: Any = None, auth: str | None = ADMIN
) -> tuple[int, dict]:
    headers = {"Authorization": f"Token {auth}"} if auth else {}
    data = body if isinstance(body, bytes) or body is None else json.dumps(body).encode()
    response = await treq.request(method, service.url + path, data=data, headers=headers)
    text = await response.text()
    for secret in SECRETS:
        assert secret not in text, f"a secret in the answer to {method} {path}"
    return response.code, json.loads(text)


async def create(service: ServiceProcess, created: list[str], **body: Any) -> str:
    code, data = await call(service, "POST", "/channels/", {**BODY, **body})
    assert (code, data["description"]) == (201, "channel created"), data
    created.append(data["result"]["id"])
    return data["result"]["id"]


async def send(service: ServiceProcess, channel_id: str, token: str = CHANNEL_TOKEN) -> int:
    code, _ = await call(
        service,
        "POST",
        f"/channels/{channel_id}/messages",
        {"to": "+27", "from": "8110", "content": "hi"},
        token,
    )
    return code


@pytest_twisted.ensureDeferred
async def test_create_send_receive_modify_restart_delete(
    start: Callable[..., ServiceProcess], sink: Any, broker: Broker, created: list[str]
) -> None:
    service = start()
    new = await create(
        service, created, mo_url=f"{sink.url}/one", api_auth_token=CHANNEL_TOKEN, label="new"
    )
    code, data = await call(service, "GET", f"/channels/{new}")
    assert (code, data["result"]["label"], data["result"]["mo_url"]) == (
        200,
        "new",
        f"{sink.url}/one",
    )
    assert data["result"]["config"]["password"] != TRANSPORT_PASSWORD
    # It sends on its queues, named after its id, and receives.
    assert await send(service, new) == 201
    assert json.loads((await broker.wait_get(f"{new}.outbound"))[1])["content"] == "hi"
    broker.publish(f"{new}.inbound", inbound_message(new))
    await wait_for(lambda: sink.at("/one"), what="the inbound message at mo_url")
    # Modify: the new mo_url and token apply from the next message on.
    code, data = await call(
        service,
        "POST",
        f"/channels/{new}",
        {"mo_url": f"{sink.url}/two", "api_auth_token": NEW_TOKEN},
    )
    assert (code, data["description"], data["result"]["label"]) == (200, "channel updated", "new")
    assert await send(service, new) == 401
    assert await send(service, new, NEW_TOKEN) == 201
    broker.publish(f"{new}.inbound", inbound_message(new))
    await wait_for(lambda: sink.at("/two"), what="the inbound message at the new mo_url")
    assert await call(service, "POST", f"/channels/{new}/restart") == (
        200,
        {"status": 200, "code": "OK", "description": "channel restarted", "result": {}},
    )
    assert await send(service, new, NEW_TOKEN) == 201
    # Delete: 404 at once, its queues and their messages kept.
    code, data = await call(service, "DELETE", f"/channels/{new}")
    assert (code, data["description"], data["result"]) == (200, "channel deleted", {})
    assert await send(service, new, NEW_TOKEN) == 404
    assert (await call(service, "GET", f"/channels/{new}"))[0] == 404
    assert broker.count(f"{new}.outbound") == 2
    assert new not in (await call(service, "GET", "/channels/"))[1]["result"]


@pytest_twisted.ensureDeferred
async def test_credentials_bodies_and_config_channels(
    start: Callable[..., ServiceProcess], channel_id: str, created: list[str]
) -> None:
    service = start()
    for auth in (None, CHANNEL_TOKEN, "wrong"):
        code, data = await call(service, "POST", "/channels/", BODY, auth)
        assert (code, data["result"]["errors"][0]["type"]) == (401, "Unauthorized")
        assert (await call(service, "DELETE", f"/channels/{channel_id}", auth=auth))[0] == 401
    # The admin token also opens the read routes; the channel's token still does.
    for auth in (ADMIN, CHANNEL_TOKEN):
        assert (await call(service, "GET", f"/channels/{channel_id}", auth=auth))[0] == 200
    for body in (b"{", {"config": {}}, {**BODY, "mo_url": "ftp://x"}, {**BODY, "rate": 1}):
        code, data = await call(service, "POST", "/channels/", body)
        assert code == 400, body
    for method, path in (
        ("POST", f"/channels/{channel_id}"),
        ("DELETE", f"/channels/{channel_id}"),
        ("POST", f"/channels/{channel_id}/restart"),
    ):
        code, data = await call(service, method, path, {} if method == "POST" else None)
        assert (code, data["result"]["errors"][0]["type"]) == (403, "ChannelInConfigFile")
    missing = str(uuid.uuid4())
    code, data = await call(service, "DELETE", f"/channels/{missing}")
    assert (code, data["result"]["errors"][0]["type"]) == (404, "ChannelNotFound")
    assert await send(service, channel_id) == 201


@pytest_twisted.ensureDeferred
async def test_the_channels_file_across_a_restart(
    start: Callable[..., ServiceProcess], tmp_path: Path, created: list[str]
) -> None:
    service = start()
    kept = await create(service, created, api_auth_token=CHANNEL_TOKEN)
    gone = await create(service, created)
    assert (await call(service, "DELETE", f"/channels/{gone}"))[0] == 200
    service.stop()
    path = tmp_path / "channels.yaml"
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    again = start()
    assert await send(again, kept) == 201
    assert (await call(again, "GET", f"/channels/{gone}"))[0] == 404


@pytest_twisted.ensureDeferred
async def test_two_processes_on_one_redis(
    start: Callable[..., ServiceProcess], created: list[str]
) -> None:
    keys = RedisKeys(f"jbtest:{uuid.uuid4().hex[:8]}:")
    redis = {
        "state_cache_class": "junebug_api.state_cache.RedisStateCache",
        "state_cache_config": {"url": REDIS_URL, "key_prefix": keys.prefix},
        "channel_api_file": None,
    }
    try:
        one, two = start(**redis), start(**redis)
        new = await create(one, created, api_auth_token=CHANNEL_TOKEN)
        began = time.monotonic()
        await wait_for_status(two, new, 200)
        assert time.monotonic() - began < 5
        assert await send(two, new) == 201
        assert (await call(two, "POST", f"/channels/{new}", {"label": "two"}))[0] == 200
        await wait_for_label(one, new, "two")
        assert (await call(two, "DELETE", f"/channels/{new}"))[0] == 200
        began = time.monotonic()
        await wait_for_status(one, new, 404)
        assert time.monotonic() - began < 5
        third = start(**redis)  # a process started later has the stored channels
        kept = await create(one, created)
        await wait_for_status(third, kept, 200)
    finally:
        keys.clean()


async def wait_for_status(service: ServiceProcess, channel_id: str, status: int) -> None:
    deadline = time.monotonic() + 5
    while (await call(service, "GET", f"/channels/{channel_id}"))[0] != status:
        assert time.monotonic() < deadline, f"{channel_id} not {status} within 5 s"
        await pause(0.1)


async def wait_for_label(service: ServiceProcess, channel_id: str, label: str) -> None:
    deadline = time.monotonic() + 5
    while (await call(service, "GET", f"/channels/{channel_id}"))[1]["result"].get(
        "label"
    ) != label:
        assert time.monotonic() < deadline, f"{channel_id} not {label!r} within 5 s"
        await pause(0.1)


LOAD_CONNECTIONS = 16
CHURN = 30
#: The churned channels ask for no credentials of their own, and the top level sets none.
ADMIN_FREE = None


@pytest_twisted.ensureDeferred
async def test_churn_under_outbound_load(
    start: Callable[..., ServiceProcess], channel_id: str, broker: Broker, created: list[str]
) -> None:
    """30 channels created (each sends one message) and deleted while the config
    channel takes outbound at 16 connections: every request answered 201 (200
    for the deletes), none slower than 2 s, every 201's message on its queue."""
    service = start()
    slowest = [0.0]
    codes: list[int] = []
    churning = [True]

    async def timed(coroutine: Any) -> Any:
        began = time.monotonic()
        result = await coroutine
        slowest[0] = max(slowest[0], time.monotonic() - began)
        return result

    async def load() -> None:
        while churning[0]:
            codes.append(await timed(send(service, channel_id)))

    async def churn() -> None:
        for _ in range(CHURN):
            new = await timed(create(service, created))
            assert await timed(send(service, new, ADMIN_FREE)) == 201
            assert (await timed(call(service, "DELETE", f"/channels/{new}")))[0] == 200
        churning[0] = False

    loads = [Deferred.fromCoroutine(load()) for _ in range(LOAD_CONNECTIONS)]
    await Deferred.fromCoroutine(churn())
    await gatherResults(loads)
    assert set(codes) == {201} and len(codes) > CHURN
    assert slowest[0] < 2, f"the slowest request took {slowest[0]:.2f} s"
    assert broker.count(f"{channel_id}.outbound") == len(codes)
    for new in created:
        assert broker.count(f"{new}.outbound") == 1
