"""Log events of this package, filtered by the configured ``log_level``, and
the lines of the log file in ``log_format`` (text or JSON).

Every module logs through ``Logger(namespace=__name__, observer=observer)``;
``set_log_level`` decides which of those events reach twistd's log. With
twistd's log observer is replaced (through the application's ``ILogObserver``
component, which twistd looks up) by one that writes the same file: twistd's
text lines, or with ``log_format: json`` one JSON object per line; either way
:class:`Redactor` keeps secrets out of every line, and out of Sentry.
"""

from __future__ import annotations

import json
import os
import re
import sys
import time
from collections import Counter
from collections.abc import Iterable
from datetime import UTC, datetime
from typing import IO, Any

from twisted.logger import (
    FileLogObserver,
    FilteringLogObserver,
    ILogObserver,
    Logger,
    LogLevel,
    LogLevelFilterPredicate,
    formatEvent,
    formatEventAsClassicLogText,
    globalLogPublisher,
)
from twisted.python.logfile import LogFile

from junebug_api.config.redaction import top_level_secret_values
from junebug_api.formats.urls import mask_urls

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
    # The predicate filters by the level of namespace "": its defaultLogLevel
    # is only what clearLogLevels resets to.
    _predicate.setLogLevelForNamespace("", _LEVELS[name.upper()])


def debug_enabled() -> bool:
    """Whether debug events are logged (so callers can skip building them)."""
    return _predicate.logLevelForNamespace("") is LogLevel.debug


# -- secrets out of log lines and error reports -------------------------------

_URL_USERINFO = re.compile(r"(?P<scheme>\b[a-zA-Z][a-zA-Z0-9+.\-]*://)[^/\s@\"']+@")


class Redactor:
    """Takes secrets out of text: URL user info, the config's own secrets, and
    what an http(s) URL may not show in a log (query values, identifiers in
    its path: :func:`~junebug_api.formats.urls.url_for_log`).

    ``secrets`` are the literal values (passwords, tokens, URL passwords) the
    config and the running channels hold; any text that contains one gets
    ``***`` instead. It is the safety net under every log line and Sentry
    event: the code that logs a URL shows it with ``url_for_log`` already.
    Channels come and go while the process runs, so their secrets are added
    (:meth:`add`) and removed (:meth:`remove`): each value is counted, so one
    that two holders share stays until both are gone.
    """

    def __init__(self, secrets: Iterable[str] = ()) -> None:
        self._held: Counter[str] = Counter()
        #: The values taken out, longest first (a tuple: replaced, never changed in place).
        self.secrets: tuple[str, ...] = ()
        self.add(secrets)

    def __repr__(self) -> str:
        return f"<Redactor of {len(self.secrets)} secret(s)>"

    @classmethod
    def for_config(cls, config: Any) -> Redactor:
        """The top-level secrets of a :class:`~junebug_api.config.model.JunebugConfig`
        (those from ``<option>_file`` too); each channel's are added as it starts."""
        return cls(top_level_secret_values(config))

    def add(self, values: Iterable[str]) -> None:
        """Take ``values`` out of every text from now on."""
        self._held.update(_kept(values))
        self._order()

    def remove(self, values: Iterable[str]) -> None:
        """Forget ``values`` once (one :meth:`add` of them); a value still added
        by another holder stays."""
        self._held.subtract(_kept(values))
        for value in [v for v, count in self._held.items() if count <= 0]:
            del self._held[value]
        self._order()

    def _order(self) -> None:
        self.secrets = tuple(sorted(self._held, key=len, reverse=True))

    def text(self, text: str) -> str:
        """``text`` without URL user info, http(s) query values and path
        identifiers, or any of the secrets."""
        if "://" in text:
            text = mask_urls(text)
        if "@" in text:
            text = _URL_USERINFO.sub(r"\g<scheme>***@", text)
        for secret in self.secrets:
            if secret in text:
                text = text.replace(secret, "***")
        return text

    def value(self, value: Any) -> Any:
        """A JSON-able value with every string in it redacted."""
        if isinstance(value, str):
            return self.text(value)
        if isinstance(value, dict):
            return {str(k): self.value(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [self.value(v) for v in value]
        if value is None or isinstance(value, (bool, int, float)):
            return value
        return self.text(str(value))


def _kept(values: Iterable[str]) -> list[str]:
    """The values worth redacting: very short ones ("guest", "x") would
    mangle ordinary words."""
    return [v for v in set(values) if v and len(v) >= 4 and v != "guest"]


# -- log_format: json ------------------------------------------------------------

# Keys of an event that are Twisted's bookkeeping, not the event's fields.
_LEGACY_KEYS = frozenset({"format", "message", "isError", "system", "time", "why", "failure"})


def json_log_line(event: dict, redactor: Redactor, connector: str | None = None) -> str:
    """One log event as one line of JSON: time, level, logger, message,
    ``connector``, then the event's own fields (``message_id``, ``queue``,
    ``url``, ``error``, ...); an error or failure becomes text, and a
    failed attempt's ``reason`` is given as ``error`` too; every string
    goes through ``redactor``.
    """
    level = event.get("log_level")
    when = event.get("log_time")
    record: dict[str, Any] = {
        "time": datetime.fromtimestamp(time.time() if when is None else when, UTC).isoformat(
            timespec="milliseconds"
        ),
        "level": level.name if level is not None else "info",
        "logger": event.get("log_namespace") or event.get("system") or "-",
        "message": formatEvent(event),
    }
    if connector is not None:
        record["connector"] = connector
    for key, value in event.items():
        if key.startswith("log_") or key in _LEGACY_KEYS or key in record:
            continue
        record[key] = value
    failure = event.get("log_failure")
    if failure is not None:
        record["error"] = f"{failure.type.__name__}: {failure.getErrorMessage()}"
        record["traceback"] = failure.getTraceback()
    elif "error" not in record and isinstance(record.get("reason"), str):
        # A failed attempt names its cause ``reason``; ``error`` is where log
        # searches look for it, so it is there too.
        record["error"] = record["reason"]
    return json.dumps(redactor.value(record), ensure_ascii=False, default=str) + "\n"


def json_file_log_observer(
    out: IO[str], redactor: Redactor, connector: str | None = None
) -> ILogObserver:
    """A log observer writing :func:`json_log_line` lines to ``out``."""
    return FileLogObserver(out, lambda event: json_log_line(event, redactor, connector))


def text_file_log_observer(out: IO[str], redactor: Redactor) -> ILogObserver:
    """twistd's own text lines (``log_format: text``), each through ``redactor``."""

    def line(event: dict) -> str | None:
        text = formatEventAsClassicLogText(event)
        return redactor.text(text) if text else text

    return FileLogObserver(out, line)


def log_file_observer(
    log_format: str, out: IO[str], redactor: Redactor, connector: str | None = None
) -> ILogObserver:
    """The observer writing ``log_format`` (``text`` or ``json``) lines to
    ``out``, every line through ``redactor``."""
    if log_format == "json":
        return json_file_log_observer(out, redactor, connector)
    return text_file_log_observer(out, redactor)


def twistd_log_file(server_options: Any) -> IO[str] | None:
    """Where twistd would write its log, from its own options (``--logfile``,
    ``-n``); None when it logs to syslog (then twistd's own observer stays)."""
    if server_options.get("syslog"):
        return None
    name = server_options.get("logfile") or ""
    if name == "-" or (server_options.get("nodaemon") and not name):
        return sys.stdout
    return LogFile.fromFullPath(os.path.abspath(name or "twistd.log"))
