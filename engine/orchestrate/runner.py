"""The queue runner (``mediswift queue work``): starts queued runs as engine processes and records how
each ended; and the two ways the CLI gets the queue worked (here until a sweep is done, or by a runner
in the background). No torch: it starts engines, it does not train.

Each run is an ordinary ``mediswift train`` in its own session, its events going to a file in the runs
folder's ``queue/`` (not a pipe): neither the studio closing nor this runner dying touches it. A later
runner adopts the runs an earlier one started by watching their rows, so the queue survives any of
its processes crashing; a run whose engine died is marked crashed (the database's reaping) and the
queue moves on.

An entry starts in two phases (engine.orchestrate.queue): the runner claims it in the database, starts
its engine held at a gate (a few lines of Python that wait for one byte on stdin, then exec the engine:
same pid), records the engine's pid, and only then lets it go. Killed before that byte, the runner
leaves an engine that reads end-of-file and exits without starting; killed after it, an engine whose
pid is recorded, which the next runner adopts. ``MEDISWIFT_FAULT_RUNNER=after-claim|after-spawn|after-record``
makes a runner SIGKILL itself at that point of a start (the fault suite's hook).
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

from engine.core.processes import pid_alive
from engine.orchestrate.queue import ENDED, GATE_MARK, RUNNING, STARTING, Queue, started_run
from engine.store.rundb import FINAL_STATUSES, RunDB

POLL_S = 0.5
FAULT_ENV = "MEDISWIFT_FAULT_RUNNER"  # after-claim | after-spawn | after-record: SIGKILL this runner there
# the gate an engine waits at until its runner has recorded its pid: one byte "g" on stdin execs the engine
# (argv[1:]) with stdin on /dev/null; end-of-file (the runner died) exits without starting it
_GATE = (f"# {GATE_MARK}\n"
         "import os, sys\n"
         "if os.read(0, 1) != b'g':\n"
         "    os._exit(0)\n"
         "fd = os.open(os.devnull, os.O_RDONLY)\n"
         "os.dup2(fd, 0)\n"
         "os.close(fd)\n"
         "os.execv(sys.argv[1], sys.argv[1:])\n")


def _fault(point: str) -> None:
    if os.environ.get(FAULT_ENV) == point:
        os.kill(os.getpid(), signal.SIGKILL)


class QueueRunner:
    def __init__(self, db: RunDB, say: Callable[[str], None] = lambda line: None):
        self.db = db
        self.db_path = Path(db.path).expanduser().resolve()  # the engine runs in the entry's folder, not ours
        self.queue = Queue(db)
        self.say = say
        self.children: dict[int, subprocess.Popen] = {}  # entry id -> engine process this runner started

    def work(self, until: Callable[[], bool] | None = None, forever: bool = False) -> None:
        """Start and watch runs until the queue has nothing left to do (or ``until()`` says so)."""
        try:
            while True:
                self.queue.heartbeat()
                self.db.reap_crashed()
                for line in self.queue.settle_starts():
                    self.say(line)
                self.watch()
                if not self.queue.state()["paused"]:
                    self.start_ready()
                if until is not None and until():
                    return
                if not forever and not self._busy():
                    return
                time.sleep(POLL_S)
        finally:
            self.queue.release_runner()

    def _busy(self) -> bool:
        st = self.queue.state()
        live = self.queue.entries(include_ended=False)
        running = [e for e in live if e["status"] in (STARTING, RUNNING)]
        return bool(running) or (not st["paused"] and bool(self.queue.ready()))

    # -- starting ---------------------------------------------------------------------------------
    def start_ready(self) -> None:
        parallel = self.queue.state()["parallel"]
        running = sum(1 for e in self.queue.entries(include_ended=False) if e["status"] in (STARTING, RUNNING))
        for e in self.queue.ready()[:max(0, parallel - running)]:
            self.launch(e)

    def launch(self, e: dict) -> bool:
        """Start one entry in two phases (claim, then the engine's pid recorded before it may start);
        False when another runner took it first or the queue is full."""
        folder = Path(e["runs_dir"]) / "queue"
        log = folder / f"entry-{e['id']}.events.jsonl"
        if not self.queue.claim(e, str(log)):
            return False
        _fault("after-claim")
        sets = list(e["sets"])
        if e.get("parent_run"):
            sets.append(f"parent={e['parent_run']}")
        try:
            folder.mkdir(parents=True, exist_ok=True)
            config = folder / f"entry-{e['id']}.toml"
            config.write_text(e["config_text"], encoding="utf-8")
            cmd = [sys.executable, "-m", "engine", "train", str(config), "--db", str(self.db_path),
                   "--runs-dir", e["runs_dir"]]
            for s in sets:
                cmd += ["--set", s]
            with open(log, "wb") as out, open(folder / f"entry-{e['id']}.stderr.log", "wb") as err:
                proc = subprocess.Popen([sys.executable, "-S", "-c", _GATE, *cmd], stdin=subprocess.PIPE, stdout=out,
                                        stderr=err, cwd=e["cwd"] or None, start_new_session=True, env=_child_env())
        except OSError as exc:  # the runs folder or the entry's working directory is gone or not writable
            self._end(e, "failed", f"could not start the engine: {exc}")
            return True
        _fault("after-spawn")
        if not self.queue.record_engine(e["id"], proc.pid):  # no longer this runner's claim (never while it lives)
            proc.stdin.close()  # the gate reads end-of-file: the engine never starts
            proc.wait()
            return True
        try:
            proc.stdin.write(b"g")
            proc.stdin.close()
        except OSError:
            pass  # the gate is gone: the watch finds the engine dead and ends the entry
        _fault("after-record")
        self.queue.mark_running(e["id"])
        self.children[e["id"]] = proc
        if self.queue.entry(e["id"])["cancel_requested"]:  # cancelled while starting: stop it gracefully now
            proc.send_signal(signal.SIGTERM)
        self.say(f"entry {e['id']} started: {e['label'] or e['config_name']} (pid {proc.pid})")
        return True

    # -- watching ---------------------------------------------------------------------------------
    def watch(self) -> None:
        for e in self.queue.entries(include_ended=False):
            if e["status"] != RUNNING:
                continue
            proc = self.children.get(e["id"])
            code = proc.poll() if proc is not None else None
            alive = (code is None) if proc is not None else pid_alive(e["pid"], e["pid_start"])
            if not e["run_id"]:
                run_id = started_run(e["log_path"])
                if run_id:
                    self.queue.set_run(e["id"], run_id)
                    e["run_id"] = run_id
            if e["run_id"]:
                run = self.db.get_run(e["run_id"])
                status = run["status"] if run else "failed"
                if status in FINAL_STATUSES:
                    if alive and proc is not None:
                        continue  # the engine is writing its last lines; take its exit first
                    self._end(e, status, run.get("error") if run else "the run's row is gone")
                # else, if the engine died without finishing: the next round's reaping (work()) marks the run
                # crashed, and this entry ends then
            elif not alive:
                self._end(e, "failed", _last_error(e) or "the engine exited before the run started")

    def _end(self, e: dict, status: str, error: str | None) -> None:
        self.children.pop(e["id"], None)
        self.queue.finish(e["id"], status, error)
        done = self.queue.entry(e["id"])
        tail = f" ({done['error']})" if done["error"] and done["status"] != "completed" else ""
        self.say(f"entry {e['id']} {done['status']}: {e['label'] or e['config_name']}"
                 + (f" run {e['run_id']}" if e["run_id"] else "") + tail)


def _child_env() -> dict:
    env = dict(os.environ)
    env.pop("MEDISWIFT_GROUP_DIR", None)
    env.pop(FAULT_ENV, None)
    return env


def _last_error(e: dict) -> str | None:
    """The engine's one-line error (exit 2: bad input) from its stderr log, or its last line."""
    if not e.get("log_path"):
        return None
    err = Path(e["log_path"]).with_name(f"entry-{e['id']}.stderr.log")
    try:
        lines = [ln for ln in err.read_text(encoding="utf-8", errors="replace").splitlines() if ln.strip()]
    except OSError:
        return None
    errors = [ln for ln in lines if ln.startswith("mediswift: error:")]
    return (errors[-1] if errors else lines[-1] if lines else None)


def start_detached(db_path: str | Path) -> subprocess.Popen:
    """A runner for this database in its own session, outliving whoever started it."""
    db_path = Path(db_path).expanduser().resolve()
    cmd = [sys.executable, "-m", "engine", "queue", "work", "--db", str(db_path)]
    log = db_path.with_name("queue-runner.log")  # what it started and how each ended
    with open(log, "ab") as out:
        return subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True, env=_child_env())


