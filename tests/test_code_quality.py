"""The code keeps its own rules, checked with the tools the dev extra installs: ruff's lint and
format check (config in pyproject.toml), and import-linter's contracts (the layers, top to bottom,
and no import circles)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def run(tool: str, *args: str) -> subprocess.CompletedProcess:
    exe = Path(sys.executable).parent / tool
    found = str(exe) if exe.exists() else shutil.which(tool)
    assert found, f"{tool} is not installed: pip install -e '.[dev]'"
    return subprocess.run([found, *args], cwd=REPO, capture_output=True, text=True, timeout=300)


def test_ruff_finds_nothing():
    result = run("ruff", "check", "--no-cache", ".")
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_code_is_formatted():
    result = run("ruff", "format", "--check", "--no-cache", ".")
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_import_layers_hold_and_nothing_imports_in_a_circle():
    result = run("lint-imports", "--no-cache")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 broken" in result.stdout, result.stdout
