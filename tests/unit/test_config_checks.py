"""What the config refuses that it could not honour (issue 20, item 6) and
the checks of the channel API's options: one line each, naming the option,
never showing a URL (it may hold a password)."""

from __future__ import annotations

import os
import re
import threading
from pathlib import Path

import pytest

from junebug_api.config.model import ConfigError, load_config

REQUIRED = {
    "connector_name": "conn",
    "mo_message_url": "http://rapidpro.example/c/jn/uuid/receive",
    "http_bind": "127.0.0.1:8080",
}
REDIS = "junebug_api.state_cache.RedisStateCache"


def refused(cli: dict, environ: dict | None = None) -> str:
    with pytest.raises(ConfigError) as e:
        load_config(None, environ=environ or {}, cli={**REQUIRED, **cli})
    message = str(e.value)
    assert "\n" not in message and "s3cr3t" not in message, message
    return message


@pytest.mark.parametrize(
    ("cli", "name"),
    [
        ({"amqp_url": "amqp://u:s3cr3t@rabbit:0/"}, "amqp_url"),
        ({"amqp_urls": "amqp://a/,amqp://u:s3cr3t@b:0/"}, r"amqp_urls\[1\]"),
        ({"mo_message_url": "http://u:s3cr3t@rp.example:0/in"}, "mo_message_url"),
        ({"default_event_url": "https://rp.example:0/ev"}, "default_event_url"),
        ({"sentry_dsn": "https://s3cr3t@sentry.example:0/1"}, "sentry_dsn"),
        ({"state_cache_config": '{"url": "redis://:s3cr3t@h:0/0"}'}, "state_cache_config.url"),
        ({"channels": '{"a": {"status_url": "http://h:0/s"}}'}, r"channels\.a\.status_url"),
        ({"channels": '{"a": {"mo_url": "http://h:0/in"}}'}, r"channels\.a\.mo_message_url"),
        ({"amqp_url": "amqp://rabbit:70000/"}, "amqp_url"),
    ],
)
def test_every_url_has_a_port_from_1_to_65535(cli: dict, name: str) -> None:
    message = refused(cli)
    assert re.match(f"^{name} has an invalid port", message), message


@pytest.mark.parametrize(
    ("cli", "name"),
    [
        ({"amqp_url": "amqp://u:s3cr3t%zz@rabbit/"}, "amqp_url"),
        ({"amqp_url": "amqp://u:s3cr3t%4@rabbit/"}, "amqp_url"),
        ({"mo_message_url": "http://u:s3cr3t%@rp.example/in"}, "mo_message_url"),
        ({"state_cache_config": '{"url": "redis://:s3cr3t%g1@h/0"}'}, "state_cache_config.url"),
        ({"sentry_dsn": "https://s3cr3t%x@sentry.example/1"}, "sentry_dsn"),
    ],
)
def test_every_url_has_valid_percent_escapes(cli: dict, name: str) -> None:
    message = refused(cli)
    assert message.startswith(f"{name} has an invalid percent-escape"), message


def test_escaped_credentials_must_be_utf8() -> None:
    message = refused({"amqp_url": "amqp://u:s3cr3t%FF@rabbit/"})
    assert message == "amqp_url has credentials whose percent-escapes are not UTF-8"


def test_valid_escapes_and_ports_still_load() -> None:
    cfg = load_config(
        None,
        environ={},
        cli={**REQUIRED, "amqp_url": "amqp://u:p%40ss%2F%C3%A9@rabbit:1/%2F"},
    )
    assert cfg.amqp_settings.password == "p@ss/é"
    assert cfg.amqp_settings.port == 1


def test_a_secret_file_that_is_a_fifo_is_refused_at_once(tmp_path: Path) -> None:
    """Reading a FIFO would block the start for ever, with no output."""
    fifo = tmp_path / "token"
    os.mkfifo(fifo)
    result: list = []

    def load() -> None:
        try:
            load_config(None, environ={}, cli={**REQUIRED, "api_auth_token_file": str(fifo)})
        except ConfigError as e:
            result.append(str(e))

    worker = threading.Thread(target=load, daemon=True)
    worker.start()
    worker.join(10)
    if worker.is_alive():  # unblock the reader before failing
        with open(fifo, "w"):
            pass
        pytest.fail("load_config blocked on a FIFO")
    assert result == [f"api_auth_token_file: {str(fifo)!r} is not a regular file"]


def test_secret_files_must_be_regular_and_small(tmp_path: Path) -> None:
    assert refused({"api_auth_token_file": str(tmp_path)}).endswith("is not a regular file")
    big = tmp_path / "big"
    big.write_bytes(b"x" * 65537)
    assert refused({"sentry_dsn_file": str(big)}).endswith("is larger than 65536 bytes")
    fits = tmp_path / "fits"
    fits.write_bytes(b"t" * 65535 + b"\n")
    cfg = load_config(None, environ={}, cli={**REQUIRED, "api_auth_token_file": str(fits)})
    assert cfg.api_auth_token == "t" * 65535


