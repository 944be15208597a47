"""``mediswift migrate-checkpoints RUN_ID``: a run's checkpoints of an earlier version (pickles) converted
to the current format (safetensors)."""
from __future__ import annotations

import sys
from pathlib import Path

from engine.cli.common import open_db
from engine.core.errors import InputError
from engine.store.queries import find_run


def register(sub, with_db) -> None:
    mc = with_db(sub.add_parser("migrate-checkpoints",
                                help="convert a run's checkpoints of an earlier version (pickles) to safetensors"))
    mc.add_argument("run_id")
    mc.add_argument("--yes", action="store_true", help="trust and convert without asking (for scripts)")
    mc.set_defaults(fn=cmd_migrate_checkpoints)


def cmd_migrate_checkpoints(args) -> int:
    from engine.model.checkpoint import SUFFIX, file_sha256, is_legacy, load_legacy_checkpoint, save_checkpoint  # torch

    db = open_db(args)
    run = find_run(db, args.run_id)
    legacy = [r for r in db.checkpoints(run["id"]) if Path(r["path"]).is_file() and is_legacy(r["path"])]
    if not legacy:
        print(f"run {run['id']}: no checkpoint of an earlier version to convert")
        return 0
    if not args.yes:
        if not sys.stdin or not sys.stdin.isatty():
            raise InputError("migrate-checkpoints opens pickles, which can run code: confirm with --yes", key="yes")
        answer = input(f"{len(legacy)} checkpoint(s) of run {run['id']} are pickles, which can run code when opened. "
                       "Open them only if you trust where they came from. Convert? [y/N] ")
        if answer.strip().lower() not in ("y", "yes"):
            print("nothing converted")
            return 0
    for r in legacy:
        old = Path(r["path"])
        new = old.with_suffix(SUFFIX)
        nbytes = save_checkpoint(load_legacy_checkpoint(old), new)
        db.replace_checkpoint_file(r["id"], str(new), nbytes, file_sha256(new))
        old.unlink()
        print(f"converted {old} -> {new} ({nbytes:,} bytes)")
    return 0
