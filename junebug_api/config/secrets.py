"""Secrets: ``<option>_file``, and secrets inside free-form mappings.

Every option marked ``secret`` or ``url`` (:class:`~junebug_api.config.options.Option`)
may be given as ``<option>_file``: the path of a file holding the value (a
container secret), its trailing newline stripped. Setting both is an error,
as is a file that is no regular file (a FIFO would block the start for ever)
or one larger than :data:`SECRET_FILE_LIMIT`. A mapping option names its own
secret keys (``state_cache_config``: ``url``, ``password``,
``sentinel_password``), which take ``<key>_file`` the same way.

In a channel's transport ``config`` (free-form, old Junebug's), the values of
keys naming a password, secret or token, at any depth, are secrets:
:func:`masked` hides them, :func:`secret_leaves` lists them for the redactor.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any
from urllib.parse import quote, urlsplit

import attrs

from junebug_api.config.checks import ConfigError, read_regular_file
from junebug_api.config.options import Option, options
from junebug_api.config.urls import url_secrets
from junebug_api.formats.urls import url_for_log

SECRET_FILE_LIMIT = 65536
"""The largest secret file read, in bytes: a token, a password, a URL or a
DSN is far smaller; a bigger file is a wrong path."""

DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"

MASK = "***"


def read_secret_file(name: str, path: Any) -> str:
    """The secret in the file at ``path`` for option ``name`` (``..._file``)."""
    data = read_regular_file(name, path, SECRET_FILE_LIMIT)
    try:
        return data.decode("utf-8").rstrip("\r\n")
    except UnicodeDecodeError:
        raise ConfigError(f"{name}: {path!r} is not UTF-8 text") from None


def _read_into(holder: dict, key: str, where: str) -> bool:
    """``holder[key]`` from the file ``holder[key + "_file"]`` names, if it
    names one; whether it did."""
    if f"{key}_file" not in holder:
        return False
    path = holder.pop(f"{key}_file")
    if path is None:  # null: unset, as for any optional option
        return False
    if holder.get(key) is not None:
        raise ConfigError(f"set {where}{key} or {where}{key}_file, not both")
    holder[key] = read_secret_file(f"{where}{key}_file", path)
    return True


def read_secret_files(data: Mapping[str, Any], cls: type, where: str = "") -> dict[str, Any]:
    """``data`` (the options of ``cls``) with every ``<secret>_file`` read into
    ``<secret>``, in nested blocks (``amqp.password_file``) and in the
    secret keys of mapping options too."""
    data = dict(data)
    for field, about, hint in options(cls):
        value = data.get(field.name)
        if attrs.has(hint):
            if isinstance(value, Mapping):
                data[field.name] = read_secret_files(value, hint, f"{where}{field.name}.")
        elif about.from_file:
            _read_into(data, field.name, where)
        elif isinstance(value, Mapping) and (about.secret_keys or about.url_keys):
            data[field.name] = _read_keys(value, about.secret_keys + about.url_keys, field.name)
    return data


def _read_keys(mapping: Mapping[str, Any], keys: tuple[str, ...], name: str) -> dict[str, Any]:
    """A mapping option's secret keys read from their files; a ``password``
    read so goes into its ``url`` (percent-encoded), whose password it is."""
    mapping = dict(mapping)
    found = [key for key in keys if f"{key}_file" in mapping]
    if not found:
        return mapping
    for key in keys:
        if mapping.get(f"{key}_file") is not None and key in mapping:
            raise ConfigError(f"set {name}.{key} or {name}.{key}_file, not both")
        _read_into(mapping, key, f"{name}.")
    if "password" in mapping and "url" in keys:
        mapping["url"] = _with_password(mapping.get("url", DEFAULT_REDIS_URL), mapping["password"])
        del mapping["password"]
    return mapping


def _with_password(url: Any, password: Any) -> Any:
    """``url`` with ``password`` as its password (percent-encoded)."""
    if not isinstance(url, str) or not isinstance(password, str):
        return url  # the cache's own check names the wrong type
    parts = urlsplit(url)
    user = parts.username or ""
    host = parts.netloc.rsplit("@", 1)[-1]
    return parts._replace(netloc=f"{user}:{quote(password, safe='')}@{host}").geturl()


# -- secrets inside free-form mappings (a channel's transport config) -------

_SECRET_KEY = re.compile("password|secret|token", re.IGNORECASE)


def is_secret_key(key: Any) -> bool:
    """Whether a key of a free-form mapping names a secret."""
    return isinstance(key, str) and _SECRET_KEY.search(key) is not None


def masked(value: Any) -> Any:
    """``value`` with the value of every secret key (at any depth) as ``***``."""
    if isinstance(value, Mapping):
        return {
            k: (MASK if is_secret_key(k) and v is not None else masked(v)) for k, v in value.items()
        }
    if isinstance(value, (list, tuple)):
        return [masked(v) for v in value]
    return value


def secret_leaves(value: Any, secret: bool = False) -> list[str]:
    """The secret values (as text) inside ``value``: everything under a
    secret key, at any depth."""
    if isinstance(value, Mapping):
        return [
            leaf for k, v in value.items() for leaf in secret_leaves(v, secret or is_secret_key(k))
        ]
    if isinstance(value, (list, tuple)):
        return [leaf for v in value for leaf in secret_leaves(v, secret)]
    if secret and value is not None and not isinstance(value, bool):
        return [str(value)]
    return []


# -- how an option's value is shown, and the secrets it holds ---------------


def shown(about: Option, value: Any) -> Any:
    """``value`` of an option as the config echo and the API show it: a
    secret as ``***``, a URL with its credentials masked, the secrets inside
    a mapping masked."""
    if value is None:
        return None
    if about.secret:
        return MASK if value else value
    if about.url:
        return [_shown_url(v) for v in value] if about.many else _shown_url(value)
    if about.secret_names:
        return masked(value)
    if (about.secret_keys or about.url_keys) and isinstance(value, Mapping):
        return {
            k: _shown_url(v) if k in about.url_keys else (MASK if k in about.secret_keys else v)
            for k, v in value.items()
        }
    return value


def _shown_url(value: Any) -> Any:
    # The config echo is a log line: a URL as log lines show it.
    return url_for_log(value) if isinstance(value, str) and value else value


def held_secrets(about: Option, value: Any) -> list[str]:
    """The secret texts an option's ``value`` holds: a secret itself (and,
    for a URL such as Sentry's DSN, its user name and password), the
    password of a URL, the secrets inside a mapping."""
    if value is None:
        return []
    if about.secret:
        text = str(value)
        return [text, *_url_userinfo(text)]
    if about.url:
        return [s for v in (value if about.many else [value]) for s in _url_password(v)]
    if about.secret_names:
        return secret_leaves(value)
    if isinstance(value, Mapping):
        found = [str(value[k]) for k in about.secret_keys if value.get(k) is not None]
        return found + [s for k in about.url_keys for s in _url_password(value.get(k))]
    return []


def _url_password(value: Any) -> list[str]:
    return url_secrets(value) if isinstance(value, str) else []


def _url_userinfo(text: str) -> list[str]:
    if "://" not in text:
        return []
    try:
        user = urlsplit(text.strip()).username
    except ValueError:
        return []
    return [user, *url_secrets(text.strip())] if user else url_secrets(text.strip())
