"""config.load_config: defaults, the three sources, validation, helpers."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from junebug_api.config import model as config_module
from junebug_api.config.model import (
    DEFAULT_STATE_CACHE,
    AmqpConfig,
    ConfigError,
    describe,
    http_bind_to_endpoint,
    load_config,
    parse_amqp_url,
)

REQUIRED = {
    "connector_name": "conn",
    "mo_message_url": "http://rapidpro.example/c/jn/uuid/receive",
    "http_bind": "127.0.0.1:8080",
}


def write_yaml(tmp_path: Path, data: dict, name: str = "config.yaml") -> str:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(data), encoding="utf-8")
    return str(path)


def load(data: dict | None = None, tmp_path: Path | None = None, **kwargs):
    """Load a config from a YAML file holding REQUIRED plus ``data``."""
    assert tmp_path is not None
    path = write_yaml(tmp_path, {**REQUIRED, **(data or {})})
    return load_config(path, environ=kwargs.pop("environ", {}), cli=kwargs.pop("cli", None))


# -- defaults and required options ------------------------------------------


def test_defaults() -> None:
    cfg = load_config(None, environ={}, cli=REQUIRED)
    assert cfg.connector_name == "conn"
    assert cfg.mo_message_url == REQUIRED["mo_message_url"]
    assert cfg.mo_message_url_auth_token is None
    assert cfg.default_event_url is None
    assert cfg.default_event_auth_token is None
    assert cfg.base_url_path == ""
    assert cfg.transport_type == "sms"
    assert cfg.default_from_addr is None
    assert cfg.allow_expired_replies is False
    assert cfg.state_cache_class == DEFAULT_STATE_CACHE
    assert cfg.state_cache_config == {}
    assert cfg.request_timeout == 240.0
    assert cfg.mo_message_url_timeout == 10.0
    assert cfg.event_url_timeout == 10.0
    assert cfg.amqp == AmqpConfig(
        hostname="127.0.0.1", port=5672, username="guest", password="guest", vhost="/"
    )
    assert cfg.amqp_url == ""
    assert cfg.amqp_settings == cfg.amqp
    assert cfg.worker_concurrency == 20
    assert cfg.sentry_dsn is None
    assert cfg.log_level == "INFO"
    assert cfg.middlewares == []
    assert cfg.delivery_retry_delay == 1.0
    assert cfg.delivery_retry_max_delay == 60.0
    assert cfg.delivery_max_attempts == 10
    assert cfg.shutdown_timeout == 30.0
    assert cfg.amqp_heartbeat == 30
    assert cfg.messages_path == "/messages"
    assert cfg.http_endpoint == "tcp:8080:interface=127.0.0.1"


def test_messages_path_strips_trailing_slash() -> None:
    cfg = load_config(None, environ={}, cli={**REQUIRED, "base_url_path": "/channels/abc/"})
    assert cfg.messages_path == "/channels/abc/messages"


@pytest.mark.parametrize("missing", sorted(REQUIRED))
def test_required_options(missing: str) -> None:
    cli = {k: v for k, v in REQUIRED.items() if k != missing}
    with pytest.raises(ConfigError, match=f"^{missing} is required$"):
        load_config(None, environ={}, cli=cli)


@pytest.mark.parametrize("name", sorted(REQUIRED))
def test_required_options_must_not_be_blank(name: str) -> None:
    with pytest.raises(ConfigError, match=name):
        load_config(None, environ={}, cli={**REQUIRED, name: "  "})


def test_empty_file_is_empty_config(tmp_path: Path) -> None:
    path = tmp_path / "empty.yaml"
    path.write_text("", encoding="utf-8")
    cfg = load_config(str(path), environ={}, cli=REQUIRED)
    assert cfg.connector_name == "conn"


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read config file"):
        load_config(str(tmp_path / "nope.yaml"), environ={}, cli=REQUIRED)


def test_file_not_a_mapping(tmp_path: Path) -> None:
    path = tmp_path / "list.yaml"
    path.write_text("- a\n- b\n", encoding="utf-8")
    with pytest.raises(ConfigError, match="must hold a mapping"):
        load_config(str(path), environ={}, cli=REQUIRED)


def test_invalid_yaml_names_the_line(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("connector_name: a\nfoo: [1, 2\n", encoding="utf-8")
    with pytest.raises(ConfigError, match=r"bad\.yaml line \d+"):
        load_config(str(path), environ={}, cli=REQUIRED)


# -- unknown keys and types --------------------------------------------------


def test_unknown_top_level_key(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"^unknown option redis_url$"):
        load({"redis_url": "x"}, tmp_path)


def test_unknown_nested_key(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"^unknown option amqp\.hostnme$"):
        load({"amqp": {"hostnme": "rabbit"}}, tmp_path)


def test_nested_block_must_be_a_mapping(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"^amqp must be a mapping$"):
        load({"amqp": "rabbit"}, tmp_path)


def test_null_nested_block_means_defaults(tmp_path: Path) -> None:
    assert load({"amqp": None}, tmp_path).amqp == AmqpConfig()


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"allow_expired_replies": "yes"}, "allow_expired_replies must be true or false"),
        ({"allow_expired_replies": 1}, "allow_expired_replies must be true or false"),
        ({"worker_concurrency": 2.5}, "worker_concurrency must be an integer"),
        ({"worker_concurrency": True}, "worker_concurrency must be an integer"),
        ({"worker_concurrency": "20"}, "worker_concurrency must be an integer"),
        ({"request_timeout": "soon"}, "request_timeout must be a number"),
        ({"request_timeout": False}, "request_timeout must be a number"),
        ({"connector_name": 123}, "connector_name must be a string"),
        ({"transport_type": ["sms"]}, "transport_type must be a string"),
        ({"state_cache_config": [1, 2]}, "state_cache_config must be a mapping"),
        ({"state_cache_config": "x"}, "state_cache_config must be a mapping"),
        ({"middlewares": {"a": 1}}, "middlewares must be a list"),
        ({"amqp": {"port": "5672"}}, "amqp.port must be an integer"),
        ({"amqp": {"hostname": 5}}, "amqp.hostname must be a string"),
        ({"transport_type": None}, "transport_type must not be null"),
    ],
)
def test_yaml_type_errors(tmp_path: Path, data: dict, message: str) -> None:
    with pytest.raises(ConfigError, match="^" + re.escape(message)):
        load(data, tmp_path)


def test_yaml_types_accepted(tmp_path: Path) -> None:
    cfg = load(
        {
            "allow_expired_replies": True,
            "request_timeout": 5,
            "event_url_timeout": 2.5,
            "worker_concurrency": 3,
            "default_event_url": None,
            "state_cache_config": {"timeout": 60},
            "middlewares": [{"class": "x"}],
        },
        tmp_path,
    )
    assert cfg.allow_expired_replies is True
    assert cfg.request_timeout == 5.0
    assert isinstance(cfg.request_timeout, float)
    assert cfg.event_url_timeout == 2.5
    assert cfg.worker_concurrency == 3
    assert cfg.default_event_url is None
    assert cfg.state_cache_config == {"timeout": 60}
    assert cfg.middlewares == [{"class": "x"}]


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"mo_message_url": "ftp://example.com/x"}, "mo_message_url must be an http"),
        ({"default_event_url": "example.com/events"}, "default_event_url must be an http"),
        ({"log_level": "LOUD"}, "log_level must be one of"),
        ({"worker_concurrency": 0}, "worker_concurrency must be from 1 to 65535, got 0"),
        ({"worker_concurrency": 70000}, "worker_concurrency must be from 1 to 65535"),
        ({"delivery_max_attempts": 0}, "delivery_max_attempts must be from 1 to"),
        ({"request_timeout": 0}, "request_timeout must be from 0.01 to 86400, got 0.0"),
        ({"request_timeout": float("nan")}, "request_timeout must be a finite number"),
        ({"http_read_timeout": float("inf")}, "http_read_timeout must be a finite number"),
        ({"http_idle_timeout": 1e9}, "http_idle_timeout must be from 0.01 to 86400"),
        ({"delivery_retry_delay": -1}, "delivery_retry_delay must be from 0.01"),
        ({"shutdown_timeout": -1}, "shutdown_timeout must be from 0 to 86400"),
        ({"amqp_heartbeat": -1}, "amqp_heartbeat must be from 0 to 65535"),
        ({"amqp_heartbeat": 70000}, "amqp_heartbeat must be from 0 to 65535"),
        ({"amqp": {"port": 0}}, "amqp.port must be from 1 to 65535"),
        ({"amqp": {"vhost": "é"}}, "amqp.vhost must be printable ASCII"),
        ({"amqp": {"vhost": "v" * 256}}, "amqp.vhost must have at most 255 characters"),
        ({"amqp_url": "amqp://h/%C3%A9"}, "amqp_url: vhost must be printable ASCII"),
        ({"http_max_connections": 0}, "http_max_connections must be from 1 to"),
        ({"max_request_size": 0}, "max_request_size must be from 1 to"),
        ({"connector_name": "é"}, "connector_name must be printable ASCII"),
        ({"connector_name": "a\tb"}, "connector_name must not contain control"),
        ({"connector_name": "x" * 250}, "connector_name must have at most 237 characters, got 250"),
        ({"connector_name": "amq.x"}, "connector_name must not start with 'amq.'"),
        ({"mo_message_url": "http://h/x#frag"}, "mo_message_url must not have a #fragment"),
        ({"mo_message_url": "http://h:99999/x"}, "mo_message_url has an invalid port"),
        ({"mo_message_url": "http://h/a b"}, "mo_message_url must not contain spaces"),
        ({"amqp_url": "amqp://h/#x"}, "amqp_url must not have a #fragment"),
        ({"api_auth_token": "a\r\nX: y"}, "api_auth_token must not contain control"),
        ({"base_url_path": "/é"}, "base_url_path must be a URL path"),
        ({"http_bind": "tcp:70000"}, "http_bind port must be from 0 to 65535"),
        ({"http_bind": "ssl:8443:privateKey=/nonexistent"}, "http_bind 'ssl:8443"),
        ({"base_url_path": "channels/x"}, "base_url_path must start with '/'"),
        ({"base_url_path": "/a b"}, "base_url_path must be a URL path"),
        ({"http_bind": "not a bind"}, "http_bind must be"),
        ({"amqp_url": "http://rabbit/"}, "amqp_url must start with amqp://"),
    ],
)
def test_semantic_errors(tmp_path: Path, data: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(message)):
        load(data, tmp_path)


# -- environment and command line ---------------------------------------------


def test_environment_names_like_vumi2() -> None:
    environ = {
        "CONNECTOR_NAME": "from-env",
        "MO_MESSAGE_URL": "https://rp.example/receive",
        "HTTP_BIND": "9000",
        "AMQP_HOSTNAME": "rabbit.example",
        "AMQP_PORT": "5673",
        "AMQP_VHOST": "/jb",
        "ALLOW_EXPIRED_REPLIES": "yes",
        "REQUEST_TIMEOUT": "2.5",
        "WORKER_CONCURRENCY": "7",
        "STATE_CACHE_CONFIG": '{"timeout": 30}',
        "DEFAULT_FROM_ADDR": "+27000",
        "UNRELATED": "ignored",
    }
    cfg = load_config(None, environ=environ)
    assert cfg.connector_name == "from-env"
    assert cfg.http_endpoint == "tcp:9000"
    assert cfg.amqp.hostname == "rabbit.example"
    assert cfg.amqp.port == 5673
    assert isinstance(cfg.amqp.port, int)
    assert cfg.amqp.vhost == "/jb"
    assert cfg.allow_expired_replies is True
    assert cfg.request_timeout == 2.5
    assert cfg.worker_concurrency == 7
    assert cfg.state_cache_config == {"timeout": 30}
    assert cfg.default_from_addr == "+27000"


@pytest.mark.parametrize(
    ("name", "value", "message"),
    [
        ("AMQP_PORT", "five", "AMQP_PORT must be an integer"),
        ("REQUEST_TIMEOUT", "soon", "REQUEST_TIMEOUT must be a number"),
        ("ALLOW_EXPIRED_REPLIES", "maybe", "ALLOW_EXPIRED_REPLIES must be true or false"),
        ("STATE_CACHE_CONFIG", "{not json", "STATE_CACHE_CONFIG must be JSON"),
        ("STATE_CACHE_CONFIG", "[1]", "STATE_CACHE_CONFIG must be a mapping"),
    ],
)
def test_environment_type_errors(name: str, value: str, message: str) -> None:
    with pytest.raises(ConfigError, match="^" + re.escape(message)):
        load_config(None, environ={name: value}, cli=REQUIRED)


@pytest.mark.parametrize("text", ["", "null", "None"])
def test_environment_null_for_optional(text: str) -> None:
    cfg = load_config(
        None, environ={"DEFAULT_EVENT_AUTH_TOKEN": "t", "SENTRY_DSN": text}, cli=REQUIRED
    )
    assert cfg.default_event_auth_token == "t"
    # sentry_dsn is a str option: the text stays as given.
    assert cfg.sentry_dsn == text


def test_environment_prefix() -> None:
    environ = {
        "VUMI_CONFIG_PREFIX": "JB",
        "JB_AMQP_PORT": "6000",
        "JB_CONNECTOR_NAME": "prefixed",
        "AMQP_PORT": "7000",  # without the prefix: not ours
        "CONNECTOR_NAME": "unprefixed",
    }
    cfg = load_config(
        None, environ=environ, cli={k: v for k, v in REQUIRED.items() if k != "connector_name"}
    )
    assert cfg.amqp.port == 6000
    assert cfg.connector_name == "prefixed"


def test_vumi_config_file_used_when_path_is_none(tmp_path: Path) -> None:
    path = write_yaml(tmp_path, {**REQUIRED, "connector_name": "from-file"})
    cfg = load_config(None, environ={"VUMI_CONFIG_FILE": path})
    assert cfg.connector_name == "from-file"


def test_explicit_path_wins_over_vumi_config_file(tmp_path: Path) -> None:
    env_file = write_yaml(tmp_path, {**REQUIRED, "connector_name": "env-file"}, "env.yaml")
    explicit = write_yaml(tmp_path, {**REQUIRED, "connector_name": "explicit"}, "explicit.yaml")
    cfg = load_config(explicit, environ={"VUMI_CONFIG_FILE": env_file})
    assert cfg.connector_name == "explicit"


def test_precedence_file_env_cli(tmp_path: Path) -> None:
    path = write_yaml(
        tmp_path,
        {
            **REQUIRED,
            "connector_name": "file",
            "transport_type": "file",
            "default_from_addr": "file",
            "amqp": {"hostname": "file-host", "port": 1111, "username": "file-user"},
        },
    )
    environ = {"TRANSPORT_TYPE": "env", "DEFAULT_FROM_ADDR": "env", "AMQP_PORT": "2222"}
    cli = {"default_from_addr": "cli", "amqp_username": "cli-user", "transport_type": None}
    cfg = load_config(path, environ=environ, cli=cli)
    assert cfg.connector_name == "file"
    assert cfg.transport_type == "env"  # cli None means "not given"
    assert cfg.default_from_addr == "cli"
    # The amqp block merges key by key across the sources.
    assert cfg.amqp.hostname == "file-host"
    assert cfg.amqp.port == 2222
    assert cfg.amqp.username == "cli-user"


def test_cli_type_error_names_the_flag() -> None:
    with pytest.raises(ConfigError, match=r"^--amqp-port must be an integer"):
        load_config(None, environ={}, cli={**REQUIRED, "amqp_port": "x"})


def test_os_environ_is_the_default(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CONNECTOR_NAME", "os-env")
    monkeypatch.delenv("VUMI_CONFIG_FILE", raising=False)
    monkeypatch.delenv("VUMI_CONFIG_PREFIX", raising=False)
    cli = {k: v for k, v in REQUIRED.items() if k != "connector_name"}
    assert load_config(None, cli=cli).connector_name == "os-env"


# -- amqp_url -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        (
            "amqp://user:p%40ss%2Fw%3Ard@rabbit.example:5673/%2F",
            AmqpConfig(
                hostname="rabbit.example",
                port=5673,
                username="user",
                password="p@ss/w:rd",
                vhost="/",
            ),
        ),
        ("amqp://u:p@h/", AmqpConfig(hostname="h", username="u", password="p", vhost="/")),
        ("amqp://u:p@h", AmqpConfig(hostname="h", username="u", password="p", vhost="/")),
        (
            "amqp://u%20x:p@h:1234/custom",
            AmqpConfig(hostname="h", port=1234, username="u x", password="p", vhost="custom"),
        ),
        ("amqp://h/%2Fjb", AmqpConfig(hostname="h", vhost="/jb")),
        ("amqp:///", AmqpConfig()),
    ],
)
def test_parse_amqp_url(url: str, expected: AmqpConfig) -> None:
    assert parse_amqp_url(url) == expected


def test_parse_amqp_url_bad_port() -> None:
    with pytest.raises(ConfigError, match="invalid port"):
        parse_amqp_url("amqp://h:99999/")


def test_amqp_url_wins_over_amqp(tmp_path: Path) -> None:
    cfg = load(
        {
            "amqp": {"hostname": "block-host", "port": 1, "password": "block"},
            "amqp_url": "amqp://url-user:url%23pass@url-host:5674/vh",
        },
        tmp_path,
    )
    assert cfg.amqp.hostname == "block-host"
    assert cfg.amqp_settings == AmqpConfig(
        hostname="url-host", port=5674, username="url-user", password="url#pass", vhost="vh"
    )


def test_amqps_url_means_tls_on_5671() -> None:
    assert parse_amqp_url("amqps://u:p@rabbit.example/%2F") == AmqpConfig(
        hostname="rabbit.example", port=5671, username="u", password="p", vhost="/", tls=True
    )
    assert parse_amqp_url("amqps://h:5999").port == 5999


@pytest.mark.parametrize("url", ["amqp://h/?heartbeat=10", "amqps://h/vh?x=1", "amqp://h/?"])
def test_amqp_url_with_a_query_string_is_refused(tmp_path: Path, url: str) -> None:
    with pytest.raises(ConfigError, match=r"^amqp_url must not have a query string"):
        load({"amqp_url": url}, tmp_path)


def test_amqp_urls_in_order_from_yaml_env_and_cli(tmp_path: Path) -> None:
    urls = ["amqps://u:p@one.example/%2F", "amqp://u:p@two.example:5673/%2F"]
    cfg = load({"amqp_urls": urls}, tmp_path)
    assert [b.address for b in cfg.amqp_brokers] == ["one.example:5671", "two.example:5673"]
    assert [b.tls for b in cfg.amqp_brokers] == [True, False]
    assert cfg.amqp_settings == cfg.amqp_brokers[0]
    env = load(None, tmp_path, environ={"AMQP_URLS": " amqp://a/ , amqp://b:1/"})
    assert [b.address for b in env.amqp_brokers] == ["a:5672", "b:1"]
    cli = load(None, tmp_path, cli={"amqp_urls": "amqp://c/,amqp://d/"})
    assert [b.hostname for b in cli.amqp_brokers] == ["c", "d"]
    json_env = load(None, tmp_path, environ={"AMQP_URLS": '["amqp://e/"]'})
    assert [b.hostname for b in json_env.amqp_brokers] == ["e"]


def test_amqp_connection_settings(tmp_path: Path) -> None:
    cfg = load(
        {
            "amqp": {"hostname": "rabbit", "tls": True},
            "amqp_failover": "shuffle",
            "amqp_heartbeat": 5,
            "amqp_max_unconfirmed": 10,
            "amqp_queue_arguments": {"x-queue-type": "quorum"},
            "amqp_declare": "passive",
            "amqp_connect_timeout": 3,
            "amqp_tls_verify": False,
        },
        tmp_path,
    )
    settings = cfg.amqp_connection
    assert settings.brokers == (AmqpConfig(hostname="rabbit", tls=True),)
    assert settings.failover == "shuffle"
    assert settings.heartbeat == 5
    assert settings.max_unconfirmed == 10
    assert settings.queue_arguments == {"x-queue-type": "quorum"}
    assert settings.declare == "passive"
    assert settings.connect_timeout == 3.0
    assert settings.tls_verify is False
    assert settings.auth_mechanism == "PLAIN"


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"amqp_url": "amqp://a/", "amqp_urls": ["amqp://b/"]}, "set amqp_url or amqp_urls"),
        ({"amqp_urls": ["amqp://a/", "http://b/"]}, r"amqp_urls\[1\] must start with amqp://"),
        ({"amqp_urls": [""]}, r"amqp_urls\[0\] must be a non-empty"),
        ({"amqp_urls": ["amqp://a/?x=1"]}, r"amqp_urls\[0\] must not have a query string"),
        ({"amqp_failover": "random"}, "amqp_failover must be in_order or shuffle"),
        ({"amqp_declare": "never"}, "amqp_declare must be declare or passive"),
        ({"amqp_auth_mechanism": "AMQPLAIN"}, "amqp_auth_mechanism must be PLAIN or EXTERNAL"),
        (
            {"amqp_auth_mechanism": "EXTERNAL", "amqp_url": "amqps://h/"},
            "amqp_auth_mechanism EXTERNAL needs amqp_tls_cert_file",
        ),
        ({"amqp_tls_cert_file": "/etc/hostname"}, "must be set together"),
        ({"amqp_tls_ca_file": "/no/such/ca.pem"}, "cannot read amqp_tls_ca_file /no/such/ca.pem"),
        (
            {"amqp_tls_ca_file": "/etc/hostname", "amqp_url": "amqps://h/"},
            "amqp_tls_ca_file /etc/hostname holds no certificate",
        ),
        ({"amqp_max_unconfirmed": 0}, "amqp_max_unconfirmed must be from 1 to"),
        ({"amqp_connect_timeout": 0}, "amqp_connect_timeout must be greater than 0"),
        ({"amqp_connect_timeout": float("nan")}, "amqp_connect_timeout must be a finite number"),
        ({"amqp_queue_arguments": {"x-ttl": 1.5}}, "amqp_queue_arguments.x-ttl must be a string"),
        ({"amqp_queue_arguments": {"x-ttl": 2**64}}, "amqp_queue_arguments.x-ttl is out of range"),
        ({"amqp_tls_ca_file": "a\x00b"}, "amqp_tls_ca_file must not contain NUL characters"),
    ],
)
def test_amqp_option_errors(tmp_path: Path, data: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load(data, tmp_path)


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"amqp": {"hostname": ""}}, "amqp.hostname must be a host name"),
        ({"amqp": {"hostname": "rabbit_mq"}}, "amqp.hostname must be a host name"),
        ({"amqp": {"hostname": "a b"}}, "amqp.hostname must be a host name"),
        ({"amqp_url": "amqp://u:p@rabbit_mq/"}, "amqp_url: hostname must be a host name"),
        ({"amqp_urls": ["amqp://a/", "amqp://x..y/"]}, "amqp_urls: hostname must be a host"),
    ],
)
def test_amqp_host_names_twisted_cannot_connect_to_are_refused(
    tmp_path: Path, data: dict, message: str
) -> None:
    """Twisted's HostnameEndpoint refuses such names only when it connects, on
    every attempt: a service that starts and never reaches its broker."""
    with pytest.raises(ConfigError, match=message):
        load(data, tmp_path)
    from twisted.internet.endpoints import HostnameEndpoint
    from twisted.internet.testing import MemoryReactorClock

    host = data.get("amqp", {}).get("hostname")
    if host is not None:  # the same name, as Twisted sees it
        connecting = HostnameEndpoint(MemoryReactorClock(), host, 5672).connect(None)
        failures = []
        connecting.addErrback(failures.append)
        assert failures and failures[0].check(ValueError)


@pytest.mark.parametrize("host", ["rabbit-1.internal", "RABBIT", "localhost.", "::1", "é.example"])
def test_amqp_host_names_that_connect_are_accepted(tmp_path: Path, host: str) -> None:
    assert load({"amqp": {"hostname": host}}, tmp_path).amqp_settings.hostname == host


def test_amqp_tls_block_defaults_to_port_5671(tmp_path: Path) -> None:
    """``tls: true`` in the amqp block means AMQPS's port, as amqps:// does."""
    assert load({"amqp": {"tls": True}}, tmp_path).amqp_settings.port == 5671
    assert load({"amqp": {"tls": True, "port": 5672}}, tmp_path).amqp_settings.port == 5672
    assert load({"amqp": {"hostname": "h"}}, tmp_path).amqp_settings.port == 5672
    env = load(None, tmp_path, environ={"AMQP_TLS": "true"})
    assert env.amqp_settings.port == 5671


