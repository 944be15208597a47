"""The fault suite's tally: each check records (category, held); the table prints at the end of the run
(the hooks are in tests/conftest.py)."""
from __future__ import annotations

import pytest
from fault_tally import TALLY  # category -> [tried, held]; printed by tests/conftest.py


@pytest.fixture
def record():
    def note(category: str, held: bool) -> bool:
        TALLY[category][0] += 1
        TALLY[category][1] += int(bool(held))
        return held

    return note
