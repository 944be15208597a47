"""Sweeps and the run queue: a grid at equal FLOPs through the queue, a killed engine, cancel and
reorder, chained fine-tuning, and bad input that leaves nothing behind."""
from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import pytest
from helpers import SHARED_DATA, TINY, sets, tiny

from engine.orchestrate.queue import Queue
from engine.store.rundb import RunDB
from engine.orchestrate.study import sweep_study

PQA = SHARED_DATA / "pubmedqa" / "pqal_trainval.json"
VALID = SHARED_DATA / "pubmed_abstracts" / "valid.txt"


def _wait(predicate, timeout: float = 240, every: float = 0.3):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(every)
    raise AssertionError("timed out")


def _entries(db_path: Path) -> list[dict]:
    return Queue(RunDB(db_path)).entries()


def test_a_2x2_sweep_at_equal_flops_runs_through_the_queue(cli, db_path):
    budget = 2e8
    tiny_sets = sets(*(t for t in TINY if not t.startswith("model.d_model")))
    r = cli("sweep", "demo", *tiny_sets, "--grid", "sparsity.level=0,0.5", "--grid", "model.d_model=32,48",
            "--equal-flops", f"{budget:g}", "--name", "size-sparsity", "--parallel", "2", "--wait", "--json")
    assert r.rc == 0, r.stderr
    out = json.loads(r.stdout.splitlines()[-1])
    assert len(out["runs"]) == 4 and all(x["status"] == "completed" for x in out["runs"])
    # two at a time, never more: at each start, count the entries already running
    spans = [(e["started_at"], e["finished_at"]) for e in _entries(db_path)]
    overlap = [sum(1 for s0, f0 in spans if s0 <= s < f0) for s, _ in spans]
    assert max(overlap) == 2, spans
    runs = json.loads(cli("runs", "list", "--json").stdout)
    assert len(runs) == 4
    for run in runs:
        assert run["sweep"] == {"id": out["sweep"]["id"], "name": "size-sparsity"}
        steps, flops = run["summary"]["step"], run["summary"]["flops"]
        # the engine's own counter, not the plan: every run within one of its steps' FLOPs of the budget
        assert abs(flops - budget) <= flops / steps, (run["name"], flops, steps)
    steps = {(r["config"]["sparsity"]["level"], r["config"]["model"]["d_model"]): r["summary"]["step"]
             for r in RunDB(db_path).list_runs()}
    assert steps[(0.5, 32)] > steps[(0.0, 32)] > steps[(0.0, 48)]  # sparser and smaller runs buy more steps
    study = sweep_study(RunDB(db_path), out["sweep"]["id"])
    assert {p["sparsity"] for p in study["points"]} == {0.0, 0.5}
    assert all(p["final_val_loss"] is not None and p["curve"]["flops"][-1] == p["flops"] for p in study["points"])


@pytest.mark.quick
@pytest.mark.parametrize("grid, message", [
    (["--grid", "sparsity.levle=0,0.5"], "unknown config key 'sparsity.levle'; did you mean 'sparsity.level'?"),
    (["--grid", "train.grad_accum=1,big"], "train.grad_accum must be an integer, got 'big'"),
    (["--grid", "sparsity.level="], "--grid sparsity.level has an empty value"),
    ([], "a sweep needs at least one --grid"),
    (["--grid", "sparsity.level=0,0.5", "--equal-flops", "1e3"], "--equal-flops 1000 is less than one training step"),
    (["--grid", "sparsity.level=0.5,0.50"], "--grid sparsity.level repeats a value: 0.5 and 0.50"),
    (["--grid", "train.nproc=1,99", "--set", "train.device=cpu"], "train.nproc is 99 but this machine has"),
])
def test_bad_sweep_input_exits_2_with_one_line_and_creates_nothing(db_path, capsys, grid, message):
    from engine.cli import main

    rc = main(["sweep", "demo", *tiny(), *grid, "--db", str(db_path)])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and message in err[0], err
    db = RunDB(db_path)
    assert db.list_runs() == [] and Queue(db).entries() == [] and Queue(db).sweeps() == []


