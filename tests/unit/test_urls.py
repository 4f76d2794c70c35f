"""How a URL is shown (junebug_api.formats.urls), and that every place that
shows one uses it: the config logged at start, ``GET /channels/<id>``'s
settings, the log redactor under text and JSON lines, and Sentry's scrubbing."""

from __future__ import annotations

import io
import json

import pytest
from twisted.logger import LogLevel
from twisted.python.failure import Failure

from junebug_api.config.channels import resolve_channels
from junebug_api.config.model import describe, load_config
from junebug_api.formats.urls import (
    mask_urls,
    redact_url,
    url_for_log,
    url_masked,
    url_origin,
)
from junebug_api.observe.error_reporting import scrub
from junebug_api.observe.log import Redactor, json_log_line, log_file_observer

UUID = "0b9e6b6c-5b7a-4e39-9a4c-7d1c1f0a2b3c"
# RapidPro's Junebug channel URL: the path's UUID is the capability, and a token.
MO = f"https://rp:pw@rapidpro.example/c/jn/{UUID}/receive?token=t0k3n&lang=en"


@pytest.mark.parametrize(
    ("url", "origin"),
    [
        (MO, "https://rapidpro.example:443"),
        ("http://RP.Example/in", "http://rp.example:80"),
        ("http://127.0.0.1:8000/x?y=1#z", "http://127.0.0.1:8000"),
        ("http://[::1]:81/", "http://[::1]:81"),
        ("gopher://h/x", "gopher://h:0"),
        # A port out of range counts as none, as the outage tracker has always had it.
        ("http://h:99999/x", "http://h:80"),
        ("http://[broken/", "***"),
    ],
)
def test_the_origin_is_scheme_host_and_port_only(url: str, origin: str) -> None:
    assert url_origin(url) == origin


@pytest.mark.parametrize(
    ("url", "masked"),
    [
        (MO, f"https://***@rapidpro.example/c/jn/{UUID}/receive?token=***&lang=***"),
        ("https://KEY@rp.example/x?a=&b", "https://***@rp.example/x?a=***&***"),
        ("http://rp.example/x?s3cr3t#frag", "http://rp.example/x?***#***"),
        ("http://rp.example/in", "http://rp.example/in"),
        ("http://rp.example/in?", "http://rp.example/in"),
        ("http://[broken/", "***"),
    ],
)
def test_masked_keeps_the_path_and_query_keys(url: str, masked: str) -> None:
    assert url_masked(url) == masked


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        (MO, "https://***@rapidpro.example/c/jn/***/receive?token=***&lang=***"),
        # An identifier: 16 or more characters with a digit (a UUID, its hex, a token).
        ("http://h/c/jn/0b9e6b6c5b7a4e399a4c7d1c1f0a2b3c/event", "http://h/c/jn/***/event"),
        ("http://h/hooks/AbCdEfGh1jKlMnOp/x", "http://h/hooks/***/x"),
        # Words and short parts are kept.
        ("http://h/api/v2/delivery-reports/2024", "http://h/api/v2/delivery-reports/2024"),
        ("http://[broken/", "***"),
    ],
)
def test_for_log_also_masks_identifiers_in_the_path(url: str, shown: str) -> None:
    assert url_for_log(url) == shown
    assert url_for_log(shown) == shown  # masking twice changes nothing


def test_redact_url_masks_user_info_only() -> None:
    """For the AMQP and Redis URLs, whose query holds options; a log line
    shows them so too."""
    for url in ("amqps://u:p@rabbit/%2F?heartbeat=30", "redis://:pw@redis:6379/0"):
        assert url_for_log(url) == redact_url(url)
    assert (
        redact_url("amqps://u:p@rabbit/%2F?heartbeat=30") == "amqps://***@rabbit/%2F?heartbeat=30"
    )
    assert redact_url("http://[broken/") == "***"


def test_mask_urls_finds_every_http_url_in_a_text() -> None:
    text = (
        f"POST to {MO} failed; retrying (was http://h/e?k=v). "
        "amqp://u@rabbit/?heartbeat=30 stays, as does ftp://h/?x=1."
    )
    assert mask_urls(text) == (
        "POST to https://***@rapidpro.example/c/jn/***/receive?token=***&lang=*** failed;"
        " retrying (was http://h/e?k=***). amqp://u@rabbit/?heartbeat=30 stays,"
        " as does ftp://h/?x=1."
    )
    assert mask_urls(f"POST to {MO}: HTTP 500", url_origin) == (
        "POST to https://rapidpro.example:443: HTTP 500"
    )
    assert mask_urls("no url here") == "no url here"


# -- every place that shows a callback URL --------------------------------------


def config_with_channels() -> object:
    return load_config(
        None,
        environ={},
        cli={
            "http_bind": "127.0.0.1:1",
            "connector_name": "top",
            "mo_message_url": MO,
            "default_event_url": "http://rp.example/e?token=ev-t0k3n",
            "channels": json.dumps(
                {"ch": {"mo_url": f"http://rp.example/c/jn/{UUID}/receive?token=ch-t0k3n"}}
            ),
        },
    )


def test_the_config_logged_at_start_shows_callback_urls_as_log_lines_do() -> None:
    described = describe(config_with_channels())
    assert described["mo_message_url"] == url_for_log(MO)
    assert described["default_event_url"] == "http://rp.example/e?token=***"
    assert described["channels"]["ch"]["mo_url"] == "http://rp.example/c/jn/***/receive?token=***"
    text = json.dumps(described)
    assert "t0k3n" not in text and UUID not in text


def test_a_channels_settings_show_the_path_and_mask_the_query() -> None:
    [top, channel] = resolve_channels(config_with_channels())
    assert channel.public()["mo_url"] == f"http://rp.example/c/jn/{UUID}/receive?token=***"
    assert top.public()["mo_url"] == url_masked(MO)
    assert top.public()["default_event_url"] == "http://rp.example/e?token=***"


def log_event(**fields: object) -> dict:
    return {
        "log_level": LogLevel.warn,
        "log_namespace": "junebug_api.delivery.inbound",
        "log_time": 0,
        "log_system": "-",
        **fields,
    }


def test_the_redactor_masks_any_http_url_in_text_and_json_lines() -> None:
    """The safety net: a URL logged without url_for_log is masked anyway."""
    event = log_event(log_format="POST to {where} failed", where=MO, url=MO, error=f"at {MO}")
    for log_format in ("text", "json"):
        out = io.StringIO()
        log_file_observer(log_format, out, Redactor())(event)
        line = out.getvalue()
        assert "rapidpro.example/c/jn/***/receive?token=***&lang=***" in line, line
        assert "t0k3n" not in line and UUID not in line and ":pw@" not in line
    record = json.loads(json_log_line(event, Redactor()))
    assert record["url"] == url_for_log(MO)


def test_sentry_events_are_scrubbed_of_url_queries_and_identifiers() -> None:
    failure = Failure(ValueError(f"POST to {MO} failed"))
    event = {
        "exception": {"values": [{"value": str(failure.value), "type": "ValueError"}]},
        "extra": {"log_message": f"while posting to {MO}"},
    }
    scrubbed = json.dumps(scrub(event, Redactor()))
    assert "t0k3n" not in scrubbed and UUID not in scrubbed
    assert url_for_log(MO) in scrubbed
