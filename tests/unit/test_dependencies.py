"""What setup.cfg's bounds stand for: the AMQP layer works with the installed
Twisted, warning about nothing but txAMQP's use of ``returnValue``.

txAMQP 0.8.2 calls ``twisted.internet.defer.returnValue`` (deprecated since
Twisted 24.7) while it runs. A Twisted that drops it, or a new deprecation
met on the way, fails these tests before it fails a connection.
"""

from __future__ import annotations

import subprocess
import sys
import warnings

from twisted.internet.task import Clock

from junebug_api.amqp.protocol import JunebugAMQPClient, JunebugDelegate, load_spec
from junebug_api.testing import RecordingConnectionEvents

RETURN_VALUE_DEPRECATION = "twisted.internet.defer.returnValue was deprecated"
AMQP_MODULES = [
    "junebug_api.amqp.protocol",
    "junebug_api.amqp.service",
    "junebug_api.amqp.connect",
    "txamqp.client",
    "txamqp.codec",
    "txamqp.connection",
    "txamqp.endpoint",
    "txamqp.protocol",
    "txamqp.spec",
]


def test_the_amqp_layer_imports_with_warnings_as_errors() -> None:
    """A fresh interpreter, so that every module is really imported."""
    imported = subprocess.run(
        [
            sys.executable,
            "-W",
            "error",
            "-W",
            f"ignore:{RETURN_VALUE_DEPRECATION}:DeprecationWarning",
            "-c",
            "import " + ", ".join(AMQP_MODULES),
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert imported.returncode == 0, imported.stderr


def test_txamqp_calls_returnValue_and_warns_of_nothing_else() -> None:
    client = JunebugAMQPClient(
        JunebugDelegate(), "/", load_spec(), clock=Clock(), events=RecordingConnectionEvents()
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        queue = client.queue("a-consumer-tag")  # an inlineCallbacks ending in returnValue
    results: list[object] = []
    queue.addBoth(results.append)
    assert results == [client.queues["a-consumer-tag"]]
    messages = [str(w.message) for w in caught]
    assert messages, "txAMQP no longer calls returnValue: the Twisted bound may go"
    assert all(m.startswith(RETURN_VALUE_DEPRECATION) for m in messages), messages
