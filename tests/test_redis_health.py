"""Redis health follows the connection, not one failed operation."""

from __future__ import annotations

import uuid

import pytest
import pytest_twisted
import redis
from twisted.internet import reactor

from junebug_api.state.cache import make_state_cache
from junebug_api.state.redis_cache import RedisUnavailable

from .support import free_port, wait_for

REDIS_URL = "redis://127.0.0.1:6379/9"


@pytest_twisted.ensureDeferred
async def test_one_failed_operation_does_not_flip_health():
    prefix = f"jbtest:{uuid.uuid4().hex[:8]}:"
    client = redis.Redis.from_url(REDIS_URL)
    cache = make_state_cache(
        "junebug_api.state_cache.RedisStateCache",
        {"url": REDIS_URL, "key_prefix": prefix},
        clock=reactor,
        connector_name="c",
    )
    cache.start()
    try:
        await wait_for(lambda: cache.health()["redis"]["health"] == "ok", what="redis ok")
        # A key of the wrong type: GET fails (WRONGTYPE) while Redis is fine.
        client.rpush(f"{prefix}inbound:m1", "x")
        with pytest.raises(Exception, match="WRONGTYPE"):
            await cache.fetch_inbound("m1")
        assert cache.health()["redis"]["health"] == "ok"
    finally:
        await cache.close()
        client.delete(f"{prefix}inbound:m1")
        client.close()


@pytest_twisted.ensureDeferred
async def test_an_unanswered_operation_fails_with_a_readable_cause():
    """Without Redis an operation fails after operation_timeout with a sentence
    naming the cause (the log lines of 503s and retries print it), not with
    Twisted's bare TimeoutError, which reads "(0.3, 'Deferred')"."""
    cache = make_state_cache(
        "junebug_api.state_cache.RedisStateCache",
        {"url": f"redis://127.0.0.1:{free_port()}/0", "operation_timeout": 0.3},
        clock=reactor,
        connector_name="c",
    )
    cache.start()
    try:
        with pytest.raises(RedisUnavailable) as e:
            await cache.fetch_inbound("m1")
        # The cause in brackets: "not connected yet" or the refused connection.
        assert str(e.value).startswith("Redis: no answer within 0.3 s (")
        assert "Deferred" not in str(e.value)
        await wait_for(lambda: cache.health()["redis"]["health"] == "down", what="redis down")
    finally:
        await cache.close()
