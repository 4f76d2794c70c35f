"""channels: resolving each channel's settings from its entry and the defaults."""

from __future__ import annotations

import pytest

from junebug_api.config.channels import resolve_channels
from junebug_api.config.model import ConfigError, describe, load_config

BIND = {"http_bind": "127.0.0.1:8080"}
MO = "http://rapidpro.example/c/jn/uuid/receive"


def load(**data):
    import json

    cli = {k: json.dumps(v) if isinstance(v, dict) else v for k, v in {**BIND, **data}.items()}
    return load_config(None, environ={}, cli=cli)


def test_channels_alone_need_no_top_level_connector() -> None:
    cfg = load(channels={"abc": {"mo_url": MO}})
    [channel] = resolve_channels(cfg)
    assert channel.id == "abc"
    assert channel.connector_name == "abc"  # old Junebug named queues after the id
    assert channel.messages_path == "/channels/abc/messages"
    assert channel.mo_message_url == MO


def test_top_level_values_are_every_channels_defaults() -> None:
    cfg = load(
        mo_message_url=MO,
        mo_message_url_auth_token="top-token",
        transport_type="ussd",
        default_from_addr="8110",
        allow_expired_replies="true",
        character_limit="160",
        api_auth_token="api-token",
        worker_concurrency="7",
        default_event_url="http://rp.example/events",
        channels={
            "a": {},
            "b": {
                "mo_url": "http://b.example/in",
                "mo_url_auth_token": "b-token",
                "transport_type": "sms",
                "character_limit": None,
                "label": "B",
                "metadata": {"x": 1},
                "connector_name": "bee",
                "worker_concurrency": 3,
                "api_auth_username": "u",
                "api_auth_password": "p",
            },
        },
    )
    a, b = resolve_channels(cfg)
    assert (a.id, a.connector_name, a.mo_message_url, a.mo_message_url_auth_token) == (
        "a",
        "a",
        MO,
        "top-token",
    )
    assert (a.transport_type, a.default_from_addr, a.allow_expired_replies) == (
        "ussd",
        "8110",
        True,
    )
    assert (a.character_limit, a.api_auth_token, a.worker_concurrency) == (160, "api-token", 7)
    assert a.default_event_url == "http://rp.example/events"
    assert (b.connector_name, b.mo_message_url, b.mo_message_url_auth_token) == (
        "bee",
        "http://b.example/in",
        "b-token",
    )
    assert (b.transport_type, b.character_limit, b.label, b.metadata) == (
        "sms",
        None,
        "B",
        {"x": 1},
    )
    assert (b.api_auth_username, b.api_auth_password, b.worker_concurrency) == ("u", "p", 3)


def test_the_vumi2_form_is_one_channel_beside_others() -> None:
    cfg = load(
        connector_name="conn",
        mo_message_url=MO,
        base_url_path="/jb",
        channels={"abc": {}},
    )
    top, abc = resolve_channels(cfg)
    assert (top.id, top.connector_name, top.messages_path) == ("conn", "conn", "/jb/messages")
    assert (abc.id, abc.connector_name, abc.messages_path) == (
        "abc",
        "abc",
        "/channels/abc/messages",
    )


