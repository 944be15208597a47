"""The fault suite's tally: each check records (category, held); the table prints at the end of the run."""
from __future__ import annotations

from collections import defaultdict

import pytest

TALLY: dict[str, list[int]] = defaultdict(lambda: [0, 0])  # category -> [tried, held]


@pytest.fixture
def record():
    def note(category: str, held: bool) -> bool:
        TALLY[category][0] += 1
        TALLY[category][1] += int(bool(held))
        return held

    return note


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
    w.write_line(f"{'category':58} {'tried':>6} {'held':>6}")
    for category, (tried, held) in TALLY.items():
        w.write_line(f"{category:58} {tried:>6} {held:>6}")
    tried = sum(t for t, _ in TALLY.values())
    held = sum(h for _, h in TALLY.values())
    w.write_line(f"{'all':58} {tried:>6} {held:>6}")
