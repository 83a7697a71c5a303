"""Static checks that keep the tree readable: ruff on everything hand-written, mypy on the
services."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_ruff() -> None:
    result = subprocess.run([sys.executable, "-m", "ruff", "check", "services", "tests", "scripts",
                             "benchmarks", "clients/python/src/sglmesh/client.py"],
                            cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_mypy_on_the_services() -> None:
    """The services' annotations hold (pyproject's [tool.mypy]); ~75 s without a cache."""
    result = subprocess.run([sys.executable, "-m", "mypy", "services"], cwd=ROOT,
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