def test_external_needs_tls_on_every_broker(tmp_path: Path) -> None:
    import trustme

    ca = trustme.CA()
    cert = ca.issue_cert("client")
    cert_file = tmp_path / "c.pem"
    key_file = tmp_path / "c.key"
    cert_file.write_bytes(cert.cert_chain_pems[0].bytes())
    key_file.write_bytes(cert.private_key_pem.bytes())
    base = {
        "amqp_auth_mechanism": "external",
        "amqp_tls_cert_file": str(cert_file),
        "amqp_tls_key_file": str(key_file),
    }
    with pytest.raises(ConfigError, match="EXTERNAL needs amqps://"):
        load({**base, "amqp_urls": ["amqps://a/", "amqp://b/"]}, tmp_path)
    cfg = load({**base, "amqp_urls": ["amqps://a/"]}, tmp_path)
    assert cfg.amqp_connection.auth_mechanism == "EXTERNAL"
    with pytest.raises(ConfigError, match="not a certificate and its key"):
        load({**base, "amqp_tls_key_file": str(cert_file), "amqp_urls": ["amqps://a/"]}, tmp_path)


def test_describe_masks_amqp_urls(tmp_path: Path) -> None:
    cfg = load({"amqp_urls": ["amqp://user:secret@a/", "amqp://b/"]}, tmp_path)
    assert describe(cfg)["amqp_urls"] == ["amqp://***@a/", "amqp://b/"]


