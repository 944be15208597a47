"""Fine-tuning by epochs, measured against the run itself: `mediswift estimate` counts the steps, tokens
and FLOPs a by-epochs run trains (and the windows of a classification head), the memory check counts the
windows the run's largest micro-batch really holds, and a by-epochs run with early stopping that is
killed or stopped after a checkpoint and resumed ends as the uninterrupted run did. A tiny parent, small
slices of the real HoC files, the real CLI: in a subprocess for the runs that are killed or stopped, its
``main`` in this process for the rest (no interpreter start-up and torch import each)."""
from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import hoc_slices, REPO, SHARED_DATA, cli_inproc, engine_env, read_until, sets
from test_finetune import PARENT, Env

from engine.core.config import from_dict, load_config, load_toml
from engine.core.errors import InputError
from engine.core.paths import resolve_preset
from engine.store.rundb import RunDB
from engine.train.estimate import StepShape, memory_breakdown

HOC = SHARED_DATA / "hoc"
VALID = SHARED_DATA / "pubmed_abstracts" / "valid.txt"
pytestmark = pytest.mark.skipif(not (HOC.is_dir() and VALID.is_file()), reason=f"shared data missing under {SHARED_DATA}")

N_TRAIN, N_DEV, BATCH = 22, 6, 4  # ceil(22 / 4) = 6 steps an epoch (the last batch runs into the next epoch's order)


@pytest.fixture(scope="module")
def env(tmp_path_factory) -> Env:
    """The tiny parent of tests/test_finetune.py (n_ctx 128: every HoC abstract is read in several
    windows), trained through the CLI in this process, and slices of the HoC files: the first training
    abstracts, and development abstracts whose hallmarks all occur in them."""
    e = Env(tmp_path_factory.mktemp("epochs"))
    r = cli_inproc(e.tmp, e.db, "train", "demo", *sets(*PARENT, "name=parent"))
    assert r.rc == 0, r.stderr
    e.parent = r.run_id
    e.train, e.dev = hoc_slices(e.tmp, N_TRAIN, N_DEV)
    return e


def hoc(env: Env, *extra: str) -> list[str]:
    return [f"parent={env.parent}", f"task.train={env.train}", f"task.dev={env.dev}", f"train.batch_size={BATCH}",
            "train.threads=1", "train.warmup_steps=1", "train.log_every=1", *extra]


# -- units -----------------------------------------------------------------------------------------


@pytest.mark.quick
def test_memory_counts_the_step_shapes_positions_and_no_lm_logits_for_a_head():
    cfg = load_config(None, {"stage": "finetune", "parent": "abc", "task.name": "hoc", "task.head": "classifier",
                             "train.batch_size": 4, "model.n_ctx": 64, "train.precision": "fp32"})
    plain = memory_breakdown(cfg)
    shape = StepShape(peak_rows=13, peak_tokens=13 * 64, tokens=0, micro_batches=1, windows_per_example=3.2)
    windows = memory_breakdown(cfg, shape)
    # activations scale with the positions of the largest micro-batch: 13 windows, not 4 sequences
    assert windows["activations"] == plain["activations"] * 13 // 4
    assert windows["logits"] == 0 and plain["logits"] > 0  # a classification head forms no [tokens, vocab] logits
    assert windows["states"] == plain["states"]


# -- end to end ------------------------------------------------------------------------------------


def test_estimate_counts_epochs_and_windows_as_the_run_trains_them(env):
    args = hoc(env, "train.epochs=2", "train.early_stopping_patience=0")
    est = cli_inproc(env.tmp, env.db, "estimate", "finetune-hoc", "--json", "--probe-steps", "1", *sets(*args))
    assert est.rc == 0, est.stderr
    e = json.loads(est.stdout.splitlines()[-1])
    run = cli_inproc(env.tmp, env.db, "train", "finetune-hoc", *sets(*args))  # the CLI's train, in this process
    assert run.rc == 0, run.stderr
    db = RunDB(env.db)
    row = db.get_run(run.run_id)
    steps = 2 * math.ceil(N_TRAIN / BATCH)
    assert e["epochs"] == 2 and e["max_steps"] == row["config"]["train"]["max_steps"] == steps
    assert e["notes"] and f"= {steps} steps" in e["notes"][-1]
    assert row["config"]["model"]["n_ctx"] == 128  # the parent's shape, in the estimate too (its windows)
    # tokens: every position of every micro-batch the run built (all windows, right-padded)
    assert e["tokens"] == row["summary"]["tokens"]
    per_step = [r["tokens"] for r in db.metrics(run.run_id, names=["loss"])]
    assert len(per_step) == steps
    step_tokens = [b - a for a, b in zip([0, *per_step], per_step)]
    shape = e["step_shape"]
    assert shape["peak_tokens"] == max(step_tokens) > BATCH * 128  # several windows per abstract
    assert shape["windows_per_example"] > 1
    assert shape["micro_batches"] == steps
    # FLOPs and ETA follow the steps and tokens
    assert e["flops"]["dense"] == pytest.approx(e["flops"]["per_token_dense"] * e["tokens"])
    assert e["eta_seconds"] == pytest.approx(e["step_seconds"] * steps)
    # memory: the largest micro-batch's windows
    cfg = from_dict(row["config"])
    parts = memory_breakdown(cfg, StepShape(**shape))
    assert e["memory_parts"] == parts
    assert parts["activations"] == memory_breakdown(cfg)["activations"] * max(step_tokens) // (BATCH * 128)

    # --set train.max_steps turns epochs off, as it does for train
    preset_epochs = load_toml(resolve_preset("finetune-hoc"))["train"]["epochs"]
    assert preset_epochs > 0
    e5 = json.loads(cli_inproc(env.tmp, env.db, "estimate", "finetune-hoc", "--json", "--probe-steps", "0",
                               *sets(*hoc(env, "train.max_steps=5"))).stdout.splitlines()[-1])
    assert (e5["max_steps"], e5["epochs"], e5["step_shape"]["micro_batches"]) == (5, 0, 5)
    assert f"train.epochs ({preset_epochs}) is off" in e5["notes"][-1]
    # the preset's own epochs over the slice, without --set
    ep = json.loads(cli_inproc(env.tmp, env.db, "estimate", "finetune-hoc", "--json", "--probe-steps", "0",
                               *sets(*hoc(env))).stdout.splitlines()[-1])
    assert (ep["max_steps"], ep["epochs"]) == (preset_epochs * math.ceil(N_TRAIN / BATCH), preset_epochs)


