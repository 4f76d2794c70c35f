"""The open-file limit raised at start, on this very process (restored after)."""

from __future__ import annotations

import resource
from collections.abc import Iterator

import pytest

from junebug_api.http.limits import raise_open_file_limit


@pytest.fixture
def restored_limit() -> Iterator[tuple[int, int]]:
    limits = resource.getrlimit(resource.RLIMIT_NOFILE)
    yield limits
    resource.setrlimit(resource.RLIMIT_NOFILE, limits)  # lowering the soft limit is allowed


def test_the_soft_limit_goes_up_to_the_hard_one(restored_limit: tuple[int, int]) -> None:
    soft, hard = restored_limit
    if soft > 64:
        resource.setrlimit(resource.RLIMIT_NOFILE, (64, hard))
    before, after, reported_hard = raise_open_file_limit()
    assert reported_hard == hard
    assert before == min(soft, 64)
    now = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    assert after == now
    if hard != resource.RLIM_INFINITY:
        assert after == hard
    else:
        assert after == before  # an unlimited hard limit leaves the soft one alone
    assert raise_open_file_limit() == (after, after, hard)  # already raised: no change
