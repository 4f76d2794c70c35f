"""Throttling is not failure: RapidPro answering 429 with Retry-After for
~15 s, with a retry budget of 3 attempts, dead-letters nothing; everything
is delivered once it answers 200 again, and meanwhile it is asked no more
often than its Retry-After allows."""

from __future__ import annotations

import itertools
import json
import time
import uuid
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.web.resource import Resource
from twisted.web.server import Site

from .support import Broker, event_message, health, inbound_message, wait_for

RETRY_AFTER = 3
THROTTLE = 15.0
MESSAGES = 10


class ThrottlingRapidPro(Resource):
    """Answers 429 with ``Retry-After`` until ``until`` (monotonic), then 200;
    records when each POST came, to where, with which id, and the answer."""

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.until = 0.0
        self.seen: list[tuple[float, str, str, int]] = []

    def render_POST(self, request: Any) -> bytes:
        now = time.monotonic()
        code = 429 if now < self.until else 200
        message_id = json.loads(request.content.read())["message_id"]
        self.seen.append((now, request.path.decode(), message_id, code))
        request.setResponseCode(code)
        if code == 429:
            request.setHeader(b"Retry-After", str(RETRY_AFTER).encode())
        return b"{}"

    def delivered(self, path: str) -> list[str]:
        return [m for _, p, m, code in self.seen if p == path and code == 200]


@pytest.mark.slow
@pytest_twisted.ensureDeferred
async def test_429_with_a_small_retry_budget_dead_letters_nothing(
    make_service: Any, broker: Broker, connector: str
) -> None:
    rapidpro = ThrottlingRapidPro()
    port = reactor.listenTCP(0, Site(rapidpro), interface="127.0.0.1")
    url = f"http://127.0.0.1:{port.getHost().port}"
    try:
        service = make_service(
            mo_message_url=f"{url}/inbound",
            default_event_url=f"{url}/event",
            delivery_max_attempts=3,
            delivery_probe_interval=1,
        )
        rapidpro.until = time.monotonic() + THROTTLE
        inbound = [inbound_message(connector) for _ in range(MESSAGES)]
        events = [event_message(uuid.uuid4().hex, "ack") for _ in range(MESSAGES)]
        for message, event in zip(inbound, events, strict=True):
            broker.publish(f"{connector}.inbound", message)
            broker.publish(f"{connector}.event", event)

        down = await wait_for(lambda: rapidpro.seen, 10, "the first POST")
        first = down[0][0]
        code, body = await health(service)
        assert code == 200
        [entry] = body["components"]["deliveries"]["destinations_down"].values()
        assert "throttled_until" in entry

        inbound_ids = {m["message_id"] for m in inbound}
        event_ids = {e["user_message_id"] for e in events}
        await wait_for(
            lambda: (
                set(rapidpro.delivered("/inbound")) == inbound_ids
                and set(rapidpro.delivered("/event")) == event_ids
            ),
            THROTTLE + 45,
            "every message and event delivered",
        )
        assert broker.count(f"{connector}.inbound.failed") == 0
        assert broker.count(f"{connector}.event.failed") == 0

        throttled = [t for t, _, _, code in rapidpro.seen if code == 429]
        # At first, every delivery in flight at once gets its 429; after
        # that, one probe per Retry-After at most.
        burst = [t for t in throttled if t - first < 1]
        probes = [t for t in throttled if t - first >= 1]
        assert len(burst) <= 2 * MESSAGES
        assert len(probes) <= THROTTLE / RETRY_AFTER + 1, probes
        for a, b in itertools.pairwise([first, *probes]):
            assert b - a >= RETRY_AFTER - 0.5, (a, b)
        log = service.log()
        assert "asks to wait" in log
        assert "is back after" in log
        assert "Undeliverable" not in log
    finally:
        await port.stopListening()
