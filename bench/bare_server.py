"""A bare twisted.web server: every POST gets 201 and a tiny JSON body.

    python bench/bare_server.py PORT

The HTTP ceiling bench/benchmark.py compares junebug-api with: the same
reactor and HTTP stack, no routing, no JSON, no AMQP. It listens on 127.0.0.1
only, writes no access log, and answers GET with 200 so a caller can tell it
is up.
"""

from __future__ import annotations

import sys
from typing import Any

from twisted.internet import reactor
from twisted.web.resource import Resource
from twisted.web.server import Site

BODY = b'{"status": 201, "code": "Created", "description": "message submitted"}'


class Created(Resource):
    isLeaf = True

    def render_POST(self, request: Any) -> bytes:
        request.content.read()
        request.setResponseCode(201)
        request.setHeader(b"content-type", b"application/json")
        return BODY

    def render_GET(self, request: Any) -> bytes:
        return b"ok"


class QuietSite(Site):
    noisy = False

    def log(self, request: Any) -> None:
        pass


def main() -> None:
    port = int(sys.argv[1])
    reactor.listenTCP(port, QuietSite(Created()), interface="127.0.0.1", backlog=1024)
    reactor.run()


if __name__ == "__main__":
    main()
