"""What the benchmark tells the person running it, and the error that ends a run."""

from __future__ import annotations


class BenchError(Exception):
    """Something the benchmark needs did not work; the message says what."""


def say(text: str) -> None:
    """A progress line, flushed at once (a run takes minutes)."""
    print(f"bench: {text}", flush=True)


def shout(text: str) -> None:
    """A failed check or an aborted run, framed so it stands out in the log."""
    line = "!" * 78
    print(f"{line}\n!!! {text}\n{line}", flush=True)
