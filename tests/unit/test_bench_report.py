"""The benchmark's pure parts: the command line's plan, wrk's output in numbers,
the checks behind a row's status, and the table. No services are started.

The benchmark is bench/junebug_bench (with bench/roundtrip.py and
bench/cache_memory.py beside it, imported as top-level modules), so bench/
goes on sys.path here, as running bench/benchmark.py puts it there.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))

from junebug_bench.accounting import count_deliveries, drain_status, outbound_count
from junebug_bench.console import BenchError
from junebug_bench.load import parse_wrk
from junebug_bench.messages import inbound_expected
from junebug_bench.plan import Setup, parse_plan
from junebug_bench.report import (
    RunFacts,
    cache_ratios,
    channel_api_cost,
    channel_lines,
    metrics_cost,
    metrics_pairs,
    render,
    report,
)
from junebug_bench.results import Row, SetupResult, Tally

WRK_OUTPUT = """\
Running 5s test @ http://127.0.0.1:8080/channels/bench/messages
  1 threads and 16 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency     1.23ms  456.00us  12.34ms   90.00%
    Req/Sec     8.00k   500.00     9.00k    70.00%
  Latency Distribution
     50%  850.00us
     75%    1.30ms
     90%    2.50ms
     99%    1.20s
  40000 requests in 5.00s, 4.00MB read
  Socket errors: connect 0, read 2, write 0, timeout 1
Requests/sec:   8000.00
Transfer/sec:    800.00KB
wrk-lua: status201=39990 non201=10 last_non201=503
"""


def test_parse_wrk_converts_every_unit_to_milliseconds():
    wrk = parse_wrk(WRK_OUTPUT)
    assert (wrk.p50, wrk.p90, wrk.p99) == (pytest.approx(0.85), 2.5, 1200.0)
    assert (wrk.requests, wrk.seconds, wrk.rate) == (40000, 5.0, 8000.0)
    assert (wrk.created, wrk.non201, wrk.last_non201, wrk.socket_errors) == (39990, 10, 503, 3)


def test_parse_wrk_refuses_output_without_the_lua_counts():
    with pytest.raises(BenchError, match="cannot parse"):
        parse_wrk(WRK_OUTPUT.replace("wrk-lua", "other"))


@pytest.mark.parametrize(
    ("queued", "status"),
    [(100, "ok"), (116, "in flight"), (118, "in flight"), (119, "count mismatch"), (99, "lost")],
)
def test_outbound_count_allows_one_request_in_flight_per_connection(queued, status):
    # 16 connections and 2 socket errors: up to 18 messages more than answers 201.
    got, note = outbound_count("bench.outbound", queued, 100, 16, 2)
    assert got == status
    assert f"{queued} on bench.outbound" in note


def test_count_deliveries_finds_duplicates_missing_and_malformed_bodies():
    ids = ["a", "b", "c"]
    wrong = {**inbound_expected("b"), "content": "changed"}
    bodies = [inbound_expected("a"), inbound_expected("a"), wrong, None, {"message_id": "z"}]
    got = count_deliveries(bodies, ids, inbound_expected)
    assert (got.bodies, got.distinct, got.duplicates, got.missing, got.malformed) == (5, 1, 1, 2, 3)
    assert drain_status(got, left=0, failed=0) == "lost + duplicates + count mismatch"


def test_drain_status_is_ok_only_when_each_id_arrived_once_and_nothing_is_left():
    ids = ["a", "b"]
    got = count_deliveries([inbound_expected(i) for i in ids], ids, inbound_expected)
    assert drain_status(got, left=0, failed=0) == "ok"
    assert drain_status(got, left=0, failed=1) == "count mismatch"


def test_render_aligns_columns_and_shows_missing_figures_as_dashes():
    rows = [
        Row("outbound @64", "req/s", 1234.4, 1.0, 2.0, 3.0, 0.5, 60.0, 0.5, "ok"),
        Row("inbound", "msg/s", 900.0),
    ]
    lines = render(rows, ["a line under the table"]).splitlines()
    assert lines[0].split() == [
        *("row", "rate", "unit", "p50", "ms", "p90", "ms", "p99", "ms", "CPU", "ms/op"),
        *("peak", "RSS", "MiB", "of", "ceiling", "status"),
    ]
    assert set(lines[1].replace(" ", "")) == {"-"}
    assert lines[2].split() == [
        *("outbound", "@64", "1,234", "req/s", "1.00", "2.00", "3.00", "0.500", "60.0", "50%"),
        "ok",
    ]
    assert lines[3].split() == ["inbound", "900", "msg/s", *["-"] * 6, "not", "run"]
    # Names, units and statuses start in one column; figures end in one.
    assert lines[0].index("status") == lines[2].index("ok") == lines[3].index("not run")
    assert lines[0].index("unit") == lines[2].index("req/s") == lines[3].index("msg/s")
    assert lines[0].index("rate") + 4 == lines[2].index("1,234") + 5 == lines[3].index("900") + 3
    assert lines[-1] == "a line under the table"


def test_setup_tags_name_what_differs_from_one_process_with_memory():
    assert Setup("main", "", 1, "memory", False).tag() == ""
    assert Setup("tls", "", 1, "memory", False, tls=True).tag() == " [tls]"
    assert Setup("r", "", 2, "redis", True).tag(outbound=True) == " [2p redis, lb]"
    assert Setup("m", "", 1, "memory", False, metrics=False).tag() == " [metrics off]"


def measured(setup: Setup, measure: str, rate: float, unit: str = "msg/s") -> Row:
    """A row as the phases name it: what was measured, then the setup's marks."""
    return Row(measure + setup.tag(), unit, rate, measure=measure)


