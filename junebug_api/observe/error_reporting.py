"""Errors to Sentry when ``sentry_dsn`` is set, as vumi2 does.

sentry-sdk is imported only here, and only when a DSN is set, so the twistd
dropin and a start without a DSN never load it. A log observer turns every
log event at ERROR or above, and every logged failure (unhandled errors
included: Twisted logs those as failures), into exactly one Sentry event,
tagged ``connector_name`` and, when the event names them, ``message_id`` and
``queue``. ``before_send`` scrubs every event: URL user info, the config's
passwords and tokens, and any value under a key that names a secret
(password, token, authorization, ...). sentry-sdk sends from its own
background thread: the reactor only hands the event over, and a Sentry that
is down or slow costs a dropped report, nothing else.

Written for sentry-sdk 3 (setup.cfg admits 3.x only): 3.0 took out
``include_local_variables`` and ``send_default_pii`` for ``data_collection``,
and attaches a stack trace with its frames' variables to every message unless
``attach_stacktrace`` is off.
"""

from __future__ import annotations

import re
from typing import Any

from twisted.internet.defer import Deferred, succeed
from twisted.internet.threads import deferToThreadPool
from twisted.logger import LogLevel, formatEvent, globalLogPublisher

from junebug_api import __version__
from junebug_api.observe.log import Redactor

_REPORTED_LEVELS = frozenset({LogLevel.error, LogLevel.critical})
_SECRET_KEY = re.compile(r"pass|token|secret|authori[sz]ation|cookie|api_?key|dsn", re.I)
_TAGS = ("message_id", "queue")


def scrub(value: Any, redactor: Redactor) -> Any:
    """``value`` (a Sentry event or part of it) with every secret taken out."""
    if isinstance(value, dict):
        return {
            k: "[Filtered]"
            if isinstance(k, str) and _SECRET_KEY.search(k) and isinstance(v, (str, bytes))
            else scrub(v, redactor)
            for k, v in value.items()
        }
    if isinstance(value, list):
        return [scrub(v, redactor) for v in value]
    if isinstance(value, tuple):
        return tuple(scrub(v, redactor) for v in value)
    if isinstance(value, str):
        return redactor.text(value)
    return value


class SentryReporter:
    """Initialises sentry-sdk and reports error log events to it."""

    def __init__(
        self,
        dsn: str,
        environment: str | None,
        connector_name: str,
        redactor: Redactor,
        publisher: Any = globalLogPublisher,
        transport: Any = None,
    ) -> None:
        """``transport``: a ``sentry_sdk.transport.Transport`` to send with
        instead of sentry-sdk's own HTTP one (the unit tests record with it)."""
        self._dsn = dsn
        self._environment = environment
        self._connector_name = connector_name
        self._redactor = redactor
        self._publisher = publisher
        self._transport = transport
        self._sdk: Any = None

    def start(self) -> None:
        """Initialise the SDK and start watching the log."""
        import sentry_sdk

        sentry_sdk.init(**self._sdk_options())
        sentry_sdk.set_tag("connector_name", self._connector_name)
        self._sdk = sentry_sdk
        self._publisher.addObserver(self)

    def _sdk_options(self) -> dict[str, Any]:
        """The keyword arguments of ``sentry_sdk.init``: only the events this
        observer hands over, scrubbed, and nothing the SDK would collect itself."""
        options: dict[str, Any] = {
            "dsn": self._dsn,
            "release": f"junebug-api@{__version__}",
            "environment": self._environment,
            # No logging, excepthook, argv, module or other integrations.
            "default_integrations": False,
            "auto_enabling_integrations": False,
            # No local variables (they hold secrets and message content), no
            # user, request headers, cookies, query strings or bodies.
            "data_collection": {
                "stack_frame_variables": False,
                "user_info": False,
                "cookies": {"mode": "off"},
                "http_headers": {"request": {"mode": "off"}},
                "url_query_params": {"mode": "off"},
                "http_bodies": [],
            },
            # A message event is the log line, not the logging call's stack.
            "attach_stacktrace": False,
            "max_breadcrumbs": 0,
            # No sessions and no reports about dropped reports: only events.
            "auto_session_tracking": False,
            "send_client_reports": False,
            "before_send": self._before_send,
            "shutdown_timeout": 2,
        }
        if self._transport is not None:
            options["transport"] = self._transport
        return options

    def stop(self, reactor: Any) -> Deferred[None]:
        """Stop watching the log, send what is queued (in a thread, at most
        2 s) and close the SDK's client: nothing is reported after this."""
        if self._sdk is None:
            return succeed(None)
        self._publisher.removeObserver(self)
        client = self._sdk.get_client()
        self._sdk = None
        return deferToThreadPool(reactor, reactor.getThreadPool(), client.close, 2).addBoth(
            lambda _: None
        )

    def __call__(self, event: dict) -> None:
        """A log observer: report failures and errors, ignore the rest."""
        sdk = self._sdk
        if sdk is None:
            return
        failure = event.get("log_failure")
        if failure is None and event.get("log_level") not in _REPORTED_LEVELS:
            return
        tags = {"logger": str(event.get("log_namespace") or "-")}
        for name in _TAGS:
            value = event.get(name)
            if isinstance(value, str) and value:
                tags[name] = value
        try:
            message = formatEvent(event)
        except Exception:  # a broken format string must not lose the report
            message = str(event.get("log_format"))
        extras = {"log_message": message}
        try:
            if failure is not None:
                sdk.capture_exception(failure.value, tags=tags, extras=extras)
            else:
                sdk.capture_message(message, level="error", tags=tags, extras=extras)
        except Exception:
            pass  # logging it would report it again, and again

    def _before_send(self, event: dict, hint: dict) -> dict:
        return scrub(event, self._redactor)
