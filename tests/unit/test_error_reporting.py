"""SentryReporter on a log publisher of its own: which events become Sentry
events, their tags, and the scrubbing of secrets. sentry-sdk is initialised
for real, with a transport (given through ``SentryReporter``'s ``transport``)
that records envelopes, so nothing leaves the process."""

from __future__ import annotations

import logging
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import sentry_sdk
from sentry_sdk.transport import Transport
from twisted.logger import Logger, LogPublisher
from twisted.python.failure import Failure

from junebug_api.observe.error_reporting import SentryReporter, scrub
from junebug_api.observe.log import Redactor

from .helpers import result_of


class RecordingTransport(Transport):
    """Keeps what sentry-sdk would send."""

    def __init__(self) -> None:
        super().__init__()
        self.envelopes: list[Any] = []
        self.flushed: float | None = None
        self.killed = False

    def capture_envelope(self, envelope: Any) -> None:
        self.envelopes.append(envelope)

    @property
    def events(self) -> list[dict]:
        return [e.get_event() for e in self.envelopes if e.get_event() is not None]

    @property
    def item_types(self) -> list[str]:
        return [item.type for e in self.envelopes for item in e.items]

    def flush(self, timeout: float, callback: Any = None) -> None:
        self.flushed = timeout

    def kill(self) -> None:
        self.killed = True


class SynchronousThreads:
    """The reactor parts ``deferToThreadPool`` uses, running the work at once."""

    def getThreadPool(self) -> SynchronousThreads:
        return self

    def callInThreadWithCallback(self, on_result: Any, f: Any, *args: Any) -> None:
        try:
            on_result(True, f(*args))
        except Exception:
            on_result(False, Failure())

    def callFromThread(self, f: Any, *args: Any) -> None:
        f(*args)


class Reporting:
    def __init__(self) -> None:
        self.publisher = LogPublisher()
        self.log = Logger(namespace="junebug_api.delivery.consumer", observer=self.publisher)
        self.transport = RecordingTransport()
        self.reporter = SentryReporter(
            "https://public@sentry.invalid/1",
            "test-env",
            "chan-1",
            Redactor(secrets=("s3cret-token",)),
            publisher=self.publisher,
            transport=self.transport,
        )
        self.reporter.start()


@pytest.fixture
def reporting() -> Iterator[Callable[[], Reporting]]:
    """Starts reporting when the test calls it: sentry-sdk keeps its tags per
    context, and pytest-twisted runs a test in a greenlet (a context) of its
    own, apart from its fixtures."""
    started: list[Reporting] = []

    def start() -> Reporting:
        started.append(Reporting())
        return started[-1]

    yield start
    for r in started:
        result_of(r.reporter.stop(SynchronousThreads()))
    sentry_sdk.init()  # no DSN: a client that sends nothing


def test_an_error_line_becomes_one_tagged_and_scrubbed_event(
    reporting: Callable[[], Reporting],
) -> None:
    r = reporting()
    r.log.error(
        "Could not deliver {message_id} on {queue} to {url}",
        message_id="m-1",
        queue="chan-1.inbound",
        url="http://user:pw@rapidpro/receive?token=s3cret-token",
    )
    (event,) = r.transport.events
    assert event["level"] == "error"
    assert event["tags"] == {
        "connector_name": "chan-1",
        "logger": "junebug_api.delivery.consumer",
        "message_id": "m-1",
        "queue": "chan-1.inbound",
    }
    assert event["environment"] == "test-env"
    assert event["release"].startswith("junebug-api@")
    text = event["message"] + event["extra"]["log_message"]
    assert "s3cret-token" not in text and "pw@" not in text
    assert "Could not deliver m-1 on chan-1.inbound" in event["message"]


def test_a_logged_failure_becomes_an_exception_event(reporting: Callable[[], Reporting]) -> None:
    r = reporting()
    try:
        raise ValueError("bad body with s3cret-token in it")
    except ValueError:
        r.log.failure("Consumer failed for {message_id}", message_id=42)
    (event,) = r.transport.events
    (exception,) = event["exception"]["values"]
    assert exception["type"] == "ValueError"
    assert "s3cret-token" not in exception["value"]
    assert "message_id" not in event["tags"]  # only strings become tags
    assert event["extra"]["log_message"] == "Consumer failed for 42"


def test_lines_below_error_are_not_reported(reporting: Callable[[], Reporting]) -> None:
    r = reporting()
    r.log.info("Connected")
    r.log.warn("Redis is slow")
    assert r.transport.envelopes == []


def test_a_broken_format_string_still_reports(reporting: Callable[[], Reporting]) -> None:
    r = reporting()
    r.log.error("Broken {missing")
    (event,) = r.transport.events
    assert "Broken" in event["extra"]["log_message"]


def test_after_stop_nothing_is_reported() -> None:
    r = Reporting()
    assert result_of(r.reporter.stop(SynchronousThreads())) is None
    assert r.transport.flushed == 2  # what was queued got up to 2 s
    assert r.transport.killed
    r.log.error("after the stop")
    assert r.transport.envelopes == []
    assert result_of(r.reporter.stop(SynchronousThreads())) is None  # a second stop: no-op
    sentry_sdk.init()


def test_no_local_variables_no_stack_of_the_log_call(
    reporting: Callable[[], Reporting],
) -> None:
    """sentry-sdk 3 sends frame variables and attaches the caller's stack to a
    message unless told not to; the local here is no secret the redactor knows."""
    r = reporting()

    def deliver(body: str) -> None:
        raise ValueError("undeliverable")

    local_body = f"a body only a local variable holds: {uuid.uuid4().hex}"
    try:
        deliver(local_body)
    except ValueError:
        r.log.failure("Consumer failed")
    r.log.error("Could not deliver {message_id}", message_id="m-2")
    failure_event, message_event = r.transport.events
    (exception,) = failure_event["exception"]["values"]
    frames = exception["stacktrace"]["frames"]
    assert [f["function"] for f in frames][-1] == "deliver"
    assert all("vars" not in f for f in frames)
    assert local_body not in repr(r.transport.events)
    assert "threads" not in message_event and "stacktrace" not in message_event


def test_only_events_are_sent(reporting: Callable[[], Reporting]) -> None:
    """No sessions or logs beside the events, and no default integration: a
    stdlib logging error is not this observer's to report, and neither the
    command line nor the installed modules go with an event."""
    r = reporting()
    logging.getLogger("some.library").error("a stdlib logging error")
    r.log.error("one line")
    result_of(r.reporter.stop(SynchronousThreads()))
    assert r.transport.item_types == ["event"]
    (event,) = r.transport.events
    assert "sys.argv" not in event.get("extra", {})
    assert "modules" not in event


def test_scrub_takes_secrets_out_of_nested_values() -> None:
    redactor = Redactor(secrets=("hunter2",))
    event = {
        "request": {"headers": {"Authorization": "Basic abc", "X-Count": 3}},
        "extra": {"args": ("the password is hunter2", b"raw"), "list": ["hunter2", 1]},
        "api_key": "k",
        "password_count": 2,
    }
    assert scrub(event, redactor) == {
        "request": {"headers": {"Authorization": "[Filtered]", "X-Count": 3}},
        "extra": {"args": ("the password is ***", b"raw"), "list": ["***", 1]},
        "api_key": "[Filtered]",
        "password_count": 2,
    }