def test_cache_ratios_and_metrics_cost_compare_rows_of_the_same_measure():
    memory_setup = Setup("memory", "", 1, "memory", False)
    memory = SetupResult(memory_setup, [measured(memory_setup, "inbound", 1000)])
    redis_setup = Setup("redis", "", 1, "redis", False)
    redis = SetupResult(redis_setup, [measured(redis_setup, "inbound", 900)])
    assert cache_ratios([memory, redis])[1] == "  inbound: 900 / 1,000 = 0.90"
    off_setup = Setup("off", "", 1, "memory", False, metrics=False, metrics_off_of="memory")
    off = SetupResult(off_setup, [measured(off_setup, "inbound", 1250)])
    assert off.rows[0].name == "inbound [metrics off]"
    assert metrics_cost([memory, off]) == [
        "metrics on vs off, inbound: 1,000 vs 1,250 msg/s (-20.0%)"
    ]


@pytest.mark.parametrize(
    "options",
    [
        [],
        ["--tls"],
        ["--compare-code", "HEAD~1"],
        ["--tls", "--compare-code", "HEAD~1"],
        ["--processes", "2"],
        ["--processes", "2", "--tls", "--compare-code", "HEAD~1"],
        ["--state-cache", "redis", "--balancer", "--tls"],
    ],
)
def test_compare_metrics_pairs_the_chosen_setup_with_its_metrics_off_twin(options):
    plan = parse_plan(["--compare-metrics", *options])
    pairs = metrics_pairs([SetupResult(s) for s in plan.setups])
    assert [(on.setup.key, off.setup.key) for on, off in pairs] == [("main", "nometrics")]
    [(on, off)] = pairs
    assert (on.setup.metrics, off.setup.metrics) == (True, False)
    # The twin differs only in metrics: same processes, cache, balancer, transport, code.
    same = ("processes", "cache", "balancer", "tls", "code")
    assert [getattr(off.setup, a) for a in same] == [getattr(on.setup, a) for a in same]


@pytest.mark.parametrize("options", [[], ["--tls", "--compare-code", "HEAD~1"]])
def test_without_compare_metrics_nothing_is_paired(options):
    plan = parse_plan(options)
    assert metrics_pairs([SetupResult(s) for s in plan.setups]) == []
    assert metrics_cost([SetupResult(s, [measured(s, "inbound", 1)]) for s in plan.setups]) == []


