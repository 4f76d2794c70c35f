"""The channel API's admin, store sync and file store, with a registry in memory."""

from __future__ import annotations

import os
import stat
from typing import Any

import pytest
import yaml
from twisted.internet.defer import Deferred, DeferredLock
from twisted.internet.task import Clock

from junebug_api.channels.admin import ChannelAdmin
from junebug_api.channels.store import (
    FileChannelStore,
    RedisChannelStore,
    StoreUnavailable,
    store_for_config,
)
from junebug_api.channels.sync import StoreSync
from junebug_api.config.checks import ConfigError
from junebug_api.formats.api_errors import (
    ApiUsageError,
    ChannelInConfigFile,
    ChannelNotFound,
    ServiceUnavailable,
)

from .channel_api_support import FakeRegistry, api_config
from .helpers import result_of

BODY = {"type": "smpp", "config": {"system_id": "j", "password": "pw"}, "mo_url_auth_token": "t"}


def run(coroutine: Any) -> Any:
    return result_of(Deferred.fromCoroutine(coroutine))


class Setup:
    def __init__(self, tmp_path: Any) -> None:
        self.config = api_config(tmp_path)
        self.path = self.config.channel_api_file
        self.store = store_for_config(self.config, None)
        self.registry = FakeRegistry(self.config)
        lock = DeferredLock()
        ids = iter(f"id-{n}" for n in range(100))
        self.admin = ChannelAdmin(self.store, self.registry, self.config, lock, lambda: next(ids))
        self.clock = Clock()
        self.sync = StoreSync(self.store, self.registry, self.config, lock, self.clock)

    def stored(self) -> dict[str, Any]:
        with open(self.path) as f:
            return yaml.safe_load(f)["channels"]


def test_create_stores_and_starts_the_channel(tmp_path: Any) -> None:
    s = Setup(tmp_path)
    channel = run(s.admin.create(BODY))
    assert channel.id == "id-0"
    assert s.registry.origin("id-0") == "api"
    assert s.stored() == {
        "id-0": {"type": "smpp", "config": BODY["config"], "mo_message_url_auth_token": "t"}
    }
    shown = channel.info({})
    assert shown["config"]["password"] != "pw"
    assert "mo_url_auth_token" not in shown
    assert stat.S_IMODE(os.stat(s.path).st_mode) == 0o600


def test_create_refuses_a_bad_body_naming_the_key(tmp_path: Any) -> None:
    s = Setup(tmp_path)
    for body, key in [
        ({"config": {}}, "type"),
        ({**BODY, "mo_url": "ftp://x"}, "mo_message_url"),
        ({**BODY, "colour": "red"}, "colour"),
        ({**BODY, "connector_name": "fixed"}, "connector_name"),
    ]:
        with pytest.raises(ApiUsageError) as raised:
            run(s.admin.create(body))
        assert key in str(raised.value)
        assert raised.value.errors[0]["type"] == "invalid_body"
    assert not os.path.exists(s.path)
    assert s.registry.calls == []


def test_modify_changes_only_the_keys_given(tmp_path: Any) -> None:
    s = Setup(tmp_path)
    run(s.admin.create({**BODY, "label": "old", "character_limit": 10}))
    channel = run(s.admin.modify("id-0", {"label": "new", "mo_url": "http://127.0.0.1:9/two"}))
    assert channel.settings.label == "new"
    assert channel.settings.character_limit == 10
    assert channel.settings.mo_message_url == "http://127.0.0.1:9/two"
    assert s.stored()["id-0"]["label"] == "new"
    assert s.registry.calls == [("start", "id-0"), ("change", "id-0")]
    with pytest.raises(ApiUsageError):
        run(s.admin.modify("id-0", {"character_limit": -1}))
    assert s.stored()["id-0"]["character_limit"] == 10


