"""``junebug-api-openapi``: the OpenAPI document of what ``twistd junebug-api``
serves with a config, printed without starting anything.

``junebug-api-openapi --config FILE [--OPTION VALUE ...]`` loads the config
exactly as ``twistd junebug-api`` does (the same options, file, environment
and checks; a config problem is one line and exit status 1) and prints the
document ``GET <openapi_path>`` would answer, as indented JSON: for client
generation in a build, with no broker, Redis or reactor.
"""

from __future__ import annotations

import json
import sys

from twisted.python import usage

from junebug_api.http.openapi import document_for_config
from junebug_api.tap import Options

PROG = "junebug-api-openapi"


class OpenApiOptions(Options):
    """twistd's options, for a command of its own."""

    def getSynopsis(self) -> str:
        return f"Usage: {PROG} {self.synopsis}"


def main(argv: list[str] | None = None) -> None:
    """The console script."""
    options = OpenApiOptions()
    try:
        options.parseOptions(sys.argv[1:] if argv is None else argv)
    except usage.UsageError as e:
        sys.stderr.write(f"{PROG}: {e}\n")
        raise SystemExit(2) from None
    document = document_for_config(options.config)
    sys.stdout.write(json.dumps(document, indent=2, ensure_ascii=False) + "\n")