def test_metrics_cost_with_two_processes_tls_and_other_code_compares_only_the_twins():
    plan = parse_plan(
        ["--compare-metrics", "--processes", "2", "--tls", "--compare-code", "HEAD~1"]
    )
    results = []
    for setup, rate in zip(plan.setups, (1000, 500, 400, 1250), strict=True):
        rows = [
            Row(
                f"outbound @64{setup.tag(n, outbound=True)}",
                "req/s",
                rate * n,
                cpu_ms=0.5,
                measure=f"outbound @64 by {n} process(es)",
            )
            for n in (1, 2)
        ]
        rows += [
            measured(setup, "inbound", rate),
            measured(setup, "round trip @200/s", 0),  # no rate: not compared
            measured(setup, f"round trip max {rate:,}/s", rate, "ses/s"),  # maxima differ
        ]
        results.append(SetupResult(setup, rows))
    off_names = [row.name for row in results[3].rows[:3]]
    assert off_names == [
        "outbound @64 [1p memory, lb, metrics off]",
        "outbound @64 [2p memory, lb, metrics off]",
        "inbound [2p memory, metrics off]",
    ]
    results[3].rows[0].cpu_ms = 0.4
    assert metrics_cost(results) == [
        "metrics on vs off, outbound @64 [1p memory, lb]: 1,000 vs 1,250 req/s (-20.0%);"
        " CPU 0.500 vs 0.400 ms/req (+25.0%)",
        "metrics on vs off, outbound @64 [2p memory, lb]: 2,000 vs 2,500 req/s (-20.0%);"
        " CPU 0.500 vs 0.500 ms/req (+0.0%)",
        "metrics on vs off, inbound [2p memory]: 1,000 vs 1,250 msg/s (-20.0%)",
    ]


def test_channel_lines_say_whether_the_busy_channel_keeps_90_percent():
    one = {"startup": 1.0, "rss_kb": 60_000, "outbound": 1000, "inbound": 1000}
    many = {"startup": 2.0, "rss_kb": 60_099, "outbound": 950, "inbound": 800}
    lines = channel_lines(one, many, 100)
    assert "1,024 bytes per idle channel" in lines[1]
    assert lines[2].endswith("95% of the one-channel rate (at least 90%: yes)")
    assert lines[3].endswith("80% of the one-channel rate (at least 90%: NO)")


def test_report_puts_notes_and_run_facts_under_the_table():
    plan = parse_plan(["--quick", "--phases", "inbound"])
    row = Row("inbound", "msg/s", 500.0, status="ok", notes=["20,000 bodies"])
    tally = Tally(rows=[row], extra=["RabbitMQ 3.10"])
    text = report(plan, tally, RunFacts("machine: test", "other load", 61.4, redis=False))
    under = text.splitlines()[3:]
    assert under[0] == "RabbitMQ 3.10"
    assert under[1].startswith("pinning: every service process on core 0")
    assert under[2:5] == ["machine: test", "other load", "notes:"]
    assert under[5] == "  inbound: 20,000 bodies"
    assert under[-1] == "total run time: 61 s"


@pytest.mark.parametrize(
    ("argv", "setups", "phases", "connections", "event_url"),
    [
        ([], ["main"], {"outbound", "inbound", "events", "bare", "roundtrip"}, [1, 16, 64], False),
        (["--compare-scaling"], ["mem1", "redis1", "redis2"], {"outbound", "inbound"}, [64], True),
        (
            ["--compare-caches"],
            ["memory", "redis"],
            {"outbound", "inbound", "roundtrip"},
            [1, 64],
            True,
        ),
        (["--compare-channels", "10"], ["main"], {"outbound", "inbound", "bare"}, [64], False),
        (["--tls", "--compare-metrics"], ["main", "tls", "nometrics"], None, [1, 16, 64], False),
    ],
)
def test_each_mode_chooses_its_setups_phases_and_connections(
    argv, setups, phases, connections, event_url
):
    plan = parse_plan(argv)
    assert [s.key for s in plan.setups] == setups
    assert phases is None or plan.phases == phases
    assert (plan.connections, plan.event_url) == (connections, event_url)


def test_bad_phases_are_a_usage_error():
    with pytest.raises(SystemExit):
        parse_plan(["--phases", "outbound,nonsense"])


def test_compare_channel_api_runs_the_chosen_setup_again_with_channel_api_on():
    plan = parse_plan(["--compare-channel-api", "--state-cache", "redis"])
    off, on = plan.setups
    assert (off.channel_api, on.channel_api, on.channel_api_of) == (False, True, off.key)
    assert (on.processes, on.cache, on.balancer) == (off.processes, off.cache, off.balancer)
    results = [
        SetupResult(off, [measured(off, "outbound @64", 2000, "req/s")]),
        SetupResult(on, [measured(on, "outbound @64", 1960, "req/s")]),
    ]
    assert results[1].rows[0].name == "outbound @64 [1p redis, channel_api]"
    assert channel_api_cost(results) == [
        "channel_api on vs off, outbound @64 [1p redis, channel_api]: 1,960 vs 2,000 req/s (-2.0%)"
    ]
