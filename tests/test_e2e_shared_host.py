"""Two channels whose RapidPro is one host that fails (issue 20 item 1).

Both channels' ``mo_url`` are on one local RapidPro stand-in, each at its
own path with its own credentials (a token; user info in the URL). The host
answers 500 for a while, then 200; in a second run it flaps between 500 and
200 every 2 s. The host goes down for both channels at once, so both pause
gates probe it on the same timer, each with a ``basic.get`` on the one
consuming connection: with two such gets in flight on one AMQP channel,
each took the other's message. Wanted: every message reaches its own
channel's URL with its own credentials, exactly one POST of it answered 200,
nothing left unacked or on ``.failed``, and ``/health``'s
``messages_in_work`` back at 0.
"""

from __future__ import annotations

import base64
import json
import subprocess
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import attrs
import pytest
import pytest_twisted
import treq
from twisted.internet import reactor
from twisted.web.resource import Resource
from twisted.web.server import Site

from junebug_api.formats.queue_names import QueueNames

from .support import Broker, ServiceProcess, free_port, inbound_message, pause, wait_for

PER_CHANNEL = 10
TOKEN_A = "tok-a-s3cret"
USER_B, PASSWORD_B = "rp-b", "pw-b-s3cret"


@attrs.frozen
class Post:
    path: str
    authorization: str | None
    channel_id: str
    message_id: str
    status: int


class SharedHost(Resource):
    """The RapidPro host of both channels: answers each POST with
    ``answer()`` (500 or 200) and records it."""

    isLeaf = True

    def __init__(self, answer: Callable[[], int]) -> None:
        super().__init__()
        self.answer = answer
        self.posts: list[Post] = []

    def render_POST(self, request: Any) -> bytes:
        body = json.loads(request.content.read())
        status = self.answer()
        authorization = request.getHeader("authorization")
        self.posts.append(
            Post(
                request.path.decode(),
                authorization,
                body["channel_id"],
                body["message_id"],
                status,
            )
        )
        request.setResponseCode(status)
        return b"{}"


def down_then_up(started: float) -> Callable[[], int]:
    """500 for the first 10 s, then 200."""
    return lambda: 500 if time.monotonic() - started < 10 else 200


def flapping(started: float) -> Callable[[], int]:
    """500 and 200 in turns of 2 s for 24 s, then 200."""

    def answer() -> int:
        elapsed = time.monotonic() - started
        return 500 if elapsed < 24 and int(elapsed / 2) % 2 == 0 else 200

    return answer


@pytest.fixture
def ids() -> Iterator[list[str]]:
    base = f"jb20-{uuid.uuid4().hex[:8]}"
    names = [f"{base}-a", f"{base}-b"]
    yield names
    broker = Broker()
    for name in names:
        for queue in QueueNames.for_connector(name).all():
            broker.delete(queue)
    broker.close()


def queue_counts(names: list[str]) -> dict[str, tuple[int, int]]:
    """name -> (ready, unacked) of the shared broker's queues ``names``."""
    result = subprocess.run(
        [
            "rabbitmqctl",
            "list_queues",
            "name",
            "messages_ready",
            "messages_unacknowledged",
            "-q",
            "--no-table-headers",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    counts = {}
    for line in result.stdout.splitlines():
        parts = line.split("\t")
        if len(parts) == 3 and parts[0] in names:
            counts[parts[0]] = (int(parts[1]), int(parts[2]))
    return counts


async def in_work(service: ServiceProcess, queues: list[str]) -> dict[str, Any]:
    response = await treq.get(service.url + "/health")
    status = json.loads(await response.content())["components"]["amqp"]["queues"]
    return {
        queue: (status[queue]["messages_ready"], status[queue]["messages_in_work"])
        for queue in queues
    }


@pytest.mark.slow
@pytest.mark.parametrize("host", [down_then_up, flapping], ids=lambda h: h.__name__)
@pytest_twisted.ensureDeferred
async def test_channels_on_one_failing_host_each_get_their_own_messages(
    tmp_path: Path, ids: list[str], host: Callable[[float], Callable[[], int]]
) -> None:
    a, b = ids
    port_number = free_port()
    started = time.monotonic()
    rapidpro = SharedHost(host(started))
    port = reactor.listenTCP(port_number, Site(rapidpro), interface="127.0.0.1")
    base = f"http://127.0.0.1:{port_number}"
    credentials = {
        a: f"Token {TOKEN_A}",
        b: "Basic " + base64.b64encode(f"{USER_B}:{PASSWORD_B}".encode()).decode(),
    }
    paths = {a: f"/c/jn/{a}/receive", b: f"/c/jn/{b}/receive"}
    service = ServiceProcess(
        tmp_path,
        {
            "http_bind": f"127.0.0.1:{free_port()}",
            "amqp_heartbeat": 10,
            "delivery_retry_delay": 0.2,
            "delivery_retry_max_delay": 1,
            "delivery_probe_interval": 1,
            "channels": {
                a: {"mo_url": base + paths[a], "mo_url_auth_token": TOKEN_A},
                b: {"mo_url": f"http://{USER_B}:{PASSWORD_B}@127.0.0.1:{port_number}{paths[b]}"},
            },
        },
    ).start()
    broker = Broker()
    try:
        service.wait_healthy(30)
        sent: dict[str, str] = {}
        for n in range(PER_CHANNEL):
            for channel in ids:
                message_id = uuid.uuid4().hex
                sent[message_id] = channel
                broker.publish(
                    f"{channel}.inbound",
                    inbound_message(channel, message_id=message_id, content=f"{channel} {n}"),
                )
            await pause(0.3)

        def delivered() -> Counter[str]:
            return Counter(p.message_id for p in rapidpro.posts if p.status == 200)

        await wait_for(
            lambda: set(delivered()) == set(sent),
            timeout=90,
            what=f"every message delivered ({len(delivered())} of {len(sent)})",
        )
        # Both gates did probe the host while it was down.
        log = service.log()
        for channel in ids:
            assert f"Paused consuming {channel}.inbound" in log

        # Each POST of a message went to its own channel's URL, with its own
        # credentials; each message was answered 200 once.
        for post in rapidpro.posts:
            channel = sent[post.message_id]
            assert (post.channel_id, post.path, post.authorization) == (
                channel,
                paths[channel],
                credentials[channel],
            ), post
        assert delivered() == Counter(sent.keys())

        # Nothing left unacked or on .failed; /health agrees.
        inbound = [f"{channel}.inbound" for channel in ids]
        failed = [f"{channel}.inbound.failed" for channel in ids]
        await wait_for(
            lambda: all(counts == (0, 0) for counts in queue_counts(inbound + failed).values()),
            timeout=15,
            what=f"no message ready or unacked: {queue_counts(inbound + failed)}",
        )
        await pause(1.5)  # the queue monitors' next look
        for _ in range(50):
            health = await in_work(service, inbound)
            if all(value == (0, 0) for value in health.values()):
                break
            await pause(0.2)
        assert health == {queue: (0, 0) for queue in inbound}
        await pause(1)  # a second later: nothing was redelivered
        assert delivered() == Counter(sent.keys())
    finally:
        broker.close()
        service.stop()
        await port.stopListening()
