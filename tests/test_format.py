"""The tree is formatted by the project's one formatter configuration (pyproject.toml: ruff format, lines of
at most 120 characters), so a reader meets one style everywhere and a diff shows only what changed."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def ruff(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ruff", *args], cwd=ROOT, capture_output=True, text=True)


def test_every_python_file_is_formatted():
    proc = ruff("format", "--check", ".")
    assert proc.returncode == 0, f"run `python -m ruff format .`:\n{proc.stdout}{proc.stderr}"


def test_no_line_is_longer_than_120_characters():
    proc = ruff("check", "--output-format", "concise", ".")
    assert proc.returncode == 0, proc.stdout + proc.stderr
