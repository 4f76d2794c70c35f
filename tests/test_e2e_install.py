"""``pip install .`` as an operator would: the project alone, no lock, no test
tools, into a new virtualenv, then ``twistd -n junebug-api`` with Sentry,
metrics and JSON logs on.

The source is copied as it is (committed or not) and installed from the
registry within setup.cfg's bounds, so this also shows that the bounds
resolve today and that what they admit runs. The Sentry stand-in answers
each envelope only after a moment, so when SIGTERM comes most reports are
still queued: all of them arriving shows the flush on stop.
"""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
import treq
from prometheus_client.parser import text_string_to_metric_families
from twisted.internet import reactor
from twisted.web.server import NOT_DONE_YET, Site

from .operations_support import SentryRecorder
from .support import ServiceProcess, free_port, inbound_message, wait_for

pytestmark = pytest.mark.slow  # a pip install from the registry: a minute or two

ROOT = Path(__file__).resolve().parent.parent
NOT_SOURCE = shutil.ignore_patterns(
    ".git", ".venv", "build", "dist", "*.egg-info", "__pycache__", ".hypothesis",
    ".ruff_cache", "dropin.cache", ".coverage*",
)  # fmt: skip
SECRET = "mopass-5v8q1"
DEAD_LETTERS = 10
ANSWER_AFTER = 0.1  # seconds the stand-in takes per envelope


class SlowSentry(SentryRecorder):
    """Records an envelope at once, answers it ``ANSWER_AFTER`` s later:
    sentry-sdk sends one envelope at a time, so the rest wait in its queue."""

    def render_POST(self, request: Any) -> Any:
        body = super().render_POST(request)
        gone: list[object] = []
        request.notifyFinish().addErrback(gone.append)  # the client hung up

        def answer() -> None:
            if not gone:
                request.write(body)
                request.finish()

        reactor.callLater(ANSWER_AFTER, answer)
        return NOT_DONE_YET


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A new virtualenv with ``pip install <a copy of the source>`` and nothing else."""
    base = tmp_path_factory.mktemp("pip-install")
    source = base / "source"
    shutil.copytree(ROOT, source, ignore=NOT_SOURCE)
    venv = base / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    done = subprocess.run(
        [str(venv / "bin" / "python"), "-m", "pip", "install", "--quiet", str(source)],
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return venv


def test_pip_install_takes_the_project_and_its_dependencies_alone(installed: Path) -> None:
    python = str(installed / "bin" / "python")
    where = subprocess.run(
        [python, "-c", "import junebug_api; print(junebug_api.__file__)"],
        capture_output=True,
        text=True,
        cwd=installed,
        check=True,
    ).stdout.strip()
    assert Path(where).is_relative_to(installed), where
    listed = subprocess.run(
        [python, "-m", "pip", "list", "--format=json"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    names = {d["name"].lower() for d in json.loads(listed)}
    assert {"junebug-api", "twisted", "sentry-sdk", "cattrs"} <= names
    assert not names & {"pytest", "hypothesis", "sphinx", "schemathesis"}


@pytest_twisted.ensureDeferred
async def test_installed_service_reports_each_error_once_and_flushes_on_sigterm(
    installed: Path, broker, connector, sink, tmp_path
) -> None:
    recorder = SlowSentry()
    port = reactor.listenTCP(0, Site(recorder), interface="127.0.0.1")
    dsn = f"http://publickeyforjunebugtest@127.0.0.1:{port.getHost().port}/42"
    mo_url = sink.url.replace("http://", f"http://rpuser:{SECRET}@") + "/inbound"
    config = {
        "connector_name": connector,
        "http_bind": f"127.0.0.1:{free_port()}",
        "mo_message_url": mo_url,
        "delivery_retry_delay": 0.1,
        "sentry_dsn": dsn,
        "sentry_environment": "install-test",
        "metrics_enabled": True,
        "log_format": "json",
    }
    service = ServiceProcess(tmp_path, config, twistd=str(installed / "bin" / "twistd"))
    try:
        service.start().wait_healthy(timeout=60)
        sink.statuses = [400] * DEAD_LETTERS
        refused = [inbound_message(connector) for _ in range(DEAD_LETTERS)]
        for message in refused:
            broker.publish(f"{connector}.inbound", message)
        for _ in refused:
            await broker.wait_get(f"{connector}.inbound.failed")
        response = await treq.get(service.url + "/metrics")
        exposition = (await response.content()).decode()
        metrics = {
            (s.name, s.labels.get("queue_role"), s.labels.get("outcome")): s.value
            for family in text_string_to_metric_families(exposition)
            for s in family.samples
        }
        sent_before_stop = len(recorder.events())
        started = time.monotonic()
        # SIGTERM, and the reactor keeps running meanwhile: the stand-in must
        # answer the flush (ServiceProcess.stop would block it).
        service.signal(signal.SIGTERM)
        await wait_for(lambda: service.process.poll() is not None, timeout=15, what="the exit")
        stopped_in = time.monotonic() - started
        service.stop()  # exited already: fails the test on a traceback in the log
    finally:
        await port.stopListening()

    events = recorder.events()
    ids = sorted(e["tags"]["message_id"] for e in events)
    assert ids == sorted(m["message_id"] for m in refused)  # each one, once
    assert sent_before_stop < DEAD_LETTERS, "nothing was left for the flush on stop"
    assert stopped_in < 10
    for event in events:
        assert event["tags"]["connector_name"] == connector
        assert event["tags"]["queue"] == f"{connector}.inbound"
        assert event["environment"] == "install-test"
        assert event["release"] == "junebug-api@0.1.0"
        assert "threads" not in event  # no stack of the logging call
    sent = recorder.raw()
    assert SECRET not in sent and "rpuser:" not in sent
    dead_lettered = ("junebug_consumed_messages_total", "inbound", "dead_lettered")
    assert metrics[dead_lettered] == DEAD_LETTERS
    records = [json.loads(line) for line in service.log().splitlines()]
    moved = [r for r in records if r["level"] == "error" and "moved to" in r["message"]]
    assert sorted(r["message_id"] for r in moved) == ids