def test_cancel_reorder_and_a_killed_engine_the_queue_moves_on(cli, db_path):
    assert cli("queue", "pause").rc == 0
    # entry 1 would train for a long time; 2, 3 and 4 are short
    r = cli("sweep", "demo", *sets(*(t for t in TINY if not t.startswith("train.max_steps"))),
            "--grid", "train.max_steps=100000,4,5,6", "--json")
    assert r.rc == 0, r.stderr
    first, second, third, fourth = json.loads(r.stdout.splitlines()[-1])["entries"]
    assert cli("queue", "move", str(fourth), "1").rc == 0
    assert cli("queue", "cancel", str(second)).rc == 0
    assert [e["id"] for e in _entries(db_path) if e["status"] == "waiting"] == [fourth, first, third]
    assert cli("queue", "resume").rc == 0  # starts a runner in the background

    def long_run_training():
        e = next(e for e in _entries(db_path) if e["id"] == first)
        run = RunDB(db_path).get_run(e["run_id"]) if e["run_id"] else None
        return run if run and run["status"] == "running" and run["summary"].get("step", 0) >= 1 else None

    run = _wait(long_run_training)
    os.kill(run["pid"], signal.SIGKILL)  # the engine dies mid-run
    done = _wait(lambda: (lambda es: es if all(e["status"] not in ("waiting", "running") for e in es) else None)(
        _entries(db_path)))
    by_id = {e["id"]: e for e in done}
    assert by_id[first]["status"] == "crashed" and RunDB(db_path).get_run(run["id"])["status"] == "crashed"
    assert by_id[second]["status"] == "cancelled" and by_id[second]["run_id"] is None
    assert by_id[third]["status"] == by_id[fourth]["status"] == "completed"
    starts = [by_id[i]["started_at"] for i in (fourth, first, third)]
    assert starts == sorted(starts)  # the order the queue was given, the crash notwithstanding
    listing = cli("queue", "list", "--json")
    listed = json.loads(listing.stdout)["entries"]
    assert [e["id"] for e in listed] == [fourth, first, second, third]
    assert [e["status"] for e in listed] == ["completed", "crashed", "cancelled", "completed"]


@pytest.mark.skipif(not (PQA.is_file() and VALID.is_file()), reason=f"shared data missing under {SHARED_DATA}")
def test_then_chains_a_fine_tune_and_a_prompt_after_each_run_and_the_study_shows_their_scores(cli, db_path):
    parent = ["model.n_layer=1", "model.d_model=32", "model.n_head=2", "model.n_ctx=128", "tokenizer.vocab_size=400",
              f"data.corpus={VALID}", "train.max_steps=4", "train.batch_size=4", "train.eval_every=4",
              "train.eval_batches=1", "train.threads=1", "sparsity.kernel=dense"]
    ft, pr = Path(db_path).with_name("ft.toml"), Path(db_path).with_name("pr.toml")
    ft.write_text(_task_toml("finetune", PQA))
    pr.write_text(_task_toml("prompt", PQA) + "[prompt]\nn_tokens = 4\n")
    r = cli("sweep", "demo", *sets(*parent), "--grid", "sparsity.level=0.75", "--then", str(ft), "--then", str(pr),
            "--wait", "--json")
    assert r.rc == 0, r.stderr
    out = json.loads(r.stdout.splitlines()[-1])
    runs = {x["id"]: x for x in json.loads(cli("runs", "list", "--json").stdout)}
    (head,) = [x for x in runs.values() if x["stage"] == "pretrain"]
    children = sorted((x for x in runs.values() if x["stage"] != "pretrain"), key=lambda x: x["stage"])
    # each --then starts from the grid run itself, with the queue filling in its parent
    assert [c["stage"] for c in children] == ["finetune", "prompt"] and all(c["parent"] == head["id"] for c in children)
    assert all(c["sweep"]["id"] == out["sweep"]["id"] for c in children)
    (point,) = sweep_study(RunDB(db_path), out["sweep"]["id"])["points"]
    assert [c["stage"] for c in point["children"]] == ["finetune", "prompt"]
    for child in point["children"]:
        assert child["task"] == "pubmedqa" and 0.0 <= child["metrics"]["accuracy"] <= 1.0
        assert "majority" in child["baselines"] and "zero_shot" in child["baselines"]


def _task_toml(stage: str, pqa: Path) -> str:
    return f"""stage = "{stage}"
[task]
name = "pubmedqa"
train = "{pqa}"
fold = 0
max_examples = 12
[train]
max_steps = 4
batch_size = 4
eval_every = 4
checkpoint_every = 4
warmup_steps = 1
threads = 1
"""


