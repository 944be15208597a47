"""Runs on several processes through torchrun's launcher (Gloo on the CPU), against one process.

2 processes x 1 micro-batch must train on exactly the micro-batches 1 process x 2 accumulates, so
their loss curves agree (DDP and FSDP2, masked-dense path and sparse core); a run checkpointed by 2
processes resumes on 1 and continues the same batch order; a rank killed mid-run ends the run as
crashed with no process left behind, and the run resumes.
"""
from __future__ import annotations

import json
import os
import signal
import time

import pytest
from helpers import PUBMED_TRAIN, needs_shared_data, process_table, read_until, start_train, tiny

from engine.store.rundb import RunDB

pytestmark = needs_shared_data()

CORPUS = f"data.corpus={PUBMED_TRAIN}"
# one step is 2 micro-batches either way: (1 process, grad_accum 2, 2 threads) or (2 processes x 1 thread)
BASE = (CORPUS, "train.max_steps=20", "train.checkpoint_every=5", "train.eval_every=10", "model.dropout=0.0")
SINGLE = ("train.grad_accum=2", "train.threads=2")
GROUP = ("train.nproc=2", "train.threads=0")


def losses(result) -> dict[int, float]:
    return {m["step"]: m["metrics"]["loss"] for m in result.of_type("metrics") if "loss" in m["metrics"]}


@pytest.fixture(scope="module")
def references(tmp_path_factory):
    """One-process runs (dense path and sparse core), computed once for the module."""
    import subprocess
    import sys

    from helpers import REPO, CliResult, engine_env

    tmp = tmp_path_factory.mktemp("reference")
    out = {}
    for kernel in ("dense", "sparse"):
        cmd = [sys.executable, "-m", "engine", "train", "demo", *tiny(*BASE, *SINGLE, f"sparsity.kernel={kernel}"),
               "--db", str(tmp / "runs.db")]
        r = CliResult(subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=REPO, env=engine_env(tmp)))
        assert r.rc == 0, r.stderr
        out[kernel] = losses(r)
    return out


# (DDP with the masked-dense path: test_killed_rank_... compares its steps before the kill, and after its resume)
@pytest.mark.parametrize("strategy,kernel", [("ddp", "sparse"), ("fsdp", "dense"), ("fsdp", "sparse")])
def test_two_processes_train_what_one_process_accumulates(cli, db_path, references, strategy, kernel):
    r = cli("train", "demo", *tiny(*BASE, *GROUP, f"train.strategy={strategy}", f"sparsity.kernel={kernel}"))
    assert r.rc == 0, r.stderr
    group = losses(r)
    assert sorted(group) == list(range(1, 21))
    ref = references[kernel]
    worst = max(abs(group[s] - ref[s]) / abs(ref[s]) for s in ref)
    assert worst <= 1e-4, f"{strategy}/{kernel}: loss differs by {worst:.2e} (relative)"
    # one voice: exactly one run, one start and one finish on stdout, rank 0's
    assert len(r.of_type("run_started")) == len(r.of_type("run_finished")) == 1
    db = RunDB(db_path)
    assert [row["id"] for row in db.list_runs()] == [r.run_id]
    run = db.get_run(r.run_id)
    assert run["meta"]["world"] == {"size": 2, "nproc": 2, "nnodes": 1, "strategy": strategy, "backend": "gloo"}
    # tokens summed over the ranks: 20 steps x 2 ranks x 4 sequences x 32 tokens
    assert run["summary"]["tokens"] == 20 * 2 * 4 * 32
    assert len(db.checkpoints(r.run_id)) == 4
    if strategy == "ddp":
        ex = run["meta"]["grad_exchange"]
        # only the packed nonzeros of the masked layers travel: 25 % of their dense bytes at 75 %
        assert ex["masked_layers_ratio"] == pytest.approx(0.25, abs=0.01)
        assert ex["masked_layers_bytes"] < ex["bytes_per_step"] < ex["model_dense_bytes"]


def _workers_of(pid: int) -> list[int]:
    """The worker processes the launcher ``pid`` spawned (children running multiprocessing's spawn_main)."""
    return [p["pid"] for p in process_table() if p["ppid"] == pid and b"spawn_main" in p["cmdline"]]


def _alive(pid: int) -> bool:
    return any(p["pid"] == pid for p in process_table())


