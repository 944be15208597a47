"""The studio's shape: one run store polls the database on one timer and signals what changed; views and
widgets read through it and never write (``studio.commands`` does); the layers import one way, with no
cycle among the studio's modules."""
from __future__ import annotations

import ast
import os
import re
import subprocess
import sys
import traceback

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")

import pytest
from helpers import REPO
from import_graph import cycles, graph, imported, modules

from engine.core.processes import pid_alive, process_start
from engine.orchestrate.queue import Queue
from engine.store.rundb import RunDB

STUDIO = REPO / "studio"
# RunDB's and the queue's methods that write; the studio calls them in studio/commands/ only
WRITES = {
    "RunDB": ("create_run", "update_run", "mark_running", "set_status", "merge_meta", "delete_run", "reap_crashed",
              "log_metrics", "insert_metric_rows", "truncate_metrics", "add_evaluation", "add_checkpoint",
              "replace_checkpoint_file", "delete_checkpoint", "add_artifact"),
    "Queue": ("add", "set_paused", "set_parallel", "move", "cancel", "claim_runner", "heartbeat", "release_runner",
              "ready", "claim", "record_engine", "mark_running", "settle_starts", "set_run", "finish", "create_sweep"),
}
RUN_STORE = "studio/models/run_store.py"


def studio_modules() -> dict[str, ast.Module]:
    return modules(STUDIO)


@pytest.mark.quick
def test_only_the_run_store_reads_the_database_and_only_commands_write():
    readers, writers, callers = [], [], []
    for path, tree in studio_modules().items():
        mods = imported(tree)
        store = sorted(m for m in mods if m.split(".")[:2] in (["engine", "store"], ["engine", "orchestrate"]))
        if store and path != RUN_STORE and not path.startswith("studio/commands/"):
            readers.append(f"{path}: {store}")
        if path.startswith(("studio/views/", "studio/widgets/")):
            bad = sorted(m for m in mods if m.startswith(("engine.store", "engine.orchestrate", "engine.publish")))
            if bad:
                writers.append(f"{path}: {bad}")
        if path.startswith("studio/commands/"):
            continue
        for node in ast.walk(tree):  # a write method called outside the commands (db.update_run(...), q.cancel(...))
            if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                    and node.func.attr in WRITES["RunDB"] + WRITES["Queue"]
                    and re.search(r"\b(db|queue|Queue)\b", ast.unparse(node.func.value))):
                callers.append(f"{path}:{node.lineno}: {ast.unparse(node.func)}(")
    assert not readers, "only studio/models/run_store.py reads the store (and studio/commands/ writes):\n" + "\n".join(readers)
    assert not writers, "views and widgets go through the models and the commands:\n" + "\n".join(writers)
    assert not callers, "database writes outside studio/commands/:\n" + "\n".join(callers)
    # the listed write methods exist (a renamed one would make this scan blind)
    assert all(hasattr(RunDB, m) for m in WRITES["RunDB"]) and all(hasattr(Queue, m) for m in WRITES["Queue"])
    assert "engine.store.queries" in imported(studio_modules()[RUN_STORE])


@pytest.mark.quick
def test_the_run_store_holds_the_studios_only_database_timer():
    """Exactly one QTimer in the models (the store's); a view's timers poll no database (checked below)."""
    timers = {path: sum(isinstance(n, ast.Call) and getattr(n.func, "id", getattr(n.func, "attr", "")) == "QTimer"
                        for n in ast.walk(tree))
              for path, tree in studio_modules().items() if path.startswith("studio/models/")}
    assert {p: n for p, n in timers.items() if n} == {RUN_STORE: 1, "studio/models/throttle.py": 1}


@pytest.mark.quick
def test_no_import_cycle_among_studio_modules():
    g = graph(studio_modules())
    assert not cycles(g), f"import cycles among studio modules: {cycles(g)}"
    assert "studio.views.runs_browser" in g["studio.views.run_form"]  # the scan sees function-level imports


# -- the run store on a real database -------------------------------------------------------------------


@pytest.fixture
def store(qtbot, tmp_path):
    from studio.models.run_store import RunStore

    s = RunStore(tmp_path / "runs.db")
    yield s
    s.stop()


def dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    assert not pid_alive(p.pid)
    return p.pid