def _model_run(db: RunDB, stage: str = "pretrain", checkpoint: bool = True) -> str:
    """A run row a sweep may name as parent (the sweep reads rows only; nothing trains here)."""
    run_id = db.create_run(name=f"a {stage} run", stage=stage, config={})
    if checkpoint:
        db.add_checkpoint(run_id, 3, 96, "/nonexistent/step-3.safetensors", 1, True)
    return run_id


@pytest.mark.quick
def test_a_grid_over_parent_queues_the_same_recipe_from_each_parent(db_path, capsys):
    from engine.cli import main

    db = RunDB(db_path)
    a, b = _model_run(db), _model_run(db, "finetune")
    assert main(["queue", "pause", "--db", str(db_path)]) == 0  # queued, not run
    rc = main(["sweep", "finetune-hoc", "--db", str(db_path), "--grid", f"parent={a},{b}", "--grid", "train.seed=1,2",
               "--set", "task.train=hoc/train.jsonl", "--set", "task.dev=hoc/dev.jsonl", "--name", "from-parents"])
    out = capsys.readouterr()
    assert rc == 0, out.err
    # a by-epochs preset's points count epochs (their steps come from the examples when they start)
    assert f"  parent={a} seed=1: 4 epochs\n" in out.out and " steps" not in out.out
    entries = Queue(db).entries()
    assert [(e["point"]["parent"], e["point"]["train.seed"]) for e in entries] == [(a, 1), (a, 2), (b, 1), (b, 2)]
    assert [e["label"] for e in entries] == [f"parent={a} seed=1", f"parent={a} seed=2", f"parent={b} seed=1",
                                             f"parent={b} seed=2"]
    for e in entries:  # the engine started for each entry gets its parent as a --set, and its paths absolute
        assert f"parent={e['point']['parent']}" in e["sets"] and f"task.train={Path('hoc/train.jsonl').resolve()}" in e["sets"]


