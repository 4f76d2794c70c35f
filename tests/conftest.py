"""Fixtures: a connector of one's own, the broker client, RapidPro, the service.

Every test outside ``tests/unit`` is marked ``e2e``: it needs RabbitMQ, Redis,
a ``twistd`` process or another local service. The local RabbitMQ and Redis
are started (``scripts/_common.sh``) once per run, and only when the run has
an ``e2e`` test, so ``-m "not e2e"`` runs without them.

The e2e tests spell queue names out (``f"{connector}.inbound"``) on purpose:
they are the wire contract a transport relies on, checked independently of
``junebug_api.formats.queue_names``, which the unit tests and fixtures use.
"""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from junebug_api.formats.queue_names import QueueNames

from .support import Broker, ServiceProcess, free_port, start_sink

UNIT_TESTS = Path(__file__).parent / "unit"
COMMON_SH = Path(__file__).parent.parent / "scripts" / "_common.sh"


@pytest.hookimpl(tryfirst=True)  # before -m deselects by marker
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Mark every test outside ``tests/unit`` as ``e2e``, new files too."""
    for item in items:
        if UNIT_TESTS not in item.path.parents:
            item.add_marker(pytest.mark.e2e)


DESELECTED_E2E = pytest.StashKey[int]()
SERVICES_NEEDED = pytest.StashKey[bool]()


def pytest_deselected(items: list[pytest.Item]) -> None:
    for item in items:
        if item.get_closest_marker("e2e"):
            item.config.stash[DESELECTED_E2E] = item.config.stash.get(DESELECTED_E2E, 0) + 1


def pytest_terminal_summary(terminalreporter: Any, config: pytest.Config) -> None:
    """Say so when e2e tests were left out: RabbitMQ and Redis (and their
    install) were not checked by this run."""
    deselected = config.stash.get(DESELECTED_E2E, 0)
    if deselected and not config.stash.get(SERVICES_NEEDED, False):
        terminalreporter.write_line(
            f"{deselected} e2e tests deselected: RabbitMQ and Redis were neither checked"
            " nor started (a run without -m runs them)"
        )


@pytest.fixture(scope="session", autouse=True)
def local_services(request: pytest.FixtureRequest) -> None:
    """Start the local RabbitMQ and Redis when they are not running, once,
    if this run has an e2e test; stop the run with what to install when one
    is missing."""
    if not any(item.get_closest_marker("e2e") for item in request.session.items):
        return
    request.config.stash[SERVICES_NEEDED] = True
    started = subprocess.run(
        ["bash", "-c", 'source "$0" && ensure_rabbitmq && ensure_redis', str(COMMON_SH)],
        env=dict(os.environ, JUNEBUG_VENV=sys.prefix),
        capture_output=True,
        text=True,
    )
    if started.returncode != 0:
        pytest.exit(started.stderr.strip() or "could not start RabbitMQ and Redis", returncode=1)


def unused_name(prefix: str) -> Iterator[str]:
    """A connector name no other test uses; its queues are deleted afterwards."""
    name = f"{prefix}-{uuid.uuid4().hex[:10]}"
    yield name
    broker = Broker()
    for queue in QueueNames.for_connector(name).all():
        broker.delete(queue)
    broker.close()


@pytest.fixture
def connector() -> Iterator[str]:
    """A connector name no other test uses; its queues are deleted afterwards."""
    yield from unused_name("jbtest")


@pytest.fixture
def channel_id() -> Iterator[str]:
    """A channel id (for ``channels:`` beside ``connector``) no other test
    uses; its queues are deleted afterwards."""
    yield from unused_name("jbchan")


@pytest.fixture
def broker() -> Iterator[Broker]:
    b = Broker()
    yield b
    b.close()


@pytest.fixture
def sink() -> Iterator[Any]:
    rapidpro, port, url = start_sink()
    rapidpro.url = url
    yield rapidpro
    port.stopListening()


@pytest.fixture
def make_service(
    tmp_path: Path, connector: str, sink: Any
) -> Iterator[Callable[..., ServiceProcess]]:
    """Start ``twistd junebug-api`` with a config for this test's connector."""
    started: list[ServiceProcess] = []

    def make(
        wait: bool = True,
        extra_args: list[str] | None = None,
        env: dict[str, str] | None = None,
        command_prefix: list[str] | None = None,
        allow_log_errors: bool = False,
        **overrides: Any,
    ) -> ServiceProcess:
        config = {
            "connector_name": connector,
            "http_bind": f"127.0.0.1:{free_port()}",
            "base_url_path": "/channels/test-channel",
            "mo_message_url": f"{sink.url}/inbound",
            "delivery_retry_delay": 0.1,
            "delivery_retry_max_delay": 0.5,
            "amqp_heartbeat": 10,
        }
        config.update(overrides)
        config = {k: v for k, v in config.items() if v is not None}
        service = ServiceProcess(
            tmp_path, config, extra_args, env, command_prefix, allow_log_errors
        ).start()
        started.append(service)
        if wait:
            service.wait_healthy()
        return service

    yield make
    failures = []
    for service in started:
        try:
            service.stop()
        except AssertionError as e:
            failures.append(str(e))
    if failures:
        pytest.fail("\n\n".join(failures), pytrace=False)
