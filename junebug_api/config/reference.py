"""The option reference, derived from the model: one row per option (the
docs' configuration reference, built by ``docs/_ext/config_reference.py``),
grouped as the model groups them, and each command-line option's ``--help``
sentence (the row's description, so ``--help`` and the docs say the same).
"""

from __future__ import annotations

from typing import Any

import attrs

from junebug_api.config.amqp_options import AmqpOptions
from junebug_api.config.channel_options import ChannelEntry, ChannelOptions
from junebug_api.config.delivery_options import DeliveryOptions
from junebug_api.config.http_options import HttpOptions
from junebug_api.config.model import JunebugConfig
from junebug_api.config.operations_options import OperationsOptions
from junebug_api.config.options import Leaf, Option, base_type, leaves
from junebug_api.config.sources import sources

_TYPES = {str: "text", int: "integer", float: "number", bool: "boolean", dict: "mapping"}
_TYPES[list] = "list"


@attrs.frozen
class Row:
    """One option as the reference shows it."""

    name: str
    type: str
    default: str
    accepts: str | None
    env: str | None
    secret: str
    channel: str
    reload: bool
    description: str
    #: Whether ``<name>_file`` may give it instead (secrets and URLs).
    from_file: bool = False
    #: Old Junebug names a channel entry may use instead.
    aliases: tuple[str, ...] = ()


def type_text(hint: Any) -> str:
    """``int | None`` -> ``integer or null``."""
    kind, optional = base_type(hint)
    kinds = getattr(kind, "__args__", (kind,))
    text = " or ".join("false" if k is bool and len(kinds) > 1 else _TYPES[k] for k in kinds)
    return f"{text} or null" if optional else text


def default_text(field: attrs.Attribute, about: Option) -> str:
    """The default as the reference shows it."""
    if about.default_text is not None:
        return about.default_text
    default = field.default
    if default is attrs.NOTHING:
        return "required"
    if isinstance(default, attrs.Factory):  # type: ignore[arg-type]
        default = default.factory()
    if default is None:
        return "none"
    if isinstance(default, bool):
        return str(default).lower()
    if isinstance(default, float) and default.is_integer():
        return str(int(default))
    if default == "":
        return '""'
    return str(default)


def _secret_text(about: Option) -> str:
    if about.secret:
        return "yes"
    if about.url:
        return "in the URL"
    if about.secret_keys or about.url_keys:
        return "its keys " + ", ".join(about.url_keys + about.secret_keys)
    return "keys naming a password, secret or token" if about.secret_names else "no"


_CHANNEL_OPTIONS = {field.name for field in attrs.fields(ChannelOptions)}


def _channel_text(leaf: Leaf) -> str:
    if leaf.dotted not in _CHANNEL_OPTIONS:
        return "no"
    return f"yes (default: {leaf.about.channel_default or 'the top-level value'})"


def _row(leaf: Leaf, env: str | None, channel: str) -> Row:
    return Row(
        name=leaf.dotted,
        type=type_text(leaf.hint),
        default=default_text(leaf.field, leaf.about),
        accepts=leaf.about.text,
        env=env,
        secret=_secret_text(leaf.about),
        channel=channel,
        reload=leaf.about.reload,
        description=leaf.about.description,
        from_file=leaf.about.from_file,
        aliases=leaf.about.aliases,
    )


def option_rows() -> list[Row]:
    """Every top-level option (nested ones dotted: ``amqp.hostname``)."""
    return [_row(leaf, leaf.name.upper(), _channel_text(leaf)) for leaf in leaves(JunebugConfig)]


def channel_rows() -> list[Row]:
    """The options only a channel entry (or a channel API body) has."""
    return [
        _row(leaf, None, "only")
        for leaf in leaves(ChannelEntry)
        if leaf.dotted not in _CHANNEL_OPTIONS
    ]


def reference_rows() -> list[Row]:
    """Every option, top-level then channel-only: the docs' reference."""
    return option_rows() + channel_rows()


#: The model's groups of top-level options, in the model's order, each with
#: the title the reference gives it.
GROUPS = (
    ("Channel options (each channel's own, or every channel's default)", ChannelOptions),
    ("HTTP, channels and the channel API", HttpOptions),
    ("Delivery and the state cache", DeliveryOptions),
    ("AMQP", AmqpOptions),
    ("Logs, Sentry, metrics and health", OperationsOptions),
)


def option_groups() -> list[tuple[str, list[Row]]]:
    """The top-level options' rows by group (see :data:`GROUPS`)."""
    rows = option_rows()
    groups = []
    for title, cls in GROUPS:
        names = set(attrs.fields_dict(cls))
        groups.append((title, [r for r in rows if r.name.partition(".")[0] in names]))
    return groups


def file_sentence(dotted: str) -> str:
    """The sentence of ``<option>_file``."""
    return f"Reads {dotted} from this file."


def help_texts() -> dict[str, str]:
    """Each command-line option's flat name -> its ``--help`` text: the
    option's sentence, then its range and default in brackets."""
    texts = {}
    for source in sources(JunebugConfig):
        about = source.leaf.about
        if source.name.endswith("_file") and source.dotted != source.leaf.dotted:
            texts[source.name] = file_sentence(source.leaf.dotted)
            continue
        default = default_text(source.leaf.field, about)
        accepts = f"{about.text}; " if about.text else ""
        texts[source.name] = f"{about.description} [{accepts}default: {default}]"
    return texts
