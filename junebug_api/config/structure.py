"""Values into the option model, with cattrs: YAML's typed values strictly,
and the text of environment variables and command-line options.

YAML already gives numbers, booleans, mappings and lists, so :data:`strict`
takes each only as its own type (``"20"`` is no integer there: a quoted
number in YAML is a mistake worth naming). Environment variables and
command-line options are text, so :data:`text` parses them (``20``, ``yes``,
``null``, JSON mappings, comma-separated lists). Both come from the fields'
types; what a value must be beyond its type is the field's checks (attrs
validators), run as cattrs builds the class. Any problem becomes one
:class:`ConfigError` line naming the option.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from typing import Any

import attrs
import cattrs
from cattrs.errors import ClassValidationError, ForbiddenExtraKeysError
from cattrs.gen import make_dict_structure_fn

from junebug_api.config.checks import ConfigError
from junebug_api.config.options import base_type


class Problem(Exception):
    """A value of the wrong type: the text after the option's name."""


def _strict_bool(value: Any, _hint: Any) -> bool:
    if isinstance(value, bool):
        return value
    raise Problem(f"must be true or false, got {value!r}")


def _strict_int(value: Any, _hint: Any) -> int:
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    raise Problem(f"must be an integer, got {value!r}")


def _strict_float(value: Any, _hint: Any) -> float:
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        raise Problem(f"must be a number, got {value!r}")
    try:
        number = float(value)
    except OverflowError:
        number = math.inf
    if not math.isfinite(number):
        raise Problem(f"must be a finite number, got {value!r}")
    return number


def _strict_str(value: Any, _hint: Any) -> str:
    if not isinstance(value, str):
        raise Problem(f"must be a string, got {value!r}")
    if "\x00" in value:
        raise Problem("must not contain NUL characters")
    return value


def _strict_dict(value: Any, _hint: Any) -> dict:
    if isinstance(value, dict):
        return value
    raise Problem(f"must be a mapping, got {value!r}")


def _strict_list(value: Any, _hint: Any) -> list:
    if isinstance(value, list):
        return value
    raise Problem(f"must be a list, got {value!r}")


def _path_or_false(value: Any, _hint: Any) -> str | bool:
    if value is False:
        return False
    if isinstance(value, str):
        return _strict_str(value, str)
    raise Problem(f"must be a path or false, got {value!r}")


_STRICT = {
    bool: _strict_bool,
    int: _strict_int,
    float: _strict_float,
    str: _strict_str,
    dict: _strict_dict,
    list: _strict_list,
    str | bool: _path_or_false,
}


def _not_null(hook: Any) -> Any:
    def structure(value: Any, hint: Any) -> Any:
        if value is None:
            raise Problem("must not be null")
        return hook(value, hint)

    return structure


def _block_factory(converter: cattrs.Converter) -> Any:
    """Structuring of a block of options (an attrs class): a mapping of its
    options, no other keys; null means every default."""

    def factory(cls: type) -> Any:
        build = make_dict_structure_fn(cls, converter, _cattrs_forbid_extra_keys=True)

        def structure(value: Any, hint: Any) -> Any:
            if value is None:
                value = {}
            if not isinstance(value, Mapping):
                raise Problem("must be a mapping")
            return build(value, hint)

        return structure

    return factory


def _converter(hooks: Mapping[Any, Any]) -> cattrs.Converter:
    converter = cattrs.Converter(detailed_validation=True, forbid_extra_keys=True)
    for hint, hook in hooks.items():
        converter.register_structure_hook(hint, _not_null(hook))
    converter.register_structure_hook_factory(attrs.has, _block_factory(converter))
    return converter


strict = _converter(_STRICT)
"""Typed values (YAML, JSON bodies, stored channels) into the option model."""


# -- text: environment variables and command-line options -------------------

_TRUE = {"true", "yes", "on", "1"}
_FALSE = {"false", "no", "off", "0"}
_NULL = {"", "null", "none"}


