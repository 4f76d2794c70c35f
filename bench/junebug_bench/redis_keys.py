"""The shared Redis, seen only through the benchmark's key prefix."""

from __future__ import annotations

import contextlib
from pathlib import Path

from .console import BenchError, say, shout


class RedisKeys:
    """The shared Redis, seen only through the benchmark's key prefix."""

    def __init__(self, url: str, prefix: str) -> None:
        import redis

        self.url = url
        self.prefix = prefix
        self.client = redis.Redis.from_url(url, socket_timeout=10, socket_connect_timeout=5)

    def check(self) -> None:
        try:
            self.client.ping()
        except Exception as e:
            raise BenchError(f"Redis at {self.url} does not answer: {e}") from None

    def count(self, kind: str = "") -> int:
        return sum(1 for _ in self.client.scan_iter(match=f"{self.prefix}{kind}*", count=1000))

    def delete(self) -> int:
        """Delete every key under the prefix (SCAN MATCH + DEL); how many."""
        deleted = 0
        batch: list[bytes] = []
        for key in self.client.scan_iter(match=f"{self.prefix}*", count=1000):
            batch.append(key)
            if len(batch) >= 1000:
                deleted += self.client.delete(*batch)
                batch = []
        if batch:
            deleted += self.client.delete(*batch)
        return deleted

    def cleanup(self) -> None:
        try:
            deleted = self.delete()
            left = self.count()
        except Exception as e:
            shout(f"could not delete the keys under {self.prefix} in {self.url}: {e}")
            return
        say(f"Redis: deleted {deleted:,} key(s) under {self.prefix}; {left} left")


def redis_server_pid() -> int | None:
    """The shared redis-server's pid, for its CPU share (None if not visible)."""
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                if (entry / "cmdline").read_bytes().startswith(b"redis-server"):
                    return int(entry.name)
    return None
