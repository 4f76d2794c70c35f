"""``junebug-api-openapi``: the document for a config, without starting anything;
config problems as twistd reports them."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from openapi_spec_validator import validate

from junebug_api.cli import openapi as cli

CONFIG = """\
connector_name: conn
mo_message_url: http://rapidpro.example/in
http_bind: 127.0.0.1:0
base_url_path: /junebug
api_auth_token: cli-secret-token
"""


def test_prints_the_document_of_the_config(tmp_path: Path, capsys: Any) -> None:
    path = tmp_path / "config.yaml"
    path.write_text(CONFIG)
    cli.main(["--config", str(path), "--metrics-enabled", "false"])
    out = capsys.readouterr().out
    document = json.loads(out)
    validate(document)
    assert "/junebug/messages" in document["paths"]
    assert "/metrics" not in document["paths"]  # the command line overrides the file
    assert set(document["components"]["securitySchemes"]) == {"token"}
    assert "cli-secret-token" not in out


def test_the_environment_counts_as_for_twistd(
    tmp_path: Path, capsys: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "config.yaml"
    path.write_text(CONFIG)
    monkeypatch.setenv("VUMI_CONFIG_FILE", str(path))
    monkeypatch.setenv("BASE_URL_PATH", "/from-env")
    cli.main([])
    assert "/from-env/messages" in json.loads(capsys.readouterr().out)["paths"]


def test_a_bad_config_is_one_line_and_status_1(tmp_path: Path, capsys: Any) -> None:
    path = tmp_path / "config.yaml"
    path.write_text(CONFIG + "request_timeout: soon\n")
    with pytest.raises(SystemExit) as exit:
        cli.main(["--config", str(path)])
    assert exit.value.code == 1
    out, err = capsys.readouterr()
    assert out == ""
    assert err.count("\n") == 1
    assert err.startswith("junebug-api: config error: request_timeout")


def test_an_unknown_option_is_status_2(capsys: Any) -> None:
    with pytest.raises(SystemExit) as exit:
        cli.main(["--no-such-option"])
    assert exit.value.code == 2
    assert (
        capsys.readouterr().err == "junebug-api-openapi: option --no-such-option not recognized\n"
    )
