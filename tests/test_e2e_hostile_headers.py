"""Hostile x-junebug-* headers strand nothing: messages carrying values no
run of the service writes (a double far in the past, counts at the edge of
64 bits) in front of good messages, with two prefetch slots; every good
message is delivered, the hostile ones delivered or parked on ``.failed``
with a log line naming them, and nothing is left unacked."""

from __future__ import annotations

import json
import struct
import time
from typing import Any

import pika
import pytest_twisted

from .support import Broker, health, inbound_message, pause, wait_for


def _shortstr(text: str) -> bytes:
    data = text.encode()
    return bytes((len(data),)) + data


def field_table(fields: list[tuple[str, bytes, bytes]]) -> bytes:
    """An AMQP field table of ``(name, type octet, packed value)``: any type,
    doubles (``d``) too, which pika cannot send."""
    payload = b"".join(_shortstr(name) + kind + value for name, kind, value in fields)
    return struct.pack(">I", len(payload)) + payload


class RawHeaders(pika.BasicProperties):
    """Persistent JSON properties whose headers table is given as bytes."""

    def __init__(self, table: bytes) -> None:
        super().__init__(content_type="application/json", delivery_mode=2)
        self.table = table

    def encode(self) -> list[bytes]:
        flags = self.FLAG_CONTENT_TYPE | self.FLAG_HEADERS | self.FLAG_DELIVERY_MODE
        return [struct.pack(">H", flags), _shortstr("application/json"), self.table, b"\x02"]


HOSTILE = {
    "first-failure-past": [("x-junebug-first-failure", b"d", struct.pack(">d", -1e300))],
    "attempts-max": [("x-junebug-attempts", b"l", struct.pack(">q", 2**63 - 1))],
    # A timestamp: unsigned 64 bits (RabbitMQ takes no "L" field).
    "holds-unsigned": [("x-junebug-holds", b"T", struct.pack(">Q", 2**64 - 1))],
    "first-failure-future": [
        ("x-junebug-first-failure", b"d", struct.pack(">d", 1e300)),
        # A string (RabbitMQ refuses a NaN double: INTERNAL_ERROR).
        ("x-junebug-attempts", b"S", struct.pack(">I", 1) + b"3"),
    ],
}


@pytest_twisted.ensureDeferred
async def test_hostile_retry_headers_in_front_of_good_messages(
    make_service: Any, broker: Broker, connector: str, sink: Any
) -> None:
    service = make_service(worker_concurrency=2, delivery_max_attempts=3)
    inbound = f"{connector}.inbound"
    # Two hostile messages that are fine otherwise (delivered), two whose
    # body is no vumi message (parked on .failed, headers written again).
    hostile: dict[str, tuple[str, bool]] = {}
    for n, (name, fields) in enumerate(HOSTILE.items()):
        message = inbound_message(connector, message_id=f"hostile-{name}")
        poison = n % 2 == 1
        if poison:
            del message["to_addr"]
        hostile[message["message_id"]] = (name, poison)
        broker.channel.basic_publish(
            "vumi", inbound, json.dumps(message).encode(), RawHeaders(field_table(fields))
        )
    good = [inbound_message(connector) for _ in range(5)]
    for message in good:
        broker.publish(inbound, message)

    def delivered() -> set[str]:
        return {r["json"]["message_id"] for r in sink.at("/inbound")}

    wanted = {m["message_id"] for m in good} | {m for m, (_, p) in hostile.items() if not p}
    await wait_for(lambda: wanted <= delivered(), 20, "every good message delivered")
    await wait_for(lambda: broker.count(f"{inbound}.failed") == 2, 20, "the poison ones on .failed")
    parked = []
    while (got := broker.get(f"{inbound}.failed")) is not None:
        properties, body = got
        parked.append(json.loads(body)["message_id"])
        headers = properties.headers
        assert headers["x-junebug-attempts"] == 1
        assert headers["x-junebug-holds"] == 0
        assert 0 < headers["x-junebug-first-failure"] < 2**40
        assert headers["x-junebug-source-queue"] == inbound
    assert sorted(parked) == sorted(m for m, (_, poison) in hostile.items() if poison)
    assert len(sink.at("/inbound")) == len(wanted)  # each once

    # Nothing held: /health says so, and once the service is gone nothing
    # comes back to the queue (an unacked delivery would).
    async def in_work() -> Any:
        _, body = await health(service)
        return body["components"]["amqp"]["queues"][inbound]["messages_in_work"]

    await wait_for_async(lambda: in_work(), lambda n: n == 0, "messages_in_work 0")
    log = service.log()
    for message_id, (name, _) in hostile.items():
        [line] = [line for line in log.splitlines() if message_id in line and "ignored" in line]
        for header, _, _ in HOSTILE[name]:
            assert header in line
    assert "Unexpected error" not in log
    service.stop()
    assert broker.count(inbound) == 0
    assert broker.count(f"{inbound}.failed") == 0


async def wait_for_async(get: Any, done: Any, what: str, timeout: float = 15.0) -> Any:
    """Poll the coroutine ``get()`` until ``done(value)``."""
    deadline = time.monotonic() + timeout
    while True:
        value = await get()
        if done(value):
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what} (last: {value!r})")
        await pause(0.25)
