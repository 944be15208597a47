"""``mediswift metrics RUN_ID --json|--csv``: a run's metric rows."""
from __future__ import annotations

import csv
import sys

from engine.cli.common import open_db, print_json
from engine.store.queries import find_run

COLUMNS = ["step", "tokens", "wall_time", "flops", "flops_dense", "name", "value"]


def register(sub, with_db) -> None:
    m = with_db(sub.add_parser("metrics", help="a run's metric rows (step, tokens, name, value)"))
    m.add_argument("run_id")
    fmt = m.add_mutually_exclusive_group(required=True)
    fmt.add_argument("--json", action="store_true")
    fmt.add_argument("--csv", action="store_true")
    m.add_argument("--name", action="append", help="only these metric names")
    m.set_defaults(fn=cmd_metrics)


def cmd_metrics(args) -> int:
    db = open_db(args)
    row = find_run(db, args.run_id)
    rows = db.metrics(row["id"], names=args.name or None)
    if args.csv:
        w = csv.writer(sys.stdout, lineterminator="\n")
        w.writerow(COLUMNS)
        for r in rows:
            w.writerow([r[c] for c in COLUMNS])
    else:
        print_json(rows)
    return 0
