"""The chaos soak, short (issue 20 item 7): four channels, two sharing a
flapping RapidPro host and one throttled (429 with Retry-After), hostile
``x-junebug-*`` headers and poison bodies mixed in, outbound through the
API, a broker restart and a SIGKILL of the service; then per channel 0 lost,
0 delivered to another channel's URL or with its credentials, 0 good
messages on ``.failed``, every poison body on ``.failed`` with its reason,
0 stranded. ``bench/chaos_soak.py`` runs the same kit with larger numbers.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import pytest_twisted

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
    throttle_for=8.0,
    flap_for=16.0,
    restart_broker_after=1,
    kill_service_after=2,
    drain_limit=40.0,
    settle_limit=15.0,
)


@pytest.mark.slow
@pytest_twisted.ensureDeferred
async def test_chaos_soak_short(tmp_path: Path) -> None:
    run = ChaosRun(SHORT, tmp_path, note=print)
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