@pytest.mark.quick
def test_the_run_store_signals_what_another_connection_writes(qtbot, store, tmp_path):
    """The engine's side is a second connection; the store's timer alone brings each change to its signals."""
    engine = RunDB(tmp_path / "runs.db")
    seen: list[tuple] = []
    store.status_changed.connect(lambda rid, st: seen.append(("status", rid, st)))
    store.metrics_added.connect(lambda rid, rows: seen.append(("metrics", rid, [r["step"] for r in rows])))
    store.evaluations_added.connect(lambda rid, ev: seen.append(("evals", rid, [e["step"] for e in ev])))

    rid = engine.create_run(name="r", stage="pretrain", config={})
    with qtbot.waitSignal(store.runs_changed, timeout=2000):
        store.refresh()  # a new run is seen when the whole list is read (every few seconds, or now)
    assert [r["id"] for r in store.runs()] == [rid]

    store.follow(rid)  # as a re-attached run's tab does
    engine.mark_running(rid)  # this process is the "engine": alive
    with qtbot.waitSignal(store.status_changed, timeout=3000, check_params_cb=lambda r, s: (r, s) == (rid, "running")):
        pass
    with qtbot.waitSignals([store.metrics_added, store.runs_progressed], timeout=3000):
        for step in (1, 2, 3):
            engine.log_metrics(rid, step, step * 64, step * 0.1, step * 1e6, step * 2e6, {"loss": 5.0 - step})
    engine.add_evaluation(rid, 3, "lm", "val", {"loss": 4.5})
    with qtbot.waitSignal(store.evaluations_added, timeout=3000):
        engine.log_metrics(rid, 4, 256, 0.4, 4e6, 8e6, {"loss": 1.0})
    engine.log_metrics(rid, 5, 320, 0.5, 5e6, 1e7, {"loss": 0.5})
    engine.set_status(rid, "completed")
    qtbot.waitUntil(lambda: ("status", rid, "completed") in seen, timeout=3000)
    got = [s for s in seen if s[1] == rid]
    steps = [step for kind, _r, steps in got if kind == "metrics" for step in steps]
    assert steps == [1, 2, 3, 4, 5]  # each row once, in order
    assert ("evals", rid, [3]) in got
    # the last rows are out before the status that says the run ended
    assert got.index(("status", rid, "completed")) > max(i for i, s in enumerate(got) if s[0] == "metrics")

    Queue(engine).add([{"config_text": "", "config_name": "q", "sets": [], "runs_dir": str(tmp_path), "cwd": str(tmp_path),
                        "label": "q"}])
    with qtbot.waitSignal(store.queue_changed, timeout=3000):
        pass
    engine.delete_run(rid)
    with qtbot.waitSignal(store.runs_changed, timeout=2000):
        store.refresh()
    engine.close()


@pytest.mark.quick
def test_a_dead_engine_is_reported_and_the_commands_reap_it(qtbot, store, tmp_path):
    from studio.commands.run_commands import Commands

    engine = RunDB(tmp_path / "runs.db")
    rid = engine.create_run(name="r", stage="pretrain", config={})
    engine.update_run(rid, status="running", pid=dead_pid(), pid_start=process_start(os.getpid()), host=store.host)
    reported = []  # what the database held when the store reported the dead engine (this slot runs first)
    store.engines_gone.connect(lambda ids: reported.append((ids, engine.get_run(rid)["status"])))
    commands = Commands(store)  # acts on what the store reports: the row is marked crashed within a tick
    with qtbot.waitSignal(store.status_changed, timeout=3000, check_params_cb=lambda r, s: (r, s) == (rid, "crashed")):
        store.watch(rid)
    assert reported == [([rid], "running")]  # the store only reads; the commands wrote
    assert engine.get_run(rid)["status"] == "crashed" and commands.store is store
    engine.close()


@pytest.mark.quick
def test_one_timer_polls_the_database_while_a_live_run_is_followed(qtbot, tmp_path):
    """Every SQL statement the studio runs while nobody touches it comes from the run store's tick (or a
    view's throttled refresh that one of its signals asked for); the re-attached run's tab follows the rows
    written by another connection, and its status change shows within a tick or two."""
    from studio.views.main_window import KEEP, MainWindow

    engine = RunDB(tmp_path / "runs.db")
    rid = engine.create_run(name="live", stage="pretrain", config={"train": {"max_steps": 100}})
    engine.mark_running(rid)  # alive: this process
    done = engine.create_run(name="old", stage="pretrain", config={})
    engine.log_metrics(done, 1, 64, 0.1, 1e6, 2e6, {"loss": 3.0})
    engine.set_status(done, "completed")
    win = MainWindow(tmp_path / "runs.db", tmp_path / "runs")  # re-attaches the live run
    win.estimate.auto.setChecked(False)
    win.close_policy = KEEP
    qtbot.addWidget(win)
    win.show()
    view = win.view_for(rid)
    assert view is not None and view.status == "running"
    win.open_compare([rid, done])
    win.tabs.setCurrentWidget(win.browser)

    origins: list[str] = []

    def trace(_sql: str) -> None:
        frames = {f.name for f in traceback.extract_stack()}
        origins.append("tick" if "_tick" in frames else "throttle" if "_fire" in frames else
                       "".join(line for line in traceback.format_stack() if "/studio/" in line))

    win.store.db.db.conn.set_trace_callback(trace)
    polls = win.store.polls
    for step in range(1, 21):  # an engine writing a step every 50 ms
        engine.log_metrics(rid, step, step * 64, step * 0.1, step * 1e6, step * 2e6, {"loss": 5.0 - step / 10})
        qtbot.wait(50)
    qtbot.waitUntil(lambda: view.data.last_step == 20, timeout=3000)
    engine.set_status(rid, "stopped")
    qtbot.waitUntil(lambda: view.status == "stopped", timeout=1500)
    win.store.db.db.conn.set_trace_callback(None)

    assert win.store.polls - polls >= 4 and origins  # the store polled, and read
    stray = [o for o in origins if o not in ("tick", "throttle")]
    assert not stray, "SQL outside the run store's timer:\n" + stray[0]
    assert view.buttons["restart"].isEnabled() is False  # no checkpoint: nothing to resume from
    win.close()
    engine.close()
