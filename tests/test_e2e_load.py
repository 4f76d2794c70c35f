"""Under load: clients that vanish mid-request, and long keep-alive connections."""

from __future__ import annotations

import http.client
import json
import socket
import struct
import time
import urllib.request

MESSAGES = "/channels/test-channel/messages"


def request_bytes(content: str) -> bytes:
    body = json.dumps({"to": "+1", "from": "2", "content": content}).encode()
    return (
        f"POST {MESSAGES} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    ).encode() + body


def test_clients_vanishing_mid_request(make_service, broker, connector):
    service = make_service()
    sent = 0
    for round_ in range(5):
        sockets = []
        for i in range(64):
            s = socket.create_connection(("127.0.0.1", service.port))
            # Close with a reset, as a killed load generator does.
            s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            data = request_bytes(f"vanishing {round_}-{i}")
            if i % 2:
                data = data[: len(data) // 2]  # some even vanish halfway through the body
            else:
                sent += 1
            s.sendall(data)
            sockets.append(s)
        for s in sockets:
            s.close()
    # The process, its AMQP channel and its HTTP side are all still fine.
    with urllib.request.urlopen(
        urllib.request.Request(
            service.url + MESSAGES,
            data=json.dumps({"to": "+1", "from": "2", "content": "after"}).encode(),
            method="POST",
        ),
        timeout=10,
    ) as r:
        assert r.status == 201
    assert service.process.poll() is None
    deadline = time.monotonic() + 10
    contents = []
    while time.monotonic() < deadline:
        got = broker.get(f"{connector}.outbound")
        if got is None:
            if contents and contents[-1] == "after":
                break
            time.sleep(0.05)
            continue
        contents.append(json.loads(got[1])["content"])  # every message is whole JSON
    assert contents[-1] == "after"
    # Only whole requests could be published, each at most once.
    vanished = contents[:-1]
    assert len(vanished) == len(set(vanished)) <= sent
    assert all(c.startswith("vanishing ") and int(c.split("-")[1]) % 2 == 0 for c in vanished)
    log = service.log()
    assert "Unhandled" not in log and "Traceback" not in log, log[-3000:]
    assert "AMQP connection lost" not in log


def test_one_keep_alive_connection_serves_10000_requests(make_service, broker, connector):
    service = make_service()
    connection = http.client.HTTPConnection("127.0.0.1", service.port, timeout=10)
    body = json.dumps({"to": "+1", "from": "2", "content": "again"}).encode()
    connection.connect()
    sock = connection.sock
    for i in range(10_000):
        connection.request(
            "POST", MESSAGES, body=body, headers={"Content-Type": "application/json"}
        )
        response = connection.getresponse()
        response.read()
        assert response.status == 201, i
        assert connection.sock is sock, f"the connection was replaced after {i} requests"
    connection.close()
    assert broker.count(f"{connector}.outbound") == 10_000
