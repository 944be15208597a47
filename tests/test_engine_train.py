"""End-to-end runs of the real CLI on real data: events, database, checkpoints, sparsity, resume."""
from __future__ import annotations

import json
import os
import signal

import pytest
import torch
from helpers import PUBMED_TRAIN, needs_shared_data
from helpers import read_until as _read_until
from helpers import start_train as _start
from helpers import tiny

from engine.core.events import EVENT_FIELDS, validate_event
from engine.store.rundb import RunDB

pytestmark = needs_shared_data()
CORPUS = f"data.corpus={PUBMED_TRAIN}"


def test_demo_shaped_run_completes_with_valid_events_and_rows(cli, db_path):
    r = cli("train", "demo", *tiny(CORPUS, "train.max_steps=12", "train.eval_every=4", "train.lr=0.01"))
    assert r.rc == 0, r.stderr
    for e in r.events:  # every line on stdout is a schema-valid event
        validate_event(e)
        assert e["type"] in EVENT_FIELDS
    types = [e["type"] for e in r.events]
    assert types[0] == "run_started" and types.count("run_started") == types.count("run_finished") == 1
    assert types[-1] == "run_finished" or types[-2:] == ["run_finished", "log"]  # the closing log line may follow
    metrics = r.of_type("metrics")
    assert [m["step"] for m in metrics if "loss" in m["metrics"]] == list(range(1, 13))
    # counters grow monotonically; sparse FLOPs are below the dense-equivalent at 75 %
    assert all(b["flops"] > a["flops"] and b["tokens"] > a["tokens"] for a, b in zip(metrics, metrics[1:]))
    assert metrics[-1]["flops"] < metrics[-1]["flops_dense"]
    evals = r.of_type("eval")
    assert [e["step"] for e in evals] == [4, 8, 12]
    assert evals[-1]["metrics"]["loss"] < evals[0]["metrics"]["loss"], "validation loss should fall"

    db = RunDB(db_path)
    run = db.get_run(r.run_id)
    assert run["status"] == "completed" and run["stage"] == "pretrain"
    assert run["versions"]["torch"] == torch.__version__
    rows = db.metrics(r.run_id, names=["loss"])
    assert [row["step"] for row in rows] == list(range(1, 13))
    assert rows[-1]["value"] == pytest.approx(metrics[-1]["metrics"]["loss"])
    assert [c["step"] for c in db.checkpoints(r.run_id)][-1] == 12
    assert db.artifacts(r.run_id, "tokenizer")

    ins = cli("inspect", r.run_id, "--json")
    assert ins.rc == 0, ins.stderr
    report = json.loads(ins.stdout)
    assert report["sparsity"]["total"] == pytest.approx(0.75, abs=1e-3)
    assert all(v == pytest.approx(0.75, abs=0.01) for v in report["sparsity"]["layers"].values())
    assert len(report["sparsity"]["layers"]) == 6  # q, k, v, out, fc, proj of one block
    # the matmul path each layer trained with, as recorded in the run's metadata
    assert report["kernels"] == RunDB(db_path).get_run(r.run_id)["meta"]["kernels"]
    assert set(report["kernels"]) == set(report["sparsity"]["layers"])
    assert set(report["kernels"].values()) <= {"sparse", "dense"}
    layer_lines = {line.split()[0]: line for line in cli("inspect", r.run_id).stdout.splitlines() if line.startswith("  ")}
    assert all(layer_lines[name].endswith(f"kernel {k}") for name, k in report["kernels"].items())
    assert report["params"]["nonzero"] < report["params"]["total"]
    assert report["flops_per_token"]["sparse"] < report["flops_per_token"]["dense"]

    listed = json.loads(cli("runs", "list", "--json").stdout)
    assert listed[0]["id"] == r.run_id and listed[0]["status"] == "completed"
    shown = json.loads(cli("runs", "show", r.run_id, "--json").stdout)
    assert shown["summary"]["val_loss"] == pytest.approx(evals[-1]["metrics"]["loss"])
    assert shown["summary"]["tokens"] == metrics[-1]["tokens"]
    csv_out = cli("metrics", r.run_id, "--csv").stdout.splitlines()
    assert csv_out[0].startswith("step,tokens,")
    assert len(csv_out) - 1 == len(db.metrics(r.run_id))


