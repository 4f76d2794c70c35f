"""OutboundSender: the event info write and the publish travel together.

A fake cache whose writes the test answers by hand shows the order: the
publish goes out before the write is answered, and the send finishes (201)
only once both are.
"""

from __future__ import annotations

import json
from typing import Any

import pytest
from twisted.internet.defer import Deferred, succeed

from junebug_api.amqp.service import PublishFailed
from junebug_api.delivery.outbound import OutboundSender
from junebug_api.formats.api_errors import ServiceUnavailable
from junebug_api.state.cache import EventInfo
from junebug_api.testing import RecordingPublisher

BODY = json.dumps({"to": "+2782", "from": "8110", "content": "hi", "event_url": "http://rp/e"})


class HandCache:
    """A state cache whose event info writes stay open until the test answers them."""

    def __init__(self, health: str = "ok") -> None:
        self.writes: list[tuple[str, EventInfo, Deferred]] = []
        self.deleted: list[str] = []
        self.state = health

    def store_event_info(self, channel_id: str, message_id: str, info: EventInfo) -> Deferred[None]:
        d: Deferred[None] = Deferred()
        self.writes.append((message_id, info, d))
        return d

    def delete_event_info(self, channel_id: str, message_id: str) -> Deferred[None]:
        self.deleted.append(message_id)
        return succeed(None)

    def health(self) -> dict[str, dict[str, Any]]:
        return {"redis": {"health": self.state}}


def make(cache: HandCache) -> tuple[OutboundSender, RecordingPublisher]:
    publish = RecordingPublisher(auto_confirm=False)
    sender = OutboundSender(
        connector_name="c",
        transport_type="sms",
        default_from_addr=None,
        allow_expired_replies=False,
        cache=cache,  # type: ignore[arg-type]
        publish=publish,
    )
    return sender, publish


def outcome(d: Deferred) -> list:
    seen: list = []
    d.addBoth(seen.append)
    return seen


@pytest.mark.parametrize("write_first", [True, False])
def test_publish_does_not_wait_for_the_write_but_the_answer_waits_for_both(write_first):
    cache = HandCache()
    sender, publish = make(cache)
    result = outcome(Deferred.fromCoroutine(sender.send(BODY.encode())))
    [(message_id, info, write)] = cache.writes
    [sent] = publish.published  # out before the write was answered
    assert sent.message_id == message_id
    confirm = sent.confirmed
    assert info == EventInfo("http://rp/e", None)
    first, second = (write, confirm) if write_first else (confirm, write)
    first.callback(None)
    assert result == []
    second.callback(None)
    assert result[0]["message_id"] == message_id


def test_write_failing_after_the_confirm_is_503():
    cache = HandCache()
    sender, publish = make(cache)
    result = outcome(Deferred.fromCoroutine(sender.send(BODY.encode())))
    publish.confirm()
    cache.writes[0][2].errback(ConnectionError("Redis went away"))
    [failure] = result
    assert failure.check(ServiceUnavailable)


def test_publish_failing_takes_the_event_info_back_after_the_write():
    cache = HandCache()
    sender, publish = make(cache)
    result = outcome(Deferred.fromCoroutine(sender.send(BODY.encode())))
    message_id, _, write = cache.writes[0]
    publish.nack(PublishFailed("nacked"))
    assert cache.deleted == []  # the delete must not overtake the write
    write.callback(None)
    assert cache.deleted == [message_id]
    assert result[0].check(ServiceUnavailable)


def test_with_the_cache_down_nothing_is_published_before_the_write():
    cache = HandCache(health="down")
    sender, publish = make(cache)
    result = outcome(Deferred.fromCoroutine(sender.send(BODY.encode())))
    assert publish.published == []
    cache.writes[0][2].errback(ConnectionError("still down"))
    assert publish.published == []
    assert result[0].check(ServiceUnavailable)
