"""memory_state_cache: ExpiringMap timing and InMemoryStateCache behaviour; state_cache:
loading a class by name."""

from __future__ import annotations

import re
from typing import Any

import pytest
from twisted.internet.task import Clock

from junebug_api.config.model import ConfigError
from junebug_api.formats.vumi_messages import REPLY_SOURCE_FIELDS
from junebug_api.state.cache import EventInfo, load_state_cache_class, make_state_cache
from junebug_api.state.memory_cache import ExpiringMap, InMemoryStateCache

from .helpers import result_of

# -- ExpiringMap ----------------------------------------------------------------


def test_entry_expires_exactly_at_timeout() -> None:
    clock = Clock()
    m = ExpiringMap(clock, 10)
    m.set("a", 1)
    clock.advance(9.9375)
    assert m.get("a") == 1
    assert len(m) == 1
    clock.advance(0.0625)
    assert len(m) == 0  # removed by the timer, not by the lookup
    assert m.get("a") is None


def test_get_at_expiry_without_timer_run() -> None:
    # A lookup at exactly the expiry time misses even if the timer has not run.
    clock = Clock()
    m = ExpiringMap(clock, 10)
    m.set("a", 1)
    clock.rightNow = 10.0  # move time without running delayed calls
    assert m.get("a") is None
    assert len(m) == 0


def test_reset_moves_expiry_later() -> None:
    clock = Clock()
    m = ExpiringMap(clock, 10)
    m.set("a", 1)
    m.set("b", 2)
    clock.advance(5)
    m.set("a", 3)
    clock.advance(5)  # t=10: b is due, a was re-set at 5
    assert m.get("b") is None
    assert m.get("a") == 3
    assert len(m) == 1
    assert len(clock.getDelayedCalls()) == 1
    clock.advance(4.75)
    assert m.get("a") == 3
    clock.advance(0.25)
    assert len(m) == 0
    assert clock.getDelayedCalls() == []


def test_one_timer_for_many_entries() -> None:
    clock = Clock()
    m = ExpiringMap(clock, 60)
    for i in range(10_000):
        m.set(f"key-{i}", i)
        if i % 100 == 99:
            clock.advance(0.125)
        assert len(clock.getDelayedCalls()) <= 1
    assert len(clock.getDelayedCalls()) == 1
    assert len(m) == 10_000
    # At t=60 the first 100 (set at t=0) are due; the timer removes them.
    clock.advance(60 - clock.seconds())
    assert len(m) == 9_900
    assert m.get("key-99") is None
    assert m.get("key-100") == 100
    assert len(clock.getDelayedCalls()) == 1
    clock.advance(15)
    assert len(m) == 0
    assert clock.getDelayedCalls() == []


def test_delete_and_clear() -> None:
    clock = Clock()
    m = ExpiringMap(clock, 10)
    m.set("a", 1)
    m.set("b", 2)
    m.delete("a")
    m.delete("missing")
    assert m.get("a") is None
    assert m.get("b") == 2
    m.clear()
    assert len(m) == 0
    assert clock.getDelayedCalls() == []
    # Usable again after clear.
    m.set("c", 3)
    assert len(clock.getDelayedCalls()) == 1
    assert m.get("c") == 3


def test_timer_restarts_after_map_empties() -> None:
    clock = Clock()
    m = ExpiringMap(clock, 10)
    m.set("a", 1)
    clock.advance(10)
    assert clock.getDelayedCalls() == []
    clock.advance(100)
    m.set("b", 2)
    assert [c.getTime() for c in clock.getDelayedCalls()] == [120]
    clock.advance(10)
    assert m.get("b") is None


# -- InMemoryStateCache -----------------------------------------------------------

INBOUND = {
    "message_id": "in-1",
    "to_addr": "*120#",
    "from_addr": "+27820000000",
    "transport_name": "ussd_transport",
    "transport_type": "ussd",
    "transport_metadata": {"session_id": "s1"},
    "provider": "mtn",
    "group": None,
    "to_addr_type": "msisdn",
    "from_addr_type": "msisdn",
    # Fields a reply does not need: not kept.
    "content": "hello ñ",
    "helper_metadata": {"x": 1},
    "timestamp": "2026-11-26 13:23:18.000000",
}


def test_inbound_store_fetch_delete() -> None:
    clock = Clock()
    cache = InMemoryStateCache(clock, timeout=100)
    assert result_of(cache.store_inbound(INBOUND)) is None
    fetched = result_of(cache.fetch_inbound("in-1"))
    assert fetched == {name: INBOUND[name] for name in REPLY_SOURCE_FIELDS}
    assert set(fetched) == {
        "message_id",
        "to_addr",
        "from_addr",
        "transport_name",
        "transport_type",
        "transport_metadata",
        "provider",
        "group",
        "to_addr_type",
        "from_addr_type",
    }
    assert result_of(cache.fetch_inbound("other")) is None
    result_of(cache.delete_inbound("in-1"))
    assert result_of(cache.fetch_inbound("in-1")) is None


def test_inbound_missing_fields_are_none() -> None:
    cache = InMemoryStateCache(Clock())
    result_of(cache.store_inbound({"message_id": "m", "transport_name": "t"}))
    fetched = result_of(cache.fetch_inbound("m"))
    assert fetched["transport_name"] == "t"
    assert fetched["provider"] is None


def test_inbound_expires() -> None:
    clock = Clock()
    cache = InMemoryStateCache(clock, timeout=100)
    result_of(cache.store_inbound(INBOUND))
    clock.advance(99)
    assert result_of(cache.fetch_inbound("in-1")) is not None
    clock.advance(1)
    assert result_of(cache.fetch_inbound("in-1")) is None


