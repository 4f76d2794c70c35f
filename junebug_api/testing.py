"""Test doubles for junebug-api's seams, for this project's unit tests and yours.

As ``treq.testing`` and ``txacme.testing`` do for their libraries, this module
gives the fakes a unit test needs in place of the parts that talk to the
outside world; each one keeps to the contract of what it stands in for, and
records what it was given so that a test can assert on it:

- :class:`RecordingPublisher`: ``AmqpService.publish`` (confirms at once, on
  demand, or fails as told).
- :class:`RecordingAcker`: the ``Acker`` of one delivery.
- :class:`RecordingQueueControl`: pausing, resuming and ``basic.get`` on
  consumed queues (what ``PauseWhileDown`` and ``Channel`` are given).
- :class:`RecordingAmqp`: ``AmqpService`` as the channel registry and its
  channels use it (queues declared, consumers by queue, publishes recorded).
- :class:`BreakableStateCache`: a state cache (by default the real
  ``InMemoryStateCache``) that fails every operation while it is broken.
  The in-memory cache itself needs no fake: give tests an
  ``InMemoryStateCache`` with a ``Clock``.
- :class:`FakeRapidPro`: a delivery target, a Twisted resource that records
  the POSTs it gets and answers the status codes it is told;
  :meth:`FakeRapidPro.delivery` is an ``HttpDelivery`` that reaches it
  in memory.
- :class:`CuttableSite`: a ``Site`` for a RapidPro stand-in that a test
  listens on itself and whose connections it can all cut at once (RapidPro
  going away mid-request).
- The broker's side of an AMQP connection (``FakeBroker``, the frame
  builders, ``RecordingConnectionEvents``) is in :mod:`junebug_api.amqp.testing`.
- :func:`captured_logs`: the log events published while a block runs.
- :class:`FixedChannels`: the channel directory ``JunebugApi`` looks
  channels up in, holding the channels it is given (the service's is the
  channel registry).

Nothing here touches the network or a real reactor: drive time with
``twisted.internet.task.Clock``.
"""

from __future__ import annotations

import weakref
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Any

import attrs
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.logger import globalLogPublisher
from twisted.web.http import HTTPChannel
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request, Site

from junebug_api.amqp.connect import SetupFailed
from junebug_api.delivery.http_delivery import HttpDelivery
from junebug_api.delivery.outages import OutageTracker
from junebug_api.formats.vumi_messages import VumiMessage
from junebug_api.observe.metrics import NO_METRICS, Metrics
from junebug_api.state.cache import EventInfo, StateCache
from junebug_api.state.memory_cache import InMemoryStateCache

# -- channels ---------------------------------------------------------------


class FixedChannels:
    """A channel directory (:class:`~junebug_api.http.api.ChannelDirectory`)
    of the channels given, in their order."""

    def __init__(self, channels: Iterable[Any]) -> None:
        self._channels = list(channels)

    def get(self, channel_id: str) -> Any:
        return next((c for c in self._channels if c.id == channel_id), None)

    def channels(self) -> list[Any]:
        return list(self._channels)


# -- publishing -------------------------------------------------------------


@attrs.define(eq=False)
class Publication:
    """One call of a :class:`RecordingPublisher`; ``confirmed`` is the
    Deferred the caller got (it fires on the broker's confirm)."""

    routing_key: str
    body: bytes
    message_id: str | None
    headers: dict[str, Any] | None
    refuse_if_busy: bool
    confirmed: Deferred[None] = attrs.field(repr=False)


