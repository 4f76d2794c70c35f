"""The option model: each option stated once, and what is derived from it
(names, secrets, the reference's rows, --help, what a reload applies)."""

from __future__ import annotations

from pathlib import Path

import attrs
import pytest

from junebug_api.config.channel_options import ChannelEntry, ChannelOptions
from junebug_api.config.model import (
    JunebugConfig,
    describe,
    load_config,
    option_names,
    restart_needed,
)
from junebug_api.config.options import leaves, option_of
from junebug_api.config.redaction import secret_values
from junebug_api.config.reference import (
    channel_rows,
    help_texts,
    option_groups,
    option_rows,
    reference_rows,
)
from junebug_api.observe.log import Redactor

REQUIRED = {
    "connector_name": "conn",
    "mo_message_url": "http://rapidpro.example/c/jn/uuid/receive",
    "http_bind": "127.0.0.1:8080",
}

#: Every flat option name that worked (environment, command line) before the
#: option model: each must keep working.
NAMES_BEFORE = (
    "allow_expired_replies amqp_auth_mechanism amqp_connect_timeout amqp_declare"
    " amqp_failover amqp_heartbeat amqp_hostname amqp_max_unconfirmed amqp_password"
    " amqp_password_file amqp_port amqp_queue_arguments amqp_tls amqp_tls_ca_file"
    " amqp_tls_cert_file amqp_tls_key_file amqp_tls_verify amqp_url amqp_url_file amqp_urls"
    " amqp_username amqp_vhost api_auth_password api_auth_password_file api_auth_token"
    " api_auth_token_file api_auth_username base_url_path channels character_limit"
    " connector_name default_event_auth_token default_event_auth_token_file"
    " default_event_url default_from_addr delivery_max_age delivery_max_attempts"
    " delivery_max_hold delivery_probe_interval delivery_retry_delay"
    " delivery_retry_max_delay event_url_timeout health_stuck_after http_bind"
    " http_idle_timeout http_max_connections http_read_timeout log_format log_level"
    " max_logs max_request_size metric_window metrics_auth metrics_enabled metrics_path"
    " middlewares mo_message_url mo_message_url_auth_token mo_message_url_auth_token_file"
    " mo_message_url_timeout outbound_message_ttl request_timeout sentry_dsn sentry_dsn_file"
    " sentry_environment shutdown_timeout state_cache_class state_cache_config"
    " store_message_events transport_type worker_concurrency"
).split()


def test_every_field_is_an_option_with_one_sentence() -> None:
    for cls in (JunebugConfig, ChannelEntry):
        for leaf in leaves(cls):
            text = leaf.about.description
            assert text.endswith(".") and "\n" not in text and len(text) < 200, leaf.dotted
    assert all(option_of(f) is not None for f in attrs.fields(JunebugConfig))


def test_names_are_unique_and_every_name_of_before_still_works() -> None:
    names = [name for _, name in option_names()]
    assert len(names) == len(set(names))
    assert set(NAMES_BEFORE) <= set(names)
    new = {"channel_api", "channel_api_file", "admin_auth_token", "admin_username"}
    assert new | {"admin_password_file", "openapi_path"} <= set(names)


def test_every_flat_name_works_in_the_environment_and_on_the_command_line() -> None:
    base = load_config(None, environ={}, cli=REQUIRED)
    env = load_config(
        None,
        environ={**{k.upper(): v for k, v in REQUIRED.items()}, "JB_X": "1", "AMQP_TLS": "yes"},
    )
    assert env.amqp.tls and env.amqp.port == 5671 and not base.amqp.tls
    cli = load_config(None, environ={}, cli={**REQUIRED, "openapi_path": "false"})
    assert cli.openapi_path is False
    env = load_config(
        None, environ={"VUMI_CONFIG_PREFIX": "JB", "JB_CHANNEL_API_FILE": "/x"}, cli=REQUIRED
    )
    assert env.channel_api_file == "/x"


def test_the_secrets_are_those_the_six_lists_named_plus_the_new_ones() -> None:
    secret = {leaf.dotted for leaf in leaves(JunebugConfig) if leaf.about.secret}
    assert secret == {
        "mo_message_url_auth_token",
        "default_event_auth_token",
        "api_auth_password",
        "api_auth_token",
        "admin_auth_token",
        "admin_password",
        "amqp.password",
        "sentry_dsn",
    }
    urls = {leaf.dotted for leaf in leaves(JunebugConfig) if leaf.about.url}
    assert urls == {"mo_message_url", "default_event_url", "amqp_url", "amqp_urls"}
    channel_secrets = {leaf.dotted for leaf in leaves(ChannelEntry) if leaf.about.secret}
    assert channel_secrets == {
        "mo_message_url_auth_token",
        "default_event_auth_token",
        "api_auth_password",
        "api_auth_token",
    }


