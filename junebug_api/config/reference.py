"""The option reference, derived from the model: one row per option (for the
README's tables and the docs), the README's tables as reStructuredText, and
each command-line option's ``--help`` sentence.

README.rst holds the tables between ``.. begin generated: <name>`` and
``.. end generated: <name>`` comments; ``python -m junebug_api.config.reference
README.rst`` writes them there, and a unit test fails when the README's differ.
"""

from __future__ import annotations

import re
import sys
import textwrap
from typing import Any

import attrs

from junebug_api.config.channel_options import ChannelEntry, ChannelOptions
from junebug_api.config.model import JunebugConfig
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


# -- the README's tables ------------------------------------------------------

_NAMES = {row.name for row in reference_rows()}
# Option names of more than one word: single words (channels, type) are
# ordinary words too often.
_NAME = re.compile(r"(?<![\w.`<])([a-z][a-z0-9]*(?:[_.][a-z0-9]+)+)(?![\w`>])")


def _literals(text: str) -> str:
    """``text`` with every option name of several words in it as an RST literal."""
    return _NAME.sub(lambda m: f"``{m[1]}``" if m[1] in _NAMES else m[1], text)


def _meaning(row: Row) -> str:
    notes = [row.accepts] if row.accepts else []
    if row.secret == "yes":
        notes.append("secret")
    elif row.secret == "in the URL":
        notes.append("URL credentials masked")
    elif row.secret != "no":
        notes.append(f"secrets: {row.secret}")
    if row.channel.startswith("yes") and "channel id" in row.channel:
        notes.append("channel: its own, default the channel id")
    elif row.channel.startswith("yes"):
        notes.append("channel")
    if row.reload and row.channel != "only":
        notes.append("reload")
    suffix = f" [{'; '.join(notes)}]" if notes else ""
    return _literals(row.description) + suffix


def _table(rows: list[Row], widths: tuple[int, int, int], heads: tuple[str, ...]) -> str:
    border = "  ".join("=" * w for w in widths)
    lines = [
        border,
        "  ".join(h.ljust(w) for h, w in zip(heads, widths, strict=True)).rstrip(),
        border,
    ]
    for row in rows:
        cells = [
            [f"``{row.name}``"],
            textwrap.wrap(row.default, widths[1]),
            textwrap.wrap(_meaning(row), widths[2], break_on_hyphens=False),
        ]
        for i in range(max(len(c) for c in cells)):
            parts = [
                (c[i] if i < len(c) else "").ljust(w) for c, w in zip(cells, widths, strict=True)
            ]
            lines.append("  ".join(parts).rstrip())
    lines.append(border)
    return "\n".join(lines) + "\n"


def render_option_table() -> str:
    """The README's table of the top-level options."""
    rows = option_rows()
    width = max(len(r.name) for r in rows) + 4
    return _table(rows, (width, 26, 64), ("option", "default", "meaning"))


def render_channel_table() -> str:
    """The README's table of the options only a channel has."""
    rows = channel_rows()
    width = max(len(r.name) for r in rows) + 4
    return _table(rows, (width, 10, 72), ("option", "default", "meaning"))


TABLES = {"options": render_option_table, "channel options": render_channel_table}
"""The README's generated tables by the name in their markers."""


def _markers(name: str) -> tuple[str, str]:
    return f".. begin generated: {name}\n\n", f"\n.. end generated: {name}\n"


def generated_section(text: str, name: str) -> str:
    """What README ``text`` holds between the markers of table ``name``."""
    begin, end = _markers(name)
    start = text.index(begin) + len(begin)
    return text[start : text.index(end, start)]


def with_tables(text: str) -> str:
    """README ``text`` with every generated table as the model gives it now."""
    for name, render in TABLES.items():
        begin, end = _markers(name)
        start = text.index(begin) + len(begin)
        text = text[:start] + render() + text[text.index(end, start) :]
    return text


# -- --help -------------------------------------------------------------------


def help_texts() -> dict[str, str]:
    """Each command-line option's flat name -> its ``--help`` sentence."""
    texts = {}
    for source in sources(JunebugConfig):
        about = source.leaf.about
        if source.name.endswith("_file") and source.dotted != source.leaf.dotted:
            texts[source.name] = f"Reads {source.leaf.dotted} from this file."
            continue
        default = default_text(source.leaf.field, about)
        accepts = f"{about.text}; " if about.text else ""
        texts[source.name] = f"{about.description} [{accepts}default: {default}]"
    return texts


def main(argv: list[str]) -> None:
    """``python -m junebug_api.config.reference [README.rst]``: print the
    tables, or write them into the README."""
    if not argv:
        for render in TABLES.values():
            print(render())
        return
    with open(argv[0], encoding="utf-8") as f:
        text = f.read()
    with open(argv[0], "w", encoding="utf-8") as f:
        f.write(with_tables(text))


if __name__ == "__main__":  # pragma: no cover
    main(sys.argv[1:])
