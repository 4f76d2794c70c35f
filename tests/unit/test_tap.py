"""tap: twistd's Options (every config option on the command line; a config
problem is one line and exit status 1) and makeService."""

from __future__ import annotations

import gc
import json
import re
import resource
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from twisted.application.service import Application
from twisted.logger import ILogObserver, LogLevel

from junebug_api.observe.log import set_log_level
from junebug_api.service import JunebugService
from junebug_api.tap import Options, makeService
from junebug_api.testing import captured_logs

REQUIRED = [
    "--connector-name",
    "conn",
    "--mo-message-url",
    "http://rp.example/in",
    "--http-bind",
    "127.0.0.1:0",
]


@pytest.fixture(autouse=True)
def process_state() -> Iterator[None]:
    """Nothing here starts the service; keep the process as it was anyway."""
    threshold = gc.get_threshold()
    yield
    gc.set_threshold(*threshold)
    set_log_level("INFO")


def parsed(argv: list[str]) -> Options:
    options = Options()
    options.parseOptions(argv)
    return options


def config_error(argv: list[str], capsys: Any) -> str:
    """The one stderr line of a config problem (after exit status 1)."""
    with pytest.raises(SystemExit) as info:
        parsed(argv)
    assert info.value.code == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.endswith("\n")
    return err.rstrip("\n")


def test_every_config_option_is_a_command_line_option() -> None:
    options = parsed([*REQUIRED, "--worker-concurrency", "7", "--amqp-hostname", "rabbit"])
    assert options.config.connector_name == "conn"
    assert options.config.mo_message_url == "http://rp.example/in"
    assert options.config.worker_concurrency == 7
    assert options.config.amqp_connection.brokers[0].hostname == "rabbit"


def test_the_command_line_overrides_the_config_file(tmp_path: Path) -> None:
    path = tmp_path / "junebug.yaml"
    path.write_text(
        "connector_name: from-file\nmo_message_url: http://rp.example/in\n"
        "http_bind: 127.0.0.1:0\nworker_concurrency: 3\n"
    )
    options = parsed(["--config", str(path), "--connector-name", "from-cli"])
    assert options.config.connector_name == "from-cli"
    assert options.config.worker_concurrency == 3


def test_a_missing_option_is_one_line(capsys: Any) -> None:
    line = config_error(["--connector-name", "conn", "--http-bind", "127.0.0.1:0"], capsys)
    assert line == "junebug-api: config error: mo_message_url is required"


def test_a_bad_value_is_one_line(capsys: Any) -> None:
    line = config_error([*REQUIRED, "--worker-concurrency", "many"], capsys)
    assert line == "junebug-api: config error: --worker-concurrency must be an integer, got 'many'"


def test_a_missing_config_file_is_one_line(tmp_path: Path, capsys: Any) -> None:
    line = config_error(["--config", str(tmp_path / "nope.yaml")], capsys)
    assert line.startswith("junebug-api: config error: ")
    assert "nope.yaml" in line


def test_a_bad_state_cache_config_is_one_line_before_anything_starts(capsys: Any) -> None:
    line = config_error(
        [
            *REQUIRED,
            "--state-cache-class",
            "junebug_api.redis_state_cache.RedisStateCache",
            "--state-cache-config",
            json.dumps({"colour": "blue"}),
        ],
        capsys,
    )
    assert line == (
        "junebug-api: config error: unknown option state_cache_config.colour for RedisStateCache"
    )


def test_an_unknown_state_cache_class_is_one_line(capsys: Any) -> None:
    line = config_error([*REQUIRED, "--state-cache-class", "no.such.Cache"], capsys)
    assert line == "junebug-api: config error: state_cache_class 'no.such.Cache' cannot be imported"


def test_make_service_sizes_http_connections_under_the_open_file_limit() -> None:
    with captured_logs() as logged:
        service = makeService(parsed(REQUIRED))
    assert isinstance(service, JunebugService)
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    assert 0 < service.config.http_max_connections <= soft * 3 // 4
    [line] = [e for e in logged if "max_connections" in e and "after" in e]
    assert line["after"] == soft
    assert line["max_connections"] == service.config.http_max_connections


def test_log_level_warning_drops_the_open_file_limit_line() -> None:
    with captured_logs() as logged:
        makeService(parsed([*REQUIRED, "--log-level", "WARNING"]))
    assert not [e for e in logged if e["log_namespace"] == "junebug_api.tap"]


def test_a_given_http_max_connections_is_kept_with_a_warning_when_it_leaves_few_fds() -> None:
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    with captured_logs() as logged:
        service = makeService(parsed([*REQUIRED, "--http-max-connections", str(soft)]))
    assert service.config.http_max_connections == soft
    assert any("leaves few of the {limit} file" in e["log_format"] for e in logged)


class ServerOptions(dict):
    """What makeService reads of twistd's own options (its ``parent``)."""


def joined(options: Options) -> Application:
    """The twistd application ``makeService(options)`` is put in."""
    application = Application("junebug-api")
    makeService(options).setServiceParent(application)
    return application


@pytest.mark.parametrize("log_format", ["text", "json"])
def test_twistd_gets_an_observer_writing_redacted_lines_to_its_log_file(
    tmp_path: Path, log_format: str
) -> None:
    options = parsed([*REQUIRED, "--log-format", log_format])
    log_file = tmp_path / "twistd.log"
    options.parent = ServerOptions(logfile=str(log_file))
    observer = joined(options).getComponent(ILogObserver)
    uuid = "0b9e6b6c-5b7a-4e39-9a4c-7d1c1f0a2b3c"
    observer(
        {
            "log_format": "POST to {url} failed",
            "url": f"http://user:secret@rp.example/c/jn/{uuid}/r?t=tok3n",
            "log_level": LogLevel.warn,
            "log_namespace": "junebug_api.delivery.inbound",
            "log_time": 0,
            "log_system": "-",
        }
    )
    [line] = log_file.read_text().splitlines()
    assert "POST to http://***@rp.example/c/jn/***/r?t=*** failed" in line
    assert "secret" not in line and "tok3n" not in line and uuid not in line
    if log_format == "json":
        assert json.loads(line)["connector"] == "conn"
    else:  # twistd's own line
        assert re.match(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d[+-]\d{4} \[-\] POST", line), line


def test_syslog_leaves_twistds_observer() -> None:
    options = parsed(REQUIRED)
    options.parent = ServerOptions(syslog=True)
    assert joined(options).getComponent(ILogObserver) is None


def test_help_gives_every_option_its_sentence_from_the_config_model() -> None:
    from junebug_api.config.reference import help_texts

    text = "".join(str(Options()).split())  # twisted wraps the help column, at hyphens too
    assert "overridesfileandenv" not in text
    for name, sentence in help_texts().items():
        assert "--" + name.replace("_", "-") + "=" + "".join(sentence.split()) in text, name
    assert "--openapi-path=" in text and "--channel-api=" in text
