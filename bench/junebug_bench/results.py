"""What a run measured: the table's rows and each configuration's results."""

from __future__ import annotations

from dataclasses import dataclass, field

from .plan import Setup


@dataclass
class Row:
    """One row of the table: a rate, latencies, CPU per operation, memory, checks."""

    name: str
    unit: str
    rate: float | None = None
    p50: float | None = None
    p90: float | None = None
    p99: float | None = None
    cpu_ms: float | None = None
    peak_mb: float | None = None
    ceiling: float | None = None
    status: str = "not run"
    notes: list[str] = field(default_factory=list)
    # What was measured, without the configuration's marks in the name: rows of
    # two configurations with the same measure compare ("": a row never compared).
    measure: str = ""


@dataclass
class SetupResult:
    """The rows of one configuration of the service, and lines for under the table."""

    setup: Setup
    rows: list[Row] = field(default_factory=list)
    extra: list[str] = field(default_factory=list)
    outbound: dict[int, list[Row]] = field(default_factory=dict)  # by process count
    inbound: Row | None = None


@dataclass
class Tally:
    """Everything a run measured so far, in the order it was measured."""

    rows: list[Row] = field(default_factory=list)
    results: list[SetupResult] = field(default_factory=list)
    extra: list[str] = field(default_factory=list)  # lines under the table

    def add(self, result: SetupResult) -> None:
        self.results.append(result)
        self.rows += result.rows
        self.extra += result.extra