@pytest.mark.quick
@pytest.mark.parametrize("kind, message", [
    ("unknown", "parent run not found: feedbeef"),
    ("prompt", "is a prompt run; a finetune run starts from a pretrain or finetune or import run"),
    ("no checkpoint", "has no checkpoint to start from yet"),
])
def test_a_bad_parent_in_the_grid_exits_2_with_one_line_before_anything_is_queued(db_path, capsys, kind, message):
    from engine.cli import main

    db = RunDB(db_path)
    good = _model_run(db)
    bad = {"unknown": "feedbeef", "prompt": _model_run(db, "prompt"),
           "no checkpoint": _model_run(db, checkpoint=False)}[kind]
    rc = main(["sweep", "finetune-hoc", "--db", str(db_path), "--grid", f"parent={good},{bad}",
               "--set", "task.train=hoc/train.jsonl", "--set", "task.dev=hoc/dev.jsonl"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and message in err[0], err
    assert Queue(db).entries() == [] and Queue(db).sweeps() == []


# -- equal-FLOPs planning: the schedule's sum over its phases, never step by step ----------------------


def _run_flops_stepwise(cfg, steps: int, vocab_size: int | None = None) -> float:
    """The reference: the planning as it was, the per-step plan summed step by step."""
    from engine.core.flops import flop_model_for_config
    from engine.core.sparsity_schedule import Schedule, gpt_layer_shapes, planned

    m, tc = cfg.model, cfg.train
    vocab = vocab_size or cfg.tokenizer.vocab_size
    tokens = tc.batch_size * tc.grad_accum * m.n_ctx * tc.nproc * tc.nnodes
    if cfg.sparsity.method == "static":
        return steps * tokens * flop_model_for_config(m.n_layer, m.d_model, m.n_ctx, vocab, cfg.sparsity.level).train_per_token(True)
    c = cfg.replace({"train.max_steps": steps})
    plan = planned(Schedule.from_config(c), gpt_layer_shapes(m.n_layer, m.d_model), steps,
                   flop_model_for_config(m.n_layer, m.d_model, m.n_ctx, vocab, 0.0))
    return tokens * sum(plan["flops_per_token"])


def _small(method: str, *extra: str):
    from engine.core.config import RunConfig, parse_overrides

    return RunConfig().replace(parse_overrides([
        "model.n_layer=2", "model.n_head=2", "model.d_model=32", "model.n_ctx=16", "tokenizer.vocab_size=300",
        "train.batch_size=2", "train.warmup_steps=0", f"sparsity.method={method}", "sparsity.update_every=7",
        *extra]))


@pytest.mark.quick
def test_the_phase_sum_equals_the_step_by_step_plan_for_every_method():
    from engine.core.flops import flop_model_for_config
    from engine.core.sparsity_schedule import Schedule, gpt_layer_shapes, planned, planned_flops_per_token

    shapes, fm = gpt_layer_shapes(2, 40), flop_model_for_config(2, 40, 16, 300, 0.0)
    cases = 0
    for method in ("static", "gmp", "set", "rigl"):
        for dist in ("uniform", "erk"):
            for start, end, every in ((0, 30, 1), (0, 30, 4), (3, 31, 5), (6, 40, 10), (9, 5, 3)):  # (9, 5): no update
                sched = Schedule(method, 0.8, 0.25 if method == "gmp" else 0.8, start, end, every, 0.3, dist)
                for n in (0, 1, 2, 3, 4, 5, 6, 9, 10, 29, 30, 31, 32, 45):
                    assert sched.update_steps(n) == sched.updates(n) and sched.update_count(n) == len(sched.updates(n))
                    want = sum(planned(sched, shapes, n, fm)["flops_per_token"])
                    assert planned_flops_per_token(sched, shapes, n, fm) == want, (sched, n)
                    cases += 1
    assert cases == 560


@pytest.mark.parametrize("method, extra", [
    ("static", ()), ("gmp", ()), ("gmp", ("sparsity.initial=0.3", "sparsity.distribution=erk")),
    ("gmp", ("sparsity.start_step=5", "sparsity.end_step=90")), ("set", ()), ("rigl", ()),
    ("rigl", ("sparsity.distribution=erk", "sparsity.start_step=3", "sparsity.end_step=60", "sparsity.level=0.9")),
])
def test_equal_flops_planning_equals_the_step_by_step_planning(monkeypatch, method, extra):
    import engine.orchestrate.sweep as sw

    cfg = _small(method, *extra)
    for n in (1, 6, 7, 8, 59, 60, 61, 90, 133):
        assert sw.run_flops(cfg, n) == _run_flops_stepwise(cfg, n), n
    one = _run_flops_stepwise(cfg, 6)
    for budget, vocab in ((one * 1.01, None), (one * 13.7, 257), (one * 40, None), (one * 71.3, None)):
        fast = sw.Point({}, cfg, [])
        sw.equalize(fast, budget, vocab)
        with monkeypatch.context() as mp:  # the same search over the old step-by-step FLOPs
            mp.setattr(sw, "run_flops", _run_flops_stepwise)
            slow = sw.Point({}, cfg, [])
            sw.equalize(slow, budget, vocab)
        assert (fast.cfg.train.max_steps, fast.planned_flops, fast.sets) == \
               (slow.cfg.train.max_steps, slow.planned_flops, slow.sets), (budget, vocab)


@pytest.mark.quick
def test_a_3e14_gmp_sweep_plans_by_phases_not_step_by_step(monkeypatch):
    import engine.core.sparsity_schedule as ss
    import engine.orchestrate.sweep as sw
    from engine.core.paths import resolve_preset

    def per_step(*a, **k):
        raise AssertionError("the planning went step by step")

    calls = []
    phase_sum = ss.planned_flops_per_token
    monkeypatch.setattr(ss, "planned", per_step)
    monkeypatch.setattr(ss.Schedule, "sparsity_during", per_step)
    monkeypatch.setattr(ss.Schedule, "is_update", per_step)
    monkeypatch.setattr(ss, "planned_flops_per_token", lambda *a: calls.append(a[2]) or phase_sum(*a))
    plan = sw.plan_sweep(resolve_preset("demo"), ["sparsity.method=gmp"], ["sparsity.level=0.75,0.9"], "3e14")
    assert len(calls) < 100  # a bisection: tens of sums, each over the schedule's mask updates
    for p in plan.points:
        steps = p.cfg.train.max_steps
        assert steps > 20_000 and p.sets[-1] == f"train.max_steps={steps}"
        assert abs(p.planned_flops - 3e14) <= p.planned_flops / steps  # within a step of the budget
        below, above = sw.run_flops(p.cfg, steps - 1), sw.run_flops(p.cfg, steps + 1)
        assert below < p.planned_flops < above and abs(p.planned_flops - 3e14) <= min(abs(below - 3e14), abs(above - 3e14))
