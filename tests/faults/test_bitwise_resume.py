"""Bitwise reproducibility: in bf16 and fp32, on the sparse core and the masked dense path, a run
SIGKILLed after a checkpoint and resumed in a fresh process logs every loss row bitwise equal to the
uninterrupted run's, and two fresh runs of the same config and seed are bitwise equal. (A resumed
bf16 run once left the sparse core: its first self-check ran inside autocast and failed.)

The killed runs and their resumes are real processes (a resume inherits nothing from the killed one);
the four chains run side by side while the uninterrupted runs go in this process."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from helpers import PUBMED_TRAIN, REPO, cli_inproc, engine_env, needs_shared_data, tiny

from engine.store.rundb import RunDB

pytestmark = needs_shared_data()
CASES = [(p, k) for p in ("bf16", "fp32") for k in ("sparse", "dense")]


def _args(precision: str, kernel: str) -> list[str]:
    return tiny(f"data.corpus={PUBMED_TRAIN}", "train.max_steps=8", "train.checkpoint_every=4", "train.eval_every=4",
                "train.log_every=1", f"train.precision={precision}", f"sparsity.kernel={kernel}")


def _losses(db: Path, run_id: str) -> dict[int, float]:
    runs = RunDB(db)
    try:
        return {m["step"]: m["value"] for m in runs.metrics(run_id, names=["loss"])}
    finally:
        runs.close()


def _kill_and_resume(tmp: Path, db: Path, args: list[str], out: dict) -> None:
    """A run SIGKILLed as soon as its step-4 checkpoint is announced, then resumed in a new process."""
    env = engine_env(tmp)
    cmd = [sys.executable, "-m", "engine"]
    proc = subprocess.Popen([*cmd, "train", "demo", *args, "--db", str(db)], stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, cwd=REPO, env=env)
    run_id, ckpt_step = None, None
    try:
        for line in proc.stdout:
            e = json.loads(line) if line.startswith("{") else {}
            run_id = run_id or e.get("run_id")
            if e.get("type") == "checkpoint":
                os.kill(proc.pid, signal.SIGKILL)
                ckpt_step = e.get("step")
                break
    finally:
        if proc.poll() is None and ckpt_step is None:
            proc.kill()
        proc.wait(timeout=60)
        proc.stdout.close()
    runs = RunDB(db)
    runs.reap_crashed()
    out["killed_status"] = runs.get_run(run_id)["status"] if run_id else None
    runs.close()
    out["run_id"], out["checkpoint_step"] = run_id, ckpt_step
    r = subprocess.run([*cmd, "train", "--resume", run_id, "--db", str(db)], capture_output=True, text=True,
                       cwd=REPO, env=env, timeout=300)
    out["resume_rc"], out["resume_stderr"] = r.returncode, r.stderr[-2000:]
    out["losses"] = _losses(db, run_id)
    out["meta"] = RunDB(db).get_run(run_id)["meta"]


@pytest.fixture(scope="module")
def chains(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("bitwise")
    # one run first so the tokenizer and token cache exist before the runs that share the folder
    results: dict[tuple, dict] = {case: {} for case in CASES}
    first = cli_inproc(tmp, tmp / "runs.db", "train", "demo", *_args(*CASES[0]))
    assert first.rc == 0, first.stderr
    results[CASES[0]]["fresh"] = [(tmp / "runs.db", first.run_id)]
    threads = [threading.Thread(target=_kill_and_resume, args=(tmp, tmp / f"killed-{p}-{k}.db", _args(p, k),
                                                                 results[(p, k)]))
               for p, k in CASES]
    for t in threads:
        t.start()
    for case in CASES:  # the uninterrupted runs, twice each, meanwhile
        while len(results[case].setdefault("fresh", [])) < 2:
            r = cli_inproc(tmp, tmp / "runs.db", "train", "demo", *_args(*case))
            assert r.rc == 0, r.stderr
            results[case]["fresh"].append((tmp / "runs.db", r.run_id))
    for t in threads:
        t.join(timeout=400)
    for case in CASES:
        results[case]["fresh_losses"] = [_losses(db, rid) for db, rid in results[case]["fresh"]]
        results[case]["fresh_meta"] = RunDB(tmp / "runs.db").get_run(results[case]["fresh"][0][1])["meta"]
    return results


@pytest.mark.parametrize("precision,kernel", CASES)
def test_resume_after_sigkill_equals_the_uninterrupted_run_bitwise(chains, precision, kernel, record):
    c = chains[(precision, kernel)]
    reference = c["fresh_losses"][0]
    assert set(reference) == set(range(1, 9))
    killed_mid_run = c.get("killed_status") == "crashed" and c.get("checkpoint_step") == 4
    equal = c.get("resume_rc") == 0 and c.get("losses") == reference  # every row, float for float
    differ = sorted(s for s in reference if c.get("losses", {}).get(s) != reference[s])
    assert record(f"{precision} kill-and-resume equality (bitwise)", killed_mid_run and equal), (
        c.get("killed_status"), c.get("checkpoint_step"), differ, c.get("resume_stderr"))
    assert c["meta"]["bitwise"] == {"same_seed": True, "resume": True, "why": []}


@pytest.mark.parametrize("precision,kernel", CASES)
def test_two_fresh_runs_with_one_seed_are_bitwise_equal(chains, precision, kernel, record):
    c = chains[(precision, kernel)]
    a, b = c["fresh_losses"]
    # the killed run was a fresh run in a process of its own up to its checkpoint
    killed = {s: v for s, v in c.get("losses", {}).items() if s <= 4}
    held = a == b and len(a) == 8 and killed == {s: v for s, v in a.items() if s <= 4}
    assert record(f"{precision} same-seed runs equal (bitwise)", held), (a, b, killed)
    assert c["fresh_meta"]["bitwise"]["same_seed"] is True


@pytest.mark.quick
def test_a_kernel_trial_cut_by_a_checkpoint_goes_on_where_it_was(record):
    """sparsity.kernel = auto: a checkpoint inside the first steps' trial keeps the steps still to try,
    so the resumed run takes the same kernels at the same steps."""
    from engine.train.kernel_choice import KernelTrial

    class Quiet:
        def meta(self, **kw): ...
        def info(self, line): ...

    class Model:
        def sparse_layers(self):
            return {}

        def modules(self):
            return []

    trial = KernelTrial(Quiet(), Model(), {"h.0.mlp.fc": "sparse"})
    for _ in range(3):
        trial.before_step()
        trial.after_step(0.2 if trial.current == "dense" else 0.1)
    state = json.loads(json.dumps(trial.state()))  # what a checkpoint's JSON keeps
    again = KernelTrial.resumed(Quiet(), Model(), state)
    held = (again.plan == trial.plan == ["mix", "dense", "mix"] and again.times == trial.times
            and again.mix == trial.mix)
    for t in (trial, again):
        while not t.done:
            t.before_step()
            t.after_step(0.2 if t.current == "dense" else 0.1)
    held = held and trial.state() is None and again.kernels == trial.kernels == {"h.0.mlp.fc": "sparse"}
    assert record("auto kernels: a trial cut by a checkpoint goes on", held)