# -- http_bind ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("bind", "endpoint"),
    [
        ("host.example:8080", "tcp:8080:interface=host.example"),
        ("0.0.0.0:8080", "tcp:8080:interface=0.0.0.0"),
        ("8080", "tcp:8080"),
        (" 8080 ", "tcp:8080"),
        (":8080", "tcp:8080"),
        ("[::1]:8080", "tcp6:8080:interface=\\:\\:1"),
        ("unix:/tmp/x.sock", "unix:/tmp/x.sock"),
        ("tcp:8080:interface=127.0.0.1", "tcp:8080:interface=127.0.0.1"),
        ("ssl:443:privateKey=k.pem", "ssl:443:privateKey=k.pem"),
    ],
)
def test_http_bind_to_endpoint(bind: str, endpoint: str) -> None:
    assert http_bind_to_endpoint(bind) == endpoint


@pytest.mark.parametrize("bind", ["localhost", "host:port", "[::1]", "host:80:90"])
def test_http_bind_invalid(bind: str) -> None:
    with pytest.raises(ConfigError, match="http_bind must be"):
        http_bind_to_endpoint(bind)


def test_tcp6_endpoint_parses_in_twisted() -> None:
    from twisted.internet.endpoints import TCP6ServerEndpoint, serverFromString
    from twisted.internet.protocol import Factory
    from twisted.internet.testing import MemoryReactor

    reactor = MemoryReactor()
    endpoint = serverFromString(reactor, http_bind_to_endpoint("[::1]:8080"))
    assert isinstance(endpoint, TCP6ServerEndpoint)
    endpoint.listen(Factory())
    [(port, _, _, interface)] = reactor.tcpServers
    assert (interface, port) == ("::1", 8080)


