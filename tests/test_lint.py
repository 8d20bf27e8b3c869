"""ruff and mypy stay clean: part of the test command, so CI and developers run them."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", *args], cwd=ROOT, capture_output=True, text=True, timeout=600
    )


def test_ruff() -> None:
    done = _run("ruff", "check", "proxy", "tests", "loadtests")
    assert done.returncode == 0, done.stdout + done.stderr
    done = _run("ruff", "format", "--check", "proxy", "tests", "loadtests")
    assert done.returncode == 0, done.stdout + done.stderr


def test_mypy() -> None:
    done = _run("mypy")
    assert done.returncode == 0, done.stdout + done.stderr
