"""The option model: what each option is, stated once, on its attrs field.

Every option is an attrs field made by :func:`option`, which keeps in the
field's metadata an :class:`Option`: its one-sentence description, its checks
(ranges, choices), whether it is a secret, its old Junebug aliases, whether a
SIGHUP reload applies it. Everything else is derived from these fields: the
structuring and validation (:mod:`junebug_api.config.structure`), the
environment and command-line names (:mod:`junebug_api.config.sources`),
``<option>_file`` and the masking of secrets (:mod:`junebug_api.config.secrets`),
channel entries and the channel API's bodies (:mod:`junebug_api.config.channels`,
:mod:`junebug_api.config.channel_api`), ``--help`` and the option reference
(:mod:`junebug_api.config.reference`).
"""

from __future__ import annotations

import functools
import types
import typing
from collections.abc import Iterator, Sequence
from typing import Any

import attrs

from junebug_api.config.checks import Check, HttpUrl

OPTION = "junebug_api.option"
"""The key of an option's :class:`Option` in its attrs field's metadata."""


@attrs.frozen
class Option:
    """What one option is, besides its name, type and default (the field's)."""

    #: One sentence on what it does (``--help`` and the docs' reference).
    description: str
    #: The checks of its value (attrs validators that describe themselves).
    checks: tuple[Check, ...] = ()
    #: Masked wherever the config is shown; ``<option>_file`` reads it from a file.
    secret: bool = False
    #: A URL, which may carry credentials: shown with them masked, and
    #: ``<option>_file`` reads it from a file.
    url: bool = False
    #: A list of values (``amqp_urls``): no ``<option>_file``.
    many: bool = False
    #: Old Junebug names a channel entry or an API body may use instead.
    aliases: tuple[str, ...] = ()
    #: Whether a SIGHUP reload applies a change (else it needs a restart).
    reload: bool = False
    #: Accepted, stored and shown but not acted on: why (a warning at start).
    ignored: str | None = None
    #: A channel API create body must give it.
    api_required: bool = False
    #: Shown by ``GET /channels/<id>`` (secrets never are).
    public: bool = True
    #: A free-form mapping whose keys naming a password, secret or token hold secrets.
    secret_names: bool = False
    #: For a mapping option: keys whose values are secrets (each with ``<key>_file``).
    secret_keys: tuple[str, ...] = ()
    #: For a mapping option: keys whose values are URLs (each with ``<key>_file``).
    url_keys: tuple[str, ...] = ()
    #: How the default reads in the reference when the value says too little.
    default_text: str | None = None
    #: For an option a channel may set: its default there, when that is not
    #: the top-level value.
    channel_default: str | None = None

    @property
    def from_file(self) -> bool:
        """Whether ``<option>_file`` may give it (secrets and URLs, when text)."""
        return (self.secret or self.url) and not self.many

    @property
    def text(self) -> str | None:
        """The accepted range or choices, or None."""
        texts = [c.text for c in self.checks if c.text]
        return "; ".join(texts) if texts else None

    def schema(self) -> dict[str, Any]:
        """JSON Schema keywords of its checks."""
        schema: dict[str, Any] = {}
        for check in self.checks:
            schema.update(check.schema())
        return schema


def option(
    default: Any = None,
    *,
    description: str,
    factory: Any = None,
    checks: Sequence[Check] = (),
    **meta: Any,
) -> Any:
    """An option's attrs field: its default (None unless given; ``attrs.NOTHING``
    for a required option) or ``factory``, its checks, and the rest of
    :class:`Option`. A secret or a URL is left out of ``repr``."""
    checks = tuple(checks)
    url = meta.pop("url", False) or any(isinstance(c, HttpUrl) for c in checks)
    about = Option(description=description, checks=checks, url=url, **meta)
    return attrs.field(
        default=default if factory is None else attrs.Factory(factory),
        validator=list(checks) or None,
        repr=not (about.secret or about.url),
        metadata={OPTION: about},
    )


def option_of(field: attrs.Attribute) -> Option | None:
    """The :class:`Option` of a field (None for a field that is no option)."""
    return field.metadata.get(OPTION)


@functools.cache
def options(cls: type) -> tuple[tuple[attrs.Attribute, Option, Any], ...]:
    """Each option field of ``cls`` with its :class:`Option` and resolved
    type, in order (read once per class: the classes do not change)."""
    hints = typing.get_type_hints(cls)
    return tuple(
        (field, option_of(field), hints[field.name])
        for field in attrs.fields(cls)
        if option_of(field) is not None
    )


def base_type(hint: Any) -> tuple[Any, bool]:
    """The type of a hint without None, and whether None is allowed
    (``str | None`` -> ``(str, True)``; ``str | bool`` stays as it is)."""
    if isinstance(hint, types.UnionType):
        args = [a for a in hint.__args__ if a is not type(None)]
        if len(args) == len(hint.__args__):
            return hint, False  # str | bool: a union of its own
        if len(args) == 1:
            return args[0], True
        return typing.Union[tuple(args)], True  # noqa: UP007 - rebuilt from parts
    return hint, False


@attrs.frozen
class Leaf:
    """One option as the sources name it: ``amqp.hostname`` is ``amqp_hostname``."""

    dotted: str
    field: attrs.Attribute
    about: Option
    hint: Any

    @property
    def name(self) -> str:
        """The flat name: the environment variable (upper-cased) and the
        command-line option (``-`` for ``_``)."""
        return self.dotted.replace(".", "_")


def leaves(cls: type, prefix: str = "") -> Iterator[Leaf]:
    """Every option of ``cls``, nested blocks (``amqp``) opened, in order."""
    for field, about, hint in options(cls):
        if attrs.has(hint):
            yield from leaves(hint, f"{prefix}{field.name}.")
        else:
            yield Leaf(f"{prefix}{field.name}", field, about, hint)
