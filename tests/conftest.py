"""Fixtures: a connector of one's own, the broker client, RapidPro, the service."""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from junebug_api.queue_names import QueueNames

from .support import Broker, ServiceProcess, free_port, start_sink


@pytest.fixture
def connector() -> Iterator[str]:
    """A connector name no other test uses; its queues are deleted afterwards."""
    name = f"jbtest-{uuid.uuid4().hex[:10]}"
    yield name
    broker = Broker()
    for queue in QueueNames.for_connector(name).all():
        broker.delete(queue)
    broker.close()


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
