"""headers: the x-junebug-* values read back are checked; whatever a peer
put there, the headers written next can be encoded."""

from __future__ import annotations

import math
from decimal import Decimal
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from junebug_api.amqp.protocol import encode_table
from junebug_api.delivery.headers import (
    ATTEMPTS_HEADER,
    FIRST_FAILURE_HEADER,
    HOLDS_HEADER,
    MAX_CLOCK_AHEAD,
    MAX_COUNT,
    REASON_HEADER,
    Budget,
    header_text,
)

NOW = 1_700_000_000.0


def test_values_the_service_writes_are_read_back() -> None:
    written = Budget(attempts=3, first_failure=int(NOW) - 60, holds=2).headers("HTTP 500")
    budget = Budget.from_headers(written, NOW)
    assert (budget.attempts, budget.first_failure, budget.holds) == (3, int(NOW) - 60, 2)
    assert budget.ignored == []
    assert written[REASON_HEADER] == "HTTP 500"


def test_no_headers_is_a_fresh_budget() -> None:
    for headers in ({}, None, "not a table"):
        budget = Budget.from_headers(headers, NOW)
        assert (budget.attempts, budget.first_failure, budget.holds) == (0, None, 0)
        assert budget.ignored == []


HOSTILE: list[tuple[str, Any]] = [
    (ATTEMPTS_HEADER, 2**63 - 1),  # one more overflows a signed 64-bit field
    (ATTEMPTS_HEADER, 2**64 - 1),  # an unsigned 64-bit field ("L")
    (ATTEMPTS_HEADER, -1),
    (ATTEMPTS_HEADER, MAX_COUNT + 1),
    (ATTEMPTS_HEADER, 3.0),  # a double: the service writes integers
    (ATTEMPTS_HEADER, True),
    (ATTEMPTS_HEADER, "3"),
    (ATTEMPTS_HEADER, Decimal("3")),
    (ATTEMPTS_HEADER, {"a": 1}),
    (ATTEMPTS_HEADER, None),
    (HOLDS_HEADER, 2**63 - 1),
    (HOLDS_HEADER, -5),
    (HOLDS_HEADER, math.nan),
    (FIRST_FAILURE_HEADER, -1e300),  # a double far in the past
    (FIRST_FAILURE_HEADER, 1e300),
    (FIRST_FAILURE_HEADER, math.inf),
    (FIRST_FAILURE_HEADER, -1),  # before the epoch
    (FIRST_FAILURE_HEADER, int(NOW) + MAX_CLOCK_AHEAD + 1),  # far in the future
    (FIRST_FAILURE_HEADER, 2**64 - 1),
    (FIRST_FAILURE_HEADER, float(NOW)),
    (FIRST_FAILURE_HEADER, b"\xff"),
]


@pytest.mark.parametrize(("name", "value"), HOSTILE)
def test_a_value_no_run_writes_is_treated_as_absent_and_named(name: str, value: Any) -> None:
    budget = Budget.from_headers({name: value, "x-other": "kept out"}, NOW)
    assert (budget.attempts, budget.first_failure, budget.holds) == (0, None, 0)
    [ignored] = budget.ignored
    assert ignored.startswith(f"{name}=")
    assert len(ignored) <= len(name) + 41
    budget.failed(NOW)
    budget.spend_attempt()
    encode_table(budget.headers("reason"))  # no struct.error


def test_the_edges_of_what_is_accepted() -> None:
    edge = {
        ATTEMPTS_HEADER: MAX_COUNT,
        HOLDS_HEADER: 0,
        FIRST_FAILURE_HEADER: int(NOW) + MAX_CLOCK_AHEAD,
    }
    budget = Budget.from_headers(edge, NOW)
    assert (budget.attempts, budget.holds) == (MAX_COUNT, 0)
    assert budget.first_failure == int(NOW) + MAX_CLOCK_AHEAD
    assert budget.ignored == []
    assert Budget.from_headers({FIRST_FAILURE_HEADER: 0}, NOW).first_failure == 0


def test_counts_stop_at_the_largest_budget() -> None:
    budget = Budget(attempts=MAX_COUNT, holds=MAX_COUNT)
    budget.spend_attempt()
    budget.spend_hold()
    assert (budget.attempts, budget.holds) == (MAX_COUNT, MAX_COUNT)


def test_first_failure_is_set_once() -> None:
    budget = Budget()
    budget.failed(100.7)
    budget.failed(200.0)
    assert budget.first_failure == 100


def test_reason_is_ascii_and_bounded() -> None:
    assert header_text("ñ 漢") == "\\xf1 \\u6f22"
    assert len(header_text("x" * 5000)) == 1000


header_values = st.one_of(
    st.integers(),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=20),
    st.binary(max_size=20),
    st.booleans(),
    st.none(),
    st.decimals(allow_nan=False),
    st.lists(st.integers(), max_size=3),
    st.dictionaries(st.text(max_size=5), st.integers(), max_size=2),
)


@given(
    headers=st.dictionaries(
        st.sampled_from([ATTEMPTS_HEADER, HOLDS_HEADER, FIRST_FAILURE_HEADER, "x-other"]),
        header_values,
    ),
    now=st.floats(min_value=0, max_value=4e9),
    failures=st.integers(min_value=0, max_value=3),
    reason=st.text(max_size=50),
)
def test_whatever_came_in_what_goes_out_can_be_encoded(
    headers: dict[str, Any], now: float, failures: int, reason: str
) -> None:
    budget = Budget.from_headers(headers, now)
    for _ in range(failures):
        budget.failed(now)
        budget.spend_attempt()
        budget.spend_hold()
    out = budget.headers(reason)
    encode_table(out)
    assert set(out) <= {ATTEMPTS_HEADER, HOLDS_HEADER, FIRST_FAILURE_HEADER, REASON_HEADER}
    assert 0 <= out[ATTEMPTS_HEADER] <= MAX_COUNT
    assert 0 <= out[HOLDS_HEADER] <= MAX_COUNT
