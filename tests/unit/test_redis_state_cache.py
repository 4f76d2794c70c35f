"""RedisStateCache against an in-memory Redis (and Sentinel): what it stores
where, for how long, the lookups of a turn as one MGET, replication waits,
timeouts, health, and following a master through a failover. No Redis
server: :class:`~tests.unit.helpers.FakeRedis` over ``iosim`` connections
on a MemoryReactorClock."""

from __future__ import annotations

import gc
import json
from typing import Any

import pytest
from twisted.internet.defer import Deferred

from junebug_api.config.model import ConfigError
from junebug_api.formats.vumi_messages import VumiMessage
from junebug_api.state.cache import EventInfo
from junebug_api.state.redis_cache import (
    RedisStateCache,
    RedisUnavailable,
    ReplicationError,
)
from junebug_api.state.redis_client import RedisConnectionError
from junebug_api.state.redis_options import parse_redis_url
from junebug_api.testing import captured_logs

from .helpers import FakeNetwork, FakeRedis, result_of

PREFIX = "t:c:"


def inbound(message_id: str = "in-1") -> VumiMessage:
    return {
        "message_version": "20110921",
        "message_type": "user_message",
        "message_id": message_id,
        "timestamp": "2025-01-01 00:00:00.000000",
        "to_addr": "+27000000001",
        "from_addr": "+27000000002",
        "content": "Sawubona 👋",
        "transport_name": "c",
        "transport_type": "sms",
        "session_event": "resume",
        "helper_metadata": {"session": {"id": 7}},
        "transport_metadata": {"k": "v"},
        "in_reply_to": None,
        "routing_metadata": {},
    }


class Setup:
    def __init__(self, listen: bool = True, **options: Any) -> None:
        self.net = FakeNetwork()
        self.redis = FakeRedis(self.net.reactor, password=options.pop("password", None))
        if listen:
            self.net.listen(6379, self.redis.factory())
        config = {"url": "redis://127.0.0.1:6379/0", "key_prefix": PREFIX, **options}
        self.cache = RedisStateCache.from_config(
            config, clock=self.net.reactor, connector_name="c", message_status_ttl=600
        )

    def start(self) -> Setup:
        self.cache.start()
        self.net.flush()
        return self

    def wait(self, d: Deferred) -> Any:
        self.net.flush()
        return result_of(d)

    def sent(self, name: bytes) -> list[list[bytes]]:
        return [c for c in self.redis.commands if c[0] == name]


@pytest.fixture
def setup() -> Setup:
    return Setup(timeout=3600).start()


def test_an_inbound_is_stored_compactly_under_its_prefix_and_expires(setup: Setup) -> None:
    message = inbound()
    assert setup.wait(setup.cache.store_inbound(message)) is None
    key = b"t:c:inbound:in-1"
    assert list(setup.redis.data) == [key]
    assert setup.redis.ttl(key) == 3600
    stored = json.loads(setup.redis.data[key])
    assert "Sawubona 👋" not in json.dumps(stored)  # the content is not needed for a reply
    fetched = setup.wait(setup.cache.fetch_inbound("in-1"))
    assert fetched["message_id"] == "in-1"
    assert fetched["from_addr"] == "+27000000002"
    assert fetched["transport_metadata"] == {"k": "v"}
    setup.net.advance(3600)
    assert setup.wait(setup.cache.fetch_inbound("in-1")) is None


def test_delete_and_a_missing_entry(setup: Setup) -> None:
    setup.wait(setup.cache.store_inbound(inbound()))
    assert setup.wait(setup.cache.delete_inbound("in-1")) is None
    assert setup.wait(setup.cache.fetch_inbound("in-1")) is None
    assert setup.redis.data == {}


def test_the_lookups_of_one_turn_go_out_as_one_mget(setup: Setup) -> None:
    for n in range(3):
        setup.wait(setup.cache.store_inbound(inbound(f"in-{n}")))
    setup.redis.commands.clear()
    lookups = [setup.cache.fetch_inbound(f"in-{n}") for n in (0, 5, 2)]
    lookups[1].cancel()  # its caller gave up: the others still get theirs
    setup.net.flush()
    assert [c[0] for c in setup.redis.commands] == [b"MGET"]
    assert result_of(lookups[0])["message_id"] == "in-0"
    assert result_of(lookups[2])["message_id"] == "in-2"


