"""One suite, both state caches: what the service sees must not depend on which."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from typing import Any

import pytest
import pytest_twisted
import redis
from twisted.internet import reactor
from twisted.internet.task import Clock

from junebug_api.config.model import ConfigError
from junebug_api.state.cache import EventInfo, make_state_cache
from junebug_api.state.memory_cache import InMemoryStateCache

from .support import inbound_message, wait_for

REDIS_URL = "redis://127.0.0.1:6379/9"


class RedisKeys:
    """The keys under one test prefix in the test database, removed afterwards."""

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix
        self.client = redis.Redis.from_url(REDIS_URL)

    def keys(self) -> list[bytes]:
        return sorted(self.client.scan_iter(match=f"{self.prefix}*"))

    def ttl(self, key: bytes) -> int:
        return self.client.ttl(key)

    def clean(self) -> None:
        for key in self.keys():
            self.client.delete(key)
        self.client.close()


@pytest.fixture
def redis_keys() -> Iterator[RedisKeys]:
    keys = RedisKeys(f"jbtest:{uuid.uuid4().hex[:8]}:")
    yield keys
    keys.clean()


class MemoryCase:
    name = "memory"

    def __init__(self) -> None:
        self.clock = Clock()

    def make(self, message_status_ttl: float = 172800, **options: Any) -> Any:
        return make_state_cache(
            "junebug_api.state_cache.InMemoryStateCache",
            options,
            clock=self.clock,
            connector_name="c",
            message_status_ttl=message_status_ttl,
        )

    async def expire(self, cache: Any, seconds: float) -> None:
        self.clock.advance(seconds)


class RedisCase:
    name = "redis"

    def __init__(self, keys: RedisKeys) -> None:
        self.keys = keys

    def make(self, message_status_ttl: float = 172800, **options: Any) -> Any:
        cache = make_state_cache(
            "junebug_api.state_cache.RedisStateCache",
            {"url": REDIS_URL, "key_prefix": self.keys.prefix, **options},
            clock=reactor,
            connector_name="c",
            message_status_ttl=message_status_ttl,
        )
        cache.start()
        self.opened.append(cache)
        return cache

    async def expire(self, cache: Any, seconds: float) -> None:
        # Redis expires on its own clock: wait until the keys are gone.
        await wait_for(lambda: not self.keys.keys(), timeout=seconds + 3, what="expiry")


@pytest.fixture(params=["memory", "redis"])
def case(request: Any, redis_keys: RedisKeys) -> Iterator[Any]:
    if request.param == "memory":
        yield MemoryCase()
        return
    redis_case = RedisCase(redis_keys)
    redis_case.opened = []
    yield redis_case
    for cache in redis_case.opened:
        cache.close()


@pytest_twisted.ensureDeferred
async def test_inbound_round_trip(case):
    cache = case.make()
    message = inbound_message("my-channel", transport_metadata={"aat": "Sawubona 👋 漢字"})
    await cache.store_inbound(message)
    stored = await cache.fetch_inbound(message["message_id"])
    assert stored == {
        "message_id": message["message_id"],
        "to_addr": "8110",
        "from_addr": "+27820000001",
        "transport_name": "my-channel",
        "transport_type": "ussd",
        "transport_metadata": {"aat": "Sawubona 👋 漢字"},
        "provider": "x",
        "group": None,
        "to_addr_type": None,
        "from_addr_type": None,
    }
    assert await cache.fetch_inbound("unknown") is None
    await cache.delete_inbound(message["message_id"])
    assert await cache.fetch_inbound(message["message_id"]) is None


@pytest_twisted.ensureDeferred
async def test_event_info_round_trip(case):
    cache = case.make()
    await cache.store_event_info("ch", "m1", EventInfo("http://rp/e?x=1", "tök"))
    await cache.store_event_info("ch", "m2", EventInfo("http://rp/e2", None))
    assert await cache.fetch_event_info("ch", "m1") == EventInfo("http://rp/e?x=1", "tök")
    assert await cache.fetch_event_info("ch", "m2") == EventInfo("http://rp/e2", None)
    assert await cache.fetch_event_info("ch", "m3") is None
    await cache.delete_event_info("ch", "m1")
    assert await cache.fetch_event_info("ch", "m1") is None


@pytest_twisted.ensureDeferred
async def test_store_event_info_false_stores_nothing(case):
    cache = case.make(store_event_info=False)
    await cache.store_event_info("ch", "m1", EventInfo("http://rp/e", "t"))
    assert await cache.fetch_event_info("ch", "m1") is None


@pytest_twisted.ensureDeferred
async def test_entries_expire_after_timeout(case):
    cache = case.make(timeout=1)
    message = inbound_message("c")
    await cache.store_inbound(message)
    await cache.store_event_info("ch", "m1", EventInfo("http://rp/e", None))
    assert await cache.fetch_inbound(message["message_id"]) is not None
    await case.expire(cache, 1)
    assert await cache.fetch_inbound(message["message_id"]) is None
    assert await cache.fetch_event_info("ch", "m1") is None


@pytest.mark.parametrize(
    ("options", "error"),
    [
        ({"colour": 1}, "unknown option state_cache_config.colour"),
        ({"timeout": "x"}, "state_cache_config.timeout must be of type float"),
        ({"timeout": 0}, "state_cache_config.timeout must be greater than 0"),
        ({"store_event_info": "yes"}, "state_cache_config.store_event_info must be of type bool"),
    ],
)
@pytest.mark.parametrize(
    "path",
    ["junebug_api.state_cache.InMemoryStateCache", "junebug_api.state_cache.RedisStateCache"],
)
def test_bad_options(path, options, error):
    with pytest.raises(ConfigError, match=error):
        make_state_cache(path, options, clock=Clock(), connector_name="c")


@pytest.mark.parametrize(
    ("url", "error"),
    [
        ("http://x", "must start with redis://"),
        ("redis://x:notaport/0", "invalid port"),
        ("redis://x:6379/zero", "database number"),
    ],
)
def test_bad_redis_urls(url, error):
    with pytest.raises(ConfigError, match=error):
        make_state_cache(
            "junebug_api.state_cache.RedisStateCache",
            {"url": url},
            clock=Clock(),
            connector_name="c",
        )


@pytest_twisted.ensureDeferred
async def test_redis_keys_ttl_and_prefix(redis_keys):
    cache = RedisCase(redis_keys)
    cache.opened = []
    store = cache.make(timeout=3600)
    try:
        message = inbound_message("c")
        await store.store_inbound(message)
        await store.store_event_info("ch", "m1", EventInfo("http://rp/e", None))
        keys = redis_keys.keys()
        assert keys == sorted(
            [
                f"{redis_keys.prefix}inbound:{message['message_id']}".encode(),
                f"{redis_keys.prefix}event-info:ch:m1".encode(),
            ]
        )
        for key in keys:
            assert 3590 < redis_keys.ttl(key) <= 3600
        # A compact value: only what a reply needs.
        assert len(redis_keys.client.get(keys[1])) < 200
    finally:
        store.close()


@pytest_twisted.ensureDeferred
async def test_default_key_prefix_names_the_connector():
    connector = f"jbtest-{uuid.uuid4().hex[:8]}"
    keys = RedisKeys(f"junebug:{connector}:")
    cache = make_state_cache(
        "junebug_api.state_cache.RedisStateCache",
        {"url": REDIS_URL},
        clock=reactor,
        connector_name=connector,
    )
    cache.start()
    try:
        await cache.store_event_info("ch", "m1", EventInfo("http://rp/e", None))
        assert keys.keys() == [f"junebug:{connector}:event-info:ch:m1".encode()]
    finally:
        cache.close()
        keys.clean()


def test_memory_is_the_default():
    assert isinstance(
        make_state_cache(
            "junebug_api.state_cache.InMemoryStateCache", {}, clock=Clock(), connector_name="c"
        ),
        InMemoryStateCache,
    )


# -- message status: the events of each outbound message ---------------------


@pytest_twisted.ensureDeferred
async def test_message_events_round_trip(case):
    cache = case.make()
    assert await cache.fetch_message_events("a", "m1") == []
    await cache.store_message_event("a", "m1", "e1", b'{"event_type":"submitted","n":"\xc3\xb1"}')
    await cache.store_message_event("a", "m1", "e2", b'{"event_type":"delivery_succeeded"}')
    await cache.store_message_event("a", "m2", "e3", b'{"event_type":"rejected"}')
    # The same event again (a redelivery) replaces, never duplicates.
    await cache.store_message_event("a", "m1", "e1", b'{"event_type":"submitted","n":"\xc3\xb1"}')
    assert sorted(await cache.fetch_message_events("a", "m1")) == sorted(
        [b'{"event_type":"submitted","n":"\xc3\xb1"}', b'{"event_type":"delivery_succeeded"}']
    )
    assert await cache.fetch_message_events("a", "m2") == [b'{"event_type":"rejected"}']
    assert await cache.fetch_message_events("a", "unknown") == []


@pytest_twisted.ensureDeferred
async def test_message_events_are_per_channel(case):
    cache = case.make()
    await cache.store_message_event("a", "m1", "e1", b'{"channel_id":"a"}')
    # Through another channel the id is unknown.
    assert await cache.fetch_message_events("b", "m1") == []
    # The same id on two channels (a transport's events name any id) keeps two statuses.
    await cache.store_message_event("b", "m1", "e1", b'{"channel_id":"b"}')
    await cache.store_message_event("b", "m1", "e2", b'{"channel_id":"b","n":2}')
    assert await cache.fetch_message_events("a", "m1") == [b'{"channel_id":"a"}']
    assert sorted(await cache.fetch_message_events("b", "m1")) == [
        b'{"channel_id":"b","n":2}',
        b'{"channel_id":"b"}',
    ]
    # A colon in a channel id (a connector_name may have one) joins no other's.
    await cache.store_message_event("x:y", "z", "e1", b"1")
    assert await cache.fetch_message_events("x", "y:z") == []
    assert await cache.fetch_message_events("x:y", "z") == [b"1"]


@pytest_twisted.ensureDeferred
async def test_message_events_expire_after_their_ttl(case):
    cache = case.make(message_status_ttl=1)
    await cache.store_message_event("a", "m1", "e1", b"{}")
    await cache.store_message_event("b", "m1", "e1", b"{}")
    assert await cache.fetch_message_events("a", "m1") == [b"{}"]
    await case.expire(cache, 1)
    assert await cache.fetch_message_events("a", "m1") == []
    assert await cache.fetch_message_events("b", "m1") == []


@pytest_twisted.ensureDeferred
async def test_memory_message_events_ttl_is_renewed_on_read_and_write():
    case = MemoryCase()
    cache = case.make(message_status_ttl=10)
    await cache.store_message_event("a", "m1", "e1", b"1")
    case.clock.advance(8)
    assert await cache.fetch_message_events("a", "m1") == [b"1"]  # renewed: 10 s from now
    case.clock.advance(8)
    await cache.store_message_event("a", "m1", "e2", b"2")  # renewed again
    case.clock.advance(8)
    assert sorted(await cache.fetch_message_events("a", "m1")) == [b"1", b"2"]
    case.clock.advance(10.5)
    assert await cache.fetch_message_events("a", "m1") == []


@pytest_twisted.ensureDeferred
async def test_redis_message_events_key_ttl_renewed_on_read_and_write(redis_keys):
    case = RedisCase(redis_keys)
    case.opened = []
    cache = case.make(message_status_ttl=3600)
    try:
        await cache.store_message_event("a", "m1", "e1", b"1")
        key = f"{redis_keys.prefix}events:a:m1".encode()
        assert redis_keys.keys() == [key]
        assert 3590 < redis_keys.ttl(key) <= 3600
        redis_keys.client.expire(key, 100)
        await cache.fetch_message_events("a", "m1")
        assert 3590 < redis_keys.ttl(key) <= 3600  # renewed by the read
        redis_keys.client.expire(key, 100)
        await cache.store_message_event("a", "m1", "e2", b"2")
        assert 3590 < redis_keys.ttl(key) <= 3600  # and by the write
        # An unknown message, or one asked for through another channel,
        # leaves no key behind.
        await cache.fetch_message_events("a", "m2")
        await cache.fetch_message_events("b", "m1")
        assert redis_keys.keys() == [key]
    finally:
        cache.close()


@pytest_twisted.ensureDeferred
async def test_redis_statuses_of_the_version_before_answer_on_their_own_channel(redis_keys):
    """After an upgrade, a status the previous version kept (one hash per
    message id, every channel's events in it) answers on its own channel only,
    until it expires; it is never renewed."""
    case = RedisCase(redis_keys)
    case.opened = []
    cache = case.make(message_status_ttl=3600)
    legacy = f"{redis_keys.prefix}status:m1"
    a_ack = b'{"channel_id":"a","event_type":"submitted"}'
    b_nack = b'{"channel_id":"b","event_type":"rejected"}'
    redis_keys.client.hset(legacy, mapping={"e1": a_ack, "e2": b_nack})
    redis_keys.client.expire(legacy, 100)
    try:
        assert await cache.fetch_message_events("a", "m1") == [a_ack]
        assert await cache.fetch_message_events("b", "m1") == [b_nack]
        assert await cache.fetch_message_events("c", "m1") == []
        a_dr = b'{"channel_id":"a","event_type":"delivery_succeeded"}'
        await cache.store_message_event("a", "m1", "e1", a_ack)  # redelivered: once only
        await cache.store_message_event("a", "m1", "e3", a_dr)
        assert sorted(await cache.fetch_message_events("a", "m1")) == sorted([a_ack, a_dr])
        assert redis_keys.ttl(legacy.encode()) <= 100
    finally:
        cache.close()


@pytest_twisted.ensureDeferred
async def test_lookups_of_one_turn_share_one_mget(redis_keys):
    from twisted.internet.defer import gatherResults

    case = RedisCase(redis_keys)
    case.opened = []
    cache = case.make()
    try:
        messages = [inbound_message("c") for _ in range(5)]
        await gatherResults([cache.store_inbound(m) for m in messages])
        await cache.store_event_info("ch", "m1", EventInfo("http://rp/e", "t"))
        ids = [m["message_id"] for m in messages]
        found = await gatherResults(
            [cache.fetch_inbound(i) for i in [*ids, "unknown"]]
            + [cache.fetch_event_info("ch", "m1"), cache.fetch_event_info("ch", "m2")]
        )
        assert [f["message_id"] for f in found[:5]] == ids
        assert found[5:] == [None, EventInfo("http://rp/e", "t"), None]
        before = redis_keys.client.info("commandstats").get("cmdstat_mget", {}).get("calls", 0)
        await gatherResults([cache.fetch_inbound(i) for i in ids])
        after = redis_keys.client.info("commandstats")["cmdstat_mget"]["calls"]
        assert after - before >= 1  # one from us (the shared Redis may count others too)
    finally:
        cache.close()


@pytest_twisted.ensureDeferred
async def test_min_replicas_fails_writes_no_replica_confirmed(redis_keys):
    from junebug_api.state.redis_cache import ReplicationError

    case = RedisCase(redis_keys)
    case.opened = []
    cache = case.make(min_replicas=1, operation_timeout=0.4)
    try:
        with pytest.raises(ReplicationError, match="only 0 of 1 replica"):
            await cache.store_event_info("ch", "m1", EventInfo("http://rp/e", None))
    finally:
        cache.close()