def test_masked_weights_stay_zero_and_adamw_state_covers_only_the_nonzeros(cli, db_path):
    r = cli("train", "demo", *tiny(CORPUS, "train.max_steps=50", "train.checkpoint_every=50", "train.eval_every=50",
                                   "sparsity.level=0.8", "sparsity.distribution=erk", "train.weight_decay=0.5"))
    assert r.rc == 0, r.stderr
    from engine.model.checkpoint import load_checkpoint

    ck = load_checkpoint(RunDB(db_path).latest_checkpoint(r.run_id)["path"])
    params = dict(ck["model"])
    names = list(ck["masks"])
    assert len(names) == 6
    # optimizer state is indexed by parameter order: map names via the same order as named_parameters
    from engine.core.config import from_dict
    from engine.model.gpt import GPT
    from engine.model.sparsity import load_masks

    model = GPT(from_dict(ck["config"]).model, ck["vocab_size"])
    load_masks(model, ck["masks"])
    model.load_state_dict(ck["model"])
    from engine.core.config import TrainConfig
    from engine.train.optim import make_optimizer

    order = {id(p): n for n, p in model.named_parameters()}
    state = ck["optimizer"]["state"]
    flat = [p for g in make_optimizer(list(model.named_parameters()), TrainConfig()).param_groups for p in g["params"]]
    moments = {order[id(p)]: state[i] for i, p in enumerate(flat)}
    total_zero = 0
    for name in names:
        mask = ck["masks"][name]
        w = params[name + ".weight"]
        assert torch.all(w[~mask] == 0), f"{name}: masked weights moved"
        assert torch.all(w[mask] != 0), f"{name}: a kept weight is exactly zero"
        # a masked matrix trains as its packed nonzeros: AdamW holds moments for those alone
        for moment in ("exp_avg", "exp_avg_sq"):
            assert moments[name + ".values"][moment].shape == (int(mask.sum()),)
        assert torch.all(moments[name + ".values"]["exp_avg_sq"] > 0)
        total_zero += int((~mask).sum())
    total = sum(ck["masks"][n].numel() for n in names)
    assert total_zero / total == pytest.approx(0.8, abs=1e-3)
    # ERK gives different levels to differently shaped layers
    levels = {n: 1 - float(ck["masks"][n].float().mean()) for n in names}
    assert levels["blocks.0.attn.q"] != pytest.approx(levels["blocks.0.mlp.fc"], abs=1e-3)


def test_kill_then_crash_detection_then_resume_equals_uninterrupted(tmp_path, cli, db_path):
    args = tiny(CORPUS, "train.max_steps=30", "train.checkpoint_every=6", "train.eval_every=10", "sparsity.kernel=dense")
    full = cli("train", "demo", *args)
    assert full.rc == 0, full.stderr
    reference = {m["step"]: m["metrics"]["loss"] for m in full.of_type("metrics") if "loss" in m["metrics"]}

    proc = _start(tmp_path, db_path, *args)
    _read_until(proc, lambda e: e["type"] == "checkpoint" and e["step"] == 6)
    proc.stdin.write(json.dumps({"cmd": "pause"}) + "\n")
    proc.stdin.flush()
    started, _ = _read_until(proc, lambda e: e["type"] == "status" and e["status"] == "paused")
    run_id = started["run_id"]
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    assert RunDB(db_path).get_run(run_id)["status"] == "paused"  # nobody has looked yet

    listed = json.loads(cli("runs", "list", "--json").stdout)
    assert {r["id"]: r["status"] for r in listed}[run_id] == "crashed"

    resumed = cli("train", "--resume", run_id)
    assert resumed.rc == 0, resumed.stderr
    after = {m["step"]: m["metrics"]["loss"] for m in resumed.of_type("metrics") if "loss" in m["metrics"]}
    first = min(after)
    assert first in (7, 13, 19, 25) and max(after) == 30
    for step, loss in after.items():
        assert loss == pytest.approx(reference[step], abs=1e-5), f"step {step}"
    db = RunDB(db_path)
    assert db.get_run(run_id)["status"] == "completed"
    steps = [r["step"] for r in db.metrics(run_id, names=["loss"])]
    assert steps == list(range(1, 31)), "history after resume has no gaps and no repeats"


def test_sigterm_stops_gracefully_with_checkpoint(tmp_path, db_path):
    proc = _start(tmp_path, db_path, *tiny(CORPUS, "train.max_steps=100000", "train.checkpoint_every=100000"))
    started, _ = _read_until(proc, lambda e: e["type"] == "metrics" and e["step"] >= 3)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    events = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    finished = [e for e in events if e["type"] == "run_finished"][0]
    assert finished["status"] == "stopped"
    db = RunDB(db_path)
    run = db.get_run(started["run_id"])
    assert run["status"] == "stopped"
    ck = db.latest_checkpoint(run["id"])
    assert ck["step"] == finished["step"] >= 3 and ck["is_final"] == 1


def test_pause_and_resume_over_stdin(tmp_path, db_path):
    proc = _start(tmp_path, db_path, *tiny(CORPUS, "train.max_steps=40"))
    _read_until(proc, lambda e: e["type"] == "metrics" and e["step"] >= 2)
    proc.stdin.write('{"cmd": "pause"}\n')
    proc.stdin.flush()
    paused, _ = _read_until(proc, lambda e: e["type"] == "status" and e["status"] == "paused")
    assert RunDB(db_path).get_run(paused["run_id"])["status"] == "paused"
    proc.stdin.write('{"cmd": "resume"}\n')
    proc.stdin.flush()
    _read_until(proc, lambda e: e["type"] == "status" and e["status"] == "running")
    proc.stdin.write('{"cmd": "stop"}\n')
    proc.stdin.flush()
    finished, _ = _read_until(proc, lambda e: e["type"] == "run_finished")
    proc.wait(timeout=60)
    assert proc.returncode == 0 and finished["status"] == "stopped"


