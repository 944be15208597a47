"""What every command shares: opening the run database and printing JSON (bad input: engine.core.errors)."""
from __future__ import annotations

import json
import sys

from engine.core.paths import default_db_path
from engine.store.rundb import RunDB


def open_db(args) -> RunDB:
    """The run database a command names (``--db``, else the default); any command notices runs whose
    engine died (reaping), so a crashed run never stays ``running``."""
    db = RunDB(getattr(args, "db", None) or default_db_path())
    db.reap_crashed()
    return db


def print_json(obj) -> None:
    sys.stdout.write(json.dumps(obj, indent=None, default=str) + "\n")

