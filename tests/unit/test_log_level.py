"""log_level: set_log_level decides which of the package's events are published."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from twisted.logger import LogLevel

from junebug_api.observe.log import debug_enabled, logger, set_log_level
from junebug_api.testing import captured_logs


@pytest.fixture(autouse=True)
def default_level() -> Iterator[None]:
    yield
    set_log_level("INFO")


def levels_published() -> list[LogLevel]:
    log = logger("junebug_api.test_log_level")
    with captured_logs() as events:
        log.debug("d")
        log.info("i")
        log.warn("w")
        log.error("e")
    return [e["log_level"] for e in events if e["log_namespace"] == "junebug_api.test_log_level"]


def test_info_by_default() -> None:
    assert levels_published() == [LogLevel.info, LogLevel.warn, LogLevel.error]
    assert not debug_enabled()


def test_debug_publishes_debug_events() -> None:
    set_log_level("debug")
    assert debug_enabled()
    assert levels_published() == [LogLevel.debug, LogLevel.info, LogLevel.warn, LogLevel.error]


def test_warning_drops_info() -> None:
    set_log_level("WARNING")
    assert levels_published() == [LogLevel.warn, LogLevel.error]
    set_log_level("info")
    assert levels_published() == [LogLevel.info, LogLevel.warn, LogLevel.error]