class RecordingPublisher:
    """Stands in for ``AmqpService.publish`` (same signature); records each call.

    By default every publish is confirmed at once. :meth:`fail_next` makes the
    next publishes fail (e.g. with ``PublishFailed`` or ``PublishRefused``);
    ``failure`` set makes every one fail; ``auto_confirm=False`` leaves each
    publish unconfirmed until the test calls :meth:`confirm` or :meth:`nack`,
    as a broker that has not answered yet.
    """

    def __init__(self, *, auto_confirm: bool = True) -> None:
        self.published: list[Publication] = []
        self.auto_confirm = auto_confirm
        #: While set, every publish fails with it.
        self.failure: Exception | None = None
        self._next_failures: list[Exception] = []

    def __call__(
        self,
        routing_key: str,
        body: bytes,
        message_id: str | None = None,
        headers: dict[str, Any] | None = None,
        *,
        refuse_if_busy: bool = False,
    ) -> Deferred[None]:
        if self._next_failures:
            confirmed: Deferred[None] = fail(self._next_failures.pop(0))
        elif self.failure is not None:
            confirmed = fail(self.failure)
        elif self.auto_confirm:
            confirmed = succeed(None)
        else:
            confirmed = Deferred()
        self.published.append(
            Publication(routing_key, body, message_id, headers, refuse_if_busy, confirmed)
        )
        return confirmed

    def fail_next(self, *errors: Exception) -> None:
        """The next ``len(errors)`` publishes fail, one with each error."""
        self._next_failures.extend(errors)

    @property
    def pending(self) -> list[Publication]:
        """Publishes not confirmed or failed yet (with ``auto_confirm=False``)."""
        return [p for p in self.published if not p.confirmed.called]

    def confirm(self, index: int = 0) -> None:
        """Confirm the ``index``-th publish still pending."""
        self.pending[index].confirmed.callback(None)

    def nack(self, error: Exception, index: int = 0) -> None:
        """Fail the ``index``-th publish still pending with ``error``."""
        self.pending[index].confirmed.errback(error)

    def bodies(self, routing_key: str) -> list[bytes]:
        """The bodies published to ``routing_key``, in order."""
        return [p.body for p in self.published if p.routing_key == routing_key]


# -- consuming --------------------------------------------------------------


@attrs.define(eq=False)
class RecordingAcker:
    """Stands in for the ``Acker`` of one delivery; counts acks and rejects.

    ``alive`` False is a delivery whose connection is gone (the broker
    requeues it by itself).
    """

    headers: dict[str, Any] = attrs.field(factory=dict)
    delivery_tag: int = 1
    redelivered: bool = False
    alive: bool = True
    acks: int = 0
    rejects: int = 0

    def ack(self) -> None:
        self.acks += 1

    def reject(self) -> None:
        self.rejects += 1


class RecordingQueueControl:
    """Stands in for the consumer controls of ``AmqpService`` (``QueueControl``).

    ``calls`` records ``"pause <queue>"``, ``"resume <queue>"`` and
    ``"get <queue>"`` in order; ``get`` answers the messages in ``ready`` (a
    body, or a body and its AMQP properties), one per call, each with a new
    :class:`RecordingAcker` (kept in ``ackers``), then None, as an empty
    queue does.
    """

    def __init__(self, *ready: bytes | tuple[bytes, dict[str, Any]]) -> None:
        self.calls: list[str] = []
        self.ready: list[bytes | tuple[bytes, dict[str, Any]]] = list(ready)
        self.ackers: list[RecordingAcker] = []

    async def pause_consumer(self, queue: str) -> None:
        self.calls.append(f"pause {queue}")

    async def resume_consumer(self, queue: str) -> None:
        self.calls.append(f"resume {queue}")

    async def get(self, queue: str) -> tuple[bytes, dict[str, Any], RecordingAcker] | None:
        self.calls.append(f"get {queue}")
        if not self.ready:
            return None
        acker = RecordingAcker()
        self.ackers.append(acker)
        message = self.ready.pop(0)
        body, properties = message if isinstance(message, tuple) else (message, {})
        return body, properties, acker


