"""``mediswift runs list`` and ``mediswift runs show RUN_ID``: the runs in the database."""
from __future__ import annotations

import json

from engine.cli.common import open_db, print_json
from engine.orchestrate.queue import Queue
from engine.store.queries import disk_usage, find_run


def register(sub, with_db) -> None:
    r = sub.add_parser("runs", help="list or show runs")
    rs = r.add_subparsers(dest="runs_command", required=True, metavar="ACTION")
    rl = with_db(rs.add_parser("list", help="every run in the database"))
    rl.add_argument("--json", action="store_true")
    rl.set_defaults(fn=cmd_runs_list)
    rsh = with_db(rs.add_parser("show", help="one run: config, status, summary, checkpoints, evaluations"))
    rsh.add_argument("run_id")
    rsh.add_argument("--json", action="store_true")
    rsh.set_defaults(fn=cmd_runs_show)


def cmd_runs_list(args) -> int:
    db = open_db(args)
    runs = db.list_runs()
    sweeps = Queue(db).sweep_of_runs()
    rows = [
        {"id": r["id"], "name": r["name"], "stage": r["stage"], "status": r["status"], "parent": r["parent_id"],
         "created_at": r["created_at"], "finished_at": r["finished_at"], "summary": r["summary"], "tags": r["tags"],
         "run_dir": r["run_dir"], "sweep": sweeps.get(r["id"])}
        for r in runs
    ]
    if args.json:
        print_json(rows)
        return 0
    if not rows:
        print("no runs yet; start one with: mediswift train demo")
        return 0
    print(f"{'id':10} {'name':20} {'stage':9} {'status':10} {'step':>6} {'val loss':>9}  parent")
    for r in rows:
        s = r["summary"]
        vl = f"{s['val_loss']:.4f}" if s.get("val_loss") is not None else "-"
        print(f"{r['id']:10} {r['name'][:20]:20} {r['stage']:9} {r['status']:10} {s.get('step', 0):>6} {vl:>9}  {r['parent'] or ''}")
    return 0


def cmd_runs_show(args) -> int:
    db = open_db(args)
    row = find_run(db, args.run_id)
    out = {
        "id": row["id"], "name": row["name"], "stage": row["stage"], "status": row["status"], "parent": row["parent_id"],
        "config": row["config"], "summary": row["summary"], "meta": row["meta"], "error": row["error"],
        "created_at": row["created_at"], "started_at": row["started_at"], "finished_at": row["finished_at"],
        "host": row["host"], "pid": row["pid"], "versions": row["versions"], "run_dir": row["run_dir"],
        "tags": row["tags"], "notes": row["notes"],
        "checkpoints": db.checkpoints(row["id"]), "evaluations": db.evaluations(row["id"]),
        "children": [r["id"] for r in db.list_runs() if r["parent_id"] == row["id"]],
    }
    out["disk"] = disk_usage(row, out["checkpoints"])
    if args.json:
        print_json(out)
    else:
        print(json.dumps(out, indent=2, default=str))
    return 0
