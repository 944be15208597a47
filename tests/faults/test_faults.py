"""Fault injection on purpose, with counts: kills, damaged files, a malicious pickle, symlinks, concurrent
resumes, bad float values, signals during evaluation. Every check is recorded in the tally that
tests/faults/conftest.py prints at the end (category, tried, held) and asserted on its own."""
from __future__ import annotations

import contextlib
import json
import os
import random
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from helpers import PUBMED_TRAIN, REPO, SHARED_DATA, CliResult, engine_env, needs_shared_data, tiny

from engine.core.config import field_docs, load_config
from engine.core.errors import InputError
from engine.store.rundb import RunDB
from engine.model.checkpoint import file_sha256

pytestmark = needs_shared_data()
CORPUS = f"data.corpus={PUBMED_TRAIN}"
PQA = SHARED_DATA / "pubmedqa" / "pqal_trainval.json"


def _cli(tmp: Path, db: Path, *args: str, timeout: float = 300) -> CliResult:
    cmd = [sys.executable, "-m", "engine", *args, "--db", str(db)]
    return CliResult(subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=REPO, env=engine_env(tmp)))


def _popen(tmp: Path, db: Path, *args: str) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "engine", *args, "--db", str(db)]
    return subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            cwd=REPO, env=engine_env(tmp))


def _one_line_error(r: CliResult, *needles: str) -> bool:
    """Exit 2 with a line naming the problem, and no traceback."""
    return r.rc == 2 and "Traceback" not in r.stderr and all(n in r.stderr for n in needles)


def _losses(db: RunDB, run_id: str) -> dict[int, float]:
    return {m["step"]: m["value"] for m in db.metrics(run_id, names=["loss"])}


