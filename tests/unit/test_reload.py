"""SIGHUP's reload: the config read again, its channels applied; options
that need a restart named once and kept; a broken config one line."""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from twisted.internet.defer import Deferred

from junebug_api.channels.reload import ConfigReload, keep_options
from junebug_api.config.channels import ChannelSettings
from junebug_api.config.model import ConfigError, JunebugConfig, load_config, restart_needed
from junebug_api.testing import captured_logs

from .helpers import result_of

MO = "http://rp.example/receive"


def config(**options: Any) -> JunebugConfig:
    cli = {"http_bind": "127.0.0.1:0", "mo_message_url": MO, **options}
    return load_config(None, environ={}, cli={k: str(v) for k, v in cli.items()})


class Source:
    """A config source whose next load gives ``next`` (or raises it)."""

    def __init__(self, config: JunebugConfig) -> None:
        self.config = config
        self.next: JunebugConfig | Exception = config

    def load(self) -> JunebugConfig:
        if isinstance(self.next, Exception):
            raise self.next
        return self.next


class Registry:
    def __init__(self) -> None:
        self.applied: list[tuple[list[str], str]] = []

    async def apply(self, wanted: Sequence[ChannelSettings], origin: str) -> None:
        self.applied.append(([s.id for s in wanted], origin))


def reload_lines(logged: list[dict]) -> list[dict]:
    return [e for e in logged if e.get("log_namespace") == "junebug_api.channels.reload"]


def test_a_good_config_applies_its_channels() -> None:
    source = Source(config(channels=json.dumps({"a": {}})))
    registry = Registry()
    seen: list[JunebugConfig] = []
    reload = ConfigReload(source, registry, seen.append)
    source.next = config(channels=json.dumps({"a": {}, "b": {"mo_url": MO + "/b"}}))
    with captured_logs() as logged:
        result_of(reload())
    assert registry.applied == [(["a", "b"], "config")]
    assert reload.config is source.next and seen == [source.next]
    assert [e["log_level"].name for e in reload_lines(logged)] == ["info"]


def test_a_broken_config_is_one_line_and_nothing_changes() -> None:
    source = Source(config(connector_name="c"))
    registry = Registry()
    reload = ConfigReload(source, registry)
    source.next = ConfigError("config file x.yaml line 3: mapping values are not allowed here")
    with captured_logs() as logged:
        result_of(reload())
    assert registry.applied == []
    assert reload.config is source.config
    [line] = reload_lines(logged)
    assert line["log_level"].name == "error"
    assert "x.yaml line 3" in line["error"] and "running configuration stays" in line["log_format"]


def test_options_that_need_a_restart_are_named_once_and_kept() -> None:
    source = Source(config(connector_name="c"))
    registry = Registry()
    reload = ConfigReload(source, registry)
    source.next = config(
        connector_name="c2", amqp_hostname="elsewhere", log_level="DEBUG", character_limit=10
    )
    with captured_logs() as logged:
        result_of(reload())
    warnings = [e for e in reload_lines(logged) if e["log_level"].name == "warn"]
    [warning] = warnings
    assert warning["options"] == "connector_name, amqp.hostname, log_level"
    # The top-level connector keeps its id; its channel option changed.
    assert registry.applied == [(["c"], "config")]
    assert reload.config.connector_name == "c" and reload.config.character_limit == 10
    assert reload.config.amqp.hostname == source.config.amqp.hostname
    assert restart_needed(source.config, reload.config) == []


def test_keep_options_sets_nested_and_top_level_options_back() -> None:
    old, new = config(connector_name="c"), config(connector_name="c", amqp_port="5673")
    kept = keep_options(old, new, ["amqp.port"])
    assert kept.amqp.port == old.amqp.port
    assert kept == old


def test_reloads_asked_meanwhile_run_one_after_another() -> None:
    source = Source(config(channels=json.dumps({"a": {}})))
    gate: Deferred[None] = Deferred()
    calls: list[str] = []

    class Slow:
        async def apply(self, wanted: Sequence[ChannelSettings], origin: str) -> None:
            calls.append("start")
            await gate
            calls.append("end")

    reload = ConfigReload(source, Slow())
    first, second = reload(), reload()
    assert calls == ["start"]
    gate.callback(None)
    result_of(first), result_of(second)
    assert calls == ["start", "end", "start", "end"]
