"""The command line and what it asks for: which configurations of the service
run which phases, with which durations and message counts."""

from __future__ import annotations

import argparse
from dataclasses import dataclass

from . import __doc__ as MANUAL
from .settings import ALL_PHASES

DEFAULT_CONNECTIONS = "1,16,64"


@dataclass
class Setup:
    """One configuration of the service under test."""

    key: str  # in file names
    label: str  # in the scaling table
    processes: int
    cache: str  # memory or redis
    balancer: bool  # outbound through the nginx balancer
    tls: bool = False  # amqps to the node (--tls)
    code: str | None = None  # a git ref whose code runs instead (--compare-code)
    metrics: bool = True  # metrics_enabled (--compare-metrics runs both)
    metrics_off_of: str | None = None  # the key of the setup this one repeats with metrics off
    channel_api: bool = False  # channel_api on (--compare-channel-api runs both)
    channel_api_of: str | None = None  # the key of the setup this one repeats with channel_api

    def tag(self, processes: int | None = None, outbound: bool = False) -> str:
        """The suffix of row names; none for one process, memory, no balancer,
        metrics on."""
        n = self.processes if processes is None else processes
        marks = [
            m
            for m in (
                "tls" if self.tls else "",
                self.code or "",
                "" if self.metrics else "metrics off",
                "channel_api" if self.channel_api else "",
            )
            if m
        ]
        if n == 1 and self.cache == "memory" and not self.balancer:
            return f" [{', '.join(marks)}]" if marks else ""
        lb = ", lb" if outbound and self.balancer else ""
        more = "".join(f", {m}" for m in marks)
        return f" [{n}p {self.cache}{lb}{more}]"


@dataclass
class Plan:
    """What one run does."""

    setups: list[Setup]  # with --compare-channels only for the report's pinning line
    phases: set[str]
    connections: list[int]
    event_url: bool  # an event_url in every outbound request
    duration: int  # seconds per wrk run
    warmup: int  # seconds of the warm-up wrk run
    n_inbound: int
    n_events: int
    concurrency: int  # worker_concurrency
    keep_tmp: bool
    tls: bool  # the node gets a TLS listener
    lazy_queues: bool
    spread: bool  # service process i on core (i - 1) % 2
    compare_channels: int | None
    compare_scaling: bool
    compare_caches: bool
    compare_metrics: bool
    compare_channel_api: bool = False

    @property
    def single_via_balancer(self) -> bool:
        """With N > 1 processes, also measure 1 process through the balancer."""
        return not self.compare_scaling

    @property
    def uses_redis(self) -> bool:
        """Whether a setup keeps its state in the shared Redis."""
        return any(s.cache == "redis" for s in self.setups)

    @property
    def redis_round_trips(self) -> bool:
        """Whether the Redis round trip is measured (when Redis is used at all)."""
        return self.compare_scaling or "outbound" in self.phases


def parser() -> argparse.ArgumentParser:
    """bench/run's options."""
    parser = argparse.ArgumentParser(description=MANUAL.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="5 s wrk runs, 20,000 inbound")
    parser.add_argument("--concurrency", type=int, default=20, help="worker_concurrency")
    parser.add_argument("--duration", type=int, help="seconds per wrk run (15; --quick 5)")
    parser.add_argument("--inbound", type=int, help="inbound messages (100,000; --quick 20,000)")
    parser.add_argument("--events", type=int, default=20_000, help="events (20,000)")
    parser.add_argument("--connections", default=DEFAULT_CONNECTIONS, help="wrk connection counts")
    parser.add_argument("--keep-tmp", action="store_true", help="keep the temporary directory")
    parser.add_argument(
        "--state-cache", choices=("memory", "redis"), default="memory", help="(memory)"
    )
    parser.add_argument("--processes", type=int, default=1, help="service processes (1)")
    parser.add_argument(
        "--spread",
        action="store_true",
        help="pin service process i to core (i-1) %% 2 instead of all to core 0",
    )
    parser.add_argument(
        "--balancer", action="store_true", help="outbound through nginx even with 1 process"
    )
    parser.add_argument(
        "--phases",
        default=",".join(ALL_PHASES),
        help="subset of outbound,inbound,events,bare,roundtrip",
    )
    parser.add_argument(
        "--event-url",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="event_url in every outbound request (default: only with --compare-scaling)",
    )
    parser.add_argument(
        "--lazy-queues",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="a queue-mode=lazy policy on the unconsumed outbound queue, as RabbitMQ 3.12+"
        " always has (default: on)",
    )
    parser.add_argument(
        "--tls",
        action="store_true",
        help="also run the phases with the service on amqps (rows marked [tls])",
    )
    parser.add_argument(
        "--compare-code",
        metavar="REF",
        help="also run the phases with the junebug_api of git ref REF (rows marked [REF]),"
        " e.g. the commit before the two AMQP connections",
    )
    parser.add_argument(
        "--compare-scaling",
        action="store_true",
        help="1 process memory, 1 process Redis, 2 processes Redis: outbound @64, inbound",
    )
    parser.add_argument(
        "--compare-channels",
        type=int,
        metavar="N",
        help="one busy channel alone and beside N-1 idle ones: start-up, RSS, outbound, inbound",
    )
    parser.add_argument(
        "--compare-caches",
        action="store_true",
        help="memory and Redis side by side, one process: outbound with event_url @1 and @64,"
        " inbound, session round trip (--phases and --connections narrow it)",
    )
    parser.add_argument(
        "--compare-metrics",
        action="store_true",
        help="every phase with metrics on, then again with metrics_enabled: false",
    )
    parser.add_argument(
        "--compare-channel-api",
        action="store_true",
        help="every phase with channel_api off, then again with channel_api: true (admin"
        " token, the store polled every second); try --phases outbound,inbound --connections 64",
    )
    return parser