def test_old_junebug_options_are_accepted_and_ignored() -> None:
    cfg = load(
        channels={
            "a": {
                "mo_url": MO,
                "amqp_queue": "extra",
                "status_url": "http://x/status",
                "rate_limit_count": 10,
                "rate_limit_window": 5,
            }
        }
    )
    [a] = resolve_channels(cfg)
    assert sorted(a.ignored) == [
        "amqp_queue",
        "rate_limit_count",
        "rate_limit_window",
        "status_url",
    ]
    assert a.connector_name == "a"  # amqp_queue is never the channel's queue name


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"channels": {"a": {}}}, r"^channels\.a\.mo_message_url is required"),
        ({"channels": {"a": {"mo_url": "ftp://x"}}}, r"^channels\.a\.mo_message_url must be"),
        ({"channels": {"a": {"mo_url": MO, "colour": 1}}}, r"^unknown option channels\.a\.colour$"),
        (
            {"channels": {"a": {"mo_url": MO, "character_limit": "x"}}},
            r"^channels\.a\.character_limit must be an integer",
        ),
        (
            {"channels": {"a": {"mo_url": MO, "character_limit": -1}}},
            r"^channels\.a\.character_limit must be from 0 to 1000000",
        ),
        (
            {"channels": {"a": {"mo_url": MO, "worker_concurrency": 0}}},
            r"^channels\.a\.worker_concurrency must be from 1 to 65535",
        ),
        (
            {"channels": {"a": {"mo_url": MO, "api_auth_username": "u"}}},
            r"^channels\.a: api_auth_username and api_auth_password",
        ),
        (
            {"channels": {"a": {"mo_url": MO, "mo_message_url": MO}}},
            r"^channels\.a\.mo_(message_)?url: mo_message_url is given twice",
        ),
        ({"channels": {"a/b": {"mo_url": MO}}}, r"^channels: channel id 'a/b' must be"),
        ({"channels": {"a": "x"}}, r"^channels\.a must be a mapping"),
        (
            {"channels": {"a": {"mo_url": MO}, "b": {"mo_url": MO, "connector_name": "a"}}},
            r"^channels\.b\.connector_name 'a' is already the connector of channel 'a'",
        ),
        (
            {"connector_name": "a", "mo_message_url": MO, "channels": {"a": {}}},
            r"^channels\.a: the top-level connector_name is already a channel",
        ),
        (
            {
                "connector_name": "c",
                "mo_message_url": MO,
                "base_url_path": "/channels/a",
                "channels": {"a": {}},
            },
            r"^channels\.a: its messages path /channels/a/messages is already that of the top",
        ),
        ({}, r"^connector_name is required$"),
    ],
)
def test_config_errors_name_the_channel_and_option(data: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load(**data)


def test_describe_masks_channel_secrets() -> None:
    cfg = load(
        channels={
            "a": {
                "mo_url": "http://user:pw@rp.example/in",
                "mo_url_auth_token": "s1",
                "api_auth_password": "s2",
                "api_auth_username": "u",
                "api_auth_token": "s3",
                "default_event_auth_token": "s4",
            }
        }
    )
    text = repr(describe(cfg))
    for secret in ("pw", "s1", "s2", "s3", "s4"):
        assert f"'{secret}'" not in text and f":{secret}@" not in text
    assert "***@rp.example" in text


def test_public_settings_hold_no_secret() -> None:
    cfg = load(
        channels={
            "a": {
                "mo_url": "http://user:pw@rp.example/in",
                "mo_url_auth_token": "s1",
                "api_auth_password": "s2",
                "api_auth_username": "u",
                "api_auth_token": "s3",
                "default_event_auth_token": "s4",
                "default_event_url": "http://eu:s5@rp.example/ev",
                "label": "L",
            }
        }
    )
    [a] = resolve_channels(cfg)
    text = repr(a.public())
    for secret in ("pw", "s1", "s2", "s3", "s4", "s5"):
        assert secret not in text
    assert a.public()["label"] == "L"


def test_replay_names_the_channel_when_there_are_several() -> None:
    from junebug_api.cli.replay import channel_connector

    one = load(channels={"a": {"mo_url": MO, "connector_name": "conn-a"}})
    assert channel_connector(one, None) == "conn-a"
    several = load(channels={"a": {"mo_url": MO}, "b": {"mo_url": MO}})
    assert channel_connector(several, "b") == "b"
    with pytest.raises(ConfigError, match=r"^name the channel with --channel \(one of a, b\)$"):
        channel_connector(several, None)
    with pytest.raises(ConfigError, match="no channel 'c'"):
        channel_connector(several, "c")


def test_the_example_channels_config_loads() -> None:
    from pathlib import Path

    path = Path(__file__).resolve().parents[2] / "examples" / "channels.yaml"
    channels = resolve_channels(load_config(str(path), environ={}))
    assert [(c.id, c.connector_name) for c in channels] == [
        ("sms-example", "vumi-smpp-example"),
        ("ussd-example", "ussd-example"),
    ]


def test_channel_secrets_from_files(tmp_path) -> None:
    token = tmp_path / "token"
    token.write_text("s3cret-from-file\n", encoding="utf-8")
    cfg = load(channels={"a": {"mo_url": MO, "mo_url_auth_token_file": str(token)}})
    [a] = resolve_channels(cfg)
    assert a.mo_message_url_auth_token == "s3cret-from-file"
    from junebug_api.config.redaction import channel_secret_values
    from junebug_api.observe.log import Redactor

    assert Redactor(channel_secret_values(a)).text("x s3cret-from-file y") == "x *** y"
    with pytest.raises(ConfigError, match=r"^channels\.a: set mo_message_url_auth_token or"):
        load(
            channels={
                "a": {"mo_url": MO, "mo_url_auth_token": "x", "mo_url_auth_token_file": str(token)}
            }
        )


def test_a_channels_queue_names_fit_amqp() -> None:
    with pytest.raises(
        ConfigError, match=r"^channels\.a\.connector_name must have at most 237 characters"
    ):
        load(channels={"a": {"mo_url": MO, "connector_name": "c" * 250}})
    with pytest.raises(ConfigError, match=r"^channels\.a\.connector_name must not start with"):
        load(channels={"a": {"mo_url": MO, "connector_name": "amq.x"}})


# -- the channel settings interface (channel API, stores, reload) -------------


def top_level(**data):
    """A config with the channel API and no channel yet."""
    return load(
        mo_message_url=MO,
        channel_api="true",
        admin_auth_token="adm1n",
        channel_api_file="/tmp/channels.yaml",
        **data,
    )


def test_old_junebug_fields_are_stored_and_shown_with_secrets_masked() -> None:
    from junebug_api.config.channels import channel_settings

    config = {"host": "smpp.example", "Password": "pw1", "auth": {"api_token": "t0k", "n": 1}}
    settings = channel_settings(
        "c1",
        {
            "type": "smpp",
            "config": config,
            "label": "SMS",
            "metadata": {"team": "x"},
            "amqp_queue": "extra",
            "status_url": "http://s.example/status",
            "rate_limit_count": 10,
            "rate_limit_window": 60,
            "character_limit": 160,
            "public_http": {"enabled": False},
            "api_auth_username": "rp",
            "api_auth_password": "rp-secret",
        },
        top_level(),
    )
    assert (settings.type, settings.config, settings.amqp_queue) == ("smpp", config, "extra")
    assert (settings.rate_limit_count, settings.rate_limit_window) == (10, 60)
    assert sorted(settings.ignored) == [
        "amqp_queue",
        "rate_limit_count",
        "rate_limit_window",
        "status_url",
    ]
    shown = settings.public()
    assert shown["config"] == {
        "host": "smpp.example",
        "Password": "***",
        "auth": {"api_token": "***", "n": 1},
    }
    assert (shown["type"], shown["label"], shown["status_url"]) == (
        "smpp",
        "SMS",
        "http://s.example/status",
    )
    assert (shown["rate_limit_count"], shown["public_http"]) == (10, {"enabled": False})
    assert shown["mo_url"] == MO and shown["messages_path"] == "/channels/c1/messages"
    for hidden in ("api_auth_username", "api_auth_password", "mo_message_url_auth_token"):
        assert hidden not in shown
    assert "rp-secret" not in repr(shown) and "pw1" not in repr(shown)


@pytest.mark.parametrize(
    ("entry", "message"),
    [
        ({"status_url": "ftp://x"}, r"^channels\.c1\.status_url must be an http"),
        ({"rate_limit_count": -1}, r"^channels\.c1\.rate_limit_count must be from 0"),
        ({"rate_limit_window": "60"}, r"^channels\.c1\.rate_limit_window must be an integer"),
        ({"type": 5}, r"^channels\.c1\.type must be a string"),
        ({"config": []}, r"^channels\.c1\.config must be a mapping"),
        ({"id": "other"}, r"^unknown option channels\.c1\.id$"),
        ({"ignored": {}}, r"^unknown option channels\.c1\.ignored$"),
        ({"worker_concurrency": 0}, r"^channels\.c1\.worker_concurrency must be from 1"),
    ],
)
def test_channel_settings_errors_are_one_line_naming_the_key(entry: dict, message: str) -> None:
    from junebug_api.config.channels import channel_settings

    with pytest.raises(ConfigError, match=message):
        channel_settings("c1", entry, top_level())


def test_channel_entry_gives_back_the_same_settings_and_keeps_defaults_live() -> None:
    from junebug_api.config.channels import channel_entry, channel_settings

    config = top_level(character_limit="160")
    settings = channel_settings(
        "c1", {"mo_url": "http://b.example/in", "mo_url_auth_token": "t0k", "type": "x"}, config
    )
    entry = channel_entry(settings)
    assert entry == {
        "mo_message_url": "http://b.example/in",
        "mo_message_url_auth_token": "t0k",
        "type": "x",
    }
    assert channel_settings("c1", entry, config) == settings
    # What the entry did not set follows the top level.
    assert channel_settings("c1", entry, top_level(character_limit="70")).character_limit == 70
    assert settings.character_limit == 160


def test_api_bodies_create_and_modify() -> None:
    from junebug_api.config.channel_api import created_entry, modified_entry
    from junebug_api.config.channels import channel_entry, channel_settings

    config = top_level()
    created = created_entry(
        {"type": "smpp", "config": {}, "mo_url": "http://b.example/in", "label": "B"}
    )
    settings = channel_settings("c1", created, config)
    body = {"mo_url": "http://c.example/in", "status_url": None, "character_limit": 5}
    changed = channel_settings("c1", modified_entry(channel_entry(settings), body), config)
    assert (changed.mo_message_url, changed.label, changed.character_limit) == (
        "http://c.example/in",
        "B",
        5,
    )
    assert (changed.type, changed.status_url) == ("smpp", None)


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ({"config": {}}, r"^body\.type is required$"),
        ({"type": "x"}, r"^body\.config is required$"),
        (
            {"type": "x", "config": {}, "mo_url_auth_token_file": "/etc/passwd"},
            r"^unknown option body\.mo_url_auth_token_file$",
        ),
        ({"type": "x", "config": {}, "colour": 1}, r"^unknown option body\.colour$"),
        (
            {"type": "x", "config": {}, "mo_url": MO, "mo_message_url": MO},
            r"^body\.mo_(message_)?url: mo_message_url is given twice",
        ),
        ([], r"^body must be a JSON object$"),
    ],
)
def test_api_bodies_refuse_what_they_may_not_hold(body: object, message: str) -> None:
    from junebug_api.config.channel_api import created_entry

    with pytest.raises(ConfigError, match=message):
        created_entry(body)