def test_unknown_and_config_channels(tmp_path: Any) -> None:
    s = Setup(tmp_path)
    for call in (
        s.admin.modify("nope", {"label": "x"}),
        s.admin.delete("nope"),
        s.admin.restart("nope"),
    ):
        with pytest.raises(ChannelNotFound):
            run(call)
    for call in (
        s.admin.modify("fixed", {"label": "x"}),
        s.admin.delete("fixed"),
        s.admin.restart("fixed"),
    ):
        with pytest.raises(ChannelInConfigFile):
            run(call)
    assert s.registry.origin("fixed") == "config"


def test_delete_and_restart(tmp_path: Any) -> None:
    s = Setup(tmp_path)
    run(s.admin.create(BODY))
    run(s.admin.restart("id-0"))
    assert s.registry.get("id-0").restarts == 1
    run(s.admin.delete("id-0"))
    assert s.registry.get("id-0") is None
    assert s.stored() == {}
    with pytest.raises(ChannelNotFound):
        run(s.admin.delete("id-0"))


def test_a_stored_channel_not_running_is_started_by_modify_and_restart(tmp_path: Any) -> None:
    s = Setup(tmp_path)
    run(s.admin.create(BODY))
    run(s.registry.stop("id-0"))
    run(s.admin.restart("id-0"))
    assert s.registry.origin("id-0") == "api"
    run(s.registry.stop("id-0"))
    run(s.admin.modify("id-0", {"label": "back"}))
    assert s.registry.get("id-0").settings.label == "back"


def test_store_unavailable_is_503(tmp_path: Any) -> None:
    s = Setup(tmp_path)
    os.mkdir(s.path)  # a directory where the file should be
    with pytest.raises(ServiceUnavailable):
        run(s.admin.create(BODY))


def test_sync_starts_changes_and_stops_what_another_process_stored(tmp_path: Any) -> None:
    s = Setup(tmp_path)
    other = Setup(tmp_path)  # another process on the same file
    run(other.admin.create(BODY))
    s.sync.start()
    assert s.registry.origin("id-0") == "api"
    run(other.admin.modify("id-0", {"label": "changed"}))
    s.clock.advance(1)
    assert s.registry.get("id-0").settings.label == "changed"
    calls = len(s.registry.calls)
    s.clock.advance(1)  # nothing new: no change
    assert len(s.registry.calls) == calls
    run(other.admin.delete("id-0"))
    s.clock.advance(1)
    assert s.registry.get("id-0") is None
    assert s.registry.origin("fixed") == "config"
    s.sync.stop()


def test_sync_does_not_redo_what_the_admin_did(tmp_path: Any) -> None:
    s = Setup(tmp_path)
    s.sync.start()
    run(s.admin.create(BODY))
    s.clock.advance(1)
    assert s.registry.calls == [("start", "id-0")]
    s.sync.stop()


def test_sync_keeps_channels_while_the_store_cannot_be_read(tmp_path: Any) -> None:
    s = Setup(tmp_path)
    run(s.admin.create(BODY))
    s.sync.start()
    with open(s.path, "w") as f:
        f.write("channels: [\n")
    s.clock.advance(1)
    s.clock.advance(1)
    assert s.registry.origin("id-0") == "api"
    with open(s.path, "w") as f:
        yaml.safe_dump({"channels": {}}, f)
    s.clock.advance(1)
    assert s.registry.get("id-0") is None
    s.sync.stop()


def test_sync_skips_a_stored_channel_that_does_not_resolve(tmp_path: Any) -> None:
    s = Setup(tmp_path)
    with open(s.path, "w") as f:
        yaml.safe_dump({"channels": {"bad": {"mo_url": "ftp://x"}, "good": {"type": "t"}}}, f)
    s.sync.start()
    assert s.registry.origin("good") == "api"
    assert s.registry.get("bad") is None
    s.sync.stop()


