"""One bad message or one dead destination holds back nothing else; poison
goes to ``.failed`` at once; SIGTERM answers every HTTP request it took."""

from __future__ import annotations

import http.client
import itertools
import json
import signal
import threading
import time
import uuid
from typing import Any

import pytest_twisted
import treq
from twisted.internet import reactor
from twisted.web.resource import Resource
from twisted.web.server import Site

from junebug_api.formats.queue_names import QueueNames

from .support import event_message, free_port, inbound_message, wait_for

MESSAGES = "/channels/test-channel/messages"


class PickyRapidPro(Resource):
    """Answers 500 to the messages whose id it is told to hate, 200 to the rest."""

    isLeaf = True

    def __init__(self, hated: set[str]) -> None:
        super().__init__()
        self.hated = hated
        self.seen: list[tuple[float, str]] = []

    def render_POST(self, request: Any) -> bytes:
        message_id = json.loads(request.content.read())["message_id"]
        self.seen.append((time.monotonic(), message_id))
        request.setResponseCode(500 if message_id in self.hated else 200)
        return b"{}"


@pytest_twisted.ensureDeferred
async def test_a_message_always_refused_goes_to_failed_while_others_flow(
    make_service, broker, connector
):
    bad = inbound_message(connector, content="always 500")
    rapidpro = PickyRapidPro({bad["message_id"]})
    port = reactor.listenTCP(0, Site(rapidpro), interface="127.0.0.1")
    try:
        # Backoffs of 5-10 s: each retry waits on the 5 s delay queue.
        make_service(
            mo_message_url=f"http://127.0.0.1:{port.getHost().port}/inbound",
            delivery_retry_delay=10,
            delivery_retry_max_delay=10,
            delivery_max_attempts=3,
        )
        broker.publish(f"{connector}.inbound", bad)
        others = [inbound_message(connector) for _ in range(300)]
        started = time.monotonic()
        for message in others:
            broker.publish(f"{connector}.inbound", message)
        others_ids = {m["message_id"] for m in others}
        await wait_for(
            lambda: others_ids <= {m for _, m in rapidpro.seen}, 10, "the other messages"
        )
        # They flowed meanwhile, without waiting for the bad one's retries.
        assert time.monotonic() - started < 10
        props, body = await broker.wait_get(f"{connector}.inbound.failed", timeout=40)
        assert json.loads(body)["message_id"] == bad["message_id"]
        assert props.headers["x-junebug-attempts"] == 3
        assert props.headers["x-junebug-reason"].endswith("HTTP 500")
        tries = [t for t, m in rapidpro.seen if m == bad["message_id"]]
        assert len(tries) == 3
        # Between tries it waited on the delay queue (5 s TTL), not in the process.
        assert all(b - a >= 4.5 for a, b in itertools.pairwise(tries))
        assert broker.count(QueueNames.for_connector(connector).delay_queues("inbound")[5]) == 0
        assert len(rapidpro.seen) == 303  # everything else exactly once
    finally:
        await port.stopListening()


@pytest_twisted.ensureDeferred
async def test_events_of_a_dead_event_url_hold_back_no_others(
    make_service, broker, connector, sink
):
    dead = f"http://127.0.0.1:{free_port()}/event"  # refuses connections
    service = make_service()
    ids = {"dead": [], "alive": []}
    for n in range(40):
        which = "dead" if n % 2 else "alive"
        url = dead if which == "dead" else f"{sink.url}/event"
        response = await treq.post(
            service.url + MESSAGES,
            data=json.dumps({"to": "+1", "from": "2", "content": "x", "event_url": url}).encode(),
        )
        assert response.code == 201
        ids[which].append(json.loads(await response.text())["result"]["message_id"])
    started = time.monotonic()
    for _ in range(10):
        for which in ("dead", "alive"):
            for message_id in ids[which]:
                broker.publish(f"{connector}.event", event_message(message_id, "ack"))
    # 200 events for the live URL, 200 for the dead one, interleaved.
    await wait_for(lambda: len(sink.at("/event")) == 200, 15, "the live URL's events")
    assert time.monotonic() - started < 15
    assert {r["json"]["message_id"] for r in sink.at("/event")} == set(ids["alive"])
    health = json.loads(await (await treq.get(service.url + "/health")).text())
    assert health["health"] == "ok"
    down = health["components"]["deliveries"]["destinations_down"]
    assert list(down) == [dead.rsplit("/", 1)[0]]
    # The dead URL's events wait on delay queues; none is dead-lettered.
    assert broker.count(f"{connector}.event.failed") == 0
    assert service.log().count("is down after") == 1


DEEP = "[" * 200_000 + "]" * 200_000


def _not_utf8(message: dict) -> bytes:
    return json.dumps(message).replace("hello", "h\udcffllo").encode("utf-8", "surrogateescape")


POISON = {
    "lone surrogate": lambda m: json.dumps(m).replace('"hello"', '"\\ud800"').encode(),
    "NaN": lambda m: json.dumps({**m, "helper_metadata": {"x": float("nan")}}).encode(),
    "Infinity": lambda m: json.dumps({**m, "helper_metadata": {"x": float("inf")}}).encode(),
    "too deep": lambda m: (
        json.dumps(m)
        .replace('"helper_metadata": {', f'"helper_metadata": {{"deep": {DEEP}, ')
        .encode()
    ),
    "wrong types": lambda m: json.dumps({**m, "content": 5, "to_addr": ["x"]}).encode(),
    "10 MB": lambda m: json.dumps({**m, "content": "x" * 10_000_000}).encode(),
    "not UTF-8": _not_utf8,
}


