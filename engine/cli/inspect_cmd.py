"""``mediswift inspect RUN_ID``: sparsity and kernel per layer, parameters and FLOPs from a run's latest checkpoint."""
from __future__ import annotations

from engine.cli.common import open_db, print_json
from engine.core.hardware import feature_line


def register(sub, with_db) -> None:
    i = with_db(sub.add_parser("inspect", help="sparsity and kernel per layer, parameters and FLOPs from a run's latest checkpoint"))
    i.add_argument("run_id")
    i.add_argument("--json", action="store_true")
    i.set_defaults(fn=cmd_inspect)


def cmd_inspect(args) -> int:
    from engine.publish.inspect import inspect_run  # loads torch

    report = inspect_run(open_db(args), args.run_id)
    if args.json:
        print_json(report)
        return 0
    print(f"run {report['run_id']} at step {report['step']}: {report['params']['total']:,} parameters, "
          f"{report['params']['nonzero']:,} nonzero, sparsity {report['sparsity']['total']:.4f}")
    kernels = report["kernels"]
    for name, v in report["sparsity"]["layers"].items():
        print(f"  {name:32} {v:.4f}" + (f"  kernel {kernels[name]}" if name in kernels else ""))
    f = report["flops_per_token"]
    print(f"training FLOPs per token: {f['sparse']:.4g} sparse, {f['dense']:.4g} dense-equivalent ({f['dense'] / f['sparse']:.2f}x)")
    if report.get("precision"):
        cpu = report.get("cpu") or {}
        feats = feature_line(cpu.get("features") or {})
        print(f"precision: {report['precision']}" + (f" — {report['precision_reason']}" if report.get("precision_reason") else "")
              + (f" [CPU features: {feats}]" if feats else ""))
    return 0
