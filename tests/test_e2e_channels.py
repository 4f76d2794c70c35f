"""Many channels in one real process: queues, RapidPros, status, info, logs, isolation."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
import treq
from prometheus_client.parser import text_string_to_metric_families
from twisted.internet import reactor
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Site

from junebug_api.formats.queue_names import QueueNames

from .support import (
    Broker,
    ServiceProcess,
    event_message,
    free_port,
    inbound_message,
    pause,
    start_sink,
    wait_for,
)
from .test_state_caches import REDIS_URL, RedisKeys

SECRETS = {
    "api": "api-s3cret-a",
    "mo": "mo-s3cret-b",
    "event": "ev-s3cret-c",
    "url_password": "urlpw-s3cret",
}


@pytest.fixture
def ids() -> Iterator[list[str]]:
    """Three channel ids no other test uses; their queues are deleted afterwards."""
    base = f"jb14-{uuid.uuid4().hex[:8]}"
    names = [f"{base}-a", f"{base}-b", f"{base}-c"]
    yield names
    broker = Broker()
    for name in names:
        for queue in QueueNames.for_connector(name).all():
            broker.delete(queue)
    broker.close()


@pytest.fixture
def sinks() -> Iterator[list[Any]]:
    """A RapidPro stand-in per channel."""
    made = [start_sink() for _ in range(3)]
    for sink, _, url in made:
        sink.url = url
    yield [sink for sink, _, _ in made]
    for _, port, _ in made:
        port.stopListening()


@pytest.fixture
def start(tmp_path: Path) -> Iterator[Callable[..., ServiceProcess]]:
    started: list[ServiceProcess] = []

    def run(config: dict, wait: bool = True) -> ServiceProcess:
        service = ServiceProcess(
            tmp_path, {"http_bind": f"127.0.0.1:{free_port()}", **config}
        ).start()
        started.append(service)
        if wait:
            service.wait_healthy()
        return service

    yield run
    for service in started:
        service.stop()


def three_channels(ids: list[str], sinks: list[Any], **top: Any) -> dict:
    a, b, c = ids
    return {
        "delivery_retry_delay": 0.1,
        "delivery_retry_max_delay": 0.5,
        "amqp_heartbeat": 10,
        "channels": {
            a: {
                "mo_url": f"{sinks[0].url}/inbound",
                "api_auth_token": SECRETS["api"],
                "character_limit": 40,
                "label": "Channel A",
            },
            b: {
                "mo_url": f"{sinks[1].url.replace('//', '//rp:' + SECRETS['url_password'] + '@')}"
                "/inbound",
                "mo_url_auth_token": SECRETS["mo"],
                "metadata": {"team": "b"},
            },
            c: {
                "mo_message_url": f"{sinks[2].url}/inbound",
                "default_event_url": f"{sinks[2].url}/events",
                "default_event_auth_token": SECRETS["event"],
            },
        },
        **top,
    }


async def call(
    service: ServiceProcess, method: str, path: str, body: Any = None, token: str | None = None
) -> tuple[int, dict, str]:
    headers = {"Authorization": f"Token {token}"} if token else {}
    data = None if body is None else json.dumps(body).encode()
    response = await treq.request(method, service.url + path, data=data, headers=headers)
    text = await response.text()
    return response.code, json.loads(text), text


def token_for(channel_id: str, ids: list[str]) -> str | None:
    return SECRETS["api"] if channel_id == ids[0] else None


async def each_sends_on_its_own_queue(service, broker, ids: list[str]) -> dict[str, str]:
    """Outbound: each channel's message lands on its own queue; its id by channel."""
    sent = {}
    for channel_id in ids:
        slash = "/" if channel_id == ids[1] else ""
        code, answer, _ = await call(
            service,
            "POST",
            f"/channels/{channel_id}/messages{slash}",
            {"to": "+2782", "from": "8110", "content": f"to {channel_id}"},
            token=token_for(channel_id, ids),
        )
        assert (code, answer["description"]) == (201, "message submitted"), answer
        assert answer["result"]["channel_id"] == channel_id
        sent[channel_id] = answer["result"]["message_id"]
    for channel_id in ids:
        message = await broker.wait_json(f"{channel_id}.outbound")
        assert message["content"] == f"to {channel_id}"
        assert message["transport_name"] == channel_id
        assert message["message_id"] == sent[channel_id]
    return sent


