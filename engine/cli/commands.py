"""The engine's command line: ``mediswift`` (also ``python -m engine``).

Exit codes: 0 success (a stopped run included), 1 internal failure, 2 bad input (one clear line on
stderr naming the field or file, plus an ``error`` event on stdout for commands that stream events).
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import sqlite3
import sys
from pathlib import Path

# Idle OpenMP threads of torch (and numba) spin by default; when cores are shared (the studio, a
# second run, tests) the spinning threads steal the cores the working ones need and steps get
# several times slower. Passive waiting costs little when the machine is quiet. A user's own
# setting wins. Must happen before torch is imported.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from engine.cli.common import EXIT_BAD_INPUT, open_db, print_json
from engine.cli.group import check_group, in_group, world_size
from engine.core.config import load_config, parse_overrides
from engine.core.errors import InputError
from engine.core.events import EventWriter
from engine.core.paths import default_db_path, default_runs_dir, list_presets, resolve_preset
from engine.store.queries import disk_usage, find_run
from engine.store.rundb import RunDB



_db = open_db
_print_json = print_json


# -- train ------------------------------------------------------------------------------------------


def cmd_train(args) -> int:
    from engine.train.session import RunSession

    worker = in_group()  # one process of a torchrun group (engine.cli.group)
    follower = worker and int(os.environ["RANK"]) != 0
    events = EventWriter(enabled=not follower)
    db = RunDB(args.db or default_db_path()) if follower else _db(args)  # rank 0 alone writes, reaping included
    resume_row = None
    overrides = parse_overrides(args.set)
    if args.resume and args.config:
        raise InputError("give either CONFIG or --resume RUN_ID (a resumed run keeps its own config; adjust it with --set)", key="config")
    if args.resume:
        resume_row = db.get_run(args.resume)
        if resume_row is None:
            raise InputError(f"cannot resume: unknown run {args.resume}", key="resume")
        # (a follower reads the row after rank 0 has claimed it: the claim itself is the check)
        if resume_row["status"] in ("running", "paused") and not worker:
            raise InputError(f"cannot resume run {resume_row['id']}: it is still {resume_row['status']} (pid {resume_row['pid']})", key="resume")
        if resume_row["status"] == "completed" and "train.max_steps" not in overrides and not worker:
            raise InputError(f"run {resume_row['id']} already completed; to train further add --set train.max_steps=N", key="resume")
        from engine.core.config import from_dict

        stored = from_dict(resume_row["config"])
        cfg, batch_note = keep_global_batch(stored, stored.replace(overrides), overrides)
        from engine.model.checkpoint import load_checkpoint
        from engine.model.runs import good_checkpoint

        ckpt_path = good_checkpoint(db, resume_row["id"])
        if ckpt_path is None:
            raise InputError(f"cannot resume run {resume_row['id']}: it has no intact checkpoint to continue from",
                             key="resume")
        ckpt_path = str(ckpt_path)
        resume_state = load_checkpoint(ckpt_path)  # opened before the run is touched: a bad file changes nothing
    else:
        if not args.config:
            raise InputError("train needs a CONFIG.toml (or a preset name such as 'demo'), or --resume RUN_ID", key="config")
        path = resolve_preset(args.config)
        if not path.is_file():
            raise InputError(f"config file not found: {args.config} (presets: {', '.join(list_presets())})", key="config", path=str(path))
        cfg = load_config(path, overrides)
        ckpt_path = resume_state = batch_note = None
    _check_inputs(cfg, db)
    if cfg.stage in ("finetune", "prompt") or _continues_import(db, cfg):
        from engine.core.config import load_toml
        from engine.train.child import child_config

        # the model shape comes from the parent; only an explicitly given model.n_ctx is honoured
        explicit = set(overrides) | ({f"model.{k}" for k in load_toml(path).get("model", {})} if not resume_row else set())
        cfg = child_config(cfg, db, explicit, resuming=bool(resume_row))
    if not worker:
        check_group(cfg, resuming=bool(resume_row))
        if cfg.stage != "vocab" and not args.ignore_memory_check:
            _check_memory(cfg)
        if world_size(cfg) > 1 and cfg.stage != "vocab":
            from engine.cli.group import launch

            return launch(sys.argv[1:] if args.argv is None else args.argv, cfg, str(db.path))
    runs_dir = Path(args.runs_dir) if args.runs_dir else default_runs_dir(db.path)
    if worker:
        return _train_in_group(args, db, events, cfg, runs_dir, resume_row, ckpt_path, resume_state, follower,
                               batch_note)
    session = RunSession(db, events, cfg, runs_dir, resume_id=resume_row["id"] if resume_row else None)
    if batch_note:
        session.info(batch_note)
    from engine.train.control import Control

    control = Control()
    control.install()
    try:
        status = _run_stage(session, control, ckpt_path, resume_state)
        return 0 if status in ("completed", "stopped") else 1
    except InputError as e:
        session.fail(str(e), key=e.key, path=e.path)
        _stderr_error(str(e))
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        session.fail("interrupted twice; stopped without a final checkpoint", status="stopped")
        return 130
    except Exception as e:  # noqa: BLE001 - record any failure before exiting
        import traceback

        session.log.error(traceback.format_exc())
        session.fail(f"{type(e).__name__}: {e}")
        return 1
    finally:
        control.uninstall()
        session.close()


def _continues_import(db: RunDB, cfg) -> bool:
    """A pre-training whose parent is an imported model takes the model's shape, as a fine-tune does."""
    if cfg.stage != "pretrain" or not cfg.parent:
        return False
    row = db.get_run(cfg.parent)
    return row is not None and row["stage"] == "import"


