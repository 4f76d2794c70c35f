"""KleinAppResource: a Klein app served over a real HTTP channel (StringTransport)."""

from __future__ import annotations

import gc
import json
import weakref
from collections.abc import Iterator
from typing import Any

import pytest
from klein import Klein
from twisted.internet.defer import Deferred, succeed
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.web.server import Site

from junebug_api.http.klein_resource import KleinAppResource
from junebug_api.testing import captured_logs


class App:
    """A small Klein app whose endpoints the tests drive by hand."""

    def __init__(self) -> None:
        self.klein = Klein()
        self.requests: list[Any] = []
        self.pending: Deferred[bytes] | None = None
        self.cancelled = False
        self.answer_on_cancel: bytes | None = None
        self.errors: list[Failure] = []
        self.klein.route("/now", methods=["POST"])(self.now)
        self.klein.route("/later", methods=["POST"])(self.later)
        self.klein.route("/broken", methods=["GET"])(self.broken)
        self.klein.route("/async", methods=["GET"])(self.fired)
        self.klein.route("/partial", methods=["POST"])(self.partial)
        self.klein.route("/none", methods=["GET"])(self.nothing)
        self.klein.route("/items/<item>", methods=["GET"])(self.item)
        self.error_handler_raises = False
        self.error_handler_gives_up = False

    def now(self, request: Any) -> bytes:
        self.requests.append(weakref.ref(request))
        return b"now:" + request.content.read()

    def later(self, request: Any) -> Deferred[bytes]:
        self.requests.append(weakref.ref(request))

        def cancel(d: Deferred) -> None:
            self.cancelled = True
            if self.answer_on_cancel is not None:
                d.callback(self.answer_on_cancel)

        self.pending = Deferred(cancel)
        return self.pending

    def broken(self, request: Any) -> bytes:
        raise RuntimeError("boom")

    def fired(self, request: Any) -> Deferred[bytes]:
        return succeed(b"async")

    def nothing(self, request: Any) -> None:
        return None

    def item(self, request: Any, item: str) -> bytes:
        return b"item:" + item.encode()

    def partial(self, request: Any) -> Deferred[bytes]:
        request.write(b"partial")
        self.pending = Deferred()
        return self.pending

    def on_error(self, request: Any, failure: Failure) -> bytes | Failure:
        self.errors.append(failure)
        if self.error_handler_raises:
            raise ZeroDivisionError("the error handler failed")
        if self.error_handler_gives_up:
            return failure
        if failure.check(RuntimeError):
            request.setResponseCode(500)
        else:
            request.setResponseCode(getattr(failure.value, "code", 599))
        return b"error:" + type(failure.value).__name__.encode()


@pytest.fixture
def app() -> App:
    return App()


class Client:
    """One HTTP connection to a Site serving the app."""

    def __init__(self, app: App, resource: Any = None) -> None:
        self.site = Site(resource or KleinAppResource(app.klein, app.on_error))
        self.protocol = self.site.buildProtocol(None)
        self.transport = StringTransport()
        self.protocol.makeConnection(self.transport)

    def send(self, method: str, path: bytes, body: bytes = b"") -> None:
        self.protocol.dataReceived(
            method.encode() + b" " + path + b" HTTP/1.1\r\nHost: x\r\n"
            b"Content-Length: %d\r\n\r\n" % len(body) + body
        )

    def answer(self) -> bytes:
        value = self.transport.value()
        self.transport.clear()
        return value

    def close(self) -> None:
        self.protocol.connectionLost(Failure(ConnectionError("gone")))


@pytest.fixture
def no_cycle_collector() -> Iterator[None]:
    gc.collect()
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


def test_bytes_answer(app: App) -> None:
    client = Client(app)
    client.send("POST", b"/now", b"hi")
    answer = client.answer()
    assert answer.startswith(b"HTTP/1.1 200 OK\r\n")
    assert answer.endswith(b"\r\n\r\nnow:hi")


def test_deferred_answer(app: App) -> None:
    client = Client(app)
    client.send("POST", b"/later")
    assert client.answer() == b""
    assert app.pending is not None
    app.pending.callback(b"done")
    answer = client.answer()
    assert b"\r\nContent-Length: 4\r\n" in answer
    assert answer.endswith(b"\r\n\r\ndone")


def test_deferred_that_already_fired(app: App) -> None:
    client = Client(app)
    client.send("GET", b"/async")
    assert client.answer().endswith(b"\r\n\r\nasync")


@pytest.mark.parametrize(
    ("method", "path", "status", "error"),
    [
        ("GET", b"/nowhere", b"404", b"NotFound"),
        ("GET", b"/now", b"405", b"MethodNotAllowed"),
        ("GET", b"/%ff", b"400", b"BadRequest"),
        ("GET", b"/broken", b"500", b"RuntimeError"),
    ],
)
def test_errors_go_to_the_handler(
    app: App, method: str, path: bytes, status: bytes, error: bytes
) -> None:
    client = Client(app)
    client.send(method, path)
    answer = client.answer()
    assert answer.startswith(b"HTTP/1.1 " + status)
    assert answer.endswith(b"\r\n\r\nerror:" + error)


def test_failed_deferred_goes_to_the_handler(app: App) -> None:
    client = Client(app)
    client.send("POST", b"/later")
    assert app.pending is not None
    app.pending.errback(RuntimeError("late boom"))
    assert client.answer().endswith(b"\r\n\r\nerror:RuntimeError")


