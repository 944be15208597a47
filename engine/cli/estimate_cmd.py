"""``mediswift estimate CONFIG``: parameters, FLOPs, memory and a measured ETA before launching."""
from __future__ import annotations

from engine.cli.common import print_json
from engine.core.config import load_config, parse_overrides
from engine.core.errors import InputError
from engine.core.paths import resolve_preset


def register(sub, with_db) -> None:
    e = sub.add_parser("estimate", help="parameters, FLOPs, memory and a measured ETA before launching")
    e.add_argument("config")
    e.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    e.add_argument("--json", action="store_true")
    e.add_argument("--probe-steps", type=int, default=3, help="training steps to time for the ETA (0 = no probe)")
    e.set_defaults(fn=cmd_estimate)


def cmd_estimate(args) -> int:
    from engine.train.estimate import estimate  # loads torch

    path = resolve_preset(args.config)
    if not path.is_file():
        raise InputError(f"config file not found: {args.config}", key="config", path=str(path))
    cfg = load_config(path, parse_overrides(args.set))
    result = estimate(cfg, probe_steps=args.probe_steps)
    if args.json:
        print_json(result)
        return 0
    p, f = result["params"], result["flops"]
    print(f"parameters: {p['total']:,} total, {p['nonzero']:,} nonzero")
    print(f"training FLOPs: {f['sparse']:.3e} sparse vs {f['dense']:.3e} dense-equivalent ({f['saving']:.2f}x fewer)")
    print(f"tokens: {result['tokens']:,}; memory ≈ {result['memory_bytes'] / 2**20:,.0f} MiB")
    if result["eta_seconds"] is not None:
        print(f"measured step: {result['step_seconds'] * 1000:.0f} ms → ETA {result['eta_seconds'] / 60:.1f} min (training only)")
    elif result.get("probe_skipped"):
        print(f"no probe: {result['probe_skipped']}")
    return 0