def _duplicate_rows(db_path: Path, run_id: str) -> int:
    with sqlite3.connect(db_path) as conn:
        return conn.execute("SELECT COUNT(*) FROM (SELECT step, name FROM metrics WHERE run_id = ? "
                            "GROUP BY step, name HAVING COUNT(*) > 1)", [run_id]).fetchone()[0]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One small pre-training run with checkpoints at steps 2, 4 and 6."""
    tmp = tmp_path_factory.mktemp("faults")
    db = tmp / "runs.db"
    r = _cli(tmp, db, "train", "demo", *tiny(CORPUS, "train.checkpoint_every=2", "sparsity.kernel=dense"))
    assert r.rc == 0, r.stderr
    return tmp, db, r.run_id


# -- kills ------------------------------------------------------------------------------------------


KILLS = 6  # each costs an engine start; the random points land in training, checkpoint writes and commits


def test_sigkills_at_random_points_then_resume_equal_an_uninterrupted_run(tmp_path, record):
    db_path = tmp_path / "runs.db"
    args = tiny(CORPUS, "train.max_steps=100", "train.checkpoint_every=2", "train.eval_every=10", "sparsity.kernel=dense")
    full = _cli(tmp_path, tmp_path / "reference.db", "train", "demo", *args)
    assert full.rc == 0, full.stderr
    reference = _losses(RunDB(tmp_path / "reference.db"), full.run_id)

    rng = random.Random(20261202)
    run_id, kills, finished = None, 0, False
    while kills < KILLS and not finished:
        proc = _popen(tmp_path, db_path, "train", *(["--resume", run_id] if run_id else ["demo", *args]))
        seen_checkpoint, after = False, rng.randint(1, 4)
        for line in proc.stdout:
            e = json.loads(line) if line.startswith("{") else {}
            run_id = run_id or e.get("run_id")
            seen_checkpoint |= e.get("type") == "checkpoint"
            if e.get("type") == "run_finished":
                finished = True
            if seen_checkpoint and e.get("type") == "metrics":
                after -= 1
                if after <= 0:
                    time.sleep(rng.uniform(0.0, 0.04))  # lands in training, a checkpoint write or a database commit
                    os.kill(proc.pid, signal.SIGKILL)
                    kills += 1
                    break
        proc.wait(timeout=60)
        proc.stdout.close()
        proc.stderr.close()
        if not finished:
            # what every command does first (engine.cli.common.open_db): notice runs whose engine died; the
            # `runs list` command itself is exercised once below, here it would cost a process per kill
            db = RunDB(db_path)
            db.reap_crashed()
            status = db.get_run(run_id)["status"]
            db.close()
            finished = status == "completed"  # the kill came after the run's last step
            assert record("SIGKILL: never left running (crashed, or completed)", status in ("crashed", "completed")), status
    listed = _cli(tmp_path, db_path, "runs", "list", "--json")
    assert {r["id"]: r["status"] for r in json.loads(listed.stdout)}[run_id] in ("crashed", "completed")
    last = _cli(tmp_path, db_path, "train", "--resume", run_id)
    done = last.rc == 0 or "already completed" in last.stderr
    db = RunDB(db_path)
    losses = _losses(db, run_id)
    exact = done and losses == reference
    assert record("SIGKILL: resumes equal the uninterrupted run", exact), (last.stderr, sorted(set(reference) - set(losses)))
    assert record("SIGKILL: no duplicate or missing rows", _duplicate_rows(db_path, run_id) == 0 and set(losses) == set(range(1, 101)))
    assert kills >= KILLS


# -- damaged files ------------------------------------------------------------------------------------


def _flip(data: bytes, at: int, n: int = 64) -> bytes:
    return data[:at] + bytes(b ^ 0xFF for b in data[at:at + n]) + data[at + n:]


CHECKPOINT_DAMAGE = {
    "truncated to half": lambda d: d[: len(d) // 2],
    "truncated inside the header": lambda d: d[:6],
    "empty": lambda d: b"",
    "zeroed header": lambda d: b"\0" * 256 + d[256:],
    "zeroed block in the middle": lambda d: d[: len(d) // 2] + b"\0" * 4096 + d[len(d) // 2 + 4096:],
    "bytes flipped in the middle": lambda d: _flip(d, len(d) // 2),
    "last byte flipped": lambda d: _flip(d, len(d) - 1, 1),
    "another file in its place": lambda d: (REPO / "README.md").read_bytes(),
}


@pytest.mark.quick
@pytest.mark.parametrize("kind", list(CHECKPOINT_DAMAGE))
def test_a_damaged_latest_checkpoint_is_named_and_the_one_before_is_used(trained, kind, record):
    tmp, db_path, run_id = trained
    latest = Path(RunDB(db_path).latest_checkpoint(run_id)["path"])
    original = latest.read_bytes()
    latest.write_bytes(CHECKPOINT_DAMAGE[kind](original))
    try:
        r = _cli(tmp, db_path, "inspect", run_id, "--json")
        held = r.rc == 0 and json.loads(r.stdout)["step"] == 4 and str(latest) in r.stderr and "Traceback" not in r.stderr
    finally:
        latest.write_bytes(original)
    assert record("corrupt checkpoint: named, previous one used", held), r.stderr


def test_no_intact_checkpoint_exits_2_and_a_resume_falls_back(trained, tmp_path, record):
    tmp, db_path, run_id = trained
    db = RunDB(db_path)
    paths = [Path(c["path"]) for c in db.checkpoints(run_id)]
    saved = {p: p.read_bytes() for p in paths}
    for p in paths:
        p.write_bytes(_flip(saved[p], len(saved[p]) // 3))
    try:
        r = _cli(tmp, db_path, "inspect", run_id)
        assert record("corrupt checkpoint: none intact -> exit 2", _one_line_error(r, "no intact checkpoint")), r.stderr
        before = db.get_run(run_id)
        r = _cli(tmp, db_path, "train", "--resume", run_id, "--set", "train.max_steps=8")
        after = db.get_run(run_id)
        untouched = after["status"] == before["status"] and after["config"] == before["config"]
        assert record("corrupt checkpoint: failed resume leaves the run as it was",
                      _one_line_error(r, "no intact checkpoint") and untouched), r.stderr
    finally:
        for p in paths:
            p.write_bytes(saved[p])
    # a copy of the run whose latest checkpoint is damaged resumes from the one before it
    copy_db = tmp_path / "copy.db"
    shutil.copy(db_path, copy_db)
    latest = paths[-1]
    latest.write_bytes(saved[latest][:100])
    try:
        r = _cli(tmp, copy_db, "train", "--resume", run_id, "--set", "train.max_steps=8")
        held = r.rc == 0 and str(latest) in r.stderr and "step_0000004" in r.stderr and "resumed from" in r.stderr
    finally:
        latest.write_bytes(saved[latest])
        for c in RunDB(copy_db).checkpoints(run_id):  # the copy's new checkpoints overwrote step 6's and added 8's
            if Path(c["path"]) not in saved:
                Path(c["path"]).unlink(missing_ok=True)
        for p in paths:
            p.write_bytes(saved[p])
    assert record("corrupt checkpoint: resume falls back to the one before", held), r.stderr


DATABASE_DAMAGE = {
    "truncated": lambda d: d[: len(d) // 3],
    "header overwritten": lambda d: b"not a database, just text " * 4 + d[104:],
    "pages garbled": lambda d: d[:4096] + bytes(random.Random(7).randrange(256) for _ in range(len(d) - 4096)),
}


@pytest.mark.quick
@pytest.mark.parametrize("kind", list(DATABASE_DAMAGE))
def test_a_damaged_database_exits_2_with_a_line_naming_it(trained, tmp_path, kind, record):
    tmp, db_path, run_id = trained
    RunDB(db_path).close()  # its WAL checkpointed into the main file, so the copy holds everything
    bad = tmp_path / "damaged.db"
    bad.write_bytes(DATABASE_DAMAGE[kind](db_path.read_bytes()))
    results = [_cli(tmp, bad, "runs", "list"), _cli(tmp, bad, "runs", "show", run_id), _cli(tmp, bad, "metrics", run_id, "--csv")]
    held = all(r.rc == 0 or _one_line_error(r, str(bad)) for r in results) and any(r.rc == 2 for r in results)
    assert record("corrupt database: exit 2, file named", held), [r.stderr for r in results]


TOKENIZER_DAMAGE = {
    "garbled JSON": lambda d: d[:100] + b"}{" + d[100:],
    "truncated": lambda d: d[: len(d) // 2],
    "empty": lambda d: b"",
}


@pytest.mark.quick
@pytest.mark.parametrize("kind", list(TOKENIZER_DAMAGE))
def test_a_damaged_tokenizer_exits_2_with_a_line_naming_it(trained, tmp_path, kind, record):
    tmp, db_path, run_id = trained
    tok = Path(RunDB(db_path).get_run(run_id)["run_dir"]) / "tokenizer.json"
    original = tok.read_bytes()
    tok.write_bytes(TOKENIZER_DAMAGE[kind](original))
    try:
        r = _cli(tmp, db_path, "export-hf", run_id, "--out", str(tmp_path / "hf"))
    finally:
        tok.write_bytes(original)
    assert record("corrupt tokenizer: exit 2, file named", _one_line_error(r, str(tok))), r.stderr


# -- no code from data files ------------------------------------------------------------------------


class _Payload:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_a_malicious_pickle_never_runs(trained, tmp_path, record):
    tmp, db_path, run_id = trained
    marker = tmp_path / "pwned"
    db = RunDB(db_path)
    run_dir = Path(db.get_run(run_id)["run_dir"])
    evil = run_dir / "checkpoints" / "step_0000099.pt"
    torch.save({"model": _Payload(marker)}, evil)
    db.add_checkpoint(run_id, 99, 0, str(evil), evil.stat().st_size, True, file_sha256(evil))  # a database that points at it
    try:
        commands = [("inspect", run_id), ("export-hf", run_id, "--out", str(tmp_path / "hf")),
                    ("train", "--resume", run_id, "--set", "train.max_steps=100"),
                    ("eval", run_id, "--task", "lm", "--data", str(SHARED_DATA / "pubmed_abstracts" / "valid.txt")),
                    ("train", "finetune-pubmedqa", "--set", f"parent={run_id}", "--set", f"task.train={PQA}",
                     "--set", "train.max_steps=1")]
        for args in commands:
            r = _cli(tmp, db_path, *args)
            held = _one_line_error(r, "migrate-checkpoints") and not marker.exists()
            assert record("malicious pickle: refused, never run", held), (args, r.rc, r.stderr)
    finally:
        with db.db.conn:
            db.db.conn.execute("DELETE FROM checkpoints WHERE path = ?", [str(evil)])
        evil.unlink()


# -- exports and symlinks ------------------------------------------------------------------------------


def test_export_overwrite_never_writes_through_a_symlink(trained, tmp_path, record):
    tmp, db_path, run_id = trained
    out = tmp_path / "hf"
    assert _cli(tmp, db_path, "export-hf", run_id, "--out", str(out)).rc == 0
    for name in ("README.md", "config.json"):
        victim = tmp_path / f"victim-{name}"
        victim.write_text("keep me")
        (out / name).unlink()
        (out / name).symlink_to(victim)
        r = _cli(tmp, db_path, "export-hf", run_id, "--out", str(out), "--overwrite")
        held = r.rc == 0 and victim.read_text() == "keep me" and not (out / name).is_symlink()
        assert record("symlinked export file: target untouched", held), r.stderr


# -- one writer per run ------------------------------------------------------------------------------


def test_concurrent_resumes_one_proceeds_one_exits_2(trained, tmp_path, record):
    tmp, db_path, run_id = trained
    copy = tmp_path / "copy.db"
    shutil.copy(db_path, copy)
    for round_ in range(2):
        steps = 400 + 100 * round_
        procs = [_popen(tmp, copy, "train", "--resume", run_id, "--set", f"train.max_steps={steps}",
                        "--set", "train.checkpoint_every=1000") for _ in range(2)]
        outs = [p.communicate(timeout=300) for p in procs]
        codes = sorted(p.returncode for p in procs)
        refused = [err for p, (_, err) in zip(procs, outs) if p.returncode == 2]
        held = codes == [0, 2] and "running (pid" in refused[0] and _duplicate_rows(copy, run_id) == 0
        assert record("concurrent resumes: one proceeds, one exits 2", held), (codes, [o[1][-300:] for o in outs])
    for c in RunDB(copy).checkpoints(run_id):  # the copy's checkpoints beyond the fixture's
        if c["step"] > 6:
            Path(c["path"]).unlink(missing_ok=True)


# -- bad input ---------------------------------------------------------------------------------------


FLOAT_KEYS = [k for k, v in field_docs().items() if v["type"] == "float"]


@pytest.mark.quick
@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")], ids=["nan", "inf", "-inf"])
@pytest.mark.parametrize("key", FLOAT_KEYS)
def test_every_float_key_rejects_non_finite_values(key, value, record):
    with pytest.raises(InputError) as e:
        load_config(None, {key: value})
    assert record("float key x NaN/inf: rejected naming the key", e.value.key == key), str(e.value)


def test_a_nan_setting_leaves_no_run_behind(tmp_path, record):
    db = tmp_path / "runs.db"
    r = _cli(tmp_path, db, "train", "demo", "--set", "train.lr=nan")
    held = _one_line_error(r, "train.lr") and RunDB(db).list_runs() == []
    assert record("float key x NaN/inf: CLI exit 2, no run row", held), r.stderr


@pytest.mark.quick
@pytest.mark.parametrize("case", ["whitespace-only corpus", "model too large for memory", "n_ctx 65536"])
def test_bad_input_is_refused_before_a_run_row_exists(tmp_path, case, record):
    db = tmp_path / "runs.db"
    blank = tmp_path / "blank.txt"
    blank.write_text("   \n\t\n" * 1000)
    settings = {"whitespace-only corpus": [f"data.corpus={blank}"],
                "model too large for memory": ["model.n_layer=96", "model.d_model=8192", "model.n_head=64"],
                "n_ctx 65536": ["model.n_ctx=65536"]}[case]
    r = _cli(tmp_path, db, "train", "demo", *[a for s in settings for a in ("--set", s)])
    key = "data.corpus" if case.startswith("whitespace") else "model"
    events = [e for e in r.events if e["type"] == "error"]
    held = _one_line_error(r) and RunDB(db).list_runs() == [] and events and events[0]["key"] == key
    assert record("bad input: refused before any run row", held), r.stderr


@pytest.mark.quick
def test_a_non_finite_step_leaves_weights_and_moments_untouched(record):
    from engine.core.config import ModelConfig, TrainConfig
    from engine.model.gpt import GPT
    from engine.train.optim import make_optimizer
    from engine.train.step import MicroBatch, lm_micro_batch, train_step

    torch.manual_seed(0)
    model = GPT(ModelConfig(n_layer=1, d_model=16, n_head=2, n_ctx=8), 50)
    opt = make_optimizer(list(model.named_parameters()), TrainConfig())
    x = torch.randint(0, 50, (2, 8))
    train_step(opt, lambda: lm_micro_batch(model, x, x, contextlib.nullcontext), 1, 1.0)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    r = train_step(opt, lambda: MicroBatch(model(x, x)[1] * float("nan")), 1, 1.0)
    same = all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert record("non-finite step: skipped, weights unchanged", not r.finite and same)


# -- signals during evaluation -----------------------------------------------------------------------


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_a_signal_during_eval_exits_cleanly_and_stores_nothing(trained, sig, record):
    tmp, db_path, run_id = trained
    before = len(RunDB(db_path).evaluations(run_id))
    # 13.8 MB of text, one block at a time: minutes of work, so the signal lands in the middle of it
    big = SHARED_DATA / "pubmed_abstracts_extra" / "train.txt"
    proc = _popen(tmp, db_path, "eval", run_id, "--task", "lm", "--data", str(big), "--batch-size", "1")
    time.sleep(6)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=60)
    held = proc.returncode == 130 and "interrupted" in err and "Traceback" not in err
    held = held and len(RunDB(db_path).evaluations(run_id)) == before
    assert record("signal during eval: clean exit, nothing stored", held), (proc.returncode, err[-500:])
