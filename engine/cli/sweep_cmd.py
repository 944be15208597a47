"""``mediswift sweep`` (a grid of runs, queued as one group) and ``mediswift queue`` (list, pause,
resume, cancel, move, and the runner itself: ``queue work``).

A sweep is planned whole before anything is written: every grid point is built into a validated
config, and with ``--equal-flops`` given its step count, so a wrong key, a wrong type, an empty grid or
a budget below one step exits 2 with one line and leaves no sweep, entry or run behind.
"""
from __future__ import annotations

import json
import sys
import time

from engine.cli.common import open_db
from engine.core.errors import InputError
from engine.orchestrate.queue import ENDED, RUNNING, STARTING, WAITING, Queue, describe
from engine.orchestrate.runner import QueueRunner, ensure_runner, work_until_done
from engine.orchestrate.sweep import SweepRequest, by_epochs, length_text, prepare_sweep, submit_sweep


def register(subparsers, common) -> None:
    s = common(subparsers.add_parser(
        "sweep", help="queue one run per grid point (a sweep); --wait works the queue until it is done"))
    s.add_argument("config", help="CONFIG.toml or a preset name: the base of every run")
    s.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a key in every run")
    s.add_argument("--grid", action="append", default=[], metavar="KEY=V1,V2,…",
                   help="a key and its values; several --grid span their product (parent=ID1,ID2: one recipe from "
                   "several parents). Each value once (0.5,0.50 is refused); every point is validated, train.nproc "
                   "against this machine included, before anything is queued")
    s.add_argument("--equal-flops", metavar="BUDGET",
                   help="give each run the train.max_steps that spends this many training FLOPs (e.g. 2e13)")
    s.add_argument("--name", help="the sweep's name, one printable line (default: CONFIG's name and the grid keys)")
    s.add_argument("--then", action="append", default=[], metavar="CONFIG",
                   help="after each run completes, queue this fine-tuning or prompting config with parent = that run")
    s.add_argument("--parallel", type=int, help="runs the queue may run at once (default: as it is, 1 at first)")
    s.add_argument("--wait", action="store_true", help="work the queue here until the sweep is done (scripts, CI)")
    s.add_argument("--runs-dir", help="folder for run folders (default: next to the database)")
    s.add_argument("--json", action="store_true", help="print the sweep (and, with --wait, its runs) as JSON")
    s.set_defaults(fn=cmd_sweep)

    q = subparsers.add_parser("queue", help="the run queue: list, pause, resume, cancel, move; work")
    qs = q.add_subparsers(dest="queue_command", required=True, metavar="ACTION")
    ql = common(qs.add_parser("list", help="queued, running and finished entries, in order"))
    ql.add_argument("--all", action="store_true", help="also entries that ended (default: the last 20 of them)")
    ql.add_argument("--json", action="store_true")
    ql.set_defaults(fn=cmd_queue_list)
    qp = common(qs.add_parser("pause", help="start no more runs (running ones go on)"))
    qp.set_defaults(fn=cmd_queue_pause)
    qr = common(qs.add_parser("resume", help="start runs again (and a runner if none is working the queue)"))
    qr.add_argument("--parallel", type=int, help="runs at once from now on")
    qr.set_defaults(fn=cmd_queue_resume)
    qc = common(qs.add_parser("cancel", help="cancel entries (a running one is stopped with a final checkpoint)"))
    qc.add_argument("entries", nargs="*", type=int, metavar="ENTRY")
    qc.add_argument("--sweep", help="every waiting and running entry of this sweep (id or name)")
    qc.set_defaults(fn=cmd_queue_cancel)
    qm = common(qs.add_parser("move", help="move a waiting entry to another place among the waiting ones"))
    qm.add_argument("entry", type=int)
    qm.add_argument("place", type=int, help="1 = next to start")
    qm.set_defaults(fn=cmd_queue_move)
    qw = common(qs.add_parser("work", help="start and watch queued runs until none is left (the studio and "
                                           "`sweep` start this in the background)"))
    qw.add_argument("--forever", action="store_true", help="keep waiting for new entries")
    qw.set_defaults(fn=cmd_queue_work)




