"""SentryReporter on a log publisher of its own: which events become Sentry
events, their tags, and the scrubbing of secrets. sentry-sdk is initialised
for real; only its transport is swapped for one that records envelopes, so
nothing leaves the process."""

from __future__ import annotations

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

    def capture_envelope(self, envelope: Any) -> None:
        self.envelopes.append(envelope)

    @property
    def events(self) -> list[dict]:
        return [e.get_event() for e in self.envelopes if e.get_event() is not None]

    def flush(self, timeout: float, callback: Any = None) -> None:
        self.flushed = timeout

    def kill(self) -> None:
        pass


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
        self.reporter = SentryReporter(
            "https://public@sentry.invalid/1",
            "test-env",
            "chan-1",
            Redactor(secrets=("s3cret-token",)),
            publisher=self.publisher,
        )
        self.reporter.start()
        client = sentry_sdk.get_client()
        client.transport.kill()  # the SDK's own HTTP transport, unused
        self.transport = client.transport = RecordingTransport()


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
    assert r.transport.flushed == 2
    r.log.error("after the stop")
    assert r.transport.envelopes == []
    assert result_of(r.reporter.stop(SynchronousThreads())) is None  # a second stop: no-op
    sentry_sdk.init()


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
