"""Process limits: the open-file limit raised as far as the system allows.

Every HTTP connection, AMQP connection, outgoing HTTP connection and Redis
connection takes a file descriptor. Many systems start processes with a soft
limit of 1,024 descriptors while allowing far more (the hard limit); the
service raises its soft limit to the hard limit at start, and sizes the
default ``http_max_connections`` under the result.
"""

from __future__ import annotations

import resource


def raise_open_file_limit() -> tuple[int, int, int]:
    """Raise the soft RLIMIT_NOFILE to the hard one where allowed.

    Returns ``(before, after, hard)``; an unlimited hard limit leaves the
    soft one where it is (a finite number is needed to size things by).
    """
    before, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    after = before
    if hard != resource.RLIM_INFINITY and before != hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            after = hard
        except (ValueError, OSError):
            after = before
    return before, after, hard
