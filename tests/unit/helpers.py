"""Helpers shared by the unit tests."""

from __future__ import annotations

from collections.abc import Callable, Coroutine
from typing import Any

import pytest
from twisted.internet.defer import Deferred
from twisted.python.failure import Failure

from junebug_api.consumer import HandlingFailed
from junebug_api.testing import FakeRapidPro


def result_of(d: Deferred) -> Any:
    """The result of a Deferred that has already fired; raises its failure."""
    results: list[Any] = []
    d.addBoth(results.append)
    assert results, "the Deferred has not fired"
    if isinstance(results[0], Failure):
        results[0].raiseException()
    return results[0]


class HandlerRun:
    """Runs a consumer's handler (``handler``) against a fake RapidPro
    (``rapidpro``), both set by the subclass."""

    handler: Callable[[bytes], Coroutine[Any, Any, Any]]
    rapidpro: FakeRapidPro

    def handle(self, body: bytes) -> Deferred[Any]:
        """The handler's outcome for ``body``, its POST answered."""
        d = Deferred.fromCoroutine(self.handler(body))
        self.rapidpro.flush()
        return d

    def failure(self, body: bytes) -> HandlingFailed:
        """The HandlingFailed the handler raises for ``body``."""
        with pytest.raises(HandlingFailed) as info:
            result_of(self.handle(body))
        return info.value

    def refusal(self, body: bytes) -> HandlingFailed:
        """The permanent HandlingFailed for ``body``, with no POST made."""
        failure = self.failure(body)
        assert failure.retryable is False
        assert self.rapidpro.requests == []
        return failure
