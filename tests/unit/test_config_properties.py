"""Property-based: arbitrary values for every option, from YAML, the
environment and the command line, either load into a config the service can
run with or raise ConfigError with one line; never another exception."""

from __future__ import annotations

import math
import string
from pathlib import Path

import attrs
import yaml
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from twisted.internet.endpoints import serverFromString
from twisted.internet.testing import MemoryReactorClock

from junebug_api.config.model import (
    MAX_SECONDS,
    ConfigError,
    JunebugConfig,
    load_config,
    option_names,
    option_type,
)
from junebug_api.config.options import base_type
from junebug_api.formats.queue_names import QueueNames
from junebug_api.service import JunebugService
from junebug_api.state.cache import load_state_cache_class

REQUIRED = {
    "connector_name": "conn",
    "mo_message_url": "http://rapidpro.example/c/jn/uuid/receive",
    "http_bind": "127.0.0.1:8080",
}
OPTIONS = [dotted for dotted, _ in option_names()]

scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.integers(min_value=-2, max_value=70000),
    st.floats(),  # nan, inf, -0.0, 1e308, ...
    st.text(max_size=300),
    st.sampled_from(
        [
            "",
            "é",
            "x" * 250,
            "amq.x",
            "http://h/x#f",
            "http://h:99999/",
            "https://user:pw@h:8443/p?q=1",
            "amqp://u:p@h:5672/v",
            "127.0.0.1:0",
            "tcp:70000",
            "unix:/tmp/x.sock",
            "ssl:8443",
            "/channels/x",
            "DEBUG",
            "junebug_api.state_cache.RedisStateCache",
            "redis://127.0.0.1:6379/0?x=1",
            "/nonexistent",
        ]
    ),
)
values = st.recursive(
    scalars,
    lambda inner: (
        st.lists(inner, max_size=3)
        | st.dictionaries(st.sampled_from(["timeout", "url", "port", "x", "password_file"]), inner)
    ),
    max_leaves=5,
)


SECRET_FILE = Path(__file__).with_name("helpers.py")  # any readable file


def plausible(dotted: str) -> st.SearchStrategy:
    """Values of the option's own type, mostly near the working range."""
    hint = option_type(dotted)
    kind, optional = base_type(hint)
    if dotted.endswith("_file"):
        strategy = st.sampled_from([str(SECRET_FILE), "/nonexistent", ""])
    elif dotted.endswith("_url"):
        strategy = st.builds(
            "{}://{}{}".format,
            st.sampled_from(["http", "https", "amqp", "ftp"]),
            st.sampled_from(["h", "127.0.0.1:5672", "u:p@h", "h:0", "[::1]:80"]),
            st.text(max_size=10),
        )
    elif kind is float:
        strategy = st.floats(min_value=-1, max_value=200_000)
    elif kind is int:
        strategy = st.integers(min_value=-1, max_value=100_000)
    elif kind is bool:
        strategy = st.booleans()
    elif kind is str:
        strategy = st.text(alphabet=string.ascii_letters + string.digits + "-_./:", max_size=20)
    elif kind is dict:
        strategy = st.fixed_dictionaries(
            {}, optional={"timeout": st.floats(), "store_event_info": st.booleans()}
        )
    else:
        strategy = st.just([])
    return st.none() | strategy if optional else strategy


def overrides() -> st.SearchStrategy[dict]:
    """Some options set to plausible or arbitrary values (nested ones in their block)."""

    def nest(flat: dict) -> dict:
        data: dict = {}
        for dotted, value in flat.items():
            head, _, tail = dotted.partition(".")
            if tail:
                block = data.setdefault(head, {})
                if isinstance(block, dict):
                    block[tail] = value
            else:
                data[head] = value
        return data

    keys = st.lists(st.sampled_from(OPTIONS), max_size=4, unique=True)
    return keys.flatmap(
        lambda names: st.fixed_dictionaries({n: plausible(n) | values for n in names})
    ).map(nest)


def check_loads_or_one_line(load) -> JunebugConfig | None:
    try:
        config = load()
    except ConfigError as e:
        message = str(e)
        assert message and "\n" not in message and "\r" not in message, repr(message)
        event(f"refused: {message.split(' ')[0]}")
        return None
    event("loaded")
    return config