async def each_receives_at_its_own_url(broker, sinks, ids: list[str]) -> None:
    """Inbound: from each channel's queue to its own mo_message_url."""
    for channel_id in ids:
        broker.publish(
            f"{channel_id}.inbound", inbound_message(channel_id, content=f"from {channel_id}")
        )
    for sink, channel_id in zip(sinks, ids, strict=True):
        [request] = await wait_for(lambda s=sink: s.at("/inbound"), what="an inbound POST")
        assert request["json"]["content"] == f"from {channel_id}"
        assert request["json"]["channel_id"] == channel_id
    assert sinks[1].at("/inbound")[0]["headers"]["authorization"] == f"Token {SECRETS['mo']}"
    assert "authorization" not in sinks[0].at("/inbound")[0]["headers"]


async def no_secret_in_settings(service, ids: list[str]) -> None:
    """Settings and status: no secret anywhere."""
    for channel_id in ids:
        code, info, text = await call(
            service, "GET", f"/channels/{channel_id}", token=token_for(channel_id, ids)
        )
        assert (code, info["description"]) == (200, "channel found")
        assert info["result"]["id"] == channel_id
        assert info["result"]["status"]["status"] in ("ok", "degraded")
        for secret in SECRETS.values():
            assert secret not in text


@pytest_twisted.ensureDeferred
async def test_three_channels_in_one_process(start, ids, sinks):
    broker = Broker()
    try:
        service = start(three_channels(ids, sinks))
        code, listed, _ = await call(service, "GET", "/channels/")
        assert (code, listed["description"], listed["result"]) == (
            200,
            "channels listed",
            sorted(ids),
        )

        sent = await each_sends_on_its_own_queue(service, broker, ids)
        await each_receives_at_its_own_url(broker, sinks, ids)

        # Message status: the ack and the delivery report, as old Junebug answered.
        c = ids[2]
        ack = event_message(sent[c], "ack", timestamp="2026-11-26 13:23:18.500000")
        report = event_message(
            sent[c],
            "delivery_report",
            delivery_status="delivered",
            timestamp="2026-11-26 13:23:19.000000",
        )
        broker.publish(f"{c}.event", report)
        broker.publish(f"{c}.event", ack)
        await wait_for(lambda: len(sinks[2].at("/events")) == 2, what="both events delivered")
        assert sinks[2].at("/events")[0]["headers"]["authorization"] == f"Token {SECRETS['event']}"
        code, status, _ = await call(service, "GET", f"/channels/{c}/messages/{sent[c]}")
        assert (code, status["description"]) == (200, "message status")
        assert status["result"] == {
            "id": sent[c],
            "last_event_type": "delivery_succeeded",
            "last_event_timestamp": "2026-11-26 13:23:19.000000",
            "events": [
                {
                    "channel_id": c,
                    "message_id": sent[c],
                    "timestamp": "2026-11-26 13:23:18.500000",
                    "event_type": "submitted",
                    "event_details": {},
                },
                {
                    "channel_id": c,
                    "message_id": sent[c],
                    "timestamp": "2026-11-26 13:23:19.000000",
                    "event_type": "delivery_succeeded",
                    "event_details": {},
                },
            ],
        }
        code, unknown, _ = await call(service, "GET", f"/channels/{c}/messages/nope")
        assert code == 200
        assert unknown["result"]["events"] == []
        assert unknown["result"]["last_event_type"] is None

        # Unknown channel: 404 ChannelNotFound; too long: 400 MessageTooLong.
        code, answer, _ = await call(
            service, "POST", "/channels/nope/messages", {"to": "1", "content": "x"}
        )
        assert (code, answer["description"]) == (404, "channel not found")
        assert answer["result"]["errors"][0]["type"] == "ChannelNotFound"
        code, answer, _ = await call(
            service,
            "POST",
            f"/channels/{ids[0]}/messages",
            {"to": "1", "from": "2", "content": "x" * 41},
            token=SECRETS["api"],
        )
        assert (code, answer["description"]) == (400, "message too long")
        assert answer["result"]["errors"][0]["type"] == "MessageTooLong"

        # Logs per channel: a failing delivery on b is in b's logs, not a's.
        sinks[1].statuses = [500]
        b = ids[1]
        broker.publish(f"{b}.inbound", inbound_message(b))
        await wait_for(lambda: len(sinks[1].at("/inbound")) == 3, what="the retried POST")

        async def b_logs() -> list[dict]:
            _, logs, _ = await call(service, "GET", f"/channels/{b}/logs?n=5")
            return logs["result"]

        logs: list[dict] = []
        deadline = time.monotonic() + 10
        while not any("failed" in r["message"] for r in logs) and time.monotonic() < deadline:
            logs = await b_logs()
        assert any(r["logger"] == b and r["level"] == 30 and "500" in r["message"] for r in logs), (
            logs
        )
        _, a_logs, _ = await call(service, "GET", f"/channels/{ids[0]}/logs", token=SECRETS["api"])
        assert a_logs["description"] == "logs retrieved"
        assert not any(b in r["message"] for r in a_logs["result"])

        await no_secret_in_settings(service, ids)
        _, info, _ = await call(service, "GET", f"/channels/{ids[0]}", token=SECRETS["api"])
        assert info["result"]["label"] == "Channel A"
        assert info["result"]["status"]["outbound_message_rate"] >= 0
        _, health, health_text = await call(service, "GET", "/health")
        assert set(health["channels"]) == set(ids)
        for secret in SECRETS.values():
            assert secret not in health_text
            assert secret not in service.log()

        # /metrics: per-channel series, labelled with the configured channels only.
        async def scrape() -> dict:
            response = await treq.get(service.url + "/metrics")
            text = (await response.content()).decode()
            return {
                (sample.name, tuple(sorted(sample.labels.items()))): sample.value
                for family in text_string_to_metric_families(text)
                for sample in family.samples
            }

        def channel_sample(name: str, channel_id: str, **labels: str) -> float | None:
            key = tuple(sorted({"channel": channel_id, **labels}.items()))
            return samples.get((name, key))

        samples = await scrape()
        deadline = time.monotonic() + 15  # the queue monitor looks every 5 s
        while channel_sample("junebug_queue_consumers", ids[1], queue_role="inbound") is None:
            assert time.monotonic() < deadline, "no queue gauges for the channels"
            await pause(0.5)
            samples = await scrape()

        for channel_id in ids:
            assert (
                channel_sample("junebug_channel_messages_total", channel_id, kind="outbound") == 1
            )
        assert channel_sample("junebug_channel_messages_total", c, kind="submitted") == 1
        assert channel_sample("junebug_channel_messages_total", c, kind="delivery_succeeded") == 1
        assert channel_sample("junebug_channel_messages_total", ids[0], kind="inbound") == 1
        assert channel_sample("junebug_queue_consumers", b, queue_role="inbound") == 1
        channel_labels = {
            dict(labels).get("channel") for _, labels in samples if dict(labels).get("channel")
        }
        assert channel_labels == set(ids)

        # Channels are set in the config file.
        code, answer, _ = await call(service, "DELETE", f"/channels/{ids[0]}")
        assert code == 405
        assert "config file" in answer["result"]["errors"][0]["message"]
    finally:
        broker.close()