# -- state cache aliases --------------------------------------------------------


@pytest.mark.parametrize("alias", sorted(config_module.STATE_CACHE_ALIASES))
def test_state_cache_aliases(alias: str) -> None:
    cfg = load_config(None, environ={}, cli={**REQUIRED, "state_cache_class": alias})
    assert cfg.state_cache_class == "junebug_api.state_cache.InMemoryStateCache"


def test_other_state_cache_class_kept() -> None:
    cfg = load_config(None, environ={}, cli={**REQUIRED, "state_cache_class": "my.Cache"})
    assert cfg.state_cache_class == "my.Cache"


# -- describe -----------------------------------------------------------------

SECRETS = (
    "amqpblocksecret",
    "motokensecret",
    "eventtokensecret",
    "sentrykeysecret",
    "mourlpasssecret",
    "eventurlpasssecret",
    "amqpurlpasssecret",
    "cacheurlpasssecret",
)


def test_describe_masks_secrets(tmp_path: Path) -> None:
    cfg = load(
        {
            "amqp": {"password": "amqpblocksecret"},
            "mo_message_url_auth_token": "motokensecret",
            "default_event_auth_token": "eventtokensecret",
            "sentry_dsn": "https://sentrykeysecret@sentry.example/1",
            "mo_message_url": "https://rpuser:mourlpasssecret@rp.example/c/jn/x/receive",
            "default_event_url": "https://evuser:eventurlpasssecret@rp.example/events",
            "amqp_url": "amqp://amqpuser:amqpurlpasssecret@rabbit.example/%2F",
            "state_cache_config": {"url": "redis://:cacheurlpasssecret@redis:6379/0"},
        },
        tmp_path,
    )
    described = describe(cfg)
    text = repr(described)
    for secret in SECRETS:
        assert secret not in text, secret
    assert described["amqp"]["password"] == "***"
    assert described["mo_message_url_auth_token"] == "***"
    assert described["default_event_auth_token"] == "***"
    assert described["sentry_dsn"] == "***"
    assert described["mo_message_url"] == "https://***@rp.example/c/jn/x/receive"
    assert described["default_event_url"] == "https://***@rp.example/events"
    assert described["amqp_url"] == "amqp://***@rabbit.example/%2F"
    # The config itself is untouched.
    assert cfg.mo_message_url_auth_token == "motokensecret"
    assert cfg.amqp.password == "amqpblocksecret"


