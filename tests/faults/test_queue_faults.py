"""The queue's faults: its runner SIGKILLed at each step of an entry's start, two runners working one queue at
once, a relative --db given from another folder. Each entry must end with exactly one run. Every check is
recorded in the fault tally (tests/faults/conftest.py) and asserted on its own."""
from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from pathlib import Path

from helpers import PUBMED_TRAIN, REPO, engine_env, needs_shared_data, tiny

from engine.orchestrate.queue import Queue
from engine.orchestrate.runner import FAULT_ENV
from engine.store.rundb import RunDB

pytestmark = needs_shared_data()
# the tiniest run that still checkpoints and evaluates: two steps
FAST = ["train.max_steps=2", "train.eval_every=2", "train.checkpoint_every=2", "data.max_documents=100",
        "sparsity.kernel=dense"]
KILLED = "queue: runner SIGKILLed at a step of an entry's start"
TWO = "queue: two runners on one queue"
RELATIVE = "queue: a relative --db from another folder"


def _runner(tmp: Path, db: str, cwd: Path = REPO, fault: str | None = None) -> subprocess.Popen:
    """``mediswift queue work`` (until the queue is done), SIGKILLing itself at ``fault`` if given."""
    env = engine_env(tmp)
    if fault:
        env[FAULT_ENV] = fault
    return subprocess.Popen([sys.executable, "-m", "engine", "queue", "work", "--db", db], cwd=cwd, env=env,
                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _queue(db: str, seeds: str, *extra: str, cwd: Path = REPO) -> list[int]:
    """Entries queued by ``mediswift sweep`` (in this process, from ``cwd``), the queue paused meanwhile so
    that no background runner takes them before the test's own."""
    from engine.cli import main

    here = os.getcwd()
    os.chdir(cwd)
    try:
        assert main(["queue", "pause", "--db", db]) == 0
        assert main(["sweep", "demo", *tiny(*FAST, *extra), "--grid", f"train.seed={seeds}", "--db", db]) == 0
    finally:
        os.chdir(here)
    queue = Queue(RunDB(Path(cwd, db)))
    queue.set_paused(False)
    return [e["id"] for e in queue.entries()]


def _one_run_each(db_path: Path) -> tuple[bool, str]:
    """Every entry completed with its own run, and the database holds no other run."""
    db = RunDB(db_path)
    entries = Queue(db).entries()
    runs = db.list_runs()
    ok = (all(e["status"] == "completed" and e["run_id"] for e in entries)
          and sorted(e["run_id"] for e in entries) == sorted(r["id"] for r in runs)
          and all(r["status"] == "completed" for r in runs))
    return ok, f"entries {[(e['id'], e['status'], e['run_id'], e['error']) for e in entries]}; " \
               f"runs {[(r['id'], r['status']) for r in runs]}"


def test_a_runner_killed_at_each_step_of_a_start_leaves_one_run_per_entry(tmp_path, record):
    points = ("after-claim", "after-spawn", "after-record")
    dbs = {p: str(tmp_path / p / "runs.db") for p in points}
    for p in points:
        _queue(dbs[p], "1", f"data.corpus={PUBMED_TRAIN}")
    # the three cases side by side: a runner that kills itself at that step, then a plain one
    killed = {p: _runner(tmp_path, dbs[p], fault=p) for p in points}
    for p, proc in killed.items():
        proc.communicate(timeout=60)
    left = {p: Queue(RunDB(dbs[p])).entries()[0] for p in points}
    fresh = {p: _runner(tmp_path, dbs[p]) for p in points}
    out = {p: proc.communicate(timeout=120)[0] for p, proc in fresh.items()}
    failures = []
    for p in points:
        ok, detail = _one_run_each(Path(dbs[p]))
        # the killed runner died where it was told to, leaving the entry mid-start (claimed, not yet running)
        held = record(KILLED, killed[p].returncode == -9 and left[p]["status"] == "starting" and ok
                      and fresh[p].returncode == 0)
        if not held:
            failures.append(f"{p}: rc {killed[p].returncode}, left {left[p]['status']}; {detail}; {out[p]}")
    assert not failures, failures
    # what the new runner did: an engine it found alive is adopted; an entry whose engine never ran waits again
    assert "adopted its engine" in out["after-record"], out["after-record"]
    assert all("waiting again" in out[p] for p in ("after-claim", "after-spawn")), out


def test_two_runners_at_once_never_start_one_entry_twice(tmp_path, record):
    # in-process: two connections race to claim the same 40 entries; each entry goes to exactly one
    db_path = tmp_path / "claims.db"
    q = Queue(RunDB(db_path))
    q.set_parallel(64)
    ids = q.add([{"config_text": "", "config_name": "x", "sets": [], "runs_dir": str(tmp_path), "cwd": str(tmp_path)}
                 for _ in range(40)])
    won: list[list[int]] = [[], []]
    go = threading.Barrier(2)

    def claimer(i: int) -> None:
        mine = Queue(RunDB(db_path))
        go.wait()
        for entry_id in ids:
            if mine.claim({"id": entry_id}, "log"):
                won[i].append(entry_id)

    threads = [threading.Thread(target=claimer, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert record(TWO, sorted(won[0] + won[1]) == sorted(ids) and not set(won[0]) & set(won[1])), won

    # for real: two runner processes (the lease bypassed, as if each thought itself alone) start at the same
    # instant on one queue of two runs, both may start at once: both runners try to claim both entries
    db = str(tmp_path / "runs.db")
    entries = _queue(db, "1,2", f"data.corpus={PUBMED_TRAIN}")
    Queue(RunDB(db)).set_parallel(2)
    at = time.time() + 1.5
    script = ("import sys, time\nfrom engine.store.rundb import RunDB\nfrom engine.orchestrate.runner import QueueRunner\n"
              "db = RunDB(sys.argv[1])\ntime.sleep(max(0.0, float(sys.argv[2]) - time.time()))\n"
              "QueueRunner(db, say=print).work()\n")
    procs = [subprocess.Popen([sys.executable, "-c", script, db, str(at)], cwd=REPO, env=engine_env(tmp_path),
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for _ in range(2)]
    outs = [p.communicate(timeout=150)[0] for p in procs]
    ok, detail = _one_run_each(Path(db))
    done = Queue(RunDB(db)).entries()
    spans = [(e["started_at"], e["finished_at"]) for e in done]
    most = max(sum(1 for s0, f0 in spans if s0 <= s < f0) for s, _ in spans)
    held = record(TWO, ok and len(done) == len(entries) == 2 and most <= 2 and all(p.returncode == 0 for p in procs))
    assert held, (detail, most, outs)


def test_a_relative_db_from_another_folder_runs_in_that_database(tmp_path, record):
    # queued from inside A with --db runs.db, worked by a runner started one folder up with --db A/runs.db:
    # the engine (which runs in the entry's folder, A) once got the runner's relative path and wrote A/A/runs.db
    a = tmp_path / "A"
    a.mkdir()
    corpus = os.path.relpath(PUBMED_TRAIN, a)  # relative to where the sweep was given
    _queue("runs.db", "1", f"data.corpus={corpus}", cwd=a)
    entry = Queue(RunDB(a / "runs.db")).entries()[0]
    stored = f"data.corpus={PUBMED_TRAIN.resolve()}" in entry["sets"] and Path(entry["runs_dir"]).is_absolute()
    proc = _runner(tmp_path, "A/runs.db", cwd=tmp_path)
    out = proc.communicate(timeout=120)[0]
    ok, detail = _one_run_each(a / "runs.db")
    run = RunDB(a / "runs.db").list_runs()[0] if ok else {}
    held = record(RELATIVE, stored and ok and proc.returncode == 0 and not (a / "A").exists()
                  and not (tmp_path / "runs.db").exists()
                  and run["config"]["data"]["corpus"] == [str(PUBMED_TRAIN.resolve())]
                  and Path(run["run_dir"]).parent == a / "runs")
    assert held, (entry["sets"], detail, out)
