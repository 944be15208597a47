"""``mediswift import-hf DIR``: a local Hugging Face model folder (gpt2, llama, qwen2, biogpt) as a run to start from."""
from __future__ import annotations

import json
import sys
from pathlib import Path

from engine.cli.common import open_db


def cmd_import_hf(args) -> int:
    from engine.core.paths import default_runs_dir
    from engine.publish.hf_import import import_hf

    db = open_db(args)
    runs_dir = Path(args.runs_dir) if args.runs_dir else default_runs_dir(db.path)
    report = import_hf(db, args.dir, runs_dir, name=args.name, warn=lambda m: sys.stderr.write(f"[mediswift] {m}\n"))
    if args.json:
        sys.stdout.write(json.dumps(report) + "\n")
        return 0
    print(f"imported {report['from']} as run {report['run_id']} ({report['name']}): {report['family']}, {report['n_layer']} layers, width "
          f"{report['d_model']}, {report['n_head']} heads, {report['n_positions']} positions, vocabulary "
          f"{report['vocab_size']}, {report['params']:,} parameters")
    print(f"start from it with parent = \"{report['run_id']}\": sparse continued pre-training (stage pretrain), "
          "dense fine-tuning or soft prompting")
    return 0


def register(sub, common) -> None:
    i = common(sub.add_parser("import-hf", help="register a local Hugging Face model folder (gpt2, llama, qwen2, biogpt) as a run to start from"))
    i.add_argument("dir", metavar="DIR", help="folder with config.json, model.safetensors (or pytorch_model.bin) and "
                   "tokenizer.json (or vocab.json + merges.txt: GPT-2's byte-level BPE, BioGPT's Moses + BPE)")
    i.add_argument("--name", help="the run's name (default: the folder's name)")
    i.add_argument("--runs-dir", help="folder for run folders (default: next to the database)")
    i.add_argument("--json", action="store_true")
    i.set_defaults(fn=cmd_import_hf)