def test_file_store_round_trip_and_errors(tmp_path: Any) -> None:
    path = tmp_path / "c.yaml"
    store = FileChannelStore(str(path))
    assert run(store.version()) is None
    assert run(store.load()) == (None, {})
    run(store.put("a", {"label": "x", "config": {"k": 1}}))
    first = run(store.version())
    assert run(store.get("a")) == {"label": "x", "config": {"k": 1}}
    run(store.put("b", {}))
    assert run(store.version()) != first
    assert run(store.delete("a")) is True
    assert run(store.delete("a")) is False
    assert run(store.load())[1] == {"b": {}}
    assert [p.name for p in tmp_path.iterdir()] == ["c.yaml"]  # no temporary file left
    path.write_text("- a list\n")
    with pytest.raises(ConfigError):
        run(store.load())
    path.unlink()
    path.mkdir()
    with pytest.raises(StoreUnavailable):
        run(store.put("a", {}))


def test_redis_store_over_the_state_cache_connection() -> None:
    """A hash of JSON entries and a version counter, each write in one MULTI/EXEC."""
    from .test_redis_state_cache import PREFIX
    from .test_redis_state_cache import Setup as RedisSetup

    redis = RedisSetup().start()
    store = RedisChannelStore(redis.cache)
    assert redis.wait(Deferred.fromCoroutine(store.load())) == (None, {})
    redis.wait(Deferred.fromCoroutine(store.put("a", {"label": "Sawubona 👋"})))
    assert redis.wait(Deferred.fromCoroutine(store.version())) == b"1"
    assert redis.wait(Deferred.fromCoroutine(store.get("a"))) == {"label": "Sawubona 👋"}
    assert redis.wait(Deferred.fromCoroutine(store.get("b"))) is None
    assert redis.wait(Deferred.fromCoroutine(store.load())) == (
        b"1",
        {"a": {"label": "Sawubona 👋"}},
    )
    assert redis.wait(Deferred.fromCoroutine(store.delete("a"))) is True
    assert redis.wait(Deferred.fromCoroutine(store.delete("a"))) is False
    assert redis.wait(Deferred.fromCoroutine(store.version())) == b"3"
    names = [c[0] for c in redis.redis.commands if c[0] not in (b"PING", b"GET", b"HGET")]
    assert names[-4:] == [b"MULTI", b"HDEL", b"INCR", b"EXEC"]
    redis.redis.data[f"{PREFIX}channels".encode()] = {b"bad": b"[1]"}
    with pytest.raises(ConfigError):
        redis.wait(Deferred.fromCoroutine(store.load()))
    redis.redis.silent = True
    pending = Deferred.fromCoroutine(store.put("a", {}))
    redis.net.reactor.advance(10)
    with pytest.raises(StoreUnavailable):
        redis.wait(pending)


def test_a_null_connector_name_is_the_default(tmp_path: Any) -> None:
    s = Setup(tmp_path)
    channel = run(s.admin.create({**BODY, "connector_name": "own"}))
    assert channel.settings.connector_name == "own"
    channel = run(s.admin.modify("id-0", {"connector_name": None}))
    assert channel.settings.connector_name == "id-0"


def test_a_reload_gives_the_api_channels_its_defaults(tmp_path: Any) -> None:
    s = Setup(tmp_path)
    run(s.admin.create(BODY))
    s.sync.start()
    reloaded = api_config(tmp_path, mo_message_url="http://127.0.0.1:9/reloaded")
    s.admin.use_config(reloaded)
    s.sync.use_config(reloaded)
    s.clock.advance(1)
    assert s.registry.get("id-0").settings.mo_message_url == "http://127.0.0.1:9/reloaded"
    s.sync.stop()


def test_a_registry_refusal_puts_the_store_back(tmp_path: Any) -> None:
    """Another channel took the connector name between the check and the start."""
    s = Setup(tmp_path)
    run(s.admin.create(BODY))
    s.registry.refuse = {"taken2"}
    with pytest.raises(ApiUsageError):
        run(s.admin.modify("id-0", {"connector_name": "taken2", "label": "x"}))
    assert s.stored()["id-0"].get("label") is None
    with pytest.raises(ApiUsageError):
        run(s.admin.create({**BODY, "connector_name": "taken2"}))
    assert set(s.stored()) == {"id-0"}
