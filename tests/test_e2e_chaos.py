"""The chaos soak, short (issue 20 item 7): four channels, two sharing a
flapping RapidPro host and one throttled (429 with Retry-After), hostile
``x-junebug-*`` headers and poison bodies mixed in, outbound through the
API, a broker restart and a SIGKILL of the service; then per channel 0 lost,
0 delivered to another channel's URL or with its credentials, 0 good
messages on ``.failed``, every poison body on ``.failed`` with its reason,
0 stranded. ``bench/chaos_soak.py`` runs the same kit with larger numbers.

The broker is a node of the test's own: its restart must not touch the
machine's broker, which other tests (in another xdist worker) are using.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pika
import pytest
import pytest_twisted

from .rabbit_node import RabbitNode
from .test_e2e_amqp_broker import queue_counts

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

from chaos_kit import ChaosPlan, ChaosRun, render, zeros

SHORT = ChaosPlan(
    channels=4,
    inbound=10,
    hostile=4,
    outbound=6,
    poison=2,
    rounds=4,
    round_gap=1.0,
    throttle_for=6.0,
    flap_for=10.0,
    restart_broker_after=1,
    kill_service_after=2,
    drain_limit=40.0,
    settle_limit=15.0,
)


class NodeBroker:
    """A RabbitMQ node of the test's own, as the chaos kit's BrokerControl."""

    def __init__(self, node: RabbitNode) -> None:
        self.node = node
        self.port = node.port
        self.params = pika.ConnectionParameters(
            "127.0.0.1", node.port, "/", pika.PlainCredentials("guest", "guest")
        )

    def restart(self) -> None:
        self.node.restart_app()

    def queue_counts(self, names: list[str]) -> dict[str, tuple[int, int]]:
        return {q: counts[:2] for q, counts in queue_counts(self.node).items() if q in names}


@pytest.fixture
def node() -> Iterator[RabbitNode]:
    node = RabbitNode().start()
    yield node
    node.destroy()


@pytest.mark.slow
@pytest_twisted.ensureDeferred
async def test_chaos_soak_short(tmp_path: Path, node: RabbitNode) -> None:
    run = ChaosRun(SHORT, tmp_path, note=print, broker=NodeBroker(node))
    try:
        rows = await run.run()
    finally:
        log_errors = run.close()
    table = "\n".join([render(rows), *run.chaos_notes])
    print(table)  # with -s
    assert len(run.chaos_notes) == 2, table  # the broker restarted, the service was killed
    assert zeros(rows) == [], table
    assert log_errors == [], table
    # The hostile RapidPros did answer badly, and were waited out.
    statuses = {p.status for p in run.posts()}
    assert {200, 429, 500} <= statuses, statuses