def test_tls_files_must_be_regular_files(tmp_path: Path) -> None:
    fifo = tmp_path / "ca.pem"
    os.mkfifo(fifo)
    assert refused({"amqp_tls_ca_file": str(fifo)}) == (
        f"cannot read amqp_tls_ca_file {fifo}: not a regular file"
    )


@pytest.mark.parametrize(
    ("cli", "name"),
    [
        ({"metrics_path": "/channels"}, "metrics_path"),
        ({"metrics_path": "/channels/a/metrics"}, "metrics_path"),
        ({"metrics_path": "/health/"}, "metrics_path"),
        ({"metrics_path": "/messages/x"}, "metrics_path"),
        ({"metrics_path": "/jb/messages", "base_url_path": "/jb"}, "metrics_path"),
        ({"metrics_path": "/"}, "metrics_path"),
        ({"openapi_path": "/channels/openapi.json"}, "openapi_path"),
        ({"openapi_path": "/health"}, "openapi_path"),
    ],
)
def test_metrics_and_openapi_paths_stay_outside_the_routes(cli: dict, name: str) -> None:
    message = refused(cli)
    assert message.startswith(f"{name} must start with '/' and lie outside the API's routes")


def test_metrics_and_openapi_paths_differ_when_both_are_served() -> None:
    assert refused({"metrics_path": "/x", "openapi_path": "/x/"}) == (
        "metrics_path and openapi_path must differ"
    )
    for cli in (
        {"metrics_path": "/x", "openapi_path": "false"},
        {"metrics_path": "/channels/x", "metrics_enabled": "false"},
        {"metrics_path": "/jb", "base_url_path": "/jb"},
        {"openapi_path": "/messages.json"},
    ):
        load_config(None, environ={}, cli={**REQUIRED, **cli})


@pytest.mark.parametrize(
    ("value", "expected"),
    [("false", False), ("no", False), ("/docs/openapi.json", "/docs/openapi.json")],
)
def test_openapi_path_is_a_path_or_false(value: str, expected: object) -> None:
    cfg = load_config(None, environ={"OPENAPI_PATH": value}, cli=REQUIRED)
    assert cfg.openapi_path == expected
    assert load_config(None, environ={}, cli=REQUIRED).openapi_path == "/openapi.json"


def test_openapi_path_from_yaml(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("openapi_path: false\n")
    assert load_config(str(path), environ={}, cli=REQUIRED).openapi_path is False
    path.write_text("openapi_path: true\n")
    with pytest.raises(ConfigError, match=r"^openapi_path must be a path or false, got True$"):
        load_config(str(path), environ={}, cli=REQUIRED)
    path.write_text("openapi_path: openapi.json\n")
    with pytest.raises(ConfigError, match=r"^openapi_path must start with '/'$"):
        load_config(str(path), environ={}, cli=REQUIRED)


@pytest.mark.parametrize(
    ("cli", "message"),
    [
        (
            {"channel_api": "true", "channel_api_file": "/tmp/c.yaml"},
            "channel_api needs admin_auth_token or admin_username/admin_password",
        ),
        (
            {"channel_api": "true", "admin_auth_token": "t0k3n"},
            "channel_api needs RedisStateCache (state_cache_class) or channel_api_file",
        ),
        (
            {"channel_api": "true", "admin_username": "root", "channel_api_file": "/x"},
            "admin_username and admin_password must be set together",
        ),
        ({"admin_auth_token": ""}, "admin_auth_token must not be empty"),
        ({"admin_password": "a\nb", "admin_username": "u"}, "admin_password must not contain"),
        ({"channel_api_file": ""}, "channel_api_file must not be empty"),
        ({"channel_api": "maybe"}, "--channel-api must be true or false"),
    ],
)
def test_the_channel_api_needs_admin_credentials_and_a_store(cli: dict, message: str) -> None:
    assert refused(cli).startswith(message)


def test_the_channel_api_with_credentials_and_a_store_loads() -> None:
    with_file = load_config(
        None,
        environ={},
        cli={"http_bind": "127.0.0.1:8080", "channel_api": "yes", "admin_auth_token": "t0k3n",
             "channel_api_file": "/var/lib/junebug/channels.yaml"},
    )  # fmt: skip
    assert with_file.channel_api and with_file.connector_name is None  # no channel needed
    with_redis = load_config(
        None,
        environ={},
        cli={
            **REQUIRED,
            "channel_api": "true",
            "admin_username": "root",
            "admin_password": "pw",
            "state_cache_class": REDIS,
        },
    )
    assert with_redis.channel_api_file is None
    assert load_config(None, environ={}, cli=REQUIRED).channel_api is False


def test_admin_secrets_from_files(tmp_path: Path) -> None:
    token = tmp_path / "admin"
    token.write_text("admin-t0ken\n")
    cfg = load_config(None, environ={"ADMIN_AUTH_TOKEN_FILE": str(token)}, cli={**REQUIRED})
    assert cfg.admin_auth_token == "admin-t0ken"
    assert "admin-t0ken" not in repr(cfg)
