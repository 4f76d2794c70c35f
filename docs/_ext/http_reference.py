"""``.. openapi-reference:: CONFIG``: the HTTP API reference, generated at
build time from the OpenAPI document that ``junebug-api-openapi --config
CONFIG`` prints (:func:`junebug_api.http.openapi.document_for_config`): each
route with its parameters, credentials, request body and every answer, then
the answers many routes share, the schemas and the security schemes.

CONFIG is a config file, relative to the page; its routes are the ones
rendered, so a config with ``channels:`` (and the channel API) shows them all.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from docutils.nodes import Node
from sphinx.application import Sphinx
from sphinx.util.docutils import SphinxDirective

from junebug_api.config.model import load_config
from junebug_api.http.openapi import document_for_config

_METHODS = ("get", "put", "post", "delete", "patch")
_SPECIAL = re.compile(r"([\\*|_\[\]<>])")
_CODE = re.compile(r"`([^`]+)`")


def rst(markdown: str) -> str:
    """The document's CommonMark text (code spans, plain words) as
    reStructuredText."""
    parts = []
    last = 0
    for match in _CODE.finditer(markdown):
        parts += [_SPECIAL.sub(r"\\\1", markdown[last : match.start()]), f"``{match[1]}``"]
        last = match.end()
    parts.append(_SPECIAL.sub(r"\\\1", markdown[last:]))
    return "".join(parts)


def indented(text: str, by: int) -> list[str]:
    """``text``'s lines, each indented ``by`` spaces (blank lines kept blank)."""
    pad = " " * by
    return [pad + line if line.strip() else "" for line in text.splitlines()]


def json_block(value: Any, by: int = 0) -> list[str]:
    """``value`` as a JSON code block."""
    pad = " " * by
    return [f"{pad}.. code-block:: json", "", *indented(json.dumps(value, indent=2), by + 3), ""]


def _ref_name(ref: str) -> str:
    return ref.rsplit("/", 1)[1]


def _anchor(kind: str, name: str) -> str:
    return f"http-{kind}-{name}".lower().replace("_", "-")


def heading(text: str, mark: str) -> list[str]:
    """A section title (the page's title style decides the level)."""
    return [text, mark * len(text), ""]


