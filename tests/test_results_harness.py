"""The downstream harness of docs/results.md on a tiny real database: bench/results/downstream.sh queues its
sweeps (parents, then fine-tuning and prompting with ``--grid parent=…``) through the real queue on tiny
configs and slices of HoC and PubMedQA, and bench/results/downstream_table.py prints means and spreads
equal to the ones computed here from the stored evaluations; a partial database (waiting entries, missing
sweeps) is listed, not dropped."""
from __future__ import annotations

import json
import os
import re
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import REPO, SHARED_DATA, engine_env

from engine.orchestrate.queue import Queue
from engine.store.rundb import RunDB

HOC = SHARED_DATA / "hoc"
PQA = SHARED_DATA / "pubmedqa"
VALID = SHARED_DATA / "pubmed_abstracts" / "valid.txt"

pytestmark = pytest.mark.skipif(not (HOC.is_dir() and PQA.is_dir() and VALID.is_file()),
                                reason=f"shared data missing under {SHARED_DATA}")

PARENT_SETS = ["model.n_layer=1", "model.d_model=32", "model.n_head=2", "model.n_ctx=64", "tokenizer.vocab_size=400",
               f"data.corpus={VALID}", "train.max_steps=3", "train.batch_size=4", "train.eval_every=3",
               "train.eval_batches=1", "train.checkpoint_every=3", "train.warmup_steps=1", "train.threads=1",
               "sparsity.kernel=dense"]
TASK_SETS = ["train.max_steps=2", "train.eval_every=2", "train.checkpoint_every=2", "train.batch_size=4",
             "train.warmup_steps=1", "train.threads=1", "prompt.n_tokens=2"]


def _hoc_slice(folder: Path) -> Path:
    """8 dev abstracts and 24 training ones that hold every dev label, each cut to two sentences."""
    folder.mkdir()
    read = lambda p: [json.loads(line) for line in p.read_text().splitlines() if line.strip()]  # noqa: E731
    dev, train = read(HOC / "dev.jsonl")[:8], read(HOC / "train.jsonl")
    need = {lab for d in dev for lab in d["labels"]}
    picked = train[:16]
    for d in train[16:]:
        if need - {lab for p in picked for lab in p["labels"]} & set(d["labels"]):
            picked.append(d)
    picked += [d for d in train[16:] if d not in picked][:24 - len(picked)]
    assert need <= {lab for p in picked for lab in p["labels"]}
    for name, docs in (("train", picked), ("dev", dev)):
        (folder / f"{name}.jsonl").write_text("".join(json.dumps({**d, "sentences": d["sentences"][:2]}) + "\n"
                                                      for d in docs))
    return folder


def _pqa_slice(folder: Path) -> Path:
    """Folds 0 and 1 of the official split, each 4 training questions per answer and 6 dev questions,
    contexts cut to their first sentence."""
    folder.mkdir()
    data = json.loads((PQA / "pqal_trainval.json").read_text())
    splits = json.loads((PQA / "pqal_splits.json").read_text())
    folds, keep = [], set()
    for f in splits["folds"][:2]:
        train = [i for label in ("yes", "no", "maybe")
                 for i in [i for i in f["train"] if data[i]["final_decision"] == label][:4]]
        folds.append({"fold": f["fold"], "train": train, "dev": f["dev"][:6]})
        keep |= set(train) | set(f["dev"][:6])
    small = {i: {**data[i], "CONTEXTS": [data[i]["CONTEXTS"][0][:300]]} for i in keep}
    (folder / "pqal_trainval.json").write_text(json.dumps(small))
    (folder / "pqal_splits.json").write_text(json.dumps({"folds": folds}))
    return folder / "pqal_trainval.json"


