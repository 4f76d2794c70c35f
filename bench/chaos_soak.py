"""Chaos soak (issue 20 item 7): several channels on hostile RapidPros,
hostile headers and poison bodies, a broker restart and a SIGKILL.

Not a test and not run by CI: a script to run by hand on a machine whose
RabbitMQ (127.0.0.1:5672, guest/guest) it may restart and whose Redis
(127.0.0.1:6379) it may use::

    .venv/bin/python bench/chaos_soak.py [--channels 4] [--inbound 400] [--outbound 150]
        [--rounds 30] [--round-gap 2]

What it does and counts is in ``bench/chaos_kit.py`` (shared with
``tests/test_e2e_chaos.py``, which runs it with small numbers). It prints a
table per channel; the exit status is 1 if anything was lost, crossed to
another channel, parked though good, or left stranded, or a poison body
is not on ``.failed`` with a reason.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # tests.support: the real service process

from chaos_kit import ChaosPlan, ChaosRun, render, zeros  # noqa: E402
from twisted.internet import reactor  # noqa: E402
from twisted.internet.defer import Deferred  # noqa: E402


def parse_args(argv: list[str] | None) -> ChaosPlan:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--channels", type=int, default=4, help="at least 3 (default 4)")
    parser.add_argument("--inbound", type=int, default=400, help="good inbound per channel")
    parser.add_argument("--hostile", type=int, default=60, help="of those, with hostile headers")
    parser.add_argument("--outbound", type=int, default=150, help="through the API, per channel")
    parser.add_argument("--poison", type=int, default=20, help="per channel and queue")
    parser.add_argument("--rounds", type=int, default=30, help="the sending is spread over")
    parser.add_argument("--round-gap", type=float, default=2.0, help="seconds between rounds")
    parser.add_argument("--throttle-for", type=float, default=40.0, help="seconds of 429s")
    parser.add_argument(
        "--flap-for", type=float, default=None, help="seconds of flapping (default: the sending)"
    )
    args = parser.parse_args(argv)
    if args.channels < 3 or args.rounds < 3:
        parser.error("--channels and --rounds must be at least 3")
    return ChaosPlan(
        channels=args.channels,
        inbound=args.inbound,
        hostile=min(args.hostile, args.inbound),
        outbound=args.outbound,
        poison=args.poison,
        rounds=args.rounds,
        round_gap=args.round_gap,
        throttle_for=args.throttle_for,
        flap_for=args.rounds * args.round_gap if args.flap_for is None else args.flap_for,
        restart_broker_after=args.rounds // 3,
        kill_service_after=2 * args.rounds // 3,
    )


def main(argv: list[str] | None = None) -> int:
    plan = parse_args(argv)
    tmp = Path(tempfile.mkdtemp(prefix="junebug-chaos-"))
    chaos = ChaosRun(plan, tmp)
    outcome: dict[str, object] = {}
    started = time.monotonic()

    def finished(result: object) -> None:
        outcome["result"] = result
        reactor.stop()

    reactor.callWhenRunning(lambda: Deferred.fromCoroutine(chaos.run()).addBoth(finished))
    reactor.run()
    log_errors = chaos.close()
    result = outcome.get("result")
    if not isinstance(result, list):
        print(f"chaos soak failed: {result}", file=sys.stderr)
        return 1
    print()
    print(
        f"junebug-api chaos soak: {plan.channels} channels, {plan.rounds} rounds"
        f" {plan.round_gap:g} s apart, {time.monotonic() - started:.0f} s; service log in {tmp}"
    )
    print(render(result))
    for text in chaos.chaos_notes:
        print(text)
    print(f"RapidPro answers (status: POSTs): {chaos.answers()}")
    print(f"transport publishes tried again after a broker error: {chaos.transport.retried}")
    problems = zeros(result) + log_errors
    print("RESULT: " + ("; ".join(problems) if problems else "0 lost, 0 crossed, 0 stranded"))
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
