"""Fixtures: a temporary run database and the real CLI in a subprocess."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from helpers import REPO, CliResult, engine_env


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    return tmp_path / "runs.db"


@pytest.fixture
def cli(tmp_path: Path, db_path: Path):
    """Run `python -m engine ...` for real; --db is added for every command that takes it."""

    def run(*args: str, timeout: float = 300, db: bool = True) -> CliResult:
        cmd = [sys.executable, "-m", "engine", *args]
        if db:
            cmd += ["--db", str(db_path)]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=REPO, env=engine_env(tmp_path))
        return CliResult(proc)

    return run