def assert_config_works(config: JunebugConfig) -> None:
    """What the service relies on: finite numbers in their ranges, AMQP names
    within 255 bytes, an endpoint Twisted can build, and a service tree."""
    for field in attrs.fields(JunebugConfig):
        value = getattr(config, field.name)
        if isinstance(value, float):
            # Message status is kept for old Junebug's two days by default.
            high = 366 * 86400 if field.name == "outbound_message_ttl" else MAX_SECONDS
            assert math.isfinite(value) and 0 <= value <= high, field.name
    assert 1 <= config.worker_concurrency <= 65535
    assert 0 <= config.amqp_heartbeat <= 65535
    assert 1 <= config.amqp_settings.port <= 65535
    for queue in QueueNames.for_connector(config.connector_name).all():
        assert queue.isascii() and len(queue.encode()) <= 255
    reactor = MemoryReactorClock()
    serverFromString(reactor, config.http_endpoint)
    try:
        cls = load_state_cache_class(config.state_cache_class)
        cache_config = cls.check_config(config.state_cache_config, config.connector_name)
    except ConfigError as e:  # tap.py reports these the same way
        assert "\n" not in str(e)
        return
    for value in cache_config.values():
        if isinstance(value, float):
            assert math.isfinite(value) and value > 0
    JunebugService(attrs.evolve(config, http_max_connections=100), reactor)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=overrides())
def test_yaml_values(tmp_path_factory, data: dict) -> None:
    path = Path(tmp_path_factory.getbasetemp()) / "property-config.yaml"
    path.write_text(yaml.safe_dump({**REQUIRED, **data}, allow_unicode=True), encoding="utf-8")
    config = check_loads_or_one_line(lambda: load_config(str(path), environ={}))
    if config is not None:
        assert_config_works(config)


@settings(max_examples=300, deadline=None)
@given(
    flat=st.dictionaries(
        st.sampled_from(option_names()), st.text(max_size=40).filter(lambda t: "\0" not in t)
    )
)
def test_environment_and_cli_strings(flat: dict) -> None:
    environ = {name.upper(): text for (_, name), text in flat.items()}
    cli = {name: text for (_, name), text in flat.items()}
    for kwargs in (
        {"environ": {**{k.upper(): v for k, v in REQUIRED.items()}, **environ}},
        {"environ": {}, "cli": {**REQUIRED, **cli}},
    ):
        config = check_loads_or_one_line(lambda kwargs=kwargs: load_config(None, **kwargs))
        if config is not None:
            assert_config_works(config)


def _entry_keys() -> list[str]:
    from junebug_api.config.channels import ENTRY_KEYS

    return [*sorted(k for k in ENTRY_KEYS if not k.endswith("_file")), "colour", "id"]


def _entry_value(key: str) -> st.SearchStrategy:
    """Values for an entry key: of its option's type, mostly working ones, or arbitrary."""
    from junebug_api.config.channels import ENTRY_KEYS

    if key not in ENTRY_KEYS:
        return values
    name, about = ENTRY_KEYS[key]
    kind, optional = base_type(option_type_of_entry(name))
    if about.url:
        good = st.sampled_from(["http://rp.example/in", "https://u:p@h:8443/x?token=t"])
    elif kind is int:
        good = st.integers(min_value=0, max_value=1000)
    elif kind is bool:
        good = st.booleans()
    elif kind is dict:
        good = st.dictionaries(st.sampled_from(["password", "host", "api_token", "n"]), values)
    else:
        good = st.text(alphabet=string.ascii_letters + string.digits + "-.", max_size=12)
    good = st.none() | good if optional else good
    return st.one_of(good, good, good, values)


def option_type_of_entry(name: str):
    from junebug_api.config.channel_options import ChannelEntry
    from junebug_api.config.options import options

    return {field.name: hint for field, _, hint in options(ChannelEntry)}[name]


@settings(max_examples=300, deadline=None)
@given(
    entry=st.lists(st.sampled_from(_entry_keys()), max_size=5, unique=True).flatmap(
        lambda keys: st.fixed_dictionaries({k: _entry_value(k) for k in keys})
    ),
    create=st.booleans(),
)
def test_channel_entries_and_api_bodies_give_settings_or_one_line(
    entry: dict, create: bool
) -> None:
    """Any entry or API body: settings that give back their entry and show no
    secret option (nor a secret in ``config``), or ConfigError with one line;
    never another exception."""
    from junebug_api.config.channel_api import created_entry, modified_entry
    from junebug_api.config.channels import channel_entry, channel_settings, public

    config = load_config(None, environ={}, cli=REQUIRED)

    def resolve():
        if create:
            body = created_entry({"type": "t", "config": {}, **entry})
        else:
            body = modified_entry({"type": "t"}, entry)
        return channel_settings("c-1", body, config)

    try:
        settings_ = resolve()
    except ConfigError as e:
        assert str(e) and "\n" not in str(e)
        event("refused")
        return
    event("resolved")
    assert channel_settings("c-1", channel_entry(settings_), config) == settings_
    shown = public(settings_)
    from junebug_api.config.channels import SECRET_OPTIONS
    from junebug_api.config.secrets import is_secret_key

    assert not SECRET_OPTIONS & set(shown) and "mo_url_auth_token" not in shown
    assert all(v in ("***", None) for k, v in shown["config"].items() if is_secret_key(k))