def test_json_schemas_of_bodies_come_from_the_model() -> None:
    import jsonschema

    from junebug_api.config.channel_api import channel_body_schema, channel_entry_schema

    create, modify = channel_body_schema(create=True), channel_body_schema(create=False)
    jsonschema.Draft202012Validator.check_schema(create)
    assert create["required"] == ["type", "config"] and "required" not in modify
    good = {"type": "smpp", "config": {"a": 1}, "mo_url": MO, "character_limit": 5}
    jsonschema.validate(good, create)
    for bad in (
        {"config": {}},
        {**good, "character_limit": -1},
        {**good, "worker_concurrency": 70000},
        {**good, "mo_url": "ftp://x"},
        {**good, "mo_url_auth_token_file": "/etc/passwd"},
        {**good, "colour": "red"},
        {**good, "label": 5},
    ):
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(bad, create)
    jsonschema.validate({"status_url": None, "mo_url": None}, modify)
    props = channel_entry_schema()["properties"]
    assert props["mo_url_auth_token_file"]["type"] == "string"
    assert props["character_limit"]["type"] == ["integer", "null"]
    assert props["worker_concurrency"]["description"].startswith("The prefetch")


def test_channel_secret_values_include_the_transport_config() -> None:
    from junebug_api.config.channels import channel_settings
    from junebug_api.config.redaction import channel_secret_values

    settings = channel_settings(
        "c1",
        {
            "config": {"smpp": {"password": "smpp-pass"}},
            "mo_url": "http://u:url-pass@rp.example/in",
            "api_auth_token": "api-tok",
        },
        top_level(),
    )
    assert {"smpp-pass", "url-pass", "api-tok"} <= set(channel_secret_values(settings))
