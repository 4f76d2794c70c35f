"""The three sources of options, later wins: a YAML file, environment
variables, command-line options.

The names come from the model (:func:`junebug_api.config.options.leaves`):
an option's flat name is its dotted name with ``_`` for ``.``
(``amqp.hostname`` -> ``amqp_hostname``); the environment variable is that
name upper-cased, after ``<VUMI_CONFIG_PREFIX>_`` when that is set (vumi2's
names: ``AMQP_HOSTNAME``); the command-line option is ``--amqp-hostname``.
An option that may come from a file also has ``<name>_file``.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

import attrs
import yaml

from junebug_api.config.checks import ConfigError
from junebug_api.config.options import Leaf, leaves
from junebug_api.config.structure import from_text


@attrs.frozen
class Source:
    """One name the environment and the command line know: an option, or
    the ``_file`` form of one."""

    dotted: str
    name: str
    hint: Any
    leaf: Leaf


def sources(cls: type) -> Iterator[Source]:
    """Every flat name of the options of ``cls``, with what a value becomes."""
    for leaf in leaves(cls):
        yield Source(leaf.dotted, leaf.name, leaf.hint, leaf)
        if leaf.about.from_file:
            yield Source(f"{leaf.dotted}_file", f"{leaf.name}_file", str | None, leaf)


def environment_name(name: str, environ: Mapping[str, str]) -> str:
    """The environment variable of flat option ``name``."""
    prefix = environ.get("VUMI_CONFIG_PREFIX", "")
    return "_".join(p for p in (prefix, name) if p).upper()


def _nest(flat: Mapping[str, Any]) -> dict[str, Any]:
    nested: dict[str, Any] = {}
    for dotted, value in flat.items():
        head, _, tail = dotted.partition(".")
        if tail:
            nested.setdefault(head, {})[tail] = value
        else:
            nested[head] = value
    return nested


def options_from_environment(environ: Mapping[str, str], cls: type) -> dict[str, Any]:
    """Options set by environment variables, named as vumi2 names them."""
    flat = {}
    for source in sources(cls):
        key = environment_name(source.name, environ)
        if key in environ:
            flat[source.dotted] = from_text(key, source.hint, environ[key])
    return _nest(flat)


def options_from_cli(values: Mapping[str, str | None], cls: type) -> dict[str, Any]:
    """Options given on the command line, keyed by their flat names (``a_b``)."""
    flat = {}
    for source in sources(cls):
        text = values.get(source.name)
        if text is not None:
            flag = "--" + source.name.replace("_", "-")
            flat[source.dotted] = from_text(flag, source.hint, text)
    return _nest(flat)


def merge(base: Mapping[str, Any], extra: Mapping[str, Any]) -> dict[str, Any]:
    """``extra`` over ``base``; nested mappings merge key by key."""
    result = dict(base)
    for key, value in extra.items():
        if isinstance(value, Mapping) and isinstance(result.get(key), Mapping):
            result[key] = merge(result[key], value)
        else:
            result[key] = value
    return result


def read_yaml_file(path: str) -> dict[str, Any]:
    """The mapping in a YAML config file; an empty file is an empty config."""
    try:
        with open(path, encoding="utf-8") as f:
            data = yaml.safe_load(f)
    except OSError as e:
        raise ConfigError(f"cannot read config file {path}: {e.strerror}") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark is not None else ""
        problem = getattr(e, "problem", None) or "invalid YAML"
        raise ConfigError(f"config file {path}{where}: {problem}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping of options")
    return data


def gather(
    cls: type,
    path: str | None,
    environ: Mapping[str, str],
    cli: Mapping[str, str | None],
) -> dict[str, Any]:
    """The options of the three sources, merged: the file (``path``, else
    ``$VUMI_CONFIG_FILE``), then the environment, then the command line."""
    if path is None:
        path = environ.get("VUMI_CONFIG_FILE") or None
    data = read_yaml_file(path) if path else {}
    data = merge(data, options_from_environment(environ, cls))
    return merge(data, options_from_cli(cli, cls))
