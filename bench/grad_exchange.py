"""Gradient bytes a DDP step exchanges, dense vs 75 %-masked, measured by the engine's own runs.

    python bench/grad_exchange.py              # GPT-2-small shape (d 768, 12 layers), 42,384-token vocabulary
    python bench/grad_exchange.py --json

Each configuration is a real ``mediswift train`` on 2 processes (Gloo on a CPU, NCCL on GPUs) for a few
steps. The DDP communication hook counts the bytes it all-reduces (engine.train.distributed) and the
run records them in its meta (``grad_exchange``). Beside them it prints the step time of the same run
on 1 process with grad_accum 2 (the same micro-batches), so the cost of the exchange shows too. A masked
matrix trains as its packed nonzeros, so only those travel. The tied embedding/head, the norms and the
biases stay dense, which is why the whole model's ratio is larger than the masked layers'.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from engine.core.hardware import cpu_header  # noqa: E402

CORPUS = REPO.parent / "shared" / "data" / "pubmed_abstracts" / "train.txt"
SHAPE = {"model.n_layer": 12, "model.n_head": 12, "model.d_model": 768, "model.n_ctx": 128}


def sets(d: dict) -> list[str]:
    out = []
    for k, v in d.items():
        out += ["--set", f"{k}={json.dumps(v) if isinstance(v, str) else v}"]
    return out


def train(args: list[str], env: dict, db: Path) -> dict:
    r = subprocess.run([sys.executable, "-m", "engine", "train", "demo", *args, "--db", str(db)], capture_output=True,
                       text=True, cwd=REPO, env=env, timeout=3600)
    events = [json.loads(ln) for ln in r.stdout.splitlines() if ln.startswith("{")]
    if r.returncode != 0:
        raise SystemExit(f"run failed: {r.stderr.strip().splitlines()[-1] if r.stderr.strip() else r.returncode}")
    run_id = next(e["run_id"] for e in events if e["type"] == "run_started")
    times = [e["metrics"]["step_time"] for e in events if e["type"] == "metrics" and e["step"] > 1]
    return {"run_id": run_id, "step_s": statistics.median(times) if times else None}


def meta(run_id: str, env: dict, db: Path) -> dict:
    r = subprocess.run([sys.executable, "-m", "engine", "runs", "show", run_id, "--json", "--db", str(db)],
                       capture_output=True, text=True, cwd=REPO, env=env, check=True)
    return json.loads(r.stdout)["meta"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--vocab", type=int, default=42384)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="grad-exchange-"))
    env = {**os.environ, "MEDISWIFT_HOME": str(tmp)}
    db = tmp / "runs.db"
    base = {"data.corpus": str(CORPUS), "tokenizer.vocab_size": a.vocab, "train.batch_size": 1,
            "train.max_steps": a.steps, "train.eval_every": 1000, "train.checkpoint_every": 1000,
            "train.warmup_steps": 1, "sparsity.kernel": "dense"}
    vocab = train(sets({**base, "stage": "vocab"}), env, db)  # one vocabulary for every run (and one token cache)
    base["parent"] = vocab["run_id"]
    rows = []
    for level in (0.0, 0.75):
        cfg = {**base, **SHAPE, "sparsity.level": level}
        group = train(sets({**cfg, "train.nproc": 2, "train.threads": 0}), env, db)
        single = train(sets({**cfg, "train.grad_accum": 2, "train.threads": 2}), env, db)
        ex = meta(group["run_id"], env, db)["grad_exchange"]
        rows.append({"sparsity": level, **ex, "step_s_2proc": group["step_s"], "step_s_1proc_accum2": single["step_s"]})
    dense, sparse = rows
    out = {"header": {"cpu": cpu_header(), "shape": SHAPE, "vocab": a.vocab}, "rows": rows,
           "masked_layers_ratio": sparse["masked_layers_bytes"] / dense["masked_layers_bytes"],
           "whole_model_ratio": sparse["bytes_per_step"] / dense["bytes_per_step"]}
    if a.json:
        print(json.dumps(out, indent=2))
        return
    print(cpu_header())
    print(f"shape: {SHAPE}, vocabulary {a.vocab}; 2 DDP processes; bytes the communication hook all-reduced per step")
    print(f"{'sparsity':>8} {'all (MiB)':>10} {'masked layers (MiB)':>20} {'2 procs s/step':>15} {'1 proc x accum 2':>17}")
    for r in rows:
        print(f"{r['sparsity']:>8.2f} {r['bytes_per_step'] / 2**20:>10.1f} {r['masked_layers_bytes'] / 2**20:>20.1f} "
              f"{r['step_s_2proc']:>15.3f} {r['step_s_1proc_accum2']:>17.3f}")
    print(f"masked layers at 75 % vs dense: {out['masked_layers_ratio']:.3f}x; whole model: {out['whole_model_ratio']:.3f}x")


if __name__ == "__main__":
    main()