class Renderer:
    """The document as reStructuredText lines."""

    def __init__(self, document: dict[str, Any]) -> None:
        self.doc = document
        self.lines: list[str] = []

    def render(self) -> str:
        self.lines += [*indented(rst(self.doc["info"]["description"]), 0), ""]
        for path, item in self.doc["paths"].items():
            for method in _METHODS:
                if method in item:
                    self.operation(path, item, method)
        self.shared_answers()
        self.schemas()
        self.security()
        return "\n".join(self.lines)

    def operation(self, path: str, item: dict[str, Any], method: str) -> None:
        op = item[method]
        self.lines += [f".. _{_anchor('op', op['operationId'])}:", ""]
        self.lines += heading(f"{method.upper()} {path}", "-")
        self.lines += [f"**{rst(op['summary'])}**", "", rst(op["description"]), ""]
        self.lines += [rst(item["description"]), ""]
        self.credentials(op)
        parameters = item.get("parameters", []) + op.get("parameters", [])
        if parameters:
            self.lines += ["Parameters:", ""]
            for parameter in parameters:
                self.parameter(parameter)
            self.lines.append("")
        if "requestBody" in op:
            self.request_body(op["requestBody"])
        self.lines += ["Answers:", ""]
        for status, answer in op["responses"].items():
            self.answer(status, answer, 0)

    def credentials(self, op: dict[str, Any]) -> None:
        security = op.get("security")
        if not security:
            self.lines += ["Credentials: none (open).", ""]
            return
        schemes = [f":ref:`{name} <{_anchor('scheme', name)}>`" for s in security for name in s]
        self.lines += [f"Credentials: any of {', '.join(schemes)}.", ""]

    def parameter(self, parameter: dict[str, Any]) -> None:
        schema = parameter.get("schema", {})
        kind = schema.get("type", "any")
        details = [parameter["in"], "required" if parameter.get("required") else "optional", kind]
        details += [
            f"{key} ``{schema[key]}``" for key in ("pattern", "minimum", "maximum") if key in schema
        ]
        if "example" in parameter:
            details.append(f"for example ``{parameter['example']}``")
        self.lines.append(
            f"- ``{parameter['name']}`` ({', '.join(details)}): {rst(parameter['description'])}"
        )

    def request_body(self, body: dict[str, Any]) -> None:
        required = "required" if body.get("required") else "optional"
        self.lines += [f"Request body ({required}): {rst(body.get('description', ''))}", ""]
        for media, content in body["content"].items():
            self.lines += [f"- ``{media}``: {self.schema_text(content['schema'])}", ""]
            for name, example in content.get("examples", {}).items():
                self.lines += [f"  Example ``{name}``: {rst(example.get('summary', ''))}", ""]
                self.lines += json_block(example["value"], 2)

    def schema_text(self, schema: dict[str, Any]) -> str:
        if "$ref" in schema:
            name = _ref_name(schema["$ref"])
            return f"schema :ref:`{name} <{_anchor('schema', name)}>`"
        return "schema below"

    def answer(self, status: str, answer: dict[str, Any], by: int) -> None:
        pad = " " * by
        if "$ref" in answer:
            name = _ref_name(answer["$ref"])
            self.lines += [f"{pad}- ``{status}``: :ref:`{name} <{_anchor('answer', name)}>`", ""]
            return
        status_text = f"``{status}``: " if status else ""
        self.lines += [f"{pad}- {status_text}{rst(answer['description'])}", ""]
        for header, about in answer.get("headers", {}).items():
            if "$ref" in about:
                about = self.doc["components"]["headers"][_ref_name(about["$ref"])]
            self.lines += [f"{pad}  Header ``{header}``: {rst(about['description'])}", ""]
        for media, content in answer.get("content", {}).items():
            schema = content.get("schema", {})
            self.lines += [f"{pad}  ``{media}``, {self.schema_text(schema)}:", ""]
            if "$ref" not in schema:
                self.lines += json_block(schema, by + 2)
            if "example" in content:
                self.lines += [f"{pad}  Example:", ""]
                self.lines += json_block(content["example"], by + 2)

    def shared_answers(self) -> None:
        self.lines += heading("Answers many routes give", "-")
        for name, answer in self.doc["components"]["responses"].items():
            self.lines += [f".. _{_anchor('answer', name)}:", ""]
            self.lines += heading(name, "~")
            self.answer("", answer, 0)

    def schemas(self) -> None:
        self.lines += heading("Schemas", "-")
        for name, schema in self.doc["components"]["schemas"].items():
            self.lines += [f".. _{_anchor('schema', name)}:", ""]
            self.lines += heading(name, "~")
            self.lines += json_block(schema)

    def security(self) -> None:
        schemes = self.doc["components"]["securitySchemes"]
        if not schemes:
            return
        self.lines += heading("Security schemes", "-")
        for name, scheme in schemes.items():
            self.lines += [f".. _{_anchor('scheme', name)}:", ""]
            self.lines += [f"``{name}``: {rst(scheme['description'])}", ""]


class OpenApiReference(SphinxDirective):
    """``.. openapi-reference:: CONFIG``."""

    required_arguments = 1

    def run(self) -> list[Node]:
        source = Path(self.env.doc2path(self.env.docname)).parent / self.arguments[0]
        self.env.note_dependency(str(source))
        config = load_config(str(source), environ={})
        text = Renderer(document_for_config(config)).render()
        return self.parse_text_to_nodes(text, allow_section_headings=True)


def setup(app: Sphinx) -> dict[str, Any]:
    app.add_directive("openapi-reference", OpenApiReference)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
