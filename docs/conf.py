"""Sphinx configuration of junebug-api's docs (``./scripts/docs`` builds them).

Two local extensions in ``_ext`` generate the references from the code: the
configuration reference from the config model, the HTTP API from the OpenAPI
document. Only Sphinx itself and its default theme: nothing outside the lock.
"""

import sys
from pathlib import Path

import junebug_api

sys.path.insert(0, str(Path(__file__).parent / "_ext"))


project = "junebug-api"
author = "junebug-api's authors"
release = junebug_api.__version__
version = release
extensions = ["config_reference", "http_reference"]
exclude_patterns = ["_build"]
templates_path: list[str] = []
html_static_path: list[str] = []
html_title = f"junebug-api {release}"
highlight_language = "none"
nitpicky = True
# Quotes as typed: the reference shows each option's sentence exactly as
# ``--help`` does.
smartquotes = False
