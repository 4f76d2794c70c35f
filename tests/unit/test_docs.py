"""The Sphinx docs (docs/): they build with warnings as errors, their
configuration reference describes every option ``--help`` has with the same
sentence, their HTTP reference every route the OpenAPI document has; and the
README stays a front page."""

from __future__ import annotations

import pickle
import re
import subprocess
import sys
from pathlib import Path

import pytest
from docutils import nodes
from sphinx import addnodes

from junebug_api.cli.openapi import OpenApiOptions
from junebug_api.config.model import JunebugConfig, load_config
from junebug_api.config.reference import file_sentence, reference_rows
from junebug_api.config.sources import sources
from junebug_api.http.openapi import document_for_config
from junebug_api.tap import Options

ROOT = Path(__file__).resolve().parents[2]
DOCS = ROOT / "docs"
README_MOST_LINES = 400


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The docs built from scratch, as ``./scripts/docs`` builds them; the
    doctrees are in ``<out>/doctrees``."""
    out = tmp_path_factory.mktemp("docs")
    warnings = out / "warnings.txt"
    run = subprocess.run(
        [
            *(sys.executable, "-m", "sphinx", "-W", "--keep-going", "-q", "-E", "-b", "html"),
            *("-d", str(out / "doctrees"), "-w", str(warnings), str(DOCS), str(out / "html")),
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    assert run.returncode == 0, run.stderr + warnings.read_text()
    assert warnings.read_text() == ""
    return out


def doctree(built: Path, page: str) -> nodes.document:
    with (built / "doctrees" / f"{page}.doctree").open("rb") as f:
        return pickle.load(f)


def flat(text: str) -> str:
    """Text with its whitespace runs as single spaces."""
    return " ".join(text.split())


def confval_nodes(built: Path, page: str) -> dict[str, addnodes.desc]:
    """Each ``confval`` on the page by its name."""
    return {
        desc.next_node(addnodes.desc_name).astext(): desc
        for desc in doctree(built, page).findall(addnodes.desc)
        if desc["objtype"] == "confval"
    }


def confvals(built: Path, page: str) -> dict[str, str]:
    """Each ``confval`` on the page: its name -> its entry's text."""
    return {name: flat(desc.astext()) for name, desc in confval_nodes(built, page).items()}


def sentence(desc: addnodes.desc) -> str:
    """The sentence of an option's entry: its first paragraph."""
    content = desc.next_node(addnodes.desc_content)
    return flat(next(c for c in content.children if isinstance(c, nodes.paragraph)).astext())


def test_the_docs_build_without_a_warning(built: Path) -> None:
    assert (built / "html" / "index.html").exists()
    assert (built / "html" / "configuration.html").exists()


def test_every_option_is_in_the_reference_with_everything_about_it(built: Path) -> None:
    entries = {**confvals(built, "configuration"), **confvals(built, "channels")}
    for row in reference_rows():
        entry = entries[row.name]
        assert flat(row.description) in entry, row.name
        assert f"Type {row.type}" in entry and f"Default {flat(row.default)}" in entry, row.name
        if row.accepts:
            assert flat(row.accepts) in entry, row.name
        if row.env:
            assert f"Environment {row.env}" in entry, row.name
    assert set(entries) == {row.name for row in reference_rows()}


def test_help_gives_every_option_the_docs_sentence(built: Path) -> None:
    descs = confval_nodes(built, "configuration")
    entries = {name: flat(desc.astext()) for name, desc in descs.items()}
    option_of = {s.name: s.leaf.dotted for s in sources(JunebugConfig)}
    helps = {name: text for name, _, _, text in Options.optParameters}
    config_help = helps.pop("config")
    assert flat(f"--config FILE (-c) on the command line: {config_help}") in flat(
        doctree(built, "configuration").astext()
    )
    assert set(helps) == {name.replace("_", "-") for name in option_of}
    for flag, text in helps.items():
        dotted = option_of[flag.replace("-", "_")]
        entry = entries[dotted]
        assert f"--{flag}" in entry, flag
        if flag.replace("-", "_") == dotted.replace(".", "_"):
            # the option's own flag: its sentence, then range and default
            assert flat(text).startswith(sentence(descs[dotted]) + " ["), flag
        else:  # its _file form
            assert text == file_sentence(dotted) and f"--{flag}): {text}" in entry, flag
    assert "Reads amqp.password from this file." in entries["amqp.password"]


def test_the_http_reference_has_every_route_of_the_document(built: Path) -> None:
    config = load_config(str(DOCS / "api-config.yaml"), environ={})
    document = document_for_config(config)
    page = doctree(built, "http-api")
    sections = list(page.findall(nodes.section))
    titles = {flat(section[0].astext()) for section in sections}
    ids = {i for section in sections for i in section["ids"]}
    operations = [
        (method, path, op)
        for path, item in document["paths"].items()
        for method, op in item.items()
        if isinstance(op, dict)
    ]
    assert len(operations) >= 8
    for method, path, op in operations:
        assert f"{method.upper()} {path}" in titles
        assert "http-op-" + op["operationId"].replace("_", "-") in ids
    for name in [*document["components"]["schemas"], *document["components"]["responses"]]:
        assert name in titles, name
    assert "401" in flat(page.astext())  # the config has credentials


def test_the_http_reference_is_what_junebug_api_openapi_prints() -> None:
    """The docs render the same document the command prints for that config."""
    options = OpenApiOptions()
    options.parseOptions(["--config", str(DOCS / "api-config.yaml")])
    assert document_for_config(options.config) == document_for_config(
        load_config(str(DOCS / "api-config.yaml"), environ={})
    )


def test_the_readme_is_a_front_page() -> None:
    readme = (ROOT / "README.rst").read_text(encoding="utf-8")
    assert len(readme.splitlines()) <= README_MOST_LINES
    for needed in ("./scripts/run", "./scripts/test", "./scripts/docs", "Layout\n------"):
        assert needed in readme, needed
    for page in DOCS.glob("*.rst"):  # its map of the docs names every page
        assert f"``{page.name}``" in readme or page.name == "index.rst", page.name


def test_the_readmes_layout_names_every_module() -> None:
    """README "Layout" maps the code: every module of junebug_api is in it,
    and every module it names exists."""
    readme = (ROOT / "README.rst").read_text(encoding="utf-8")
    layout = readme[readme.index("Layout\n------") :]
    modules = {
        str(path.relative_to(ROOT))
        for path in (ROOT / "junebug_api").rglob("*.py")
        if path.name != "__init__.py"
    }
    named = set(re.findall(r"``(junebug_api/[\w/]+\.py)``", layout))
    assert modules - named == set(), "README Layout: add these"
    assert named - modules == set(), "README Layout: these are gone"