def test_event_info_round_trip_and_switched_off() -> None:
    s = Setup().start()
    info = EventInfo("http://rp/events", "s3cret")
    assert s.wait(s.cache.store_event_info("ch", "out-1", info)) is None
    assert s.redis.data[b"t:c:event-info:ch:out-1"] == b'["http://rp/events","s3cret"]'
    assert s.redis.ttl(b"t:c:event-info:ch:out-1") == 86400  # the default timeout
    assert s.wait(s.cache.fetch_event_info("ch", "out-1")) == info
    assert s.wait(s.cache.delete_event_info("ch", "out-1")) is None
    assert s.wait(s.cache.fetch_event_info("ch", "out-1")) is None

    off = Setup(store_event_info=False).start()
    off.redis.commands.clear()
    assert result_of(off.cache.store_event_info("ch", "out-1", info)) is None
    off.net.flush()
    assert off.redis.commands == []


def test_message_events_are_kept_per_channel_and_message_and_renewed_on_read(
    setup: Setup,
) -> None:
    store = setup.cache.store_message_event
    assert setup.wait(store("a", "out-1", "ev-1", b'{"status": "sent"}')) is None
    setup.wait(store("a", "out-1", "ev-2", b'{"status": "delivered"}'))
    setup.wait(store("a", "out-1", "ev-1", b'{"status": "sent again"}'))
    setup.wait(store("b", "out-1", "ev-3", b'{"status": "of b"}'))  # the same id on b
    key = b"t:c:events:a:out-1"
    assert sorted(setup.redis.data) == [key, b"t:c:events:b:out-1"]
    assert setup.redis.ttl(key) == 600
    setup.net.advance(500)
    events = setup.wait(setup.cache.fetch_message_events("a", "out-1"))
    assert sorted(events) == [b'{"status": "delivered"}', b'{"status": "sent again"}']
    assert setup.redis.ttl(key) == 600  # renewed by the read
    assert setup.wait(setup.cache.fetch_message_events("b", "out-1")) == [b'{"status": "of b"}']
    assert setup.wait(setup.cache.fetch_message_events("c", "out-1")) == []
    assert setup.wait(setup.cache.fetch_message_events("a", "other")) == []


def test_a_colon_in_a_channel_id_cannot_make_two_channels_keys_meet(setup: Setup) -> None:
    # ("x:y", "z") and ("x", "y:z") would both be status ...:x:y:z unescaped.
    setup.wait(setup.cache.store_message_event("x:y", "z", "e1", b"1"))
    setup.wait(setup.cache.store_message_event("x%3Ay", "z", "e2", b"2"))
    assert setup.wait(setup.cache.fetch_message_events("x", "y:z")) == []
    assert setup.wait(setup.cache.fetch_message_events("x:y", "z")) == [b"1"]
    assert b"t:c:events:x%3Ay:z" in setup.redis.data
    assert b"t:c:events:x%253Ay:z" in setup.redis.data


def status_json(channel_id: str, event_type: str) -> bytes:
    return json.dumps({"channel_id": channel_id, "event_type": event_type}).encode()


def test_statuses_the_version_before_wrote_answer_on_their_own_channel_only(
    setup: Setup,
) -> None:
    # The previous version kept every channel's events of a message id in
    # one hash, <prefix>status:<message_id>.
    legacy = b"t:c:status:out-1"
    setup.redis.data[legacy] = {
        b"ev-1": status_json("a", "submitted"),
        b"ev-2": status_json("b", "rejected"),
        b"ev-3": b"not json",
    }
    setup.redis.expires[legacy] = setup.net.reactor.seconds() + 100
    fetch = setup.cache.fetch_message_events
    assert setup.wait(fetch("a", "out-1")) == [status_json("a", "submitted")]
    assert setup.wait(fetch("b", "out-1")) == [status_json("b", "rejected")]
    assert setup.wait(fetch("c", "out-1")) == []
    # New events join them; an event in both hashes is answered once.
    setup.wait(setup.cache.store_message_event("a", "out-1", "ev-1", status_json("a", "submitted")))
    setup.wait(setup.cache.store_message_event("a", "out-1", "ev-4", status_json("a", "delivered")))
    assert sorted(setup.wait(fetch("a", "out-1"))) == [
        status_json("a", "delivered"),
        status_json("a", "submitted"),
    ]
    assert setup.redis.ttl(legacy) == 100  # never renewed: it expires as it would have
    setup.net.advance(100)
    assert setup.wait(fetch("b", "out-1")) == []


