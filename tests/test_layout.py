"""Layout rules that no import contract can check: the studio reads the run database only through
engine.store.queries (no SQL text, no connection of its own)."""
from __future__ import annotations

import re

from helpers import REPO

# SQL statements, and the ways to reach the connection or the sqlite modules behind RunDB
SQL = re.compile(r"\b(select|insert|update|delete|create)\b.*\b(from|into|set|table|index)\b"
                 r"|\.execute(many)?\(|\.query\(|\bdb\.db\b|\.conn\b|\bsqlite", re.IGNORECASE)


def sql_lines(text: str) -> list[tuple[int, str]]:
    return [(i, line.strip()) for i, line in enumerate(text.splitlines(), 1) if SQL.search(line)]


def test_the_studio_holds_no_sql():
    found = [f"{path.relative_to(REPO)}:{i}: {line}"
             for path in sorted((REPO / "studio").glob("*.py")) for i, line in sql_lines(path.read_text(encoding="utf-8"))]
    assert not found, "SQL in the studio (add a function to engine/core/queries.py instead):\n" + "\n".join(found)


def test_the_scan_finds_what_it_should():
    assert sql_lines('x = 1\nrows = conn.execute(\n  "SELECT run_id FROM evaluations")\nself.db.db.conn\n') == [
        (2, "rows = conn.execute("), (3, '"SELECT run_id FROM evaluations")'), (4, "self.db.db.conn")]
    assert sql_lines('label = "Pick a run to delete"\nbutton.clicked.connect(f)\n') == []
