"""``mediswift estimate CONFIG``: parameters, FLOPs, memory and a measured ETA before launching."""
from __future__ import annotations

import argparse
from pathlib import Path

from engine.cli.common import print_json
from engine.core.config import load_config, load_toml, parse_overrides
from engine.core.errors import InputError
from engine.core.paths import default_db_path, resolve_preset

DESCRIPTION = """\
Parameters, FLOPs, tokens, memory and a measured ETA of CONFIG as `mediswift train CONFIG` would run it.

The run's length is counted as train counts it: with train.epochs (the fine-tuning presets), epochs x
steps per epoch from the task's training examples (task.train, after task.max_examples), unless
train.max_steps is given with --set, which turns epochs off as it does for train. A fine-tuning or
prompting config takes its parent's model shape from the run database (--db); with a classification
head (task.head = "classifier") every window of a batch's examples counts, as the run's own batch
order builds them: the tokens, the FLOPs, the ETA and the memory of the largest micro-batch. A parent
that the database does not hold leaves the config's own model shape (said in `notes`)."""


def register(sub, with_db) -> None:
    e = with_db(sub.add_parser("estimate", help="parameters, FLOPs, memory and a measured ETA before launching",
                               description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter))
    e.add_argument("config", help="a preset name or a CONFIG.toml")
    e.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key, as for train (train.max_steps given here turns train.epochs off)")
    e.add_argument("--json", action="store_true")
    e.add_argument("--probe-steps", type=int, default=3, help="training steps to time for the ETA (0 = no probe)")
    e.set_defaults(fn=cmd_estimate)


def cmd_estimate(args) -> int:
    from engine.train.estimate import estimate  # loads torch
    from engine.train.plan import estimate_config

    path = resolve_preset(args.config)
    if not path.is_file():
        raise InputError(f"config file not found: {args.config}", key="config", path=str(path))
    overrides = parse_overrides(args.set)
    cfg = load_config(path, overrides)
    explicit = set(overrides) | {f"model.{k}" for k in load_toml(path).get("model", {})}
    db = None
    db_path = Path(args.db or default_db_path())
    if cfg.parent and db_path.is_file():  # read only: an estimate creates no database
        from engine.store.rundb import RunDB

        db = RunDB(db_path)
    try:
        cfg, shape, notes = estimate_config(cfg, db, explicit)
    finally:
        if db is not None:
            db.close()
    result = estimate(cfg, probe_steps=args.probe_steps, shape=shape)
    result["notes"] = list(notes)
    if args.json:
        print_json(result)
        return 0
    p, f = result["params"], result["flops"]
    for note in notes:
        print(note)
    print(f"parameters: {p['total']:,} total, {p['nonzero']:,} nonzero")
    print(f"steps: {result['max_steps']:,}" + (f" ({result['epochs']} epochs)" if result["epochs"] else ""))
    print(f"training FLOPs: {f['sparse']:.3e} sparse vs {f['dense']:.3e} dense-equivalent ({f['saving']:.2f}x fewer)")
    print(f"tokens: {result['tokens']:,}; memory ≈ {result['memory_bytes'] / 2**20:,.0f} MiB")
    if shape is not None:
        print(f"windows: {shape.windows_per_example:.2f} per example; the largest micro-batch holds {shape.peak_rows} "
              f"windows ({shape.peak_tokens:,} positions)")
    if result["eta_seconds"] is not None:
        print(f"measured step: {result['step_seconds'] * 1000:.0f} ms → ETA {result['eta_seconds'] / 60:.1f} min (training only)")
    elif result.get("probe_skipped"):
        print(f"no probe: {result['probe_skipped']}")
    return 0