def test_the_memory_check_refuses_what_the_windows_need(env, monkeypatch):
    from engine.train import plan

    db = RunDB(env.db)
    request = plan.RunRequest("finetune-hoc", tuple(hoc(env, "train.epochs=1")))
    cfg = plan.prepare_run(request, db).cfg  # passes with this machine's memory
    shape = plan.step_shape(cfg, plan.check_parent(db, cfg))
    need = sum(memory_breakdown(cfg, shape).values())
    assert shape.peak_rows > BATCH
    monkeypatch.setattr(plan, "available_memory", lambda: int(need / 0.9 * 0.98))
    with pytest.raises(InputError, match="needs about"):
        plan.prepare_run(request, db)
    monkeypatch.setattr(plan, "available_memory", lambda: int(need / 0.9 * 1.02))
    assert plan.prepare_run(request, db).cfg.train.max_steps == math.ceil(N_TRAIN / BATCH)


def _popen(env: Env, *args: str) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "engine", *args, "--db", str(env.db)]
    return subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            cwd=REPO, env=engine_env(env.tmp))


def _outcome(db: RunDB, run_id: str) -> dict:
    run = db.get_run(run_id)
    best = dict(run["meta"].get("best_checkpoint") or {})
    best["path"] = Path(best.get("path") or "").name
    return {"loss": [(m["step"], m["value"]) for m in db.metrics(run_id, names=["loss"])],
            "evaluations": [(ev["step"], ev["metrics"]["micro_f1"]) for ev in db.evaluations(run_id)],
            "best_checkpoint": best, "best_step": run["summary"].get("best_step"),
            "stopped_early": run["summary"].get("stopped_early"), "step": run["summary"]["step"],
            "status": run["status"]}


# 6 epochs of 6 steps at patience 1; a checkpoint every 4 steps, so step 8 is in the second epoch,
# after the first epoch's evaluation and its best checkpoint at step 6
def _resume_args(env: Env) -> list[str]:
    return sets(*hoc(env, "train.epochs=6", "train.early_stopping_patience=1", "train.checkpoint_every=4",
                     "train.lr=3e-3"))


@pytest.fixture(scope="module")
def reference(env) -> dict:
    """The uninterrupted run both resume cases must end as (trained once, through the CLI in this process)."""
    ref = cli_inproc(env.tmp, env.db, "train", "finetune-hoc", *_resume_args(env))
    assert ref.rc == 0, ref.stderr
    out = _outcome(RunDB(env.db), ref.run_id)
    assert out["status"] == "completed" and out["best_step"] is not None
    assert out["stopped_early"] is True and out["step"] < 36  # early stopping ended it
    return out


@pytest.mark.parametrize("how", ["sigkill", "sigterm"])
def test_a_by_epochs_run_killed_or_stopped_and_resumed_ends_as_the_uninterrupted_run(env, reference, how):
    args = _resume_args(env)
    proc = _popen(env, "train", "finetune-hoc", *args)
    try:
        started, _ = read_until(proc, lambda e: e["type"] == "run_started", timeout=120)
        read_until(proc, lambda e: e["type"] == "checkpoint" and e["step"] == 8, timeout=120)
        if how == "sigkill":  # paused first, so the kill lands at step 8 whatever the machine's speed
            proc.stdin.write(json.dumps({"cmd": "pause"}) + "\n")
            proc.stdin.flush()
            read_until(proc, lambda e: e["type"] == "status" and e["status"] == "paused", timeout=60)
            os.kill(proc.pid, signal.SIGKILL)
        else:  # finishes the step it is in, checkpoints and exits as `stopped`
            proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    run_id = started["run_id"]
    db = RunDB(env.db)
    db.reap_crashed()
    assert db.get_run(run_id)["status"] == ("crashed" if how == "sigkill" else "stopped")
    resumed = cli_inproc(env.tmp, env.db, "train", "--resume", run_id)  # the CLI's resume, in this process
    assert resumed.rc == 0, resumed.stderr
    assert _outcome(RunDB(env.db), run_id) == reference