def test_tokenizer_and_token_cache_are_reused(cli, db_path, tmp_path):
    first = cli("train", "demo", *tiny(CORPUS, "train.max_steps=2"))
    assert first.rc == 0, first.stderr
    child = cli("train", "demo", *tiny(CORPUS, "train.max_steps=2", f"parent={first.run_id}"))
    assert child.rc == 0, child.stderr
    assert "reusing the tokenizer of parent run" in child.stderr
    assert "from cache" in child.stderr  # same corpus + same tokenizer: tokenized once
    db = RunDB(db_path)
    assert db.get_run(child.run_id)["parent_id"] == first.run_id
    a = (db.get_run(first.run_id)["run_dir"] + "/tokenizer.json")
    b = (db.get_run(child.run_id)["run_dir"] + "/tokenizer.json")
    assert open(a).read() == open(b).read()


@pytest.mark.quick
def test_vocabulary_stage_alone(cli, db_path):
    r = cli("train", "demo", *tiny(CORPUS, "stage=vocab", "tokenizer.vocab_size=500"))
    assert r.rc == 0, r.stderr
    from engine.data.vocab import EOT, PAD, load_tokenizer

    tok = load_tokenizer(RunDB(db_path).get_run(r.run_id)["run_dir"])
    assert tok.get_vocab_size() == 500
    assert tok.token_to_id(EOT) is not None and tok.token_to_id(PAD) is not None
    text = "Hepatocellular carcinoma ✓"
    assert tok.decode(tok.encode(text).ids) == text  # byte-level: lossless


def test_sparse_core_and_masked_dense_give_the_same_loss_curve(cli, db_path):
    from engine.model.kernels import kernel_available

    if not kernel_available():
        pytest.skip("sparse matmul core unavailable on this machine")
    curves = {}
    for kernel in ("dense", "sparse"):
        r = cli("train", "demo", *tiny(CORPUS, "train.max_steps=8", f"sparsity.kernel={kernel}", "model.d_model=64",
                                       "model.n_ctx=64", "train.eval_every=4"))
        assert r.rc == 0, r.stderr
        curves[kernel] = [m["metrics"]["loss"] for m in r.of_type("metrics") if "loss" in m["metrics"]]
        # a forced kernel is what every sparse layer trained with (no timing, no trial)
        report = json.loads(cli("inspect", r.run_id, "--json").stdout)
        assert report["kernels"] == dict.fromkeys(report["sparsity"]["layers"], kernel) and len(report["kernels"]) == 6
        meta = RunDB(db_path).get_run(r.run_id)["meta"]
        assert meta["kernels"] == report["kernels"] and "kernel_timings" not in meta and "kernel_trial" not in meta
    assert len(curves["dense"]) == 8
    assert curves["sparse"] == pytest.approx(curves["dense"], rel=1e-4)


def test_auto_kernel_trial_keeps_the_faster_whole_step(cli, db_path):
    from engine.model.kernels import kernel_available

    if not kernel_available():
        pytest.skip("sparse matmul core unavailable on this machine")
    # 90 % sparsity and wider layers make the per-shape timing pick the sparse core for some shape
    r = cli("train", "demo", *tiny(CORPUS, "train.max_steps=8", "sparsity.kernel=auto", "sparsity.level=0.9",
                                   "model.d_model=128", "model.n_head=4", "train.batch_size=8", "model.n_ctx=64"))
    assert r.rc == 0, r.stderr
    meta = RunDB(db_path).get_run(r.run_id)["meta"]
    timings = meta["kernel_timings"]
    assert set(timings) == {"128x128", "512x128", "128x512"}  # q/k/v/out, fc, proj: timed once per shape
    assert all(t["kernel"] == ("sparse" if t["sparse_ms"] < t["dense_ms"] else "dense") for t in timings.values())
    shape = {"fc": "512x128", "proj": "128x512"}
    timed = {name: timings[shape.get(name.rsplit(".", 1)[1], "128x128")]["kernel"] for name in meta["kernels"]}
    # the whole-step trial runs exactly when the timings chose the sparse core for some shape
    assert ("kernel_trial" in meta) == ("sparse" in timed.values())
    assert ("kernel trial over the first steps" in r.stderr) == ("sparse" in timed.values())
    if "kernel_trial" not in meta:
        assert meta["kernels"] == timed and set(timed.values()) == {"dense"}
        return
    trial = meta["kernel_trial"]
    assert trial["dense_step_s"] > 0 and trial["mix_step_s"] > 0
    kept = timed if trial["mix_step_s"] < trial["dense_step_s"] else dict.fromkeys(timed, "dense")
    assert meta["kernels"] == kept
