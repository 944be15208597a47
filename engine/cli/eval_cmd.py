"""``mediswift eval RUN_ID --task pubmedqa|hoc|lm --data PATH [--scoring raw|calibrated] [--json]``: score a run.

Works on any file of the task's format, anywhere on disk (the unseen test sets included), stores
the result with its majority and zero-shot baselines in the run database (``evaluations``), and
prints it. A prompt run is scored as its parent model with the learned prompt in front. PubMedQA
answer likelihoods are compared raw or calibrated (``--scoring``, default the run's ``task.scoring``);
the output and the stored metrics say which (``"scoring"``: raw, calibrated, generate or head).
"""
from __future__ import annotations

import json
import signal
import sys

from engine.cli.common import open_db
from engine.core import registry

# the labelled tasks first, as the help has always listed them
TASK_CHOICES = tuple(sorted(registry.TASK_NAMES, key=lambda name: not registry.task(name).labelled))


def register(subparsers, common) -> None:
    e = common(subparsers.add_parser("eval", help="score a run on a labelled file (PubMedQA, HoC) or a text file (lm)"))
    e.add_argument("run_id")
    e.add_argument("--task", choices=TASK_CHOICES, help="default: the run's task")
    e.add_argument("--data", required=True, help="PubMedQA: PQA-L JSON; HoC: JSONL; lm: text/jsonl/... file or folder")
    e.add_argument("--split", default="all", help="PubMedQA: all (default), test, cv_pool, or the fold's train/dev (needs a split file)")
    e.add_argument("--splits", help="PubMedQA split file (default: pqal_splits.json next to --data)")
    e.add_argument("--fold", type=int, default=0, help="fold for --split train/dev")
    e.add_argument("--limit", type=int, default=0, help="score only the first N examples (0 = all)")
    e.add_argument("--batch-size", type=int, default=16)
    e.add_argument("--scoring", choices=("raw", "calibrated"),
                   help="PubMedQA answer-likelihood prediction: raw log-probabilities, or calibrated against a "
                        "content-free input (default: the run's task.scoring)")
    e.add_argument("--no-baselines", action="store_true", help="skip the majority and zero-shot baselines")
    e.add_argument("--predictions", metavar="FILE.jsonl", help="also write each example's id, gold and predicted label")
    e.add_argument("--json", action="store_true", help="print one JSON object")
    e.set_defaults(fn=cmd_eval)


def _interrupt(signum, _frame):
    raise KeyboardInterrupt


def cmd_eval(args) -> int:
    from engine.tasks.run_eval import evaluate_run

    db = open_db(args)
    # SIGTERM stops an evaluation as Ctrl-C does: nothing is stored until the whole file is scored
    previous = signal.signal(signal.SIGTERM, _interrupt)
    try:
        out = evaluate_run(db, args.run_id, args.data, task_name=args.task, split=args.split, splits=args.splits,
                           fold=args.fold, limit=args.limit, batch_size=args.batch_size, with_baselines=not args.no_baselines,
                           predictions=args.predictions, scoring=args.scoring, warn=lambda m: sys.stderr.write(f"mediswift: warning: {m}\n"))
    except KeyboardInterrupt:
        # a second signal while we leave must not turn this clean exit into a death by signal
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        previous = signal.SIG_IGN
        sys.stderr.write(f"mediswift: evaluation of {args.run_id} interrupted; nothing was stored\n")
        return 130
    finally:
        signal.signal(signal.SIGTERM, previous)
    if args.json:
        sys.stdout.write(json.dumps(out, default=str) + "\n")
    else:
        from engine.tasks.scoring import headline

        def how(m: dict) -> str:
            said = f", scoring {m['scoring']}" if "scoring" in m else ""
            if isinstance(m.get("predicted"), dict):
                said += " (predicted " + ", ".join(f"{k} {v}" for k, v in m["predicted"].items()) + ")"
            return said

        head = ", ".join(f"{k} {v:.4f}" for k, v in headline(out["task"], out).items())
        print(f"run {out['run_id']} (step {out['step']}) on {out['data']} [{out['split']}]: n {out['n']}, {head}{how(out)}")
        for name, b in out["baselines"].items():
            if "skipped" in b:
                print(f"  {name}: skipped ({b['skipped']})")
            else:
                print(f"  {name}: " + ", ".join(f"{k} {v:.4f}" for k, v in headline(out["task"], b).items()) + how(b))
    return 0