def ensure_runner(db: RunDB) -> int | None:
    """Start a background runner unless one already works this queue; its pid."""
    pid = Queue(db).runner_pid()
    if pid:
        return pid
    return start_detached(db.path).pid


def work_until_done(db: RunDB, sweep_id: str, say: Callable[[str], None]) -> None:
    """Work the queue here until every entry of the sweep ended; when another runner holds the queue,
    follow its progress instead (and take over should that runner go)."""
    queue = Queue(db)

    def sweep_done() -> bool:
        return all(e["status"] in ENDED for e in queue.entries(sweep_id=sweep_id))

    if queue.claim_runner():
        QueueRunner(db, say).work(until=sweep_done)
        return
    say(f"another runner (pid {queue.runner_pid()}) works this queue; following the sweep's progress")
    seen: dict[int, str] = {}
    while True:
        for e in queue.entries(sweep_id=sweep_id):
            if seen.get(e["id"]) != e["status"]:
                seen[e["id"]] = e["status"]
                say(f"entry {e['id']} {e['status']}: {e['label']}" + (f" run {e['run_id']}" if e["run_id"] else ""))
        if sweep_done():
            return
        if queue.runner_pid() is None and queue.claim_runner():
            QueueRunner(db, say).work(until=sweep_done)
            return
        time.sleep(1.0)
