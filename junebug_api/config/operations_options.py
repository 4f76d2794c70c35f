"""The operations options: logs, Sentry, metrics and /health."""

from __future__ import annotations

from typing import Any
from urllib.parse import urlsplit

import attrs

from junebug_api.config.checks import Between, Check, OneOf, UrlPath, seconds
from junebug_api.config.options import option
from junebug_api.config.urls import url_problem

LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "WARN", "ERROR", "CRITICAL")
LOG_FORMATS = ("text", "json")
_UNSET = ("", "null", "none")
_DSN_SHAPE = "must look like https://<key>@<host>/<project id>"


def sentry_unset(dsn: str | None) -> bool:
    """Whether a Sentry DSN means "off": unset, empty, ``null`` or ``none``
    (as environment variables spell "unset")."""
    return (dsn or "").strip().lower() in _UNSET


@attrs.frozen
class SentryDsn(Check):
    """A Sentry DSN, ``https://<key>@<host>/<project id>``, or "off"; the
    DSN itself is never repeated: it holds the project's key."""

    def problem(self, value: Any) -> str | None:
        if sentry_unset(value):
            return None
        dsn = value.strip()
        try:
            parts = urlsplit(dsn)
        except ValueError:
            return _DSN_SHAPE
        if (
            parts.scheme not in ("http", "https")
            or not parts.hostname
            or not parts.username
            or not parts.path.strip("/")
        ):
            return _DSN_SHAPE
        return url_problem(dsn)

    @property
    def text(self) -> str:
        return "Sentry DSN"


@attrs.frozen(kw_only=True, slots=False)
class OperationsOptions:
    """The logging, Sentry, metrics and health options of the top-level config."""

    log_level: str = option(
        "INFO",
        checks=[OneOf(LOG_LEVELS, fold_case=True)],
        description="The least level of this service's log lines (DEBUG adds access logs).",
    )
    log_format: str = option(
        "text",
        checks=[OneOf(LOG_FORMATS)],
        description="text (twistd's lines) or json (one JSON object per line).",
    )
    middlewares: list = option(
        factory=list,
        description="Accepted for vumi2's configs; a non-empty list is ignored with a warning.",
    )
    sentry_dsn: str | None = option(
        checks=[SentryDsn()],
        secret=True,
        description=(
            "Sends every error and unhandled failure to Sentry; null, none or empty: off."
        ),
    )
    sentry_environment: str | None = option(description="The Sentry environment of those events.")
    metrics_enabled: bool = option(
        True,
        description="Serves Prometheus metrics at metrics_path; false keeps no metrics at all.",
    )
    metrics_path: str = option(
        "/metrics",
        checks=[UrlPath()],
        description="Where the metrics are served, outside the API's routes.",
    )
    metrics_auth: bool = option(
        False,
        description=(
            "Asks the top-level API credentials for metrics_path; false leaves it open,"
            " like /health."
        ),
    )
    health_stuck_after: float = option(
        300.0,
        checks=[seconds()],
        description=(
            "Seconds a queue may hold ready messages with none taken before /health calls it stuck."
        ),
    )
    metric_window: float = option(
        10.0,
        checks=[seconds(1, 3600)],
        description="Seconds over which GET /channels/<id> reports its message and event rates.",
    )
    max_logs: int = option(
        100,
        checks=[Between(1, 100_000)],
        description="Log records kept in memory per channel for GET /channels/<id>/logs.",
    )

    @property
    def sentry(self) -> str | None:
        """The Sentry DSN to use: None when unset (see :func:`sentry_unset`)."""
        return None if sentry_unset(self.sentry_dsn) else self.sentry_dsn.strip()
