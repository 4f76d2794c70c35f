"""Bytes of memory one cached inbound message costs in InMemoryStateCache.

    python bench/cache_memory.py [--entries N]

Stores N inbound messages (as a vumi2 USSD transport publishes them) and
reports the growth of the process's traced Python memory and of its RSS,
divided by N, and how long the inserts took. Not a test: CI does not run it.
"""

from __future__ import annotations

import argparse
import gc
import resource
import time
import uuid

from twisted.internet.task import Clock

from junebug_api.state.memory_cache import InMemoryStateCache


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


TIMESTAMP = "2026-11-26 13:23:18.965428"


def inbound(message_id: str, transport_name: str = "my-channel") -> dict:
    """A vumi inbound user message as a vumi2 USSD transport publishes it."""
    return {
        "to_addr": "8110",
        "from_addr": "+27820000001",
        "transport_name": transport_name,
        "transport_type": "ussd",
        "message_version": "20110921",
        "message_type": "user_message",
        "timestamp": TIMESTAMP,
        "routing_metadata": {},
        "helper_metadata": {"session_id": "abc"},
        "message_id": message_id,
        "in_reply_to": None,
        "provider": "x",
        "session_event": "new",
        "content": "hello",
        "transport_metadata": {"aat_ussd": {"provider": "x"}},
        "group": None,
        "to_addr_type": None,
        "from_addr_type": None,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--entries", type=int, default=1_000_000)
    args = parser.parse_args()
    clock = Clock()
    cache = InMemoryStateCache(clock, timeout=86400)
    gc.collect()
    rss_before = rss_bytes()
    started = time.perf_counter()
    for _ in range(args.entries):
        cache.store_inbound(inbound(uuid.uuid4().hex))
    elapsed = time.perf_counter() - started
    gc.collect()
    rss_after = rss_bytes()
    print(f"entries: {args.entries:,}")
    per_entry = (rss_after - rss_before) / args.entries
    print(f"RSS growth per entry (key, value, slot): {per_entry:,.0f} bytes")
    per_store = elapsed / args.entries * 1e6
    print(f"store_inbound: {per_store:.2f} us per entry (JSON of a message included)")
    print(f"pending timers: {len(clock.getDelayedCalls())}")
    clock.advance(86400)
    print(
        f"after the timeout: {cache.entry_count()} entries, "
        f"{len(clock.getDelayedCalls())} pending timers"
    )


if __name__ == "__main__":
    main()
