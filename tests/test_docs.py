"""Docs that cannot drift: every command is documented in the README and has help with an example."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from hesscli.cli import app

README = (Path(__file__).resolve().parents[1] / "README.md").read_text()
COMMANDS = sorted(c.name or c.callback.__name__ for c in app.registered_commands)
runner = CliRunner()


def test_all_commands_are_registered():
    assert set(COMMANDS) == {"info", "trace", "eigs", "extremes", "density", "landscape", "scan", "plot"}


@pytest.mark.parametrize("command", COMMANDS)
def test_command_is_in_the_readme_and_has_help_with_an_example(command):
    assert f"hesscli {command}" in README
    result = runner.invoke(app, [command, "--help"])
    assert result.exit_code == 0, result.output
    assert "Example" in result.output and f"hesscli {command}" in result.output


@pytest.mark.parametrize("option", ["--data", "--model", "--model-arg", "--loss", "--batch-size", "--max-samples",
                                    "--curvature", "--params", "--backend", "--device", "--dtype", "--seed", "--out",
                                    "--config", "--trust-pickle", "--json", "--quiet", "--target-key", "--forward-arg",
                                    "--output", "--batchnorm"])
def test_common_options_are_documented_and_accepted(option):
    assert option in README
    result = runner.invoke(app, ["eigs", "--help"])
    assert option in result.output
