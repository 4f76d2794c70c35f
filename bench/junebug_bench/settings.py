"""Where the benchmark's files are, which core runs what, and the names it uses.

Everything the benchmark starts talks over 127.0.0.1 only. The service (and
the bare server) run on ``SERVICE_CORE``; RabbitMQ, nginx, wrk and the load
drivers on ``OTHER_CORE``, so the service's figures are about its own core.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from junebug_api.formats.queue_names import QueueNames

ROOT = Path(__file__).resolve().parents[2]
BENCH = ROOT / "bench"
RESULTS = BENCH / "last-results.txt"
POST_LUA = BENCH / "post.lua"
BARE_SERVER = BENCH / "bare_server.py"
TWISTD = str(Path(sys.executable).with_name("twistd"))
HOST = "127.0.0.1"
SERVICE_CORE = "0"  # the service and the bare server
OTHER_CORE = "1"  # RabbitMQ, nginx, wrk
CLK_TCK = os.sysconf("SC_CLK_TCK")
CONNECTOR = "bench"
QUEUES = QueueNames.for_connector(CONNECTOR)  # the one naming rule, the service's
BASE_PATH = "/channels/bench"
REDIS_URL = "redis://127.0.0.1:6379/15"  # the shared Redis; only our prefix is touched
REDIS_CLASS = "junebug_api.state_cache.RedisStateCache"
ALL_PHASES = ("outbound", "inbound", "events", "bare", "roundtrip")
