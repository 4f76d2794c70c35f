"""Helpers for the operations tests: a Sentry stand-in and a cache that fails.

``SentryRecorder`` is a local HTTP server that takes what sentry-sdk sends
(envelopes on ``/api/<project>/envelope/``) and keeps the raw bodies, so a
test can both count events and grep everything sent for its secrets.
``ExplodingHealthCache`` is loaded by the service under test (through
``state_cache_class``) to cause an unhandled error on demand.
"""

from __future__ import annotations

import gzip
import json
import os
from typing import Any

from twisted.internet import reactor
from twisted.web.resource import Resource
from twisted.web.server import Site

from junebug_api.state.memory_cache import InMemoryStateCache

EXPLODE_ENV = "JUNEBUG_TEST_EXPLODE_FILE"


class SentryRecorder(Resource):
    """Records every envelope sentry-sdk POSTs, decompressed."""

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.bodies: list[bytes] = []
        self.headers: list[dict[str, str]] = []

    def render_POST(self, request: Any) -> bytes:
        body = request.content.read()
        encoding = (request.getHeader(b"content-encoding") or b"").decode()
        if encoding == "gzip":
            body = gzip.decompress(body)
        elif encoding:
            raise AssertionError(f"unexpected Content-Encoding {encoding}")
        self.bodies.append(body)
        self.headers.append(
            {
                k.decode().lower(): v[0].decode()
                for k, v in request.requestHeaders.getAllRawHeaders()
            }
        )
        request.setResponseCode(200)
        return b"{}"

    def events(self) -> list[dict]:
        """Every ``event`` item of every envelope received."""
        found = []
        for body in self.bodies:
            lines = body.split(b"\n")
            # Envelope: a header line, then (item header, payload) pairs.
            i = 1
            while i + 1 < len(lines):
                header = json.loads(lines[i])
                payload = lines[i + 1]
                if header.get("type") == "event":
                    found.append(json.loads(payload))
                i += 2
        return found

    def raw(self) -> str:
        """Everything sent, headers and bodies, as one text to grep."""
        return "\n".join(
            [json.dumps(h) for h in self.headers]
            + [b.decode("utf-8", "replace") for b in self.bodies]
        )


def start_sentry_recorder() -> tuple[SentryRecorder, Any, str]:
    """A recorder on a free local port, and a DSN pointing at it."""
    recorder = SentryRecorder()
    port = reactor.listenTCP(0, Site(recorder), interface="127.0.0.1")
    dsn = f"http://publickeyforjunebugtest@127.0.0.1:{port.getHost().port}/42"
    return recorder, port, dsn


class ExplodingHealthCache(InMemoryStateCache):
    """The in-memory cache, whose ``health()`` raises once a file exists."""

    def health(self) -> dict[str, dict[str, Any]]:
        path = os.environ.get(EXPLODE_ENV)
        if path and os.path.exists(path):
            with open(path, encoding="utf-8") as f:
                raise RuntimeError(f"health exploded near {f.read()}")
        return super().health()
