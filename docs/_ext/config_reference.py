"""``.. config-reference::``: the configuration reference, generated from the
config model (:mod:`junebug_api.config.reference`) at build time.

``.. config-reference:: top`` renders every top-level option, in the model's
groups; ``.. config-reference:: channel`` the keys only a ``channels:`` entry
has. Each option is a ``confval`` (so ``:confval:`amqp_url``` links to it)
with its type, default, range, environment variable, command-line option,
whether it is secret and whether a channel may set it, and its sentence: the
one ``twistd junebug-api --help`` gives.
"""

from __future__ import annotations

import re
from typing import Any

from docutils import nodes
from docutils.nodes import Node
from sphinx import addnodes
from sphinx.application import Sphinx
from sphinx.transforms import SphinxTransform
from sphinx.util.docutils import SphinxDirective

from junebug_api.config.reference import (
    Row,
    channel_rows,
    file_sentence,
    option_groups,
    reference_rows,
)

_SPECIAL = re.compile(r"([\\*`|_\[\]<>])")
# Option names of more than one word: single words (channels, type) are
# ordinary words too often.
_NAME = re.compile(r"(?<![\w.`<])([a-z][a-z0-9]*(?:[_.][a-z0-9]+)+)(?![\w`>])")


def escaped(text: str) -> str:
    """``text`` as reStructuredText that shows exactly ``text``."""
    return _SPECIAL.sub(r"\\\1", text)


def linked(text: str, names: set[str]) -> str:
    """``text`` as reStructuredText, every option name in it a link to it."""
    parts = []
    last = 0
    for match in _NAME.finditer(text):
        if match[1] in names:
            parts += [escaped(text[last : match.start()]), f":confval:`{match[1]}`"]
            last = match.end()
    parts.append(escaped(text[last:]))
    return "".join(parts)


def literal(text: str) -> str:
    """``text`` as an inline literal."""
    return f"``{text}``" if text.strip() == text and "``" not in text else escaped(text)


def _secret(row: Row) -> str:
    return {
        "yes": "yes: masked wherever the config is shown, never logged",
        "in the URL": "the URL's credentials: masked wherever the URL is shown",
        "no": "no",
    }.get(row.secret, row.secret)


def _fields(row: Row) -> list[str]:
    flat = row.name.replace(".", "_")
    fields = []
    if row.accepts:
        fields.append(f":Accepts: {escaped(row.accepts)}")
    if row.env:
        fields.append(f":Environment: {literal(row.env)}")
        fields.append(f":Command line: {literal('--' + flat.replace('_', '-'))}")
    fields.append(f":Secret: {_secret(row)}")
    if row.channel != "only":
        fields.append(f":Per channel: {escaped(row.channel)}")
        reload = "applies a change" if row.reload else "needs a restart"
        fields.append(f":SIGHUP reload: {reload} (see :ref:`channels-at-runtime`)")
    if row.aliases:
        fields.append(f":Also: {', '.join(literal(a) for a in row.aliases)} (old Junebug's name)")
    if row.from_file:
        file_flags = ""
        if row.env:
            file_flags = f" (environment {literal(row.env + '_FILE')}, command line " + literal(
                "--" + flat.replace("_", "-") + "-file"
            )
            file_flags += ")"
        fields.append(f":From a file: {literal(row.name + '_file')}{file_flags}: ")
        fields[-1] += escaped(file_sentence(row.name))
    return fields


def option_entry(row: Row, names: set[str]) -> list[str]:
    """One option as a ``confval``."""
    lines = [
        f".. confval:: {row.name}",
        f"   :type: {escaped(row.type)}",
        f"   :default: {escaped(row.default) if ' ' in row.default else literal(row.default)}",
        "",
        f"   {linked(row.description, names)}",
        "",
    ]
    lines += [f"   {field}" for field in _fields(row)]
    return [*lines, ""]


class ConfigReference(SphinxDirective):
    """``.. config-reference:: top|channel``."""

    required_arguments = 1

    def run(self) -> list[Node]:
        names = {row.name for row in reference_rows()}
        lines: list[str] = []
        if self.arguments[0] == "top":
            for title, rows in option_groups():
                lines += [title, "~" * len(title), ""]
                for row in rows:
                    lines += option_entry(row, names)
        elif self.arguments[0] == "channel":
            for row in channel_rows():
                lines += option_entry(row, names)
        else:
            raise self.error(f"config-reference: top or channel, not {self.arguments[0]!r}")
        return self.parse_text_to_nodes("\n".join(lines), allow_section_headings=True)


_NO_LINKS = (nodes.title, nodes.reference, addnodes.desc_signature, addnodes.pending_xref)


def _in_title_or_link(node: nodes.Node) -> bool:
    """Whether ``node`` is in a title (copied into tables of contents, where
    no link is resolved), a signature or a link already."""
    parent = node.parent
    while parent is not None:
        if isinstance(parent, _NO_LINKS):
            return True
        parent = parent.parent
    return False


class LinkOptionNames(SphinxTransform):
    """Every inline literal that is an option's name of several words
    (````amqp_url````, ````amqp.port````) links to its entry, on every page."""

    default_priority = 500

    def apply(self, **kwargs: Any) -> None:
        names = {row.name for row in reference_rows() if _NAME.fullmatch(row.name)}
        for literal_node in list(self.document.findall(nodes.literal)):
            name = literal_node.astext()
            if name not in names or _in_title_or_link(literal_node):
                continue
            xref = addnodes.pending_xref(
                "", refdomain="std", reftype="confval", reftarget=name, refexplicit=True
            )
            xref += literal_node.deepcopy()
            literal_node.replace_self(xref)


def setup(app: Sphinx) -> dict[str, Any]:
    app.add_directive("config-reference", ConfigReference)
    app.add_transform(LinkOptionNames)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