def test_describe_and_the_redactor_cover_every_secret(tmp_path: Path) -> None:
    cfg = load_config(
        None,
        environ={},
        cli={
            **REQUIRED,
            "admin_auth_token": "admintokensecret",
            "admin_username": "root",
            "admin_password": "adminpasssecret",
            "amqp_urls": "amqp://u:firstbrokersecret@a/,amqp://u:secondbrokersecret@b/",
            "channels": (
                '{"c": {"config": {"Password": "transportsecret", "x": {"api_token": "nested1"}},'
                ' "type": "smpp", "status_url": "http://s:statuspasssecret@h/s"}}'
            ),
        },
    )
    text = repr(describe(cfg))
    for secret in ("admintokensecret", "adminpasssecret", "firstbrokersecret", "secondbroker"):
        assert secret not in text
    assert "transportsecret" not in text and "nested1" not in text
    assert "statuspasssecret" not in text
    assert describe(cfg)["channels"]["c"]["config"]["x"] == {"api_token": "***"}
    values = set(secret_values(cfg))
    assert {"admintokensecret", "adminpasssecret", "firstbrokersecret"} <= values
    assert {"secondbrokersecret", "transportsecret", "nested1", "statuspasssecret"} <= values
    line = Redactor(values).text("auth transportsecret with secondbrokersecret")
    assert line == "auth *** with ***"
    # The top-level ones from the start, each channel's as it starts.
    redactor = Redactor.for_config(cfg)
    assert redactor.text("adminpasssecret transportsecret") == "*** transportsecret"


def test_the_groups_hold_every_top_level_option_once() -> None:
    """The docs' reference shows each option in its group (tests/unit/test_docs.py
    checks that it shows every one)."""
    grouped = [row.name for _, rows in option_groups() for row in rows]
    assert grouped == [row.name for row in option_rows()]


def test_reference_rows_say_everything_about_each_option() -> None:
    rows = {row.name: row for row in reference_rows()}
    assert len(rows) == len(option_rows()) + len(channel_rows())
    port = rows["amqp.port"]
    assert (port.type, port.default, port.accepts, port.env) == (
        "integer",
        "5672, or 5671 with tls",
        "1-65535",
        "AMQP_PORT",
    )
    assert (rows["amqp.password"].secret, rows["amqp_url"].secret) == ("yes", "in the URL")
    assert rows["http_bind"].default == "required"
    assert rows["worker_concurrency"].channel == "yes (default: the top-level value)"
    assert rows["connector_name"].channel == "yes (default: the channel id)"
    assert (rows["channels"].reload, rows["mo_message_url"].reload) == (True, True)
    assert (rows["http_bind"].reload, rows["amqp.hostname"].reload) == (False, False)
    assert rows["log_level"].accepts == "one of DEBUG, INFO, WARNING, WARN, ERROR, CRITICAL"
    assert rows["openapi_path"].type == "text or false"
    assert rows["character_limit"].type == "integer or null"
    assert (rows["type"].channel, rows["type"].env) == ("only", None)
    assert rows["state_cache_config"].secret == "its keys url, password, sentinel_password"
    channel_fields = {f.name for f in attrs.fields(ChannelOptions)}
    assert {r.name for r in option_rows() if r.channel != "no"} == channel_fields


def test_help_gives_each_option_its_sentence() -> None:
    texts = help_texts()
    assert texts["worker_concurrency"] == (
        "The prefetch of each of the channel's AMQP consumers, so the most deliveries in"
        " flight per queue, and the size of its HTTP connection pool per host."
        " [1-65535; default: 20]"
    )
    assert texts["amqp_password_file"] == "Reads amqp.password from this file."
    assert set(texts) == {name for _, name in option_names()}
    assert not any("overrides file and env" in text for text in texts.values())


def test_restart_needed_names_what_a_reload_cannot_apply() -> None:
    old = load_config(None, environ={}, cli=REQUIRED)
    new = load_config(
        None,
        environ={},
        cli={
            **REQUIRED,
            "amqp_port": "5673",
            "http_bind": "127.0.0.1:9090",
            "mo_message_url": "http://other.example/in",
            "worker_concurrency": "3",
            "channels": '{"a": {}}',
            "admin_auth_token": "t0k3n",
        },
    )
    assert restart_needed(old, new) == ["http_bind", "admin_auth_token", "amqp.port"]
    assert restart_needed(old, old) == []


@pytest.mark.parametrize(
    ("data", "prefix", "message"),
    [
        ("x", "channels.a.", "channels.a must be a mapping"),
        ([], "", "the config must be a mapping"),
        ({1: 2, "http_bind": ":80"}, "", "unknown option 1"),
        ({"http_bind": ":80", "amqp": {"x": 1}}, "", "unknown option amqp.x"),
        ({"http_bind": ":80", "amqp": {"port": "1"}}, "", "amqp.port must be an integer, got '1'"),
        ({"http_bind": ":80", "amqp": {"port": 0}}, "", "amqp.port must be from 1 to 65535, got 0"),
        ({}, "", "http_bind is required"),
        ({"http_bind": ":80", "worker_concurrency": 0}, "x.", "x.worker_concurrency must be from"),
    ],
)
def test_structuring_problems_are_one_line_naming_the_option(
    data: object, prefix: str, message: str
) -> None:
    from junebug_api.config.model import ConfigError
    from junebug_api.config.structure import build

    with pytest.raises(ConfigError) as e:
        build(JunebugConfig, data, prefix)
    assert str(e.value).startswith(message), str(e.value)


def test_a_reload_applies_the_channel_options_and_channels_only() -> None:
    from junebug_api.config.model import reloadable_options

    shared = {f.name for f in attrs.fields(ChannelOptions)} - {"connector_name"}
    assert reloadable_options() == shared | {"channels"}
    old = load_config(None, environ={}, cli=REQUIRED)
    new = load_config(None, environ={}, cli={**REQUIRED, "connector_name": "other"})
    assert restart_needed(old, new) == ["connector_name"]