@pytest_twisted.ensureDeferred
async def test_poison_goes_to_failed_at_once(make_service, broker, connector, sink):
    service = make_service()
    poison_bodies = []
    good = []
    for make in POISON.values():
        poison_bodies.append(make(inbound_message(connector)))
        broker.publish(f"{connector}.inbound", poison_bodies[-1])
        ok = inbound_message(connector)
        good.append(ok["message_id"])
        broker.publish(f"{connector}.inbound", ok)
    started = time.monotonic()
    failed: list[tuple[Any, bytes]] = []

    def collect() -> bool:
        while (got := broker.get(f"{connector}.inbound.failed")) is not None:
            failed.append(got)
        return len(failed) == len(POISON)

    try:
        await wait_for(collect, 15, "every poison message on .failed")
    except AssertionError:
        raise AssertionError(f"on .failed: {failed}\n{service.log()[-3000:]}") from None
    assert time.monotonic() - started < 15
    await wait_for(lambda: len(sink.at("/inbound")) == len(good), 10, "the good messages")
    assert sorted(r["json"]["message_id"] for r in sink.at("/inbound")) == sorted(good)
    for props, _ in failed:
        assert props.headers["x-junebug-attempts"] == 1  # no retry
    # Each one has its log line, written once the broker confirmed the move,
    # so it may land just after the message is seen on .failed.
    await wait_for(
        lambda: all(props.message_id in service.log() for props, _ in failed),
        5,
        "a log line naming each poison message's id",
    )
    assert sorted(body for _, body in failed) == sorted(poison_bodies)
    reasons = "\n".join(props.headers["x-junebug-reason"] for props, _ in failed)
    for expected in (
        "unpaired UTF-16 surrogate",
        "cannot be JSON",
        "nested too deeply",
        "must be a non-empty string",
        "bytes a body may have",
        "not JSON",
    ):
        assert expected in reasons
    for request in sink.requests:  # only strict JSON went out
        json.loads(request["body"], parse_constant=lambda c: (_ for _ in ()).throw(ValueError(c)))
    assert "retrying" not in service.log()


def test_sigterm_under_load_answers_every_request(make_service, broker, connector):
    """64 keep-alive clients POST in a loop; SIGTERM in the middle."""
    service = make_service(shutdown_timeout=20)
    stop = threading.Event()
    results: list[tuple[str, int | None, str]] = []  # (content, status, how)
    lock = threading.Lock()

    def client(n: int) -> None:
        connection = http.client.HTTPConnection("127.0.0.1", service.port, timeout=30)
        sent_on_this_connection = 0
        while not stop.is_set():
            content = f"load {n} {uuid.uuid4().hex}"
            body = json.dumps({"to": "+1", "from": "2", "content": content})
            try:
                connection.request("POST", MESSAGES, body, {"Content-Type": "application/json"})
                sent_on_this_connection += 1
                response = connection.getresponse()
                status = response.status
                response.read()
                with lock:
                    results.append((content, status, "answered"))
                if response.getheader("connection", "").lower() == "close":
                    return  # the server is draining
            except ConnectionRefusedError:
                return  # not listening any more
            except Exception as e:  # no answer: recorded, and the test fails
                with lock:
                    results.append((content, None, f"{type(e).__name__}: {e}"))
                return

    # One more keep-alive connection that stays idle after its first answer.
    idle = http.client.HTTPConnection("127.0.0.1", service.port, timeout=30)
    idle.request("POST", MESSAGES, json.dumps({"to": "+1", "from": "2", "content": "idle"}))
    first = idle.getresponse()
    first.read()
    assert first.status == 201
    threads = [threading.Thread(target=client, args=(n,)) for n in range(64)]
    for thread in threads:
        thread.start()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and len(results) < 3000:
        time.sleep(0.05)
    service.signal(signal.SIGTERM)
    idle.sock.settimeout(10)
    assert idle.sock.recv(1) == b""  # closed cleanly (FIN, no reset) while the others drain
    for thread in threads:
        thread.join(60)
    stop.set()
    service.process.wait(30)
    answered = [r for r in results if r[2] == "answered"]
    unanswered = [r for r in results if r[2] != "answered"]
    assert len(answered) > 1000
    queued: list[str] = []
    while (got := broker.get(f"{connector}.outbound")) is not None:
        queued.append(json.loads(got[1])["content"])
    created = ["idle"] + [c for c, status, _ in answered if status == 201]
    refused = [c for c, status, _ in answered if status != 201]
    extra = set(queued) - set(created)
    assert not extra, [r for r in results if r[0] in extra]
    # Every 201 is on .outbound exactly once; nothing else is.
    assert sorted(queued) == sorted(created)
    assert all(status == 503 for _, status, _ in answered if status != 201)
    assert not set(refused) & set(queued)
    assert unanswered == []
    log = service.log()
    assert "junebug-api stopped" in log
    assert "still unanswered" not in log
