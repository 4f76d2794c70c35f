"""Bytes one message status (two events: ack and delivery report) costs, per cache.

    python bench/status_memory.py [--messages N] [--redis-url redis://127.0.0.1:6379/9]

In memory: stores N messages' two events in InMemoryStateCache and reports the
growth of the process's RSS divided by N. In Redis: stores 1,000 messages'
two events through RedisStateCache under a random key prefix, reports
Redis's own ``MEMORY USAGE`` of one message's key (and the growth of
``used_memory`` per message), and deletes them again. Not a test: CI does not
run it.
"""

from __future__ import annotations

import argparse
import gc
import resource
import uuid

from twisted.internet import task
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock

from junebug_api.channels.message_status import status_event
from junebug_api.state.memory_cache import InMemoryStateCache

CHANNEL = "bc5c3a6c-5f0d-4a8a-9c8e-3b0f8a2c4d11"  # an old Junebug channel id


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def events(message_id: str) -> list[tuple[str, bytes]]:
    """A message's ack and delivery report, as RabbitMQ brings them, mapped."""
    ack = {
        "message_type": "event",
        "event_type": "ack",
        "user_message_id": message_id,
        "event_id": uuid.uuid4().hex,
        "sent_message_id": message_id,
        "timestamp": "2026-11-26 13:23:18.500000",
    }
    report = {
        **ack,
        "event_type": "delivery_report",
        "event_id": uuid.uuid4().hex,
        "delivery_status": "delivered",
        "timestamp": "2026-11-26 13:23:19.000000",
    }
    return [(e["event_id"], status_event(e, CHANNEL)) for e in (ack, report)]


def memory(n: int) -> None:
    clock = Clock()
    cache = InMemoryStateCache(clock)
    gc.collect()
    before = rss_bytes()
    for _ in range(n):
        message_id = uuid.uuid4().hex
        for event_id, body in events(message_id):
            cache.store_message_event(CHANNEL, message_id, event_id, body)
    gc.collect()
    after = rss_bytes()
    print(f"InMemoryStateCache: {n:,} messages with two events each")
    print(
        f"  RSS growth per message status (key, two event ids and JSONs, tuple, slot):"
        f" {(after - before) / n:,.0f} bytes"
    )


async def redis(url: str) -> None:
    import redis as redis_py

    from junebug_api.state.redis_cache import RedisStateCache

    prefix = f"jbbench:{uuid.uuid4().hex[:8]}:"
    client = redis_py.Redis.from_url(url)
    from twisted.internet import reactor

    cache = RedisStateCache(reactor, url=url, key_prefix=prefix)
    cache.start()
    n = 1000
    try:
        before = client.info("memory")["used_memory"]
        ids = [uuid.uuid4().hex for _ in range(n)]
        for message_id in ids:
            for event_id, body in events(message_id):
                await cache.store_message_event(CHANNEL, message_id, event_id, body)
        after = client.info("memory")["used_memory"]
        usage = client.memory_usage(f"{prefix}events:{CHANNEL}:{ids[0]}", samples=0)
        print(f"RedisStateCache: {n:,} messages with two events each")
        print(f"  MEMORY USAGE of one message's hash: {usage} bytes")
        print(f"  used_memory growth per message: {(after - before) / n:,.0f} bytes")
    finally:
        for key in client.scan_iter(match=f"{prefix}*"):
            client.delete(key)
        client.close()
        await cache.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=200_000)
    parser.add_argument("--redis-url", default="redis://127.0.0.1:6379/9")
    parser.add_argument("--no-redis", action="store_true")
    args = parser.parse_args()
    memory(args.messages)
    if not args.no_redis:
        task.react(lambda reactor: Deferred.fromCoroutine(redis(args.redis_url)))


if __name__ == "__main__":
    main()
