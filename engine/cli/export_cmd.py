"""CLI commands: ``export`` (metrics or config), ``export-config``, ``export-hf``. Registered by engine.cli.main.

None of them replaces what it did not write: an existing file needs --overwrite, and a device node, FIFO,
socket or folder where a file goes (or a symlink to one) is refused with one line, --overwrite or not
(engine.publish.run_export.check_target)."""
from __future__ import annotations

import json
import sys
from pathlib import Path

from engine.cli.common import open_db
from engine.core.errors import InputError


def cmd_export(args) -> int:
    from engine.publish.run_export import export_config, export_metrics

    db = open_db(args)
    fmt = args.format or Path(args.out).suffix.lstrip(".").lower()
    if fmt == "toml":
        if len(args.run_ids) != 1:
            raise InputError("--format toml exports one run's config: give exactly one RUN_ID", key="run_ids")
        path = export_config(db, args.run_ids[0], args.out, overwrite=args.overwrite)
        print(f"wrote the config of run {args.run_ids[0]} to {path}")
        return 0
    n = export_metrics(db, args.run_ids, args.out, fmt or None, names=args.name or None, overwrite=args.overwrite)
    print(f"wrote {n:,} metric rows of {len(args.run_ids)} run(s) to {args.out}")
    return 0


def cmd_export_config(args) -> int:
    from engine.publish.run_export import config_toml, export_config

    db = open_db(args)
    if args.out in (None, "-"):
        sys.stdout.write(config_toml(db, args.run_id))
    else:
        export_config(db, args.run_id, args.out, overwrite=args.overwrite)
        print(f"wrote the config of run {args.run_id} to {args.out}")
    return 0


def cmd_export_hf(args) -> int:
    from engine.publish.hf_export import REPORT_PROMPT, export_hf, verify_export

    db = open_db(args)
    report = export_hf(db, args.run_id, args.out, overwrite=args.overwrite, license=args.license,
                       language=args.language)
    if args.verify:
        try:
            report["verify"] = verify_export(db, args.run_id, args.out)
        except ImportError:
            raise InputError("--verify needs the transformers package (pip install transformers)") from None
    if args.json:
        sys.stdout.write(json.dumps(report, default=str) + "\n")
        return 0
    print(f"exported run {report['run_id']} (weights of {report['model_run']}) to {report['out']}: {', '.join(report['files'])}")
    print(f"sparsity of the exported attention/MLP matrices: {report['sparsity']['matrices']:.1%} (stored dense, zeros included)")
    if report["skipped"]:
        print(f"not exported (no GPT-2 equivalent): {', '.join(report['skipped'])}")
    prompt = report[REPORT_PROMPT]
    if prompt:
        print(f"soft prompt: {prompt['n_tokens']} vectors in {prompt['file']} (see README.md)")
    if "verify" in report:
        v = report["verify"]
        print(f"verified with transformers: same tokens {v['same_tokens']}, max |logit diff| {v['max_abs_diff']:.2e}")
        if not v["same_tokens"] or v["max_abs_diff"] > 1e-4:
            return 1
    return 0


OVERWRITE_FILE = ("replace an existing regular file at --out (a device, FIFO, socket or folder there is "
                  "refused even so)")


def register(sub, common) -> None:
    e = common(sub.add_parser("export", help="metrics of one or many runs to one CSV/JSON/Parquet file (or a config as TOML)"))
    e.add_argument("run_ids", nargs="+", metavar="RUN_ID")
    e.add_argument("--format", choices=("csv", "json", "parquet", "toml"), help="default: from the --out suffix")
    e.add_argument("--out", required=True, metavar="PATH", help="the file to write; never a device, FIFO, socket or folder")
    e.add_argument("--overwrite", action="store_true", help=OVERWRITE_FILE)
    e.add_argument("--name", action="append", metavar="METRIC", help="only these metric names (repeatable)")
    e.set_defaults(fn=cmd_export)

    c = common(sub.add_parser("export-config", help="a run's config as TOML, re-runnable with `mediswift train FILE`"))
    c.add_argument("run_id")
    c.add_argument("--out", metavar="PATH", help="file to write (default: stdout); never a device, FIFO, socket or folder")
    c.add_argument("--overwrite", action="store_true", help=OVERWRITE_FILE)
    c.set_defaults(fn=cmd_export_config)

    h = common(sub.add_parser("export-hf", help="the model in Hugging Face format (GPT2LMHeadModel + tokenizer + model card)"))
    h.add_argument("run_id")
    h.add_argument("--out", required=True, metavar="DIR", help="the folder to write (a file, device, FIFO or socket there is refused)")
    h.add_argument("--overwrite", action="store_true", help="write into a non-empty folder, replacing the export's "
                   "regular files there (never a device, FIFO, socket or folder in their place)")
    h.add_argument("--license", default="other", help="the model card's license (a Hub license id, e.g. apache-2.0; "
                   "default 'other': check the licenses of your training data)")
    h.add_argument("--language", default="en", help="the model card's language code(s), comma-separated (default en)")
    h.add_argument("--verify", action="store_true", help="load the export with transformers and compare logits (needs transformers)")
    h.add_argument("--json", action="store_true")
    h.set_defaults(fn=cmd_export_hf)