def test_a_failed_status_read_fails_once_and_leaves_no_unhandled_error(setup: Setup) -> None:
    setup.redis.silent = True
    with captured_logs() as events:
        fetched = setup.cache.fetch_message_events("a", "out-1")
        setup.net.flush()
        setup.net.advance(5)
        with pytest.raises(RedisConnectionError):
            result_of(fetched)
        del fetched
        gc.collect()  # an unhandled failure of the second read would be logged here
    assert not [e for e in events if e.get("log_failure") is not None]


def test_auth_and_database_are_set_on_connect() -> None:
    s = Setup(url="redis://:p%40ss@127.0.0.1:6379/3", password="p@ss").start()
    assert s.redis.commands[:2] == [[b"AUTH", b"p@ss"], [b"SELECT", b"3"]]
    assert s.cache.health()["redis"]["health"] == "ok"
    assert s.cache.health()["redis"]["url"] == "redis://***@127.0.0.1:6379/3"


def test_a_wrong_password_keeps_health_down_with_the_reason() -> None:
    s = Setup(url="redis://u:wrong@127.0.0.1:6379/0", password="right").start()
    assert s.redis.commands[0] == [b"AUTH", b"u", b"wrong"]
    with captured_logs() as events:
        s.net.advance(5)  # the first PING waited that long for a connection
    health = s.cache.health()["redis"]
    assert health["health"] == "down"
    assert health["error"] == "no answer within 5 s (127.0.0.1:6379: WRONGPASS)"
    assert [e["error"] for e in events if "unreachable" in e["log_format"]] == [health["error"]]


def test_an_unanswered_command_drops_the_connection_and_health_follows(setup: Setup) -> None:
    assert setup.cache.health() == {"redis": {"health": "ok", "url": "redis://127.0.0.1:6379/0"}}
    setup.redis.silent = True
    failed = setup.cache.fetch_inbound("in-1")
    setup.net.flush()
    with captured_logs() as events:
        setup.net.advance(5)
    with pytest.raises(RedisConnectionError, match=r"^no reply from Redis within 5 s$"):
        result_of(failed)
    assert setup.redis.connections[0].closed
    health = setup.cache.health()["redis"]
    assert health["health"] == "down"
    # The PING due at the same moment saw the timeout, or the connection it dropped.
    assert health["error"] in ("no reply from Redis within 5 s", "connection to Redis lost")
    assert any("unreachable" in e["log_format"] for e in events)
    setup.redis.silent = False
    with captured_logs() as events:
        setup.net.advance(5)  # reconnected meanwhile; the next PING is answered
    assert setup.cache.health()["redis"]["health"] == "ok"
    assert any("reachable (master 127.0.0.1:6379)" in e["log_format"].format(**e) for e in events)


def test_with_no_connection_a_call_fails_after_the_operation_timeout() -> None:
    s = Setup(listen=False, operation_timeout=2)
    s.cache.start()  # nothing listens: the connection attempt never completes
    d = s.cache.delete_inbound("in-1")
    s.net.advance(2)
    with pytest.raises(
        RedisUnavailable, match=r"^Redis: no answer within 2 s \(not connected yet\)$"
    ):
        result_of(d)


def test_event_info_is_per_channel_and_legacy_keys_read_only_when_asked() -> None:
    s = Setup().start()
    s.wait(s.cache.store_event_info("a", "out-1", EventInfo("http://rp/a", "tok-a")))
    assert s.wait(s.cache.fetch_event_info("b", "out-1")) is None
    assert s.wait(s.cache.fetch_event_info("b", "out-1", legacy=True)) is None
    # The key a version before per-channel event info wrote (no channel in it).
    s.redis.data[b"t:c:event:out-2"] = b'["http://rp/old","tok-old"]'
    assert s.wait(s.cache.fetch_event_info("b", "out-2")) is None
    assert s.wait(s.cache.fetch_event_info("b", "out-2", legacy=True)) == EventInfo(
        "http://rp/old", "tok-old"
    )
    # The channel's own entry comes first.
    s.redis.data[b"t:c:event:out-1"] = b'["http://rp/old","tok-old"]'
    assert s.wait(s.cache.fetch_event_info("a", "out-1", legacy=True)) == EventInfo(
        "http://rp/a", "tok-a"
    )


def test_a_failed_mget_fails_every_lookup_in_it(setup: Setup) -> None:
    setup.redis.silent = True
    lookups = [setup.cache.fetch_event_info("ch", f"out-{n}") for n in range(2)]
    setup.net.flush()
    setup.net.advance(5)
    assert [c for c in setup.redis.commands if c[0] == b"MGET"] == [
        [b"MGET", b"t:c:event-info:ch:out-0", b"t:c:event-info:ch:out-1"]
    ]
    for d in lookups:
        with pytest.raises(RedisConnectionError):
            result_of(d)