class Hanging(Resource):
    """A RapidPro that takes every POST and never answers."""

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.requests: list[Any] = []

    def render_POST(self, request: Any) -> Any:
        self.requests.append(request)
        return NOT_DONE_YET


async def delivery_rate(broker: Broker, sinks: list[Any], channels: list[str], n: int) -> float:
    """Publish ``n`` inbound messages to each channel; messages per second until
    every one of them reached its RapidPro."""
    before = [len(s.at("/inbound")) for s in sinks]
    started = time.monotonic()
    for i in range(n):
        for channel_id in channels:
            broker.publish(f"{channel_id}.inbound", inbound_message(channel_id, content=str(i)))
    await wait_for(
        lambda: all(len(s.at("/inbound")) >= b + n for s, b in zip(sinks, before, strict=True)),
        timeout=60,
        what="all inbound POSTs",
    )
    return n * len(channels) / (time.monotonic() - started)


@pytest.mark.parametrize("failure", ["500", "never answers"])
@pytest_twisted.ensureDeferred
async def test_one_channels_rapidpro_down_never_holds_back_another(start, ids, sinks, failure):
    """Channel a's RapidPro fails (500, retried slowly) or never answers, with
    more messages waiting than a's prefetch; b and c keep their full rate.

    With one prefetch shared by every consumer, a's stuck messages would take
    every slot and b and c would get nothing at all.
    """
    a, b, c = ids
    hanging = Hanging()
    port = reactor.listenTCP(0, Site(hanging), interface="127.0.0.1")
    broken_url = (
        f"http://127.0.0.1:{port.getHost().port}/inbound"
        if failure == "never answers"
        else f"{sinks[0].url}/inbound"
    )
    config = three_channels(ids, sinks, worker_concurrency=5, mo_message_url_timeout=120)
    config["channels"][a]["mo_url"] = broken_url
    config["delivery_retry_delay"] = 30
    config["delivery_retry_max_delay"] = 60
    broker = Broker()
    try:
        start(config)
        n = 150
        baseline = await delivery_rate(broker, sinks[1:], [b, c], n)

        sinks[0].statuses = [500] * 1000
        for _ in range(40):
            broker.publish(f"{a}.inbound", inbound_message(a))
        if failure == "never answers":
            await wait_for(lambda: len(hanging.requests) == 5, what="a's prefetch in use")
        else:
            await wait_for(lambda: len(sinks[0].at("/inbound")) >= 5, what="a's failures")
        # The rest waits in RabbitMQ (a 500 may also put a's consumer on pause,
        # or messages on its delay queues: issue 11's outage handling).
        assert broker.count(f"{a}.inbound") >= 30

        during = await delivery_rate(broker, sinks[1:], [b, c], n)
        # Measured, with a margin for a busy 2-core machine.
        assert during >= 0.5 * baseline, (during, baseline)
        assert broker.count(f"{a}.inbound") >= 30
    finally:
        broker.close()
        for request in hanging.requests:
            request.channel.transport.loseConnection()
        port.stopListening()