def keep_global_batch(stored, cfg, overrides: dict):
    """A run resumed on another number of processes keeps its global batch (processes x batch_size x
    grad_accum), and so its batch order and schedule, by changing grad_accum where it divides; an
    explicit train.grad_accum wins."""
    old, new = world_size(stored), world_size(cfg)
    if old == new or "train.grad_accum" in overrides:
        return cfg, None
    total = old * stored.train.grad_accum
    if total % new:
        return cfg, (f"the run continues on {new} processes (it ran on {old}) and its global batch changes from {total} "
                     f"to {new * cfg.train.grad_accum} micro-batches per step: {total} is not divisible by {new}")
    return cfg.replace({"train.grad_accum": total // new}), (
        f"the run continues on {new} process{'es' if new > 1 else ''} (it ran on {old}) with train.grad_accum = "
        f"{total // new}, keeping its global batch of {total} micro-batches per step and so its batch order")


def _train_in_group(args, db, events, cfg, runs_dir, resume_row, ckpt_path, resume_state, follower: bool,
                    batch_note: str | None = None) -> int:
    """One rank of a process group: rank 0 holds the run (its session, rows, events and lease) and
    tells the others its id; they follow silently. A failure of the group's communication (a rank
    died) ends the run as crashed, not failed: resuming it is the remedy."""
    import torch.distributed as dist

    from engine.cli.group import record_run_id
    from engine.train.control import Control
    from engine.train.distributed import from_environment
    from engine.train.session import FollowerSession, RunSession

    group = from_environment(cfg.train.strategy, cfg.train.device != "cpu")
    session = None
    try:
        if follower:
            run_id, run_dir = group.broadcast(None)
            if run_id is None:
                return EXIT_BAD_INPUT  # rank 0 refused the run (and said why)
            session = FollowerSession(db, cfg, run_id, run_dir, group.rank, resumed=resume_row is not None)
        else:
            try:
                session = RunSession(db, events, cfg, runs_dir, resume_id=resume_row["id"] if resume_row else None)
            except InputError:
                group.broadcast((None, None))
                raise
            record_run_id(session.run_id)
            group.broadcast((session.run_id, str(session.run_dir)))
            if batch_note:
                session.info(batch_note)
    except InputError:
        if not follower:
            raise
        return EXIT_BAD_INPUT
    control = Control(read_stdin=not follower)
    control.install()
    lost = False
    try:
        status = _run_stage(session, control, ckpt_path, resume_state)
        return 0 if status in ("completed", "stopped") else 1
    except InputError as e:
        session.fail(str(e), key=e.key, path=e.path)
        if not follower:
            _stderr_error(str(e))
        return EXIT_BAD_INPUT
    except Exception as e:  # noqa: BLE001 - record any failure before exiting
        import traceback

        text = str(e)
        lost = isinstance(e, dist.DistError) or (isinstance(e, RuntimeError) and any(
            w in text for w in ("Connection closed", "Connection reset", "gloo", "NCCL", "Broken pipe")))
        if not lost:
            session.log.error(traceback.format_exc())
        session.fail(f"{type(e).__name__}: {e}" if not lost else
                     f"a process of the group was lost ({type(e).__name__}: {text.splitlines()[0] if text else ''}); "
                     "resume the run to continue from its last checkpoint", status="crashed" if lost else "failed")
        return 1
    finally:
        control.uninstall()
        session.close()
        if lost:
            # the run is recorded; tearing down a group that lost a member (its destructor included)
            # waits on the dead peer, so leave at once
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(1)
        group.close()


def _run_stage(session, control, ckpt_path, resume_state):
    """The stage the config names, run by the one training loop (the vocabulary stage has no loop)."""
    from engine.train.loop import TrainLoop

    stage = session.cfg.stage
    if stage == "vocab":
        from engine.train.pretrain import run_vocab

        return run_vocab(session)
    if stage == "pretrain":
        from engine.train.pretrain import PretrainStage as Stage
    elif stage == "finetune":
        from engine.train.finetune import FinetuneStage as Stage
    else:
        from engine.train.prompt import PromptStage as Stage
    return TrainLoop(session, control, Stage(), ckpt_path, resume_state).run()


def _check_memory(cfg) -> None:
    """A run that cannot fit in this machine's memory is refused before it starts (not an allocation
    traceback); the processes of a group on this machine count together."""
    import torch

    from engine.train.estimate import available_memory, estimate

    if cfg.train.device != "cpu" and torch.cuda.is_available():
        return  # GPU memory is another budget; the device itself reports it
    est = estimate(cfg, probe_steps=0)
    need, have = est.get("memory_per_process_bytes", est["memory_bytes"]) * cfg.train.nproc, available_memory()
    if need > 0.9 * have:
        raise InputError(f"the run needs about {need / 2**30:.1f} GiB of memory and this machine has {have / 2**30:.1f} GiB "
                         "available; use a smaller model or train.batch_size (or pass --ignore-memory-check)", key="model")


def _check_inputs(cfg, db: RunDB) -> None:
    """Checks that need no heavy work, done before a run row exists (so bad input leaves no run behind)."""
    from engine.data.corpus import check_corpus_spec
    from engine.model.runs import check_parent

    if cfg.stage in ("vocab", "pretrain") or cfg.task.name == "lm":
        check_corpus_spec(cfg.data.corpus)
    check_parent(db, cfg)
    if cfg.stage != "vocab":
        from engine.train.metrics import check_reporters

        check_reporters(cfg.train.report_to)
        from engine.train.precision import choose_precision
        from engine.train.runtime import resolve_device

        choose_precision(cfg.train.precision, resolve_device(cfg.train.device))  # fp16 on a CPU, say


# -- runs, inspect, metrics -------------------------------------------------------------------------


def cmd_runs_list(args) -> int:
    from engine.store.queue import Queue

    db = _db(args)
    runs = db.list_runs()
    sweeps = Queue(db).sweep_of_runs()
    rows = [
        {"id": r["id"], "name": r["name"], "stage": r["stage"], "status": r["status"], "parent": r["parent_id"],
         "created_at": r["created_at"], "finished_at": r["finished_at"], "summary": r["summary"], "tags": r["tags"],
         "run_dir": r["run_dir"], "sweep": sweeps.get(r["id"])}
        for r in runs
    ]
    if args.json:
        _print_json(rows)
        return 0
    if not rows:
        print("no runs yet; start one with: mediswift train demo")
        return 0
    print(f"{'id':10} {'name':20} {'stage':9} {'status':10} {'step':>6} {'val loss':>9}  parent")
    for r in rows:
        s = r["summary"]
        vl = f"{s['val_loss']:.4f}" if s.get("val_loss") is not None else "-"
        print(f"{r['id']:10} {r['name'][:20]:20} {r['stage']:9} {r['status']:10} {s.get('step', 0):>6} {vl:>9}  {r['parent'] or ''}")
    return 0


def cmd_runs_show(args) -> int:
    db = _db(args)
    row = find_run(db, args.run_id)
    out = {
        "id": row["id"], "name": row["name"], "stage": row["stage"], "status": row["status"], "parent": row["parent_id"],
        "config": row["config"], "summary": row["summary"], "meta": row["meta"], "error": row["error"],
        "created_at": row["created_at"], "started_at": row["started_at"], "finished_at": row["finished_at"],
        "host": row["host"], "pid": row["pid"], "versions": row["versions"], "run_dir": row["run_dir"],
        "tags": row["tags"], "notes": row["notes"],
        "checkpoints": db.checkpoints(row["id"]), "evaluations": db.evaluations(row["id"]),
        "children": [r["id"] for r in db.list_runs() if r["parent_id"] == row["id"]],
    }
    out["disk"] = disk_usage(row, out["checkpoints"])
    if args.json:
        _print_json(out)
    else:
        print(json.dumps(out, indent=2, default=str))
    return 0


def cmd_inspect(args) -> int:
    from engine.core.hardware import feature_line
    from engine.publish.inspect import inspect_run

    report = inspect_run(_db(args), args.run_id)
    if args.json:
        _print_json(report)
    else:
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


def cmd_metrics(args) -> int:
    db = _db(args)
    row = find_run(db, args.run_id)
    rows = db.metrics(row["id"], names=args.name or None)
    cols = ["step", "tokens", "wall_time", "flops", "flops_dense", "name", "value"]
    if args.csv:
        w = csv.writer(sys.stdout, lineterminator="\n")
        w.writerow(cols)
        for r in rows:
            w.writerow([r[c] for c in cols])
    else:
        _print_json(rows)
    return 0


def cmd_estimate(args) -> int:
    from engine.train.estimate import estimate

    path = resolve_preset(args.config)
    if not path.is_file():
        raise InputError(f"config file not found: {args.config}", key="config", path=str(path))
    cfg = load_config(path, parse_overrides(args.set))
    result = estimate(cfg, probe_steps=args.probe_steps)
    if args.json:
        _print_json(result)
    else:
        p, f = result["params"], result["flops"]
        print(f"parameters: {p['total']:,} total, {p['nonzero']:,} nonzero")
        print(f"training FLOPs: {f['sparse']:.3e} sparse vs {f['dense']:.3e} dense-equivalent ({f['saving']:.2f}x fewer)")
        print(f"tokens: {result['tokens']:,}; memory ≈ {result['memory_bytes'] / 2**20:,.0f} MiB")
        if result["eta_seconds"] is not None:
            print(f"measured step: {result['step_seconds'] * 1000:.0f} ms → ETA {result['eta_seconds'] / 60:.1f} min (training only)")
        elif result.get("probe_skipped"):
            print(f"no probe: {result['probe_skipped']}")
    return 0


def cmd_migrate_checkpoints(args) -> int:
    """Convert a run's checkpoints of an earlier version (pickles) to the current format (safetensors)."""
    from engine.model.checkpoint import SUFFIX, file_sha256, is_legacy, load_legacy_checkpoint, save_checkpoint

    db = _db(args)
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


def cmd_presets(args) -> int:
    names = list_presets()
    if args.json:
        _print_json([{"name": n, "path": str(resolve_preset(n))} for n in names])
    else:
        print("\n".join(names))
    return 0


def cmd_config_keys(args) -> int:
    from engine.core.config import field_docs

    docs = field_docs()
    if args.json:
        _print_json(docs)
    else:
        for key, info in docs.items():
            extra = f" (one of: {', '.join(info['choices'])})" if "choices" in info else ""
            print(f"{key} = {json.dumps(info['default'])}\n    {info['doc']}{extra}")
    return 0


# -- entry point ------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mediswift", description="MediSwift engine: sparse pre-training of domain GPT models.")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def common(sp, db=True):
        if db:
            sp.add_argument("--db", help="run database (default: $MEDISWIFT_DB or ~/.local/share/mediswift/runs.db)")
        return sp

    t = common(sub.add_parser("train", help="start (or --resume) a run; streams JSON-line events on stdout"))
    t.add_argument("config", nargs="?", help="CONFIG.toml, or a preset name (see `mediswift presets`)")
    t.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key, e.g. train.max_steps=100")
    t.add_argument("--runs-dir", help="folder for run folders (default: next to the database, or $MEDISWIFT_RUNS_DIR)")
    t.add_argument("--resume", metavar="RUN_ID", help="continue a stopped or crashed run from its last checkpoint")
    t.add_argument("--ignore-memory-check", action="store_true",
                   help="start even when the estimated memory exceeds what this machine has available")
    t.set_defaults(fn=cmd_train)

    r = sub.add_parser("runs", help="list or show runs")
    rs = r.add_subparsers(dest="runs_command", required=True, metavar="ACTION")
    rl = common(rs.add_parser("list", help="every run in the database"))
    rl.add_argument("--json", action="store_true")
    rl.set_defaults(fn=cmd_runs_list)
    rsh = common(rs.add_parser("show", help="one run: config, status, summary, checkpoints, evaluations"))
    rsh.add_argument("run_id")
    rsh.add_argument("--json", action="store_true")
    rsh.set_defaults(fn=cmd_runs_show)

    i = common(sub.add_parser("inspect", help="sparsity and kernel per layer, parameters and FLOPs from a run's latest checkpoint"))
    i.add_argument("run_id")
    i.add_argument("--json", action="store_true")
    i.set_defaults(fn=cmd_inspect)

    m = common(sub.add_parser("metrics", help="a run's metric rows (step, tokens, name, value)"))
    m.add_argument("run_id")
    fmt = m.add_mutually_exclusive_group(required=True)
    fmt.add_argument("--json", action="store_true")
    fmt.add_argument("--csv", action="store_true")
    m.add_argument("--name", action="append", help="only these metric names")
    m.set_defaults(fn=cmd_metrics)

    e = sub.add_parser("estimate", help="parameters, FLOPs, memory and a measured ETA before launching")
    e.add_argument("config")
    e.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    e.add_argument("--json", action="store_true")
    e.add_argument("--probe-steps", type=int, default=3, help="training steps to time for the ETA (0 = no probe)")
    e.set_defaults(fn=cmd_estimate)

    mc = common(sub.add_parser("migrate-checkpoints",
                               help="convert a run's checkpoints of an earlier version (pickles) to safetensors"))
    mc.add_argument("run_id")
    mc.add_argument("--yes", action="store_true", help="trust and convert without asking (for scripts)")
    mc.set_defaults(fn=cmd_migrate_checkpoints)

    pr = sub.add_parser("presets", help="bundled presets")
    pr.add_argument("--json", action="store_true")
    pr.set_defaults(fn=cmd_presets)

    ck = sub.add_parser("config-keys", help="every config key with its default and meaning")
    ck.add_argument("--json", action="store_true")
    ck.set_defaults(fn=cmd_config_keys)

    for register in _extra_commands():
        register(sub, common)
    return p


def _extra_commands():
    """Commands that live in their own modules (evaluation, export, import, sweeps and the queue)."""
    from engine.cli import eval_cmd, export_cmd, import_cmd, sweep_cmd

    return [eval_cmd.register, export_cmd.register, import_cmd.register, sweep_cmd.register]


def _stderr_error(message: str) -> None:
    sys.stderr.write(f"mediswift: error: {message}\n")
    sys.stderr.flush()


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args.argv = argv  # what a process group's workers are started with
    # commands whose stdout a program reads get the error as an event too
    streams_events = args.command == "train" or (args.command == "estimate" and args.json)
    try:
        return args.fn(args)
    except InputError as e:
        if in_group() and os.environ.get("RANK") != "0":
            return EXIT_BAD_INPUT  # rank 0 says it, once
        _stderr_error(str(e))
        if streams_events:
            EventWriter().emit("error", message=str(e), key=getattr(e, "key", None) or None, path=getattr(e, "path", None))
        return EXIT_BAD_INPUT
    except sqlite3.DatabaseError as e:  # a damaged or foreign file where the run database should be
        db = getattr(args, "db", None) or default_db_path()
        _stderr_error(f"the run database {db} is damaged or not a run database ({e})")
        return EXIT_BAD_INPUT
    except BrokenPipeError:
        return 0


if __name__ == "__main__":
    sys.exit(main())