def test_event_info_store_fetch_delete() -> None:
    clock = Clock()
    cache = InMemoryStateCache(clock, timeout=100)
    result_of(cache.store_event_info("ch", "out-1", EventInfo("http://rp/events", "tok")))
    result_of(cache.store_event_info("ch", "out-2", EventInfo("http://rp/other")))
    assert result_of(cache.fetch_event_info("ch", "out-1")) == EventInfo("http://rp/events", "tok")
    assert result_of(cache.fetch_event_info("ch", "out-2")) == EventInfo("http://rp/other", None)
    result_of(cache.delete_event_info("ch", "out-1"))
    assert result_of(cache.fetch_event_info("ch", "out-1")) is None
    clock.advance(100)
    assert result_of(cache.fetch_event_info("ch", "out-2")) is None


def test_event_info_is_per_channel() -> None:
    cache = InMemoryStateCache(Clock())
    result_of(cache.store_event_info("a", "out-1", EventInfo("http://rp/a", "tok-a")))
    assert result_of(cache.fetch_event_info("b", "out-1")) is None
    assert result_of(cache.fetch_event_info("b", "out-1", legacy=True)) is None
    result_of(cache.delete_event_info("b", "out-1"))
    assert result_of(cache.fetch_event_info("a", "out-1")) == EventInfo("http://rp/a", "tok-a")


def test_event_info_repr_hides_token() -> None:
    assert "tok-secret" not in repr(EventInfo("http://rp/events", "tok-secret"))


def test_store_event_info_false_stores_nothing() -> None:
    cache = InMemoryStateCache(Clock(), store_event_info=False)
    result_of(cache.store_event_info("ch", "out-1", EventInfo("http://rp/events", "tok")))
    assert result_of(cache.fetch_event_info("ch", "out-1")) is None
    assert cache.entry_count() == 0


def test_close_clears_everything() -> None:
    clock = Clock()
    cache = InMemoryStateCache(clock)
    result_of(cache.store_inbound(INBOUND))
    result_of(cache.store_event_info("ch", "out-1", EventInfo("http://rp/events")))
    assert len(clock.getDelayedCalls()) == 2
    result_of(cache.close())
    assert clock.getDelayedCalls() == []
    assert result_of(cache.fetch_inbound("in-1")) is None
    assert cache.health() == {}


def test_check_config_defaults() -> None:
    assert InMemoryStateCache.check_config({}) == {"timeout": 86400, "store_event_info": True}
    assert InMemoryStateCache.check_config({"timeout": 5, "store_event_info": False}) == {
        "timeout": 5,
        "store_event_info": False,
    }
    assert InMemoryStateCache.check_config({"timeout": 0.5})["timeout"] == 0.5


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ({"url": "redis://x"}, "unknown option state_cache_config.url"),
        ({"timeout": "10"}, "state_cache_config.timeout must be of type float"),
        ({"timeout": True}, "state_cache_config.timeout must be of type float"),
        ({"store_event_info": "yes"}, "state_cache_config.store_event_info must be of type bool"),
        ({"store_event_info": 1}, "state_cache_config.store_event_info must be of type bool"),
        ({"timeout": 0}, "state_cache_config.timeout must be greater than 0"),
        ({"timeout": -5}, "state_cache_config.timeout must be greater than 0"),
        (["timeout"], "state_cache_config must be a mapping"),
    ],
)
def test_check_config_errors(config: Any, message: str) -> None:
    with pytest.raises(ConfigError, match="^" + re.escape(message)):
        InMemoryStateCache.check_config(config)


def test_make_state_cache() -> None:
    clock = Clock()
    cache = make_state_cache(
        "junebug_api.state_cache.InMemoryStateCache",
        {"timeout": 5, "store_event_info": False},
        clock=clock,
        connector_name="conn",
    )
    assert isinstance(cache, InMemoryStateCache)
    assert cache.store_event_info_enabled is False
    result_of(cache.store_inbound(INBOUND))
    clock.advance(5)
    assert result_of(cache.fetch_inbound("in-1")) is None


@pytest.mark.parametrize(
    ("path", "message"),
    [
        ("no_such_module_xyz.Cache", "cannot be imported"),
        ("junebug_api.state_cache.NoSuchCache", "cannot be imported"),
        ("NoDots", "cannot be imported"),
        ("", "cannot be imported"),
        ("junebug_api.state_cache.EventInfo", "is not a state cache"),
    ],
)
def test_bad_state_cache_class(path: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        make_state_cache(path, {}, clock=Clock(), connector_name="conn")
    with pytest.raises(ConfigError, match=message):
        load_state_cache_class(path)


def test_make_state_cache_checks_options() -> None:
    with pytest.raises(ConfigError, match=r"unknown option state_cache_config\.nope"):
        make_state_cache(
            "junebug_api.state_cache.InMemoryStateCache",
            {"nope": 1},
            clock=Clock(),
            connector_name="conn",
        )


def test_built_in_caches_answer_to_their_config_names_and_their_modules() -> None:
    import junebug_api.state.cache as state_cache
    from junebug_api.state.redis_cache import RedisStateCache

    for cls in (InMemoryStateCache, RedisStateCache):
        name = cls.__name__
        assert load_state_cache_class(f"junebug_api.state.cache.{name}") is cls
        assert load_state_cache_class(f"{cls.__module__}.{name}") is cls
        assert getattr(state_cache, name) is cls
    with pytest.raises(AttributeError):
        state_cache.NoSuchCache  # noqa: B018