def test_close_fails_the_calls_waiting_for_a_connection() -> None:
    s = Setup(listen=False)
    s.cache.start()
    d = s.cache.store_event_info("ch", "out-1", EventInfo("http://rp/e"))
    assert result_of(s.cache.close()) is None
    with pytest.raises(RedisConnectionError, match="the Redis client was stopped"):
        result_of(d)


def test_a_cancelled_call_says_nothing_about_redis(setup: Setup) -> None:
    setup.redis.silent = True
    d = setup.cache.delete_inbound("in-1")
    d.cancel()
    setup.net.flush()
    assert setup.cache.health()["redis"]["health"] == "ok"


def test_min_replicas_waits_once_per_turn_and_fails_without_them() -> None:
    s = Setup(min_replicas=1).start()
    s.redis.replicas = 1
    writes = [s.cache.store_inbound(inbound(f"in-{n}")) for n in range(3)]
    s.net.flush()
    assert [result_of(d) for d in writes] == [None, None, None]
    assert s.sent(b"WAIT") == [[b"WAIT", b"1", b"2500"]]
    s.redis.replicas = 0
    lost = s.cache.store_event_info("ch", "out-1", EventInfo("http://rp/e"))
    s.net.flush()
    with pytest.raises(ReplicationError, match="only 0 of 1 replica"):
        result_of(lost)


def test_a_read_only_reply_fails_the_write_and_reconnects(setup: Setup) -> None:
    setup.redis.readonly = True
    d = setup.cache.store_inbound(inbound())
    setup.net.flush()
    with pytest.raises(Exception, match="READONLY"):
        result_of(d)
    assert setup.redis.connections[0].closed
    setup.redis.readonly = False
    setup.net.advance_until(lambda: len(setup.redis.connections) == 2, limit=2)
    assert setup.wait(setup.cache.store_inbound(inbound())) is None
    assert len(setup.redis.connections) == 2


def test_a_call_before_start_is_a_programming_error() -> None:
    s = Setup()
    with pytest.raises(RuntimeError, match=r"start\(\) was not called"):
        s.cache.delete_inbound("x")
    with pytest.raises(RuntimeError, match=r"start\(\) was not called"):
        s.cache.fetch_inbound("x")
    assert result_of(s.cache.close()) is None


def test_close_stops_pinging_and_disconnects(setup: Setup) -> None:
    assert setup.wait(setup.cache.close()) is None
    assert all(c.closed for c in setup.redis.connections)
    setup.redis.commands.clear()
    setup.net.advance(30)
    assert setup.redis.commands == []


class SentinelSetup:
    """Two Redis servers and two Sentinels (the first one down)."""

    def __init__(self) -> None:
        self.net = FakeNetwork()
        self.old = FakeRedis(self.net.reactor)
        self.new = FakeRedis(self.net.reactor)
        self.new.role = b"slave"
        self.sentinel = FakeRedis(self.net.reactor, password="sp")
        self.sentinel.masters[b"mymaster"] = ("127.0.0.1", 7001)
        self.net.listen(7001, self.old.factory())
        self.net.listen(7002, self.new.factory())
        self.net.listen(26380, self.sentinel.factory())
        self.cache = RedisStateCache.from_config(
            {
                "sentinels": ["127.0.0.1:26379", "127.0.0.1:26380"],
                "service_name": "mymaster",
                "sentinel_password": "sp",
                "key_prefix": PREFIX,
            },
            clock=self.net.reactor,
            connector_name="c",
        )

    def settle(self) -> None:
        """Refuse every attempt at the Sentinel that is down; move the bytes."""
        for _ in range(10):
            self.net.flush()
            waiting = [c for c in self.net.reactor.tcpClients if c[1] == 26379]
            if not waiting:
                return
            for _ in waiting:
                self.net.refuse()
            self.net.advance(0.3)