@pytest.fixture
def redis_prefix() -> Iterator[RedisKeys]:
    keys = RedisKeys(f"jbtest:{uuid.uuid4().hex[:8]}:")
    yield keys
    keys.clean()


@pytest_twisted.ensureDeferred
async def test_message_status_written_by_one_process_is_read_from_another(
    start, ids, sinks, redis_prefix
):
    config = three_channels(
        ids,
        sinks,
        state_cache_class="junebug_api.state_cache.RedisStateCache",
        state_cache_config={"url": REDIS_URL, "key_prefix": redis_prefix.prefix},
    )
    c = ids[2]
    broker = Broker()
    try:
        first = start(config)
        code, answer, _ = await call(
            first, "POST", f"/channels/{c}/messages", {"to": "1", "from": "2", "content": "x"}
        )
        assert code == 201
        message_id = answer["result"]["message_id"]
        broker.publish(f"{c}.event", event_message(message_id, "ack"))
        await wait_for(lambda: sinks[2].at("/events"), what="the event delivered by the first")
        # The second starts only now: it cannot have consumed the event itself.
        second = start(config)
        code, status, _ = await call(second, "GET", f"/channels/{c}/messages/{message_id}")
        assert code == 200
        assert status["result"]["last_event_type"] == "submitted"
        assert [e["channel_id"] for e in status["result"]["events"]] == [c]
        assert any(f"events:{c}:{message_id}".encode() in k for k in redis_prefix.keys())
    finally:
        broker.close()