def _text_bool(text: str) -> bool:
    if text.strip().lower() in _TRUE:
        return True
    if text.strip().lower() in _FALSE:
        return False
    raise Problem(f"must be true or false, got {text!r}")


def _text_int(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise Problem(f"must be an integer, got {text!r}") from None


def _text_float(text: str) -> float:
    try:
        number = float(text)
    except ValueError:
        raise Problem(f"must be a number, got {text!r}") from None
    return _strict_float(number, float)


def _text_json(kind: Any) -> Any:
    def parse(text: str) -> Any:
        try:
            value = json.loads(text)
        except ValueError:
            raise Problem(f"must be JSON, got {text!r}") from None
        return _STRICT[kind](value, kind)

    return parse


def _text_list(text: str) -> list:
    """A JSON list, or items separated by commas."""
    if text.strip().startswith("["):
        return _text_json(list)(text)
    return [item.strip() for item in text.split(",") if item.strip()]


def _text_path_or_false(text: str) -> str | bool:
    return False if text.strip().lower() in _FALSE else _strict_str(text, str)


_TEXT = {
    bool: _text_bool,
    int: _text_int,
    float: _text_float,
    str: lambda text: _strict_str(text, str),
    dict: _text_json(dict),
    list: _text_list,
    str | bool: _text_path_or_false,
}


def from_text(name: str, hint: Any, text: str) -> Any:
    """An environment variable's or command-line option's ``text`` as a value
    of type ``hint``; ConfigError naming ``name`` (``AMQP_PORT``,
    ``--amqp-port``) if it is none. For an optional option other than text,
    ``null``, ``none`` or nothing means unset."""
    kind, optional = base_type(hint)
    try:
        if optional and kind is not str and text.strip().lower() in _NULL:
            return None
        return _TEXT[kind](text)
    except Problem as e:
        raise ConfigError(f"{name} {e}") from None


# -- one line per problem ----------------------------------------------------


def _attribute(error: BaseException) -> str | None:
    for note in getattr(error, "__notes__", ()):
        name = getattr(note, "name", None)
        if name is not None:
            return name
    return None


def _first(error: BaseException, path: tuple[str, ...]) -> tuple[tuple[str, ...], BaseException]:
    """The first problem in cattrs' tree of errors and the attributes leading
    to it; an unknown key first, as it is often the cause of the rest."""
    if not isinstance(error, ClassValidationError):
        return path, error
    errors = sorted(error.exceptions, key=lambda e: not isinstance(e, ForbiddenExtraKeysError))
    sub = errors[0]
    name = _attribute(sub)
    return _first(sub, path if name is None else (*path, name))


def one_line(error: BaseException, prefix: str = "") -> ConfigError:
    """cattrs' error (a tree of them) as one line naming the first option that
    is wrong, each name after ``prefix`` (``channels.a.``)."""
    path, leaf = _first(error, ())
    if isinstance(leaf, ConfigError):  # a check: it names its own option
        where = "".join(f"{p}." for p in path)
        return ConfigError(f"{prefix}{where}{leaf}")
    name = prefix + ".".join(path) if path else prefix.rstrip(".")
    if isinstance(leaf, ForbiddenExtraKeysError):
        key = sorted(map(str, leaf.extra_fields))[0]
        return ConfigError(f"unknown option {prefix}{''.join(f'{p}.' for p in path)}{key}")
    if isinstance(leaf, KeyError):
        return ConfigError(f"{name} is required")
    if isinstance(leaf, Problem):
        return ConfigError(f"{name or 'the config'} {leaf}")
    return ConfigError(f"{name or 'the config'} is invalid: {type(leaf).__name__}: {leaf}")


def build(cls: type, data: Any, prefix: str = "") -> Any:
    """``data`` (typed values) as an instance of ``cls``, or one ConfigError line."""
    try:
        return strict.structure(data, cls)
    except (ClassValidationError, ConfigError, Problem) as e:
        raise one_line(e, prefix) from None