def test_sentinel_finds_the_master_and_follows_a_failover() -> None:
    s = SentinelSetup()
    s.cache.start()
    s.settle()
    health = s.cache.health()["redis"]
    assert health["health"] == "ok"
    assert health["master"] == "127.0.0.1:7001"
    assert health["sentinels"] == ["127.0.0.1:26379", "127.0.0.1:26380"]
    assert [b"AUTH", b"sp"] in s.sentinel.commands
    assert [b"ROLE"] in s.old.commands
    d = s.cache.store_inbound(inbound())
    s.settle()
    assert result_of(d) is None and b"t:c:inbound:in-1" in s.old.data

    # Failover: the Sentinels name the other server, which is master now.
    s.sentinel.masters[b"mymaster"] = ("127.0.0.1", 7002)
    s.new.role = b"master"
    with captured_logs() as events:
        s.net.advance(5)  # the periodic check
        s.net.advance_until(lambda: s.cache.health()["redis"]["master"] is not None, limit=2)
    assert any("Sentinel names" in e["log_format"] for e in events)
    assert s.cache.health()["redis"]["master"] == "127.0.0.1:7002"
    assert s.old.connections[0].closed
    d = s.cache.store_inbound(inbound("in-2"))
    s.settle()
    assert result_of(d) is None and b"t:c:inbound:in-2" in s.new.data


def test_sentinels_that_stop_answering_leave_the_master_in_use() -> None:
    s = SentinelSetup()
    s.cache.start()
    s.settle()
    del s.sentinel.masters[b"mymaster"]
    with captured_logs() as events:
        s.net.advance(5)
        s.settle()
    warnings = [e["error"] for e in events if "No Sentinel answers" in e["log_format"]]
    assert warnings == [
        "no Sentinel knows a master for mymaster (127.0.0.1:26380: no master known for"
        " mymaster; 127.0.0.1:26379: Connection was refused by other side.)"
    ]
    assert s.cache.health()["redis"]["health"] == "ok"
    assert s.cache.health()["redis"]["master"] == "127.0.0.1:7001"


def test_sentinel_naming_a_replica_is_refused() -> None:
    s = SentinelSetup()
    s.sentinel.masters[b"mymaster"] = ("127.0.0.1", 7002)  # still a replica
    s.cache.start()
    s.settle()
    health = s.cache.health()["redis"]
    assert health["health"] == "down"
    assert health["master"] is None
    assert [b"ROLE"] in s.new.commands and s.new.data == {}


def test_no_sentinel_knows_the_master() -> None:
    s = SentinelSetup()
    del s.sentinel.masters[b"mymaster"]
    s.cache.start()
    with captured_logs():
        s.settle()
        s.net.advance(6)
        s.settle()
    health = s.cache.health()["redis"]
    assert health["health"] == "down"


@pytest.mark.parametrize(
    ("config", "error"),
    [
        ({"operation_timeout": 0}, "operation_timeout must be greater than 0"),
        ({"min_replicas": -1}, "min_replicas must be 0 or more"),
        ({"pool_size": 0}, "pool_size must be from 1 to 1000"),
        ({"sentinels": []}, "sentinels must be a non-empty list"),
        ({"sentinels": [1]}, "sentinels must be a non-empty list"),
        ({"sentinels": ["host"]}, r"'host' is not host:port"),
        ({"sentinels": ["h:70000"]}, r"'h:70000' is not host:port"),
        ({"sentinels": ["h:1"]}, "service_name is required with sentinels"),
        ({"service_name": "m"}, "service_name and sentinel_password need sentinels"),
        ({"sentinel_password": "p"}, "service_name and sentinel_password need sentinels"),
        ({"tls_ca_file": "/nonexistent/ca.pem"}, "tls_ca_file cannot be read"),
        ({"url": "redis://h/0?x=1"}, r"must not have a \?query"),
        ({"url": "http://h/0"}, "must start with redis:// or rediss://"),
        ({"url": "redis://h:port/0"}, "invalid port"),
        ({"url": "redis://h/zero"}, "must end with a database number"),
    ],
)
def test_bad_options(config: dict, error: str) -> None:
    with pytest.raises(ConfigError, match=error):
        RedisStateCache.check_config(config, "c")


def test_options_and_their_defaults() -> None:
    assert RedisStateCache.check_config(
        {"sentinels": ["[::1]:26379"], "service_name": "m"}, "c"
    ) == {
        "url": "redis://127.0.0.1:6379/0",
        "timeout": 86400,
        "store_event_info": True,
        "key_prefix": "junebug:c:",
        "operation_timeout": 5.0,
        "pool_size": 10,
        "tls_ca_file": None,
        "sentinels": ["[::1]:26379"],
        "service_name": "m",
        "sentinel_password": None,
        "min_replicas": 0,
    }


def test_parse_redis_url() -> None:
    assert parse_redis_url("rediss://us%3Aer:p%2Fw@redis.example:6380/2") == {
        "host": "redis.example",
        "port": 6380,
        "dbid": 2,
        "password": "p/w",
        "username": "us:er",
        "tls": True,
    }
    assert parse_redis_url("redis://")["host"] == "127.0.0.1"
