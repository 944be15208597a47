"""``mediswift train CONFIG | --resume RUN_ID``: prepare the run (engine.train.plan), run it
(engine.train.launch) and exit with its code; the run streams its own JSON-line events."""
from __future__ import annotations

from engine.cli.common import open_db
from engine.core.errors import EXIT_BAD_INPUT, InputError
from engine.store.rundb import RunDB


def register(sub, with_db) -> None:
    t = with_db(sub.add_parser("train", help="start (or --resume) a run; streams JSON-line events on stdout"))
    t.add_argument("config", nargs="?", help="CONFIG.toml, or a preset name (see `mediswift presets`)")
    t.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key, e.g. train.max_steps=100")
    t.add_argument("--runs-dir", help="folder for run folders (default: next to the database, or $MEDISWIFT_RUNS_DIR)")
    t.add_argument("--resume", metavar="RUN_ID", help="continue a stopped or crashed run from its last checkpoint")
    t.add_argument("--ignore-memory-check", action="store_true",
                   help="start even when the estimated memory exceeds what this machine has available")
    t.set_defaults(fn=cmd_train)


def cmd_train(args) -> int:
    from engine.train.request import RunRequest, in_group, is_follower, read_request

    request = RunRequest(config=args.config, overrides=tuple(args.set), resume=args.resume, runs_dir=args.runs_dir,
                         ignore_memory_check=args.ignore_memory_check)
    follower = is_follower()  # a worker of a user's `torchrun -m engine train`, not its rank 0
    db = RunDB(args.db) if follower else open_db(args)  # rank 0 alone notices crashed runs
    try:
        read = read_request(request, db, check_status=not in_group())  # before torch loads: bad input answered at once
        # torch loads with these (the other commands start without it)
        from engine.train.launch import run_plan
        from engine.train.plan import prepare_run

        plan = prepare_run(request, db, read)
    except InputError:
        if follower:
            return EXIT_BAD_INPUT  # its rank 0 says it, once
        raise
    finally:
        db.close()
    return run_plan(plan)
