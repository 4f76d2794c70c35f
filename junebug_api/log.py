"""Log events of this package, filtered by the configured ``log_level``.

Every module logs through ``Logger(namespace=__name__, observer=observer)``;
``set_log_level`` decides which of those events reach twistd's log.
"""

from __future__ import annotations

from twisted.logger import (
    FilteringLogObserver,
    Logger,
    LogLevel,
    LogLevelFilterPredicate,
    globalLogPublisher,
)

_predicate = LogLevelFilterPredicate(defaultLogLevel=LogLevel.info)
observer = FilteringLogObserver(globalLogPublisher, [_predicate])

_LEVELS = {
    "DEBUG": LogLevel.debug,
    "INFO": LogLevel.info,
    "WARNING": LogLevel.warn,
    "WARN": LogLevel.warn,
    "ERROR": LogLevel.error,
    "CRITICAL": LogLevel.critical,
}


def logger(namespace: str) -> Logger:
    """A Logger for a module of this package, subject to ``log_level``."""
    return Logger(namespace=namespace, observer=observer)


def set_log_level(name: str) -> None:
    """Drop this package's events below ``name`` (DEBUG, INFO, WARNING, ...)."""
    _predicate.defaultLogLevel = _LEVELS[name.upper()]


def debug_enabled() -> bool:
    """Whether debug events are logged (so callers can skip building them)."""
    return _predicate.defaultLogLevel is LogLevel.debug
