"""How a URL is shown: the one place that decides what of a URL may be seen where.

A callback URL (``mo_message_url``/``mo_url``, ``default_event_url``, each
message's ``event_url``, ``status_url``) carries capabilities: user info,
tokens in its query, and RapidPro's channel UUID in its path (whoever knows
``/c/jn/<uuid>/receive`` can post into RapidPro). So it is shown in one of
three forms, by who may see it:

- :func:`url_origin`, ``scheme://host:port``: the open ``/health``;
- :func:`url_masked`, user info and every query value as ``***``, the path
  kept: ``GET /channels/<id>``, which asks for the channel's credentials;
- :func:`url_for_log`, also every path segment that looks like an identifier
  (16 or more characters with a digit: UUIDs, tokens) as ``***``: log lines
  (text and JSON), Sentry, the config logged at start, the headers of a
  message parked on ``.failed``. (Any other URL, AMQP's or Redis's, shows
  there with its user info masked only: its query holds options.)

:func:`mask_urls` puts every http(s) URL in a text into one of these forms:
the log redactor's safety net, and ``/health``'s error texts.
:func:`redact_url` masks user info only (the Redis URL on ``/health``). A URL
that cannot be parsed is ``***``.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from urllib.parse import SplitResult, urlsplit

MASK = "***"

#: The port of a URL that names none, by scheme.
DEFAULT_PORTS = {"http": 80, "https": 443}

# A path segment shown in logs only when it cannot be an identifier.
_IDENTIFIER = re.compile(r"^(?=.*[0-9]).{16,}$")

# An http(s) URL in free text: up to a space, a quote or an angle bracket.
_URL_IN_TEXT = re.compile(r"\bhttps?://[^\s\"'<>`]+", re.IGNORECASE)
# Punctuation that ends a sentence after a URL rather than belonging to it.
_TRAILING = ".,;:!?)]}"


def origin_parts(url: str) -> tuple[str, str, int]:
    """(scheme, host, port) of a URL, lower case, the scheme's default port
    when it names none (0 for an unknown scheme); ValueError if it cannot be
    parsed."""
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    try:
        port = parts.port
    except ValueError:
        port = None
    if port is None:
        port = DEFAULT_PORTS.get(scheme, 0)
    return scheme, (parts.hostname or "").lower(), port


def format_origin(scheme: str, host: str, port: int) -> str:
    """``scheme://host:port`` (an IPv6 host in brackets)."""
    if ":" in host:
        host = f"[{host}]"
    return f"{scheme}://{host}:{port}"


def url_origin(url: str) -> str:
    """``scheme://host:port`` of ``url``: nothing of its user info, path or query."""
    try:
        return format_origin(*origin_parts(url))
    except ValueError:
        return MASK


def url_masked(url: str) -> str:
    """``url`` with its user info and every query value (and a fragment) as ``***``."""
    return _shown_as(url, _masked)


def url_for_log(url: str) -> str:
    """An http(s) URL as :func:`url_masked`, and every path segment that may
    be an identifier (16 or more characters, a digit among them) as ``***``;
    any other (``amqp://``, ``redis://``, whose queries hold options) as
    :func:`redact_url`."""
    return _shown_as(url, _masked_for_log)


def redact_url(url: str) -> str:
    """``url`` with its user info (a user name may be an API key) as ``***``."""
    return _shown_as(url, _without_user_info)


def mask_urls(text: str, form: Callable[[str], str] = url_for_log) -> str:
    """``text`` with every http(s) URL in it shown in ``form``."""
    if "://" not in text:
        return text
    return _URL_IN_TEXT.sub(lambda m: _shown(m.group(), form), text)


def _shown(url: str, form: Callable[[str], str]) -> str:
    kept = url.rstrip(_TRAILING)
    return form(kept) + url[len(kept) :]


def _shown_as(url: str, form: Callable[[SplitResult], SplitResult]) -> str:
    try:
        parts = urlsplit(url)
    except ValueError:
        return MASK
    return form(parts).geturl()


def _without_user_info(parts: SplitResult) -> SplitResult:
    if "@" not in parts.netloc:
        return parts
    return parts._replace(netloc=f"{MASK}@{parts.netloc.rsplit('@', 1)[1]}")


def _masked(parts: SplitResult) -> SplitResult:
    query = "&".join(
        f"{item.partition('=')[0]}={MASK}" if "=" in item else MASK if item else item
        for item in parts.query.split("&")
    )
    fragment = MASK if parts.fragment else ""
    return _without_user_info(parts)._replace(query=query, fragment=fragment)


def _masked_for_log(parts: SplitResult) -> SplitResult:
    if parts.scheme.lower() not in DEFAULT_PORTS:
        return _without_user_info(parts)
    path = "/".join(MASK if _IDENTIFIER.match(s) else s for s in parts.path.split("/"))
    return _masked(parts._replace(path=path))
