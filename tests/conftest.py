"""Fixtures: a temporary run database and the real CLI in a subprocess."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from fault_tally import TALLY
from helpers import REPO, CliResult, engine_env

from engine.store.rundb import RunDB


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    return tmp_path / "runs.db"


@pytest.fixture
def db(db_path: Path):
    """An empty run database (the real SQLite store); tests that need rows write them through it."""
    d = RunDB(db_path)
    yield d
    d.close()


@pytest.fixture
def form(qtbot, db, tmp_path):
    """The studio's run form on the ``db`` fixture's database (a run store that does not poll)."""
    from studio.models.run_store import RunStore
    from studio.views.run_form import RunForm

    f = RunForm(RunStore(db, start=False), tmp_path / "runs")
    qtbot.addWidget(f)
    return f


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


def pytest_collection_modifyitems(config, items):
    """The quick subset runs one case of each parametrized quick test (its first): the other cases
    repeat the same path on other inputs, and belong to the full suite."""
    for item in items:
        spec = getattr(item, "callspec", None)
        if spec is not None and any(i for i in spec.indices.values()):
            item.own_markers = [m for m in item.own_markers if m.name != "quick"]


# -- the fault suite's table (tests/faults records into fault_tally.TALLY) ------------------------------


def pytest_sessionfinish(session):
    """Under xdist (the default -n 2) each worker hands its tally to the controller, which prints the table."""
    out = getattr(session.config, "workeroutput", None)
    if out is not None:
        out["fault_tally"] = {category: list(counts) for category, counts in TALLY.items()}


@pytest.hookimpl(optionalhook=True)
def pytest_testnodedown(node, error):
    for category, (tried, held) in (getattr(node, "workeroutput", None) or {}).get("fault_tally", {}).items():
        TALLY[category][0] += tried
        TALLY[category][1] += held


def pytest_terminal_summary(terminalreporter):
    if not TALLY:
        return
    w = terminalreporter
    w.section("fault suite: what was tried and what held")
    w.write_line(f"{'category':64} {'tried':>6} {'held':>6}")
    for category, (tried, held) in TALLY.items():
        w.write_line(f"{category:64} {tried:>6} {held:>6}")
    tried = sum(t for t, _ in TALLY.values())
    held = sum(h for _, h in TALLY.values())
    w.write_line(f"{'all':64} {tried:>6} {held:>6}")
