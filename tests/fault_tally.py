"""The fault suite's tally (category -> [tried, held]), shared by tests/faults/conftest.py's ``record``
fixture and the hooks in tests/conftest.py that print it: the hooks live in the root conftest so the table
prints whether the run names tests/faults or the whole suite (under xdist the controller loads only the
root conftest)."""
from __future__ import annotations

from collections import defaultdict

TALLY: dict[str, list[int]] = defaultdict(lambda: [0, 0])
