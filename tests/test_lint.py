"""The checks that keep the house clean run with the tests (so in CI, through .ci/run): ruff with
the project's chosen rules over the package, tests, benchmarks and pipelines, and mypy over the
whole package with the project's config (both pinned in pyproject's dev extras)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def test_ruff_finds_nothing() -> None:
    res = subprocess.run([str(BIN / "ruff"), "check", "--no-cache", "wsi_mil", "tests", "benchmarks", "pipelines"],
                         cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout[-6000:] + res.stderr[-2000:]


def test_mypy_is_clean_on_the_package() -> None:
    res = subprocess.run([str(BIN / "mypy")], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0 and "Success" in res.stdout, res.stdout[-6000:] + res.stderr[-2000:]
