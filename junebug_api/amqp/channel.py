"""An AMQP channel that keeps the protocol's rule: one synchronous method in
flight per channel.

AMQP 0-9-1 lets a peer send the next synchronous method on a channel only
once the last one has its reply; txAMQP does not wait, and hands replies to
its waiting callers in order, so two methods in flight at once (two
``basic.get`` from two pause gates, say) took each other's replies, content
frames and delivery tags. :class:`JunebugChannel` is the channel class of
:class:`~junebug_api.amqp.protocol.JunebugAMQPClient`: the one place the rule
is kept, for every method and every caller.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import Deferred, DeferredLock
from twisted.python.failure import Failure
from txamqp.client import Closed
from txamqp.protocol import AMQChannel


class ChannelGone(Closed):
    """The channel was closed (by the broker, for an earlier method's error,
    or with its connection) before this method's turn came: it was never
    sent, so nothing happened on the broker; another channel may try it."""


def _waits_for_reply(method: Any, args: tuple[Any, ...]) -> bool:
    """A synchronous method: one the peer answers (not sent ``nowait``)."""
    if not method.responses:
        return False
    nowait = method.fields.byname.get("nowait")
    return nowait is None or not args[method.fields.index(nowait)]


class JunebugChannel(AMQChannel):
    """A txAMQP channel that keeps AMQP 0-9-1's rule for synchronous methods:
    one in flight per channel. The next caller's method waits its turn (in
    call order) and goes out once the previous one has its whole reply
    (content included, for ``basic.get``), so each caller gets its own answer.
    Every synchronous method (declares, ``basic.get``, ``basic.qos``,
    ``basic.consume``, ``basic.cancel``, ``confirm.select``,
    ``channel.open``/``close``, ...) takes this one path; asynchronous ones
    (``basic.ack``, ``channel.close-ok``) go out at once.

    A caller that cancels its wait while its method is on the wire stops
    waiting, but the method keeps its turn until the reply came, so the
    reply cannot go to the next caller. A caller whose turn comes after the
    channel closed gets :class:`ChannelGone`.
    """

    def __init__(self, id: int, outgoing: Any, client: Any) -> None:
        super().__init__(id, outgoing, client)
        self.turn = DeferredLock()

    def invoke(self, method: Any, args: tuple[Any, ...], content: Any = None) -> Deferred:
        if not _waits_for_reply(method, args):
            return super().invoke(method, args, content)
        waiting = self.turn.acquire()

        def cancel(_: Deferred) -> None:
            if not waiting.called:
                waiting.cancel()  # not sent yet: it leaves the line

        answer: Deferred = Deferred(cancel)

        def send(_: object) -> None:
            if self.closed:
                self.turn.release()
                answer.errback(
                    ChannelGone(
                        f"AMQP channel {self.id} closed before {method.klass.name}.{method.name}"
                    )
                )
                return
            sent = AMQChannel.invoke(self, method, args, content)
            sent.addBoth(replied)

        def replied(result: Any) -> None:
            self.turn.release()
            if answer.called:
                return  # the caller stopped waiting; the reply is dropped
            if isinstance(result, Failure):
                answer.errback(result)
            else:
                answer.callback(result)

        waiting.addCallbacks(send, lambda _: None)
        return answer