def test_client_gone_cancels_and_answers_nothing(app: App) -> None:
    client = Client(app)
    client.send("POST", b"/later")
    client.close()
    assert app.cancelled
    assert [f.type.__name__ for f in app.errors] == ["CancelledError"]
    assert client.answer() == b""


def test_client_gone_but_the_endpoint_answers_anyway(app: App) -> None:
    """twisted.web refuses finish() after a disconnect: nothing is written, nothing fails."""
    app.answer_on_cancel = b"too late"
    client = Client(app)
    client.send("POST", b"/later")
    with captured_logs() as events:
        client.close()
    assert app.cancelled
    assert app.errors == []
    assert client.answer() == b""
    assert [e for e in events if "log_failure" in e] == []


def assert_internal_error(answer: bytes) -> None:
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 500 ")
    assert b"\r\nContent-Type: application/json; charset=utf-8\r\n" in head
    assert json.loads(body)["result"]["errors"] == [
        {"type": "InternalError", "message": "internal error"}
    ]


def test_an_answer_that_is_not_bytes_is_a_logged_500(app: App) -> None:
    client = Client(app)
    client.send("POST", b"/later")
    assert app.pending is not None
    with captured_logs() as events:
        app.pending.callback("not bytes")  # type: ignore[arg-type]
    [event] = [e for e in events if "log_failure" in e]
    assert event["log_format"] == "Could not answer {method} {path}"
    assert event["path"] == b"/later"
    assert_internal_error(client.answer())


def test_an_endpoint_result_that_is_not_bytes_goes_to_the_handler(app: App) -> None:
    client = Client(app)
    client.send("GET", b"/none")
    assert client.answer().endswith(b"\r\n\r\nerror:TypeError")


@pytest.mark.parametrize("path", [b"/broken", b"/nowhere"])
def test_an_error_handler_that_raises_still_answers(app: App, path: bytes) -> None:
    app.error_handler_raises = True
    client = Client(app)
    with captured_logs() as events:
        client.send("GET", path)
    assert_internal_error(client.answer())
    [event] = [e for e in events if "log_failure" in e]
    assert event["log_failure"].check(ZeroDivisionError)


def test_an_error_handler_that_gives_up_while_the_client_waits_still_answers(app: App) -> None:
    app.error_handler_gives_up = True
    client = Client(app)
    client.send("POST", b"/later")
    assert app.pending is not None
    with captured_logs() as events:
        app.pending.cancel()  # cancelled by something other than a disconnect
    assert_internal_error(client.answer())
    assert [e["log_failure"].type.__name__ for e in events if "log_failure" in e] == [
        "CancelledError"
    ]


def test_a_failure_after_the_answer_began_closes_the_connection(app: App) -> None:
    app.error_handler_raises = True
    client = Client(app)
    client.send("POST", b"/partial")
    assert app.pending is not None
    assert not client.transport.disconnecting
    with captured_logs():
        app.pending.errback(RuntimeError("late"))
    assert client.transport.disconnecting
    assert client.answer().endswith(b"partial\r\n")


@pytest.mark.usefixtures("no_cycle_collector")
@pytest.mark.parametrize("path", [b"/now", b"/later"])
def test_finished_request_is_freed_without_the_cycle_collector(app: App, path: bytes) -> None:
    client = Client(app)
    client.send("POST", path, b"x")
    if app.pending is not None:
        app.pending.callback(b"done")
    assert client.answer()
    client.send("POST", b"/now", b"next")  # twisted.web keeps the last request on its channel
    assert client.answer()
    assert app.requests[0]() is None


@pytest.mark.usefixtures("no_cycle_collector")
def test_klein_own_resource_keeps_requests_in_a_cycle(app: App) -> None:
    """Why KleinAppResource exists: this fails once Klein frees its requests."""
    client = Client(app, app.klein.resource())
    client.send("POST", b"/now", b"x")
    client.send("POST", b"/now", b"next")
    assert app.requests[0]() is not None
    gc.collect()
    assert app.requests[0]() is None


@pytest.mark.usefixtures("no_cycle_collector")
def test_a_repeated_path_is_routed_without_garbage_for_the_cycle_collector(app: App) -> None:
    """werkzeug's matcher leaves a cycle per match; a path routed before is not matched again."""
    client = Client(app)
    client.send("POST", b"/now", b"first")
    assert client.answer().endswith(b"now:first")
    gc.collect()
    for i in range(20):
        client.send("POST", b"/now", b"%d" % i)
        assert client.answer().endswith(b"now:%d" % i)
    assert gc.collect() == 0


@pytest.mark.usefixtures("no_cycle_collector")
def test_werkzeug_matching_leaves_a_cycle_per_request(app: App) -> None:
    """Why routes are kept: this fails once werkzeug's matcher stops making cycles."""
    client = Client(app)
    gc.collect()
    for i in range(20):
        client.send("GET", b"/items/%d" % i)  # each path new: werkzeug matches each
        assert client.answer().endswith(b"item:%d" % i)
    assert gc.collect() >= 20


def test_kept_routes_answer_as_werkzeug_does(app: App) -> None:
    client = Client(app)
    for _ in range(2):
        for i in range(300):  # more paths than are kept
            client.send("GET", b"/items/%d" % i)
            assert client.answer().endswith(b"\r\n\r\nitem:%d" % i)
        client.send("GET", b"/nowhere")
        assert client.answer().startswith(b"HTTP/1.1 404 ")
        client.send("GET", b"/now")
        assert client.answer().startswith(b"HTTP/1.1 405 ")
        client.send("POST", b"/now", b"x")
        assert client.answer().endswith(b"now:x")