# -- sweep ------------------------------------------------------------------------------------------


def cmd_sweep(args) -> int:
    db = open_db(args)
    queue = Queue(db)
    # the studio's New sweep dialog queues through the same two calls (engine.orchestrate.sweep)
    prepared = prepare_sweep(db, SweepRequest(config=args.config, grid=args.grid, sets=args.set,
                                              equal_flops=args.equal_flops, name=args.name, then=args.then,
                                              parallel=args.parallel, runs_dir=args.runs_dir))
    if args.wait and queue.state()["paused"]:
        raise InputError("the queue is paused, so --wait would wait forever: `mediswift queue resume` first", key="wait")
    plan, name = prepared.plan, prepared.name
    sweep_id, ids = submit_sweep(queue, prepared)
    out = {"sweep": {"id": sweep_id, "name": name}, "entries": ids,
           "points": [{"label": p.label, "values": p.values, "max_steps": p.cfg.train.max_steps,
                       "epochs": p.cfg.train.epochs if by_epochs(p) else 0,
                       "planned_flops": p.planned_flops or None} for p in plan.points]}
    if not args.json:
        print(f"sweep {sweep_id} ({name}): {len(plan.points)} run(s)" + (f", {len(ids) - len(plan.points)} chained"
                                                                         if len(ids) > len(plan.points) else "")
              + (f", each {plan.budget:.4g} training FLOPs" if plan.budget else "") + f"; queue entries {ids[0]}–{ids[-1]}")
        for p in plan.points:
            print(f"  {p.label}: {length_text(p)}" + (f", {p.planned_flops:.4g} FLOPs" if p.planned_flops else ""))
        sys.stdout.flush()
    if args.wait:
        try:
            work_until_done(db, sweep_id, say=(lambda m: print(m, file=sys.stderr if args.json else sys.stdout,
                                                                 flush=True)))
        except KeyboardInterrupt:
            print("stopped waiting; the queued runs go on in the background (mediswift queue list)", file=sys.stderr)
            ensure_runner(db)
            return 130
        if any(e["status"] == WAITING for e in queue.entries(include_ended=False)):
            ensure_runner(db)  # entries queued by others wait behind the sweep
        done = {e["id"]: e for e in queue.entries(sweep_id=sweep_id)}
        out["runs"] = [{"entry": e["id"], "label": e["label"], "status": e["status"], "run_id": e["run_id"],
                        "error": e["error"]} for e in done.values()]
        if not args.json:
            _print_outcome(db, queue, sweep_id, plan.budget)
        code = 0 if all(e["status"] == "completed" for e in done.values()) else 1
    else:
        code = 0
        paused = queue.state()["paused"]
        if not paused:
            ensure_runner(db)
        if not args.json:
            print("the queue is paused: `mediswift queue resume` starts it" if paused else
                  "the queue runs in the background: `mediswift queue list`, or the studio's Queue tab")
    if args.json:
        print(json.dumps(out, default=str))
    return code


def _print_outcome(db, queue: Queue, sweep_id: str, budget: float | None) -> None:
    print(f"{'entry':>5} {'status':10} {'run':9} {'steps':>6} {'FLOPs':>10} {'val loss':>9}  point")
    spent = []
    for e in queue.entries(sweep_id=sweep_id):
        run = db.get_run(e["run_id"]) if e["run_id"] else None
        s = (run or {}).get("summary") or {}
        vl = f"{s['val_loss']:.4f}" if s.get("val_loss") is not None else "-"
        fl = f"{s['flops']:.4g}" if s.get("flops") else "-"
        print(f"{e['id']:>5} {e['status']:10} {e['run_id'] or '-':9} {s.get('step', 0):>6} {fl:>10} {vl:>9}  {e['label']}")
        if e["after_id"] is None and s.get("flops"):
            spent.append(s["flops"])  # the grid's own runs: the ones the budget was set for
    if budget and spent:
        print(f"training FLOPs against the budget {budget:.4g}: {min(spent) / budget:.4f}x to {max(spent) / budget:.4f}x")