@pytest.mark.parametrize("cache", ["memory", "redis"])
@pytest_twisted.ensureDeferred
async def test_message_status_is_per_channel(start, ids, sinks, redis_prefix, cache):
    """Through another channel a message id answers exactly as an id never
    used; the same id on two channels keeps two statuses. With Redis two
    processes consume the .event queues: whichever stored an event, both answer."""
    a, b, c = ids
    shared = {
        "state_cache_class": "junebug_api.state_cache.RedisStateCache",
        "state_cache_config": {"url": REDIS_URL, "key_prefix": redis_prefix.prefix},
    }
    config = three_channels(ids, sinks, **(shared if cache == "redis" else {}))
    broker = Broker()
    try:
        services = [start(config) for _ in range(2 if cache == "redis" else 1)]
        code, answer, _ = await call(
            services[0], "POST", f"/channels/{c}/messages", {"to": "1", "from": "2", "content": "x"}
        )
        assert code == 201
        message_id = answer["result"]["message_id"]
        # c's transport acks it; b's transport sends events naming the same id.
        broker.publish(f"{c}.event", event_message(message_id, "ack"))
        for _ in range(3):
            broker.publish(f"{b}.event", event_message(message_id, "nack", nack_reason="b's"))

        async def status(service: ServiceProcess, channel_id: str, mid: str) -> tuple[dict, str]:
            path = f"/channels/{channel_id}/messages/{mid}"
            code, answer, text = await call(service, "GET", path, token=token_for(channel_id, ids))
            assert code == 200, text
            return answer, text

        await wait_for(lambda: sinks[2].at("/events"), what="c's event delivered")
        for service in services:
            c_status, _ = await status(service, c, message_id)
            assert [(e["channel_id"], e["event_type"]) for e in c_status["result"]["events"]] == [
                (c, "submitted")
            ]
            b_events = []
            for _ in range(50):  # b's three events are stored, then dropped (no event URL)
                b_status, _ = await status(service, b, message_id)
                b_events = b_status["result"]["events"]
                if len(b_events) == 3:
                    break
                await pause(0.1)
            assert {(e["channel_id"], e["event_type"]) for e in b_events} == {(b, "rejected")}
            assert len(b_events) == 3, b_events
            # Through a, the id is unknown: the very answer of an id never used.
            never = "0" * 32
            through_a, _ = await status(service, a, message_id)
            _, never_text = await status(service, a, never)
            assert through_a == json.loads(never_text.replace(never, message_id))
            assert through_a["result"] == {
                "id": message_id,
                "last_event_type": None,
                "last_event_timestamp": None,
                "events": [],
            }
    finally:
        broker.close()