class RecordingAmqp(RecordingQueueControl):
    """Stands in for ``AmqpService`` as the channel registry and the channels
    it builds use it: ``queues`` declared now, ``consumers`` by queue (with
    their prefetch), ``cancelled`` queues in order, and ``publish`` a
    :class:`RecordingPublisher`. A consumer's cancel is confirmed at once;
    a queue in ``refused`` is refused as a broker refuses one declared with
    other arguments."""

    def __init__(self) -> None:
        super().__init__()
        self.publish = RecordingPublisher()
        self.queues: dict[str, dict[str, Any]] = {}
        #: Queues the broker refuses to declare (SetupFailed names them).
        self.refused: set[str] = set()
        self.consumers: dict[str, tuple[Any, int | None]] = {}
        self.cancelled: list[str] = []

    def add_queues(self, queues: Any) -> Deferred[None]:
        self.queues.update({name: dict(arguments) for name, arguments in queues.items()})
        refused = sorted(self.refused.intersection(queues))
        for name in refused:
            self.queues.pop(name)
        if refused:
            return fail(SetupFailed(f"the broker refused queue {refused[0]}"))
        return succeed(None)

    def remove_queues(self, names: Iterable[str]) -> None:
        for name in names:
            self.queues.pop(name, None)

    def add_consumer(self, queue: str, consumer: Any, prefetch: int | None = None) -> None:
        if queue in self.consumers:
            raise ValueError(f"{queue} has a consumer already")
        self.consumers[queue] = (consumer, prefetch)

    def remove_consumer(self, queue: str) -> Deferred[None]:
        self.consumers.pop(queue, None)
        self.cancelled.append(queue)
        return succeed(None)

    async def queue_info(self, queue: str) -> tuple[int, int]:
        return 0, 1 if queue in self.consumers else 0


# -- the state cache --------------------------------------------------------


class BreakableStateCache:
    """A state cache that fails every operation while :attr:`failure` is set.

    It wraps ``cache`` (by default an ``InMemoryStateCache`` on ``clock``) and
    passes everything through while it works; broken, every operation fails
    with the failure and ``health`` says down, as an unreachable Redis does.
    """

    def __init__(self, clock: IReactorTime, cache: StateCache | None = None) -> None:
        self.cache: StateCache = cache if cache is not None else InMemoryStateCache(clock)
        #: While set, every operation fails with it.
        self.failure: Exception | None = None

    def break_with(self, failure: Exception) -> None:
        """Fail every operation from now on with ``failure``."""
        self.failure = failure

    def mend(self) -> None:
        """Work again."""
        self.failure = None

    def _call(self, method: str, *args: Any) -> Deferred[Any]:
        if self.failure is not None:
            return fail(self.failure)
        return getattr(self.cache, method)(*args)

    def store_inbound(self, message: VumiMessage) -> Deferred[None]:
        return self._call("store_inbound", message)

    def fetch_inbound(self, message_id: str) -> Deferred[VumiMessage | None]:
        return self._call("fetch_inbound", message_id)

    def delete_inbound(self, message_id: str) -> Deferred[None]:
        return self._call("delete_inbound", message_id)

    def store_event_info(self, channel_id: str, message_id: str, info: EventInfo) -> Deferred[None]:
        return self._call("store_event_info", channel_id, message_id, info)

    def fetch_event_info(
        self, channel_id: str, message_id: str, *, legacy: bool = False
    ) -> Deferred[EventInfo | None]:
        if self.failure is not None:
            return fail(self.failure)
        return self.cache.fetch_event_info(channel_id, message_id, legacy=legacy)

    def delete_event_info(self, channel_id: str, message_id: str) -> Deferred[None]:
        return self._call("delete_event_info", channel_id, message_id)

    def store_message_event(
        self, channel_id: str, message_id: str, event_id: str, event: bytes
    ) -> Deferred[None]:
        return self._call("store_message_event", channel_id, message_id, event_id, event)

    def fetch_message_events(self, channel_id: str, message_id: str) -> Deferred[list[bytes]]:
        return self._call("fetch_message_events", channel_id, message_id)

    def start(self) -> None:
        self.cache.start()

    def health(self) -> dict[str, dict[str, Any]]:
        if self.failure is not None:
            return {"state_cache": {"health": "down", "error": str(self.failure)}}
        return self.cache.health()

    def close(self) -> Deferred[None]:
        return self.cache.close()


