"""Layout rules that no import contract can check.

One store: SQL text, the SQLite connection and the sqlite modules appear only in engine/store/ (the
engine and the studio read and write the run database through its functions and RunDB's methods).
"""
from __future__ import annotations

import re
from pathlib import Path

from helpers import REPO

SCANNED = ("engine", "studio")  # the product's code; tests and benchmarks may reach into the database
STORE = REPO / "engine" / "store"

# SQL statements, and the ways to reach the connection or the sqlite modules behind RunDB (a docstring
# may say "SQLite"; an import or an attribute of the module is what counts)
SQL = re.compile(r"\b(select|insert|update|delete|create)\b.*\b(from|into|set|table|index)\b"
                 r"|\.execute(many)?\(|\.query\(|\bdb\.db\b|\.conn\b"
                 r"|^\s*(import|from)\s+sqlite|\bsqlite(3|_utils)\.", re.IGNORECASE)

# files outside the store that still hold SQL, each waiting for its owner's fix; an entry whose file is
# clean fails the test, so the list only shrinks
SQL_PENDING = {
    "engine/cli/commands.py": "catches sqlite3.DatabaseError: catch engine.store.DatabaseError instead",
}


def product_files() -> list[Path]:
    return [p for root in SCANNED for p in sorted((REPO / root).rglob("*.py"))]


def rel(path: Path) -> str:
    return path.relative_to(REPO).as_posix()


def sql_lines(text: str) -> list[tuple[int, str]]:
    return [(i, line.strip()) for i, line in enumerate(text.splitlines(), 1) if SQL.search(line)]


def test_only_the_store_holds_sql():
    hits: dict[str, list[str]] = {}
    for path in product_files():
        if STORE not in path.parents:
            for i, line in sql_lines(path.read_text(encoding="utf-8")):
                hits.setdefault(rel(path), []).append(f"{rel(path)}:{i}: {line}")
    found = [h for path, lines in hits.items() if path not in SQL_PENDING for h in lines]
    assert not found, ("SQL outside engine/store (add a function to engine/store/queries.py or a RunDB "
                       "method instead):\n" + "\n".join(found))
    stale = [path for path in SQL_PENDING if path not in hits]
    assert not stale, f"no SQL left in {stale}: remove them from SQL_PENDING"


def test_the_sql_scan_finds_what_it_should():
    assert sql_lines('x = 1\nrows = conn.execute(\n  "SELECT run_id FROM evaluations")\nself.db.db.conn\n') == [
        (2, "rows = conn.execute("), (3, '"SELECT run_id FROM evaluations")'), (4, "self.db.db.conn")]
    assert sql_lines("import sqlite3\nfrom sqlite_utils import Database\nexcept sqlite3.DatabaseError:\n") == [
        (1, "import sqlite3"), (2, "from sqlite_utils import Database"), (3, "except sqlite3.DatabaseError:")]
    assert sql_lines('label = "Pick a run to delete"\nbutton.clicked.connect(f)\n"""reads SQLite."""\n') == []