# -- queue ------------------------------------------------------------------------------------------


def cmd_queue_list(args) -> int:
    db = open_db(args)
    queue = Queue(db)
    st = queue.state()
    sweeps = {s["id"]: s["name"] for s in queue.sweeps()}
    rows = queue.entries()
    if not args.all:
        ended = [r for r in rows if r["status"] in ENDED]
        rows = [r for r in rows if r["status"] not in ENDED or r in ended[-20:]]
    if args.json:
        print(json.dumps({"paused": st["paused"], "parallel": st["parallel"], "runner_pid": queue.runner_pid(),
                          "entries": [{**describe(r), "sweep": {"id": r["sweep_id"], "name": sweeps.get(r["sweep_id"])}
                                       if r["sweep_id"] else None} for r in rows]}, default=str))
        return 0
    runner = queue.runner_pid()
    print(f"queue: {'paused' if st['paused'] else 'active'}, {st['parallel']} at a time, "
          + (f"runner pid {runner}" if runner else "no runner working it"))
    if not rows:
        print("the queue is empty; add runs with: mediswift sweep CONFIG --grid key=v1,v2")
        return 0
    print(f"{'entry':>5} {'status':10} {'run':9} {'sweep':20} point")
    for r in rows:
        sweep = sweeps.get(r["sweep_id"], "")
        print(f"{r['id']:>5} {r['status']:10} {r['run_id'] or '-':9} {sweep[:20]:20} {r['label'] or r['config_name']}"
              + (f"  ({r['error']})" if r["error"] and r["status"] not in ("completed", WAITING, STARTING, RUNNING) else ""))
    return 0


def cmd_queue_pause(args) -> int:
    Queue(open_db(args)).set_paused(True)
    print("queue paused: no new runs start; running ones go on (mediswift queue resume)")
    return 0


def cmd_queue_resume(args) -> int:
    db = open_db(args)
    queue = Queue(db)
    if args.parallel is not None:
        queue.set_parallel(args.parallel)
    queue.set_paused(False)
    waiting = [e for e in queue.entries(include_ended=False) if e["status"] == WAITING]
    pid = ensure_runner(db) if waiting else queue.runner_pid()
    st = queue.state()
    print(f"queue resumed, {st['parallel']} at a time; {len(waiting)} waiting" + (f"; runner pid {pid}" if pid else ""))
    return 0


def cmd_queue_cancel(args) -> int:
    db = open_db(args)
    queue = Queue(db)
    ids = list(args.entries)
    if args.sweep:
        sweep = queue.sweep(args.sweep)
        ids += [e["id"] for e in queue.entries(include_ended=False, sweep_id=sweep["id"]) if e["after_id"] is None
                or e["status"] in (STARTING, RUNNING)]
    if not ids:
        raise InputError("say which entries to cancel: ENTRY … or --sweep ID (see `mediswift queue list`)", key="entry")
    for line in queue.cancel(ids):
        print(line)
    return 0


def cmd_queue_move(args) -> int:
    place = Queue(open_db(args)).move(args.entry, args.place)
    print(f"entry {args.entry} is now number {place} among the waiting entries")
    return 0


def cmd_queue_work(args) -> int:
    db = open_db(args)
    queue = Queue(db)
    if not queue.claim_runner():
        print(f"another runner (pid {queue.runner_pid()}) already works this queue")
        return 0
    QueueRunner(db, say=lambda m: print(time.strftime("%H:%M:%S ") + m, flush=True)).work(forever=args.forever)
    return 0
