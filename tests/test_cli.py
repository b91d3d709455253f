"""The `facegen` command line itself: one parser built from facegen_dist/commands/, its help, version and forms."""

from __future__ import annotations

import subprocess
import sys

import pytest

from facegen_dist.cli import build_parser


def _facegen(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "facegen_dist.cli", *args], capture_output=True, text=True, timeout=120
    )


def test_bare_facegen_prints_every_command_and_exits_2():
    result = _facegen()
    assert result.returncode == 2
    for command in ("train", "submit", "launch", "data", "codes", "eval", "sample", "export", "latent", "report"):
        assert f"    {command}" in result.stderr


def test_version_and_help_name_facegen():
    version = _facegen("--version")
    assert version.returncode == 0 and version.stdout.startswith("facegen 0.")
    train_help = _facegen("train", "--help")
    assert train_help.returncode == 0 and train_help.stdout.startswith("usage: facegen train")
    assert "--print-config" in train_help.stdout


@pytest.mark.parametrize(
    "argv",
    [
        ["latent", "--run", "a", "--run", "b", "--out", "o"],
        ["latent", "--runs", "a", "b", "--out", "o"],
        ["report", "--run", "a", "--run", "b", "--out", "o"],
        ["report", "--runs", "a", "b", "--out", "o"],
    ],
)
def test_latent_and_report_take_several_runs_in_either_form(argv):
    parsed = build_parser()[0].parse_args(argv)
    assert (parsed.run if argv[0] == "latent" else parsed.runs) == ["a", "b"]
