"""Print what the sweeps of docs/results.md found, from the run database, as Markdown tables.

    python bench/results/table.py --db /tmp/results/runs.db equal-flops sparsity-pipeline

Reads engine.orchestrate.study (the Study tab's data): per grid point its steps, training FLOPs, final and best
validation loss, and the dev scores of its chained runs with their majority and zero-shot baselines.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from engine.core.hardware import cpu_header  # noqa: E402
from engine.store.rundb import RunDB  # noqa: E402
from engine.orchestrate.study import sweep_study  # noqa: E402


def _f(v, spec=".4f"):
    return "–" if v is None else format(v, spec)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("sweeps", nargs="+", help="sweep ids or names")
    p.add_argument("--db", required=True)
    a = p.parse_args()
    db = RunDB(a.db)
    print(cpu_header())
    for name in a.sweeps:
        st = sweep_study(db, name)
        spec = st["spec"]
        print(f"\n### {st['sweep']['name']} ({st['sweep']['id']})"
              + (f": {spec['equal_flops']:.3g} training FLOPs per run" if spec.get("equal_flops") else ""))
        print("\n| point | d_model | sparsity | nonzero sparse weights | steps | training FLOPs | final val loss | best val loss |")
        print("|---|---|---|---|---|---|---|---|")
        for pt in st["points"]:
            nz = None
            if pt["d_model"]:
                nz = int(round(12 * pt["n_layer"] * pt["d_model"] ** 2 * (1 - pt["sparsity"])))
            print(f"| {pt['label']} | {pt['d_model']} | {_f(pt['sparsity'], '.2f')} | {'–' if nz is None else format(nz, ',')} | {pt['steps']} | "
                  f"{_f(pt['flops'], '.4g')} | {_f(pt['final_val_loss'])} | {_f(pt['best_val_loss'])} |")
        kids = [(pt, c) for pt in st["points"] for c in pt["children"]]
        if kids:
            print("\n| parent point | chained stage | task | dev metric | score | majority | zero-shot parent |")
            print("|---|---|---|---|---|---|---|")
            for pt, c in kids:
                m = c["metric"]
                print(f"| {pt['label']} | {c['stage']} | {c['task'] or '–'} | {m or '–'} | "
                      f"{_f(c['metrics'].get(m)) if m else c['status']} | "
                      f"{_f((c['baselines'].get('majority') or {}).get(m)) if m else '–'} | "
                      f"{_f((c['baselines'].get('zero_shot') or {}).get(m)) if m else '–'} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
