"""One suite, both channel stores (Redis, file): what the channel API and the
store sync see must not depend on which."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import reactor

from junebug_api.channels.store import FileChannelStore, RedisChannelStore, StoreUnavailable
from junebug_api.state.cache import make_state_cache

from .test_state_caches import REDIS_URL, RedisKeys, redis_keys  # noqa: F401 - a fixture


@pytest.fixture(params=["file", "redis"])
def stores(request: Any, tmp_path: Any, redis_keys: RedisKeys) -> Iterator[list[Any]]:  # noqa: F811
    """Two stores on the same place, as two processes have them."""
    if request.param == "file":
        path = str(tmp_path / "channels.yaml")
        yield [FileChannelStore(path), FileChannelStore(path)]
        return
    caches = []
    for _ in range(2):
        cache = make_state_cache(
            "junebug_api.state_cache.RedisStateCache",
            {"url": REDIS_URL, "key_prefix": redis_keys.prefix},
            clock=reactor,
            connector_name="c",
        )
        cache.start()
        caches.append(cache)
    yield [RedisChannelStore(cache) for cache in caches]
    for cache in caches:
        cache.close()


@pytest_twisted.ensureDeferred
async def test_what_one_writes_the_other_reads(stores: list[Any]) -> None:
    one, two = stores
    empty = await two.version()
    assert await two.load() == (empty, {})
    entry = {"type": "smpp", "config": {"password": "pw", "n": 1}, "label": "Sawubona 👋"}
    await one.put("a", entry)
    assert await two.version() != empty
    version, entries = await two.load()
    assert entries == {"a": entry}
    assert version == await two.version()
    await one.put("b", {"character_limit": None})
    assert await two.get("b") == {"character_limit": None}
    assert await two.get("c") is None
    assert await two.delete("a") is True
    assert await one.delete("a") is False
    assert (await one.load())[1] == {"b": {"character_limit": None}}
    assert (await one.load())[0] != version


@pytest_twisted.ensureDeferred
async def test_redis_layout(stores: list[Any], redis_keys: RedisKeys) -> None:  # noqa: F811
    """A hash of id -> JSON entry and a version counter, under the key prefix."""
    if not isinstance(stores[0], RedisChannelStore):
        pytest.skip("Redis only")
    await stores[0].put("a", {"label": "x"})
    prefix = redis_keys.prefix
    assert redis_keys.keys() == sorted(
        [f"{prefix}channels".encode(), f"{prefix}channels:version".encode()]
    )
    raw = redis_keys.client.hget(f"{prefix}channels", "a")
    assert json.loads(raw) == {"label": "x"}
    assert redis_keys.client.get(f"{prefix}channels:version") == b"1"


@pytest_twisted.ensureDeferred
async def test_redis_down_is_store_unavailable() -> None:
    cache = make_state_cache(
        "junebug_api.state_cache.RedisStateCache",
        {"url": "redis://127.0.0.1:9/0", "operation_timeout": 0.2, "key_prefix": "x:"},
        clock=reactor,
        connector_name="c",
    )
    cache.start()
    store = RedisChannelStore(cache)
    try:
        for call in (store.version(), store.load(), store.put("a", {}), store.get("a")):
            with pytest.raises(StoreUnavailable):
                await call
    finally:
        await cache.close()
