"""CLI-wide checks: every subcommand has --help, start-up stays light, user errors exit 2."""

from __future__ import annotations

import subprocess
import sys

import pytest

from harness.cli import COMMANDS, _available_commands, main

AVAILABLE = [name for name, _ in _available_commands()]


def test_planned_subcommands_cover_the_issue_list() -> None:
    planned = {name for name, _ in COMMANDS}
    for name in ("synth", "show", "eval-pq", "eval-ap", "corrupt", "train", "eval", "predict", "convert",
                 "report", "demo", "doctor"):
        assert name in planned


@pytest.mark.parametrize("name", AVAILABLE)
def test_every_subcommand_has_help(name: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main([name, "--help"]) == 0  # main returns argparse's exit status instead of raising SystemExit
    out = capsys.readouterr().out
    assert out.startswith("usage: harness " + name)
    assert "--verbose" in out and "--quiet" in out


def test_top_level_help_lists_available_commands() -> None:
    out = subprocess.run([sys.executable, "-m", "harness", "--help"], capture_output=True, text=True, check=True).stdout
    for name in AVAILABLE:
        assert name in out


def test_no_command_is_a_usage_error() -> None:
    proc = subprocess.run([sys.executable, "-m", "harness"], capture_output=True, text=True)
    assert proc.returncode == 2


def test_cli_startup_does_not_import_torch() -> None:
    """Building the parser (all subcommands) must not import torch: that alone costs seconds."""
    code = "import sys; from harness.cli import build_parser; build_parser(); print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"