def test_describe_leaves_unset_secrets_alone() -> None:
    described = describe(load_config(None, environ={}, cli=REQUIRED))
    assert described["mo_message_url_auth_token"] is None
    assert described["sentry_dsn"] is None
    assert described["mo_message_url"] == REQUIRED["mo_message_url"]
    assert described["connector_name"] == "conn"


def test_config_repr_hides_amqp_password(tmp_path: Path) -> None:
    cfg = load({"amqp": {"password": "amqpblocksecret"}}, tmp_path)
    assert "amqpblocksecret" not in repr(cfg)


def test_redact_url_hides_a_lone_user_name_too() -> None:
    from junebug_api.formats.urls import redact_url

    assert redact_url("https://APIKEY123@rp.example/x") == "https://***@rp.example/x"
    assert redact_url("https://rp.example/x") == "https://rp.example/x"
    assert redact_url("http://[broken/") == "***"


# -- secrets from files -----------------------------------------------------------


def test_secrets_from_files(tmp_path: Path) -> None:
    def secret(name: str, text: str) -> str:
        path = tmp_path / name
        path.write_text(text, encoding="utf-8")
        return str(path)

    cfg = load(
        {
            "api_auth_username": "u",
            "api_auth_password_file": secret("pw", "pässword\n"),
            "api_auth_token_file": secret("tok", "tok en\r\n"),
            "mo_message_url_auth_token_file": secret("mo", "mo-token"),
            "default_event_auth_token_file": secret("ev", "ev-token\n"),
            "amqp": {"password_file": secret("amqp", "rabbit\n")},
            "state_cache_config": {
                "url": "redis://127.0.0.1:6379/2",
                "password_file": secret("redis", "r:e/d@is\n"),
            },
        },
        tmp_path,
    )
    assert cfg.api_auth_password == "pässword"
    assert cfg.api_auth_token == "tok en"
    assert cfg.mo_message_url_auth_token == "mo-token"
    assert cfg.default_event_auth_token == "ev-token"
    assert cfg.amqp_settings.password == "rabbit"
    assert cfg.state_cache_config == {"url": "redis://:r%3Ae%2Fd%40is@127.0.0.1:6379/2"}
    from junebug_api.state.redis_options import parse_redis_url

    assert parse_redis_url(cfg.state_cache_config["url"])["password"] == "r:e/d@is"
    logged = str(describe(cfg))
    for text in ("pässword", "tok en", "mo-token", "ev-token", "rabbit", "r%3Ae"):
        assert text not in logged