@pytest.mark.parametrize("cache", ["memory", "redis"])
@pytest_twisted.ensureDeferred
async def test_an_event_never_reaches_another_channels_event_url(
    start, ids, sinks, redis_prefix, cache
):
    """Event info is per channel: an event on b's or c's queue naming a
    message sent through a goes to that channel's default event URL (or
    nowhere), never to a's event URL nor with a's token (issue 20, loose end)."""
    a, b, c = ids
    shared = {
        "state_cache_class": "junebug_api.state_cache.RedisStateCache",
        "state_cache_config": {"url": REDIS_URL, "key_prefix": redis_prefix.prefix},
    }
    service = start(three_channels(ids, sinks, **(shared if cache == "redis" else {})))
    broker = Broker()
    try:
        body = {
            "to": "1",
            "from": "2",
            "content": "x",
            "event_url": f"{sinks[0].url}/a-events",
            "event_auth_token": "ev-a-s3cret",
        }
        code, answer, text = await call(
            service, "POST", f"/channels/{a}/messages", body, token=SECRETS["api"]
        )
        assert code == 201, text
        message_id = answer["result"]["message_id"]
        broker.publish(f"{b}.event", event_message(message_id, "nack", nack_reason="b's"))
        broker.publish(f"{c}.event", event_message(message_id, "ack"))
        await wait_for(lambda: sinks[2].at("/events"), what="c's event at c's default URL")
        await wait_for(
            lambda: f"of message {message_id}; dropped" in service.log(),
            what="b's event dropped (b has no event URL)",
        )
        broker.publish(f"{a}.event", event_message(message_id, "ack"))
        await wait_for(lambda: sinks[0].at("/a-events"), what="a's event at a's URL")
        [own] = sinks[0].at("/a-events")
        assert own["headers"]["authorization"] == "Token ev-a-s3cret"
        assert own["json"]["channel_id"] == a
        [at_c] = sinks[2].at("/events")
        assert at_c["headers"]["authorization"] == f"Token {SECRETS['event']}"
        assert at_c["json"]["channel_id"] == c
        assert not any("ev-a-s3cret" in str(r["headers"]) for r in sinks[1].requests)
        assert not any("ev-a-s3cret" in str(r["headers"]) for r in sinks[2].requests)
    finally:
        broker.close()


@pytest_twisted.ensureDeferred
async def test_store_message_events_false_keeps_none(start, ids, sinks):
    config = three_channels(ids, sinks, store_message_events=False)
    c = ids[2]
    broker = Broker()
    try:
        service = start(config)
        _, answer, _ = await call(
            service, "POST", f"/channels/{c}/messages", {"to": "1", "from": "2", "content": "x"}
        )
        message_id = answer["result"]["message_id"]
        broker.publish(f"{c}.event", event_message(message_id, "ack"))
        await wait_for(lambda: sinks[2].at("/events"), what="the event delivered")
        _, status, _ = await call(service, "GET", f"/channels/{c}/messages/{message_id}")
        assert status["result"]["events"] == []
    finally:
        broker.close()


@pytest_twisted.ensureDeferred
async def test_vumi2_form_beside_channels(start, ids, sinks, connector):
    """The top-level connector keeps its base_url_path and queues beside channels:."""
    config = three_channels(
        ids,
        sinks,
        connector_name=connector,
        base_url_path="/jb/top",
        mo_message_url=f"{sinks[0].url}/top-inbound",
    )
    broker = Broker()
    try:
        service = start(config)
        code, answer, _ = await call(
            service, "POST", "/jb/top/messages", {"to": "1", "from": "2", "content": "top"}
        )
        assert code == 201
        message_id = answer["result"]["message_id"]
        assert (await broker.wait_json(f"{connector}.outbound"))["content"] == "top"
        broker.publish(f"{connector}.event", event_message(message_id, "ack"))
        broker.publish(f"{connector}.inbound", inbound_message(connector))
        await wait_for(lambda: sinks[0].at("/top-inbound"), what="the top-level inbound")

        async def status() -> dict:
            return (await call(service, "GET", f"/jb/top/messages/{message_id}"))[1]

        deadline = time.monotonic() + 10
        result = await status()
        while not result["result"]["events"] and time.monotonic() < deadline:
            result = await status()
        assert result["result"]["last_event_type"] == "submitted"
        _, listed, _ = await call(service, "GET", "/channels/")
        assert listed["result"] == sorted([connector, *ids])
    finally:
        broker.close()


def test_config_error_names_the_channel_and_option(start, ids, sinks):
    config = three_channels(ids, sinks)
    config["channels"][ids[1]]["character_limit"] = "lots"
    service = start(config, wait=False)
    assert service.process.wait(30) == 1
    output = service.process.stdout.read().decode()
    assert output.strip() == (
        f"junebug-api: config error: channels.{ids[1]}.character_limit must be an integer,"
        " got 'lots'"
    )