def test_killed_rank_crashes_the_run_then_it_resumes_on_one_process(tmp_path, cli, db_path, references):
    proc = start_train(tmp_path, db_path, *tiny(*BASE, *GROUP, "sparsity.kernel=dense"))
    try:
        started, _ = read_until(proc, lambda e: e["type"] == "run_started")
        _, seen = read_until(proc, lambda e: e["type"] == "checkpoint" and e["step"] >= 5)
        proc.stdin.write(json.dumps({"cmd": "pause"}) + "\n")  # the launcher passes it on; the ranks agree on it
        proc.stdin.flush()
        read_until(proc, lambda e: e["type"] == "status" and e["status"] == "paused")
        workers = _workers_of(proc.pid)
        assert len(workers) == 2 and started["pid"] in workers  # rank 0 holds the run
        os.kill(next(p for p in workers if p != started["pid"]), signal.SIGKILL)
        proc.wait(timeout=120)
    finally:
        if proc.poll() is None:  # a failed step above: leave no paused group behind
            for p in _workers_of(proc.pid):
                os.kill(p, signal.SIGKILL)
            proc.kill()
    assert proc.returncode != 0
    deadline = time.monotonic() + 10
    while any(_alive(p) for p in workers) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not any(_alive(p) for p in workers), "a rank outlived the run"
    run = RunDB(db_path).get_run(started["run_id"])
    assert run["status"] == "crashed", run
    # the steps the two DDP processes trained equal the one process's
    ref = references["dense"]
    before = {e["step"]: e["metrics"]["loss"] for e in seen if e["type"] == "metrics" and "loss" in e["metrics"]}
    assert len(before) >= 5
    assert max(abs(before[s] - ref[s]) / abs(ref[s]) for s in before) <= 1e-4
    assert run["error"]

    # on one process: grad_accum becomes 2 (the global batch kept), the batch order continues
    resumed = cli("train", "--resume", started["run_id"], "--set", "train.nproc=1", "--set", "train.threads=2")
    assert resumed.rc == 0, resumed.stderr
    assert "with train.grad_accum = 2, keeping its global batch" in resumed.stderr
    after = losses(resumed)
    assert min(after) in (6, 11, 16) and max(after) == 20
    ref = references["dense"]
    for step, loss in after.items():
        assert loss == pytest.approx(ref[step], rel=1e-4), f"step {step}"
    db = RunDB(db_path)
    assert db.get_run(started["run_id"])["status"] == "completed"
    assert db.get_run(started["run_id"])["config"]["train"]["grad_accum"] == 2
    assert [r["step"] for r in db.metrics(started["run_id"], names=["loss"])] == list(range(1, 21))


@pytest.mark.quick
@pytest.mark.parametrize("sets,key", [
    (("train.nproc=64",), "train.nproc"),
    (("train.nproc=2", "train.threads=2"), "train.threads"),
    (("train.nproc=2", "train.rdzv_endpoint='no-such-host.invalid:29500'"), "train.rdzv_endpoint"),
    (("train.nproc=2", "train.rdzv_endpoint='localhost'"), "train.rdzv_endpoint"),
    (("train.nproc=1", "train.nnodes=2"), "train.rdzv_endpoint"),
    (("train.strategy='fsdp'",), "train.strategy"),
])
def test_a_group_this_machine_cannot_run_is_refused_before_it_starts(tmp_path, capsys, sets, key):
    # in-process: the checks come before any worker, run row or heavy import
    from engine.cli import main

    db = tmp_path / "runs.db"
    assert main(["train", "demo", *tiny(CORPUS, *sets), "--db", str(db)]) == 2
    out, err = capsys.readouterr()
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and key in lines[0], err
    events = [json.loads(ln) for ln in out.splitlines() if ln.startswith("{")]
    assert [e["key"] for e in events if e["type"] == "error"] == [key]
    assert not [e for e in events if e["type"] == "run_started"] and RunDB(db).list_runs() == []


@pytest.mark.quick
def test_an_unreachable_rendezvous_host_is_refused(tmp_path, capsys, monkeypatch):
    from engine.cli import main

    monkeypatch.setenv("MEDISWIFT_RDZV_WAIT_S", "1")
    # TEST-NET-1 (RFC 5737): routed nowhere, so nothing answers
    db = tmp_path / "runs.db"
    args = tiny(CORPUS, "train.nproc=1", "train.nnodes=2", "train.rdzv_endpoint='192.0.2.1:29500'")
    assert main(["train", "demo", *args, "--db", str(db)]) == 2
    err = capsys.readouterr().err
    assert "cannot reach the rendezvous endpoint 192.0.2.1:29500" in err, err
    assert RunDB(db).list_runs() == []


def test_the_gpu_benchmark_script_runs_on_the_cpu():
    """bench/gpu_step.py is the prepared GPU check; its --smoke mode proves the script itself here."""
    import subprocess
    import sys

    from helpers import REPO

    r = subprocess.run([sys.executable, "bench/gpu_step.py", "--smoke", "--no-engine", "--json", "--steps", "1"],
                       capture_output=True, text=True, cwd=REPO, timeout=300)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert "AVX2" in out["header"]["cpu"] and out["header"]["bf16_matmul_peak_tflops"] > 0
    assert [s["shape"] for s in out["shapes"]] == ["gpt3-125m", "mediswift-med"]
    for s in out["shapes"]:
        assert s["dense"]["tokens_per_s"] > 0 and s["sparse_vs_dense_step"] > 0
