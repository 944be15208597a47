"""Static, GMP, SET and RigL at equal training FLOPs, measured with the engine's own runs.

    python bench/dynamic_sparsity_study.py                      # 75 % and 90 %, pubmed_abstracts
    python bench/dynamic_sparsity_study.py --levels 0.75 --steps 200 --screenshot docs/screenshots/dynamic_compare.png

For each sparsity level, the static run sets the FLOP budget (its steps x its FLOPs per step). Every other
method gets the number of steps whose planned FLOPs fit that budget: the schedule the engine follows
(engine.core.sparsity_schedule) with the documented per-step formula, so GMP, which starts dense, takes
fewer steps, and RigL pays for its dense gradients on update steps. The runs share one vocabulary (and
token cache). The table gives the FLOPs each run really spent (its own counter), its final and best
validation loss (the same fixed validation batches for all), and its wall time.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from engine.core.config import load_config  # noqa: E402
from engine.core.flops import flop_model_for_config  # noqa: E402
from engine.core.hardware import cpu_header  # noqa: E402
from engine.core.paths import resolve_preset  # noqa: E402
from engine.core.sparsity_schedule import Schedule, gpt_layer_shapes, planned  # noqa: E402

CORPUS = REPO.parent / "shared" / "data" / "pubmed_abstracts" / "train.txt"
METHODS = ("static", "gmp", "set", "rigl")
SHAPE = {"model.n_layer": 2, "model.d_model": 128, "model.n_head": 4, "model.n_ctx": 128, "tokenizer.vocab_size": 4096,
         "train.batch_size": 8, "train.eval_batches": 16, "train.warmup_steps": 20, "sparsity.kernel": "dense"}


def sets(d: dict) -> list[str]:
    out = []
    for k, v in d.items():
        out += ["--set", f"{k}={json.dumps(v) if isinstance(v, str) else v}"]
    return out


def planned_flops(overrides: dict) -> float:
    cfg = load_config(resolve_preset("demo"), overrides)
    m = cfg.model
    fm = flop_model_for_config(m.n_layer, m.d_model, m.n_ctx, cfg.tokenizer.vocab_size, 0.0)
    plan = planned(Schedule.from_config(cfg), gpt_layer_shapes(m.n_layer, m.d_model), cfg.train.max_steps, fm)
    return sum(plan["flops_per_token"]) * cfg.train.batch_size * m.n_ctx


def equal_flops_steps(overrides: dict, budget: float, hi: int) -> int:
    """The most steps whose planned FLOPs fit ``budget`` (the schedule scales with max_steps)."""
    lo = 1
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if planned_flops({**overrides, "train.max_steps": mid}) <= budget:
            lo = mid
        else:
            hi = mid - 1
    return lo


def train(args: list[str], env: dict, db: Path) -> dict:
    r = subprocess.run([sys.executable, "-m", "engine", "train", "demo", *args, "--db", str(db)], capture_output=True,
                       text=True, cwd=REPO, env=env, timeout=7200)
    if r.returncode != 0:
        raise SystemExit(f"run failed: {r.stderr.strip().splitlines()[-1] if r.stderr.strip() else r.returncode}")
    events = [json.loads(ln) for ln in r.stdout.splitlines() if ln.startswith("{")]
    fin = next(e for e in events if e["type"] == "run_finished")
    return {"run_id": fin["run_id"], **fin["summary"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--levels", default="0.75,0.9")
    ap.add_argument("--steps", type=int, default=300, help="steps of the static run (the FLOP budget)")
    ap.add_argument("--update-every", type=int, default=25)
    ap.add_argument("--db", help="keep the runs in this database (default: a temporary one)")
    ap.add_argument("--screenshot", help="save the compare view of the runs at equal FLOPs to this PNG")
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="dyn-study-"))
    env = {**os.environ, "MEDISWIFT_HOME": str(tmp)}
    db = Path(a.db) if a.db else tmp / "runs.db"
    base = {"data.corpus": str(CORPUS), **SHAPE, "train.eval_every": max(10, a.steps // 10),
            "train.checkpoint_every": 100000, "sparsity.update_every": a.update_every}
    vocab = train(sets({**base, "stage": "vocab", "name": "study-vocab"}), env, db)
    base["parent"] = vocab["run_id"]
    rows = []
    for level in (float(x) for x in a.levels.split(",")):
        static = {**base, "sparsity.level": level, "sparsity.method": "static", "train.max_steps": a.steps}
        budget = planned_flops(static)
        for method in METHODS:
            cfg = {**static, "sparsity.method": method, "name": f"{method}-{int(level * 100)}"}
            if method != "static":
                cfg["train.max_steps"] = equal_flops_steps(cfg, budget, a.steps)
            out = train(sets(cfg), env, db)
            rows.append({"method": method, "level": level, "steps": cfg["train.max_steps"], "flops": out["flops"],
                         "flops_vs_budget": out["flops"] / budget, "val_loss": out.get("val_loss"),
                         "best_val_loss": out.get("best_val_loss"), "wall_time": out.get("wall_time"),
                         "run_id": out["run_id"]})
            if not a.json:
                r = rows[-1]
                print(f"  {method:6} {level:.2f}: {r['steps']:4d} steps, {r['flops']:.3e} FLOPs "
                      f"({r['flops_vs_budget']:.3f}x budget), val loss {r['val_loss']:.4f}, best {r['best_val_loss']:.4f}, "
                      f"{r['wall_time']:.0f} s", flush=True)
    result = {"header": {"cpu": cpu_header(), "shape": SHAPE, "static_steps": a.steps, "update_every": a.update_every,
                         "db": str(db)}, "rows": rows}
    if a.screenshot:
        result["screenshot"] = screenshot(db, [r["run_id"] for r in rows], Path(a.screenshot))
    if a.json:
        print(json.dumps(result, indent=2))
        return
    print(cpu_header())
    print(f"{'method':8} {'sparsity':>8} {'steps':>6} {'FLOPs':>10} {'vs budget':>9} {'val loss':>9} {'best':>8}")
    for r in rows:
        print(f"{r['method']:8} {r['level']:>8.2f} {r['steps']:>6} {r['flops']:>10.3e} {r['flops_vs_budget']:>9.3f} "
              f"{r['val_loss']:>9.4f} {r['best_val_loss']:>8.4f}")
    print(f"runs in {db}")


def screenshot(db: Path, run_ids: list[str], out: Path) -> str:
    """The compare view of ``run_ids`` at equal FLOPs spent, saved as a PNG (offscreen)."""
    code = f"""
import os; os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")
from PySide6.QtWidgets import QApplication
app = QApplication([])
from studio.views.main_window import KEEP, MainWindow
win = MainWindow({str(db)!r}, {str(db.parent / 'runs')!r}, attach=False)
win.close_policy = KEEP
win.estimate.auto.setChecked(False)
win.resize(1500, 950); win.show()
panel = win.open_compare({run_ids!r})
panel.charts.set_x_axis("flops")
for _ in range(30): app.processEvents()
win.grab().save({str(out)!r})
"""
    subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True, timeout=300)
    return str(out)


if __name__ == "__main__":
    main()