def _table(db_path: Path) -> str:
    r = subprocess.run([sys.executable, "bench/results/downstream_table.py", "--db", str(db_path)], cwd=REPO,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    return r.stdout


def _row(out: str, heading: str, first_cell: str) -> list[str]:
    """The cells of the row that starts with ``first_cell`` in the table under ``heading``."""
    section = out.split(heading, 1)[1].split("\n### ", 1)[0]
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("|") and cells[0] == first_cell:
            return cells
    raise AssertionError(f"no row {first_cell!r} under {heading!r}:\n{section}")


def _ms(xs: list[float]) -> str:
    sd = f"{statistics.stdev(xs):.4f}" if len(xs) > 1 else "–"  # one value has no spread
    return f"{statistics.fmean(xs):.4f} ± {sd} (n={len(xs)})"


def _last_dev(db: RunDB, run_id: str) -> dict:
    """The dev evaluation of the model the run keeps: its best epoch's where it recorded one, else its last."""
    dev = [e for e in db.evaluations(run_id) if e["split"] == "dev"]
    best = ((db.get_run(run_id).get("meta") or {}).get("best_checkpoint") or {}).get("step")
    return next((e for e in reversed(dev) if e["step"] == best), dev[-1])


def test_downstream_harness_on_a_tiny_database(tmp_path):
    db_path = tmp_path / "runs.db"
    hoc, pqa = _hoc_slice(tmp_path / "hoc"), _pqa_slice(tmp_path / "pqa")
    env = {**engine_env(tmp_path), "LEVELS": "0,0.75", "SEEDS": "1", "FOLDS": "0,1", "PARALLEL": "2",
           "PRETRAIN_SETS": " ".join(PARENT_SETS), "TASK_SETS": " ".join(TASK_SETS), "HOC": str(hoc), "PQA": str(pqa),
           "PYTHON": sys.executable, "MEDISWIFT": f"{sys.executable} -m engine",
           # ~8 s of CPU per tiny run (torch and scikit-learn imports): the sweeps that cover every table's
           # path (a parent grid, random init x folds, prompts); the other two repeat the same paths. One
           # seed (its mean with no spread); two folds (their mean and spread); 8 runs with the parents
           "ONLY": "downstream-hoc downstream-pubmedqa-random downstream-prompt"}
    r = subprocess.run(["bash", "bench/results/downstream.sh", str(db_path)], cwd=REPO, env=env, capture_output=True,
                       text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "not every run completed" not in r.stdout, r.stdout

    db = RunDB(db_path)
    q = Queue(db)
    by_name = {s["name"]: s["id"] for s in q.sweeps()}
    assert set(by_name) == {"downstream-parents", "downstream-hoc", "downstream-pubmedqa-random", "downstream-prompt"}
    runs = {e["label"]: db.get_run(e["run_id"]) for e in q.entries(sweep_id=by_name["downstream-parents"])}
    dense, sparse = runs["level=0"], runs["level=0.75"]
    names = {dense["id"]: "dense", sparse["id"]: "75 %"}

    def scored(sweep: str) -> list[tuple[dict, dict]]:
        out = []
        for e in q.entries(sweep_id=by_name[sweep]):
            assert e["status"] == "completed", e
            run = db.get_run(e["run_id"])
            out.append((run, _last_dev(db, run["id"])))
        return out

    # the sweep over parent=: each parent x the seed, started from the parent it names
    hoc_runs = scored("downstream-hoc")
    assert sorted((names[r["parent_id"]], r["config"]["train"]["seed"]) for r, _ in hoc_runs) == [
        ("75 %", 1), ("dense", 1)]

    out = _table(db_path)
    assert out.splitlines()[0].startswith("CPU:")
    for label, rows in (("dense", [x for x in hoc_runs if x[0]["parent_id"] == dense["id"]]),
                        ("75 %", [x for x in hoc_runs if x[0]["parent_id"] == sparse["id"]])):
        rows.sort(key=lambda x: x[0]["config"]["train"]["seed"])
        cells = _row(out, "### HoC", label)
        assert cells[1] == _ms([ev["metrics"]["micro_f1"] for _, ev in rows])
        assert cells[2] == ", ".join(f"seed {r['config']['train']['seed']}: {ev['metrics']['micro_f1']:.4f}" for r, ev in rows)
        assert cells[3] == f"{statistics.fmean(ev['baselines']['majority']['micro_f1'] for _, ev in rows):.4f}"
        assert cells[4] == f"{statistics.fmean(ev['baselines']['tfidf_lr']['micro_f1'] for _, ev in rows):.4f}"
        assert cells[5] == "–"

    # the random-init control: the sparsest parent's shape and tokenizer, fresh weights, one run per fold
    pqa_runs = scored("downstream-pubmedqa-random")
    assert sorted((r["parent_id"], r["config"]["train"]["init"], r["config"]["task"]["fold"]) for r, _ in pqa_runs) == [
        (sparse["id"], "random", 0), (sparse["id"], "random", 1)]
    for label, rows in (("random init", pqa_runs),):
        cells = _row(out, "### PubMedQA", label)
        assert cells[1] == "2 of 2"
        assert cells[5] == ", ".join(f"{r['config']['task']['fold']}: {ev['metrics']['accuracy']:.2f}"
                                     for r, ev in sorted(rows, key=lambda x: x[0]["config"]["task"]["fold"]))
        assert cells[2] == _ms([ev["metrics"]["accuracy"] for _, ev in rows])
        assert cells[3] == f"{statistics.fmean(ev['baselines']['majority']['accuracy'] for _, ev in rows):.4f}"
        assert cells[4] == f"{statistics.fmean(ev['baselines']['tfidf_lr']['accuracy'] for _, ev in rows):.4f}"

    prompts = scored("downstream-prompt")
    assert sorted((names[r["parent_id"]], ev["task"]) for r, ev in prompts) == [("75 %", "pubmedqa"), ("dense", "pubmedqa")]
    section = out.split("### Soft prompts", 1)[1].split("\n### ", 1)[0]
    for r, ev in prompts:
        metric = "accuracy" if ev["task"] == "pubmedqa" else "micro_f1"
        line = (f"| {names[r['parent_id']]} | {ev['task']} | {r['config']['task']['head']} | {metric} | "
                f"{ev['metrics'][metric]:.4f} | {ev['baselines']['majority'][metric]:.4f} |")
        assert line in section, (line, section)

    # every run, with its wall-clock time from its row
    every = out.split("### Every downstream run", 1)[1]
    for run in [r for r, _ in hoc_runs + pqa_runs + prompts]:
        (line,) = [x for x in every.splitlines() if f"| {run['id']} |" in x]
        s = round(run["finished_at"] - run["started_at"])
        assert "| completed |" in line and line.endswith(f"| {s} s |"), line
    parents = out.split("### Parents", 1)[1].split("\n### ", 1)[0]
    assert f"| dense | {dense['id']} | completed | 0.00 | 3 |" in parents
    assert f"| 75 % | {sparse['id']} | completed | 0.75 | 3 |" in parents
    # the sweeps left out are said to be missing, not shown empty
    assert "(sweep downstream-hoc-random: not in this database yet)" in out
    assert "(sweep downstream-prompt-hoc: not in this database yet)" in out

    # run again with PARENTS=…: nothing is trained again (every sweep is in the database already)
    r = subprocess.run(["bash", "bench/results/downstream.sh", str(db_path)], cwd=REPO, capture_output=True,
                       text=True, timeout=120, env={**env, "PARENTS": f"{dense['id']} {sparse['id']}"})
    assert r.returncode == 0 and r.stdout.count("not queued again") == 3, r.stdout + r.stderr
    assert len(RunDB(db_path).list_runs()) == 2 + 2 + 2 + 2

    # a partial database: a second seed queued while the queue is paused waits, and is listed as waiting
    cli = [sys.executable, "-m", "engine"]
    assert subprocess.run([*cli, "queue", "pause", "--db", str(db_path)], cwd=REPO, env=engine_env(tmp_path),
                          capture_output=True).returncode == 0
    r = subprocess.run([*cli, "sweep", "finetune-hoc", "--db", str(db_path), "--name", "downstream-hoc",
                        "--grid", f"parent={dense['id']}", "--grid", "train.seed=2", "--set", f"task.train={hoc}/train.jsonl",
                        "--set", f"task.dev={hoc}/dev.jsonl"], cwd=REPO, env=engine_env(tmp_path), capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    out2 = _table(db_path)
    dense_rows = sorted((x for x in hoc_runs if x[0]["parent_id"] == dense["id"]), key=lambda x: x[0]["config"]["train"]["seed"])
    cells = _row(out2, "### HoC", "dense")
    assert cells[1] == _ms([ev["metrics"]["micro_f1"] for _, ev in dense_rows]) and cells[5] == "seed 2: waiting"
    assert re.search(r"\| downstream-hoc \| \d+ \| parent=\w+ seed=2 \| dense \| waiting \| – \| – \| – \|", out2), out2


@pytest.mark.quick
def test_the_table_of_a_database_without_downstream_sweeps_says_what_is_missing(tmp_path):
    db_path = tmp_path / "runs.db"
    RunDB(db_path).close()
    out = _table(db_path)
    for name in ("downstream-hoc", "downstream-pubmedqa-random", "downstream-prompt-hoc"):
        assert f"(sweep {name}: not in this database yet)" in out
    assert "(no downstream sweep in this database yet)" in out
    assert os.path.isfile(db_path)