def test_amqp_url_and_redis_url_from_files(tmp_path: Path) -> None:
    amqp = tmp_path / "amqp"
    amqp.write_text("amqp://jb:s3cret@rabbit:5673/v\n")
    redis = tmp_path / "redis"
    redis.write_text("redis://:pw@127.0.0.1:6379/3\n")
    cfg = load(
        {"amqp_url_file": str(amqp), "state_cache_config": {"url_file": str(redis)}}, tmp_path
    )
    assert cfg.amqp_settings == AmqpConfig(
        hostname="rabbit", port=5673, username="jb", password="s3cret", vhost="v"
    )
    assert cfg.state_cache_config == {"url": "redis://:pw@127.0.0.1:6379/3"}


def test_sentry_dsn_and_sentinel_password_from_files(tmp_path: Path) -> None:
    """The other two secrets: Sentry's DSN (it holds the project's key) and the
    Redis Sentinels' password."""
    dsn = tmp_path / "dsn"
    dsn.write_text("https://key123@sentry.example/42\n")
    sentinel = tmp_path / "sentinel"
    sentinel.write_text("s3ntinel\n")
    cfg = load(
        {
            "sentry_dsn_file": str(dsn),
            "state_cache_config": {"sentinel_password_file": str(sentinel)},
        },
        tmp_path,
    )
    assert cfg.sentry == "https://key123@sentry.example/42"
    assert cfg.state_cache_config == {"sentinel_password": "s3ntinel"}
    logged = str(describe(cfg))
    assert "key123" not in logged and "s3ntinel" not in logged
    env = load_config(
        None,
        environ={**{k.upper(): v for k, v in REQUIRED.items()}, "SENTRY_DSN_FILE": str(dsn)},
    )
    assert env.sentry == "https://key123@sentry.example/42"
    with pytest.raises(ConfigError, match=r"^set sentry_dsn or sentry_dsn_file, not both"):
        load({"sentry_dsn": "https://k@h/1", "sentry_dsn_file": str(dsn)}, tmp_path)


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"api_auth_token": "a", "api_auth_token_file": "/x"}, "set api_auth_token or"),
        ({"amqp": {"password": "a", "password_file": "/x"}}, "set amqp.password or"),
        ({"api_auth_token_file": "/nonexistent"}, "api_auth_token_file: cannot read"),
        ({"amqp_url_file": "/nonexistent"}, "amqp_url_file: cannot read '/nonexistent'"),
        ({"state_cache_config": {"url_file": "/nonexistent"}}, "state_cache_config.url_file"),
    ],
)
def test_secret_file_errors(tmp_path: Path, data: dict, message: str) -> None:
    with pytest.raises(ConfigError, match="^" + re.escape(message)):
        load(data, tmp_path)


def test_secret_file_from_environment(tmp_path: Path) -> None:
    token = tmp_path / "token"
    token.write_text("from-env-file\n")
    environ = {k.upper(): v for k, v in REQUIRED.items()}
    cfg = load_config(None, environ={**environ, "API_AUTH_TOKEN_FILE": str(token)})
    assert cfg.api_auth_token == "from-env-file"


def test_max_connections_default() -> None:
    cfg = load_config(None, environ={}, cli=REQUIRED)
    assert cfg.http_max_connections is None
    assert cfg.max_connections(1024) == 768
    assert cfg.max_connections(1 << 20) == 10_000
    cfg = load_config(None, environ={}, cli={**REQUIRED, "http_max_connections": "50"})
    assert cfg.max_connections(1024) == 50