# -- the delivery target ----------------------------------------------------


@attrs.frozen
class ReceivedPost:
    """One POST a :class:`FakeRapidPro` received."""

    uri: bytes
    body: bytes
    headers: dict[bytes, list[bytes]]

    def header(self, name: str) -> list[bytes] | None:
        """The raw values of header ``name`` (any case), or None."""
        return self.headers.get(name.lower().encode("ascii"))


class FakeRapidPro(Resource):
    """A delivery target (RapidPro's receive URL, an event URL) in memory.

    Every POST is recorded in ``requests`` and answered with the next code
    given to :meth:`answer` (then ``code``), with the headers in
    ``response_headers`` (``{"Retry-After": "30"}``). With ``hold`` set,
    requests are left unanswered (in ``held``) until the test finishes them,
    as a destination that does not answer.
    """

    isLeaf = True

    def __init__(self, code: int = 200) -> None:
        super().__init__()
        self.code = code
        self.hold = False
        self.response_headers: dict[str, str] = {}
        self.requests: list[ReceivedPost] = []
        self.held: list[Request] = []
        self._codes: list[int] = []
        from treq.testing import RequestTraversalAgent  # treq: the ``test`` extra

        self._agent = RequestTraversalAgent(self)

    def answer(self, *codes: int) -> None:
        """Answer the next ``len(codes)`` POSTs with these status codes."""
        self._codes.extend(codes)

    def render_POST(self, request: Request) -> bytes | int:
        headers = {
            name.lower(): list(values) for name, values in request.requestHeaders.getAllRawHeaders()
        }
        self.requests.append(ReceivedPost(request.uri, request.content.read(), headers))
        if self.hold:
            self.held.append(request)
            return NOT_DONE_YET
        request.setResponseCode(self._codes.pop(0) if self._codes else self.code)
        for name, value in self.response_headers.items():
            request.setHeader(name, value)
        return b'{"ok": true}'

    @property
    def bodies(self) -> list[bytes]:
        """The body of each POST received, in order."""
        return [r.body for r in self.requests]

    def delivery(
        self,
        clock: IReactorTime,
        metrics: Metrics = NO_METRICS,
        outages: OutageTracker | None = None,
    ) -> HttpDelivery:
        """An ``HttpDelivery`` whose POSTs, to any URL, reach this resource."""
        return HttpDelivery(self._agent, clock, metrics, outages)

    def flush(self) -> None:
        """Deliver the answers written so far to the waiting POSTs."""
        self._agent.flush()


class CuttableSite(Site):
    """A quiet ``Site`` whose connections can all be cut at once (RapidPro
    going away): it remembers them as it builds them."""

    noisy = False
    protocol = HTTPChannel  # plain HTTP/1.1 (no h2 switch), with a transport to abort

    def __init__(self, resource: Resource) -> None:
        super().__init__(resource)
        self.connections: weakref.WeakSet[Any] = weakref.WeakSet()

    def buildProtocol(self, addr: Any) -> Any:
        protocol = super().buildProtocol(addr)
        self.connections.add(protocol)
        return protocol

    def cut(self) -> None:
        """Abort every open connection."""
        for protocol in list(self.connections):
            if protocol.transport is not None:
                protocol.transport.abortConnection()

    def log(self, request: Any) -> None:
        """No access log."""


@contextmanager
def captured_logs() -> Iterator[list[dict[str, Any]]]:
    """Every log event published while the block runs (all levels, any
    namespace), in a list that stays readable afterwards.

    ``twisted.logger.capturedLogs`` without its one flaw for tests: the
    observer is removed also when the block raises (a failed assertion)."""
    events: list[dict[str, Any]] = []
    globalLogPublisher.addObserver(events.append)
    try:
        yield events
    finally:
        globalLogPublisher.removeObserver(events.append)
