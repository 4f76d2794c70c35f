"""The names of a connector's queues: the one place the naming rule is written.

vumi's rule, which transports follow too: connector ``c`` has ``c.outbound``
(messages to the transport), ``c.inbound`` and ``c.event`` (from it), each
bound to the ``vumi`` exchange with its own name as routing key. This service
adds, for each queue it consumes (``c.inbound``, ``c.event``), a dead-letter
queue ``<queue>.failed`` and delay queues ``<queue>.retry.<seconds>`` whose
TTL sends a message back to its queue.

:class:`QueueNames` is the value everyone asks: the service (declares),
channels and workers (consume, retry, dead-letter), the outbound sender
(publishes), ``junebug-api-replay`` and the config checks (each name must fit
AMQP). A module of plain values: it imports nothing of this package.
"""

from __future__ import annotations

from typing import Any

import attrs

#: The exchange every queue is bound to (vumi's).
EXCHANGE = "vumi"

#: Delay queues: ``<queue>.retry.<seconds>`` for each of these.
RETRY_DELAYS = (5, 20, 60, 300)

#: The roles of the queues this service consumes (each has delay and dead-letter queues).
CONSUMED_ROLES = ("inbound", "event")


def failed_queue(queue: str) -> str:
    """The dead-letter queue of a consumed queue."""
    return f"{queue}.failed"


def delay_queues(queue: str, delays: tuple[int, ...] = RETRY_DELAYS) -> dict[int, str]:
    """The delay queues of a consumed queue, by their delay in seconds."""
    return {delay: f"{queue}.retry.{delay}" for delay in delays}


@attrs.frozen
class QueueNames:
    """The queues of one connector (a channel's, or the top-level one).

    ``retry_delays`` are the delays of its delay queues; empty: none, every
    retry waits in the process (unit tests use that).
    """

    connector: str
    retry_delays: tuple[int, ...] = RETRY_DELAYS

    @classmethod
    def for_connector(
        cls, connector: str, retry_delays: tuple[int, ...] = RETRY_DELAYS
    ) -> QueueNames:
        return cls(connector, retry_delays)

    @property
    def outbound(self) -> str:
        return f"{self.connector}.outbound"

    @property
    def inbound(self) -> str:
        return f"{self.connector}.inbound"

    @property
    def event(self) -> str:
        return f"{self.connector}.event"

    @property
    def inbound_failed(self) -> str:
        return failed_queue(self.inbound)

    @property
    def event_failed(self) -> str:
        return failed_queue(self.event)

    def by_role(self) -> dict[str, str]:
        """The main and dead-letter queues by role (``outbound``, ``inbound``,
        ``event``, ``inbound_failed``, ``event_failed``): what ``/health`` shows."""
        return {
            "outbound": self.outbound,
            "inbound": self.inbound,
            "event": self.event,
            "inbound_failed": self.inbound_failed,
            "event_failed": self.event_failed,
        }

    def delay_queues(self, role: str) -> dict[int, str]:
        """The delay queues of the consumed queue of ``role`` (``inbound`` or
        ``event``), by their delay in seconds."""
        if role not in CONSUMED_ROLES:
            raise ValueError(f"{role!r} is not a consumed queue's role")
        return delay_queues(getattr(self, role), self.retry_delays)

    def all_delay_queues(self) -> list[str]:
        """Every delay queue of the connector."""
        return [name for role in CONSUMED_ROLES for name in self.delay_queues(role).values()]

    def delay_queue_arguments(self) -> dict[str, dict[str, Any]]:
        """Every delay queue with its declare arguments: each holds a message
        for its delay, then dead-letters it to the vumi exchange with its
        queue as routing key, so it is back at the end of its queue."""
        return {
            name: {
                "x-message-ttl": delay * 1000,
                "x-dead-letter-exchange": EXCHANGE,
                "x-dead-letter-routing-key": getattr(self, role),
            }
            for role in CONSUMED_ROLES
            for delay, name in self.delay_queues(role).items()
        }

    def declarations(self) -> dict[str, dict[str, Any]]:
        """Every queue of the connector with its declare arguments (what
        ``AmqpService.add_queues`` takes): the main and dead-letter queues
        with none of their own, the delay queues with theirs."""
        return {
            **{queue: {} for queue in self.by_role().values()},
            **self.delay_queue_arguments(),
        }

    def all(self) -> list[str]:
        """Every queue the service declares for this connector; the config
        check keeps each name within AMQP's 255 bytes, so new queues belong here."""
        return [*self.by_role().values(), *self.all_delay_queues()]
