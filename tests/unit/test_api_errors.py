"""api_errors: the Junebug envelope of answers and errors."""

from __future__ import annotations

import json
from http import HTTPStatus

from twisted.web.test.requesthelper import DummyRequest

from junebug_api.formats.api_errors import (
    MessageNotFound,
    ServiceUnavailable,
    answer_error,
    envelope,
    error_envelope,
)


def test_error_envelopes() -> None:
    data = json.loads(error_envelope(MessageNotFound("gone ñ")))
    assert data == {
        "status": 400,
        "code": "Bad Request",
        "description": "message not found",
        "result": {"errors": [{"type": "MessageNotFound", "message": "gone ñ"}]},
    }
    data = json.loads(error_envelope(ServiceUnavailable("down")))
    assert (data["status"], data["code"], data["description"]) == (
        503,
        "Service Unavailable",
        "service unavailable",
    )


def test_envelope_is_utf8() -> None:
    raw = envelope(HTTPStatus.CREATED, "message submitted", {"content": "漢字"})
    assert "漢字".encode() in raw


def test_an_error_is_answered_with_its_status_and_retry_after() -> None:
    request = DummyRequest([b""])
    error = ServiceUnavailable("busy")
    error.retry_after = 7
    body = answer_error(request, error)
    assert body == error_envelope(error)
    assert request.responseCode == 503
    assert request.responseHeaders.getRawHeaders(b"Retry-After") == [b"7"]
    assert request.responseHeaders.getRawHeaders(b"Content-Type") == [
        b"application/json; charset=utf-8"
    ]
    request = DummyRequest([b""])
    answer_error(request, MessageNotFound("gone"))
    assert request.responseCode == 400
    assert not request.responseHeaders.hasHeader(b"Retry-After")
