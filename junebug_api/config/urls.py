"""What every URL option must be: parseable, a port from 1 to 65535, valid
percent-escapes; and the password a URL holds. How a URL is shown is
:mod:`junebug_api.formats.urls`.

A problem is returned as the text that follows the option's name
(``"has an invalid port"``) and never repeats the URL: it may hold a password.
"""

from __future__ import annotations

import re
from urllib.parse import unquote, urlsplit

_BAD_ESCAPE = re.compile(r"%(?![0-9A-Fa-f]{2})")


def url_problem(url: str) -> str | None:
    """What is wrong with ``url`` whatever its scheme, or None: spaces or
    control characters, no URL, a port out of 1-65535 (port 0 would be taken
    for the scheme's default), a ``%`` not followed by two hex digits, or
    credentials whose escapes are no UTF-8 (a password that can never match)."""
    if any(c.isspace() or ord(c) < 32 or ord(c) == 127 for c in url):
        return "must not contain spaces or control characters"
    try:
        parts = urlsplit(url)
    except ValueError as e:
        return f"is not a valid URL: {e}"
    try:
        port = parts.port
    except ValueError:
        port = 0
    if port == 0:
        return "has an invalid port (it must be a number from 1 to 65535)"
    if _BAD_ESCAPE.search(url):
        return "has an invalid percent-escape (a '%' not followed by two hex digits)"
    try:
        for part in (parts.username, parts.password):
            if part:
                unquote(part, errors="strict")
    except UnicodeDecodeError:
        return "has credentials whose percent-escapes are not UTF-8"
    return None


def http_url_problem(url: str) -> str | None:
    """An http(s) URL with a host and nothing that would be dropped (a
    ``#fragment`` is never sent)."""
    problem = url_problem(url)
    if problem is not None:
        return problem
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        return "must be an http:// or https:// URL"
    if parts.fragment or url.endswith("#"):
        return "must not have a #fragment (it is never sent)"
    return None


def url_secrets(url: str) -> list[str]:
    """The password in ``url``, as written and decoded (for the log redactor)."""
    try:
        password = urlsplit(url).password
    except ValueError:
        return []
    if not password:
        return []
    return [password, unquote(password)]