# What each mode decides: setups, phases, wrk connection counts, event_url.
Choice = tuple[list[Setup], set[str], list[int], bool]


def connection_counts(text: str) -> list[int]:
    return [int(c) for c in text.split(",")]


def scaling_setups(args: argparse.Namespace, phases: set[str]) -> Choice:
    """--compare-scaling: 1 process memory, 1 Redis, 2 Redis; outbound @64 and inbound."""
    args.quick = True
    setups = [
        Setup("mem1", "1 process, memory cache", 1, "memory", True),
        Setup("redis1", "1 process, Redis cache", 1, "redis", True),
        Setup("redis2", "2 processes, Redis cache", 2, "redis", True),
    ]
    return setups, {"outbound", "inbound"}, [64], args.event_url is not False


def cache_setups(args: argparse.Namespace, phases: set[str]) -> Choice:
    """--compare-caches: one process with each cache; narrower defaults."""
    if args.phases == ",".join(ALL_PHASES):
        phases = {"outbound", "inbound", "roundtrip"}
    if args.connections == DEFAULT_CONNECTIONS:
        args.connections = "1,64"
    setups = [Setup(k, f"1 process, {k} cache", 1, k, False) for k in ("memory", "redis")]
    return setups, phases, connection_counts(args.connections), args.event_url is not False


def chosen_setups(args: argparse.Namespace, phases: set[str]) -> Choice:
    """The configuration the options describe, then the --tls, --compare-code and
    --compare-metrics ones."""
    main = Setup(
        "main",
        f"{args.processes} process(es), {args.state_cache} cache",
        args.processes,
        args.state_cache,
        args.balancer or args.processes > 1,
    )
    setups = [main]
    if args.tls:
        setups.append(Setup("tls", "amqps", 1, "memory", False, tls=True))
    if args.compare_code:
        setups.append(Setup("code", args.compare_code, 1, "memory", False, code=args.compare_code))
    if args.compare_metrics:
        label = main.label + ", metrics off"
        setups.append(
            Setup(
                "nometrics",
                label,
                main.processes,
                main.cache,
                main.balancer,
                metrics=False,
                metrics_off_of=main.key,
            )
        )
    if args.compare_channel_api:
        setups.append(
            Setup(
                "channelapi",
                main.label + ", channel_api",
                main.processes,
                main.cache,
                main.balancer,
                channel_api=True,
                channel_api_of=main.key,
            )
        )
    return setups, phases, connection_counts(args.connections), bool(args.event_url)


def parse_plan(argv: list[str] | None = None) -> Plan:
    """The plan bench/run's command line asks for; exits with usage on bad options."""
    options = parser()
    args = options.parse_args(argv)
    phases = {p.strip() for p in args.phases.split(",") if p.strip()}
    if not phases or not phases <= set(ALL_PHASES):
        options.error(f"--phases: a subset of {','.join(ALL_PHASES)}")
    if args.processes < 1:
        options.error("--processes must be at least 1")
    if args.compare_channels is not None and args.compare_channels < 2:
        options.error("--compare-channels must be at least 2")
    if args.compare_channels:
        phases = {"outbound", "inbound"} | (phases & {"bare"})
        if args.connections == DEFAULT_CONNECTIONS:
            args.connections = "64"
    if args.compare_scaling:
        choose = scaling_setups
    elif args.compare_caches:
        choose = cache_setups
    else:
        choose = chosen_setups
    setups, phases, connections, event_url = choose(args, phases)
    return Plan(
        setups=setups,
        phases=phases,
        connections=connections,
        event_url=event_url,
        duration=args.duration or (5 if args.quick else 15),
        warmup=1 if args.quick else 3,
        n_inbound=args.inbound or (20_000 if args.quick else 100_000),
        n_events=args.events,
        concurrency=args.concurrency,
        keep_tmp=args.keep_tmp,
        tls=args.tls,
        lazy_queues=args.lazy_queues,
        spread=args.spread,
        compare_channels=args.compare_channels,
        compare_scaling=args.compare_scaling,
        compare_caches=args.compare_caches,
        compare_metrics=args.compare_metrics,
        compare_channel_api=args.compare_channel_api,
    )
