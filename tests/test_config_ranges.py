"""Config values are range-checked before any side effect: the seed within 0..2^63-1, every integer key within
its bounds, run names one line of printable text (and export-config of a run stored with an odd name still
writes TOML that `train` reads); sweeps refuse duplicate grid values and points this machine cannot run
before anything is queued, and queue a 10,000-point grid quickly. In-process where possible, a few real CLI
processes."""
from __future__ import annotations

import subprocess
import sys

import pytest
from helpers import REPO, engine_env

from engine.cli import main
from engine.core.config import INT64_MAX, MAX_NAME, RunConfig, field_docs, load_config, name_problem, safe_name
from engine.core.errors import InputError
from engine.store.rundb import RunDB

INT_KEYS = {k: v for k, v in field_docs().items() if v["type"] == "int"}


def _refused(overrides: dict) -> InputError:
    with pytest.raises(InputError) as e:
        load_config(None, overrides)
    return e.value


def _cli(capsys, db_path, *args: str) -> tuple[int, str]:
    capsys.readouterr()
    rc = main([*args, "--db", str(db_path)])
    return rc, capsys.readouterr().err


def _one_line(rc: int, err: str, *needles: str) -> bool:
    lines = err.strip().splitlines()
    return rc == 2 and len(lines) == 1 and "Traceback" not in err and all(n in err for n in needles)


# -- the seed --------------------------------------------------------------------------------------


@pytest.mark.quick
@pytest.mark.parametrize("seed", [-1, 2**63, 10**30, -(2**63) - 1])
def test_a_seed_outside_0_to_2_63_minus_1_is_refused_naming_the_key(seed):
    e = _refused({"train.seed": seed})
    assert e.key == "train.seed" and "2^63-1" in str(e)


@pytest.mark.quick
@pytest.mark.parametrize("seed", [0, 1, 2**32, INT64_MAX])
def test_a_seed_within_range_is_kept(seed):
    assert load_config(None, {"train.seed": seed}).train.seed == seed


def test_the_cli_refuses_a_huge_seed_before_a_run_row_exists(tmp_path):
    db = tmp_path / "runs.db"
    p = subprocess.run([sys.executable, "-m", "engine", "train", "demo", "--set", f"train.seed={10**30}", "--db", str(db)],
                       capture_output=True, text=True, timeout=120, cwd=REPO, env=engine_env(tmp_path))
    assert p.returncode == 2 and "Traceback" not in p.stderr and "train.seed" in p.stderr, p.stderr
    assert not db.exists() or RunDB(db).list_runs() == []


# -- every integer key -------------------------------------------------------------------------------


@pytest.mark.quick
@pytest.mark.parametrize("key", list(INT_KEYS))
def test_every_integer_key_has_bounds_and_refuses_beyond_them(key):
    info = INT_KEYS[key]
    assert info.get("min") is not None and info.get("max") is not None, f"{key} has no bounds"
    assert info["max"] <= INT64_MAX
    for bad in (info["max"] + 1, 10**30, info["min"] - 1):
        e = _refused({key: bad})
        assert e.key == key, (key, bad, str(e))
        assert "\n" not in str(e)


@pytest.mark.quick
@pytest.mark.parametrize("key", ["train.max_steps", "train.batch_size", "model.n_ctx", "train.grad_accum",
                                 "train.eval_every", "train.checkpoint_every", "sparsity.update_every"])
def test_steps_batches_and_context_must_be_positive(key):
    for bad in (0, -5):
        assert _refused({key: bad}).key == key


# -- names -------------------------------------------------------------------------------------------


BAD_NAMES = {
    "newline": "pre\ntrain",
    "carriage return": "a\rb",
    "tab": "a\tb",
    "NUL": "a\x00b",
    "escape sequence": "red \x1b[31m",
    "DEL": "a\x7fb",
    "line separator": "a\u2028b",
    "right-to-left override": "abc\u202edcba",
    "too long": "x" * (MAX_NAME + 1),
}


@pytest.mark.quick
@pytest.mark.parametrize("case", list(BAD_NAMES))
def test_a_name_that_is_not_one_printable_line_is_refused(case):
    e = _refused({"name": BAD_NAMES[case]})
    assert e.key == "name" and "\n" not in str(e)
    assert "\n" not in safe_name(BAD_NAMES[case]) and name_problem(safe_name(BAD_NAMES[case])) is None


@pytest.mark.quick
@pytest.mark.parametrize("name", ["", "demo · 75 % sparse", "Größe × d_model=128 / \"quoted\" 'x' [a] #1", "x" * MAX_NAME])
def test_ordinary_names_are_kept(name):
    assert load_config(None, {"name": name}).name == name


def test_train_refuses_a_name_with_a_newline_before_a_run_row_exists(tmp_path, capsys):
    db = tmp_path / "runs.db"
    rc, err = _cli(capsys, db, "train", "demo", "--set", "name=first\nsecond")
    assert _one_line(rc, err, "name"), err
    assert RunDB(db).list_runs() == []


@pytest.mark.parametrize("stored", ["evil\nname = 'x'\n[model]", "tab\there", "esc \x1b[2J", "y" * 500])
def test_export_config_of_a_stored_odd_name_writes_toml_that_train_reads(tmp_path, capsys, stored):
    """A run stored before names were checked: export-config still writes TOML that reads back, with the
    name made safe and everything else as stored."""
    db = RunDB(tmp_path / "runs.db")
    cfg = RunConfig().replace({"sparsity.level": 0.5, "train.seed": INT64_MAX}).to_dict()
    cfg["name"] = stored  # as an earlier version stored it
    rid = db.create_run(name=stored, stage="pretrain", config=cfg)
    out = tmp_path / "run.toml"
    rc, err = _cli(capsys, db.path, "export-config", rid, "--out", str(out))
    assert rc == 0, err
    back = load_config(out)
    assert back.name == safe_name(stored) and name_problem(back.name) is None
    assert {**back.to_dict(), "name": stored} == cfg
    rc, _ = _cli(capsys, db.path, "export-config", rid, "--out", str(out))
    assert rc == 2  # an existing file needs --overwrite
    capsys.readouterr()
    assert main(["export-config", rid, "--db", str(db.path)]) == 0
    assert load_config_text(capsys.readouterr().out).name == safe_name(stored)


def load_config_text(text: str) -> RunConfig:
    import tomllib

    from engine.core.config import from_dict

    return from_dict(tomllib.loads(text))


# -- sweeps ------------------------------------------------------------------------------------------


def _sweep(capsys, db_path, *args: str) -> tuple[int, str, str]:
    capsys.readouterr()
    rc = main(["sweep", "demo", *args, "--db", str(db_path)])
    out = capsys.readouterr()
    return rc, out.out, out.err


def _nothing_queued(db_path) -> bool:
    from engine.orchestrate.queue import Queue

    db = RunDB(db_path)
    return Queue(db).entries() == [] and Queue(db).sweeps() == [] and db.list_runs() == []


@pytest.mark.quick
@pytest.mark.parametrize("grid, named", [
    ("sparsity.level=0,0.5,0.50", "0.5 and 0.50"),
    ("train.seed=1,1", "1 twice"),
    ("train.seed=3,1,3.0", "3 and 3.0"),
    ("sparsity.kernel=dense,sparse,dense", "dense twice"),
    ("train.skip_nonfinite=true,false,true", "true twice"),
])
def test_duplicate_grid_values_are_refused_naming_the_key_and_values(tmp_path, capsys, grid, named):
    rc, _, err = _sweep(capsys, tmp_path / "runs.db", "--grid", grid)
    key = grid.split("=")[0]
    assert _one_line(rc, err, f"--grid {key} repeats a value", named), err
    assert _nothing_queued(tmp_path / "runs.db")


@pytest.mark.quick
def test_a_point_this_machine_cannot_run_is_refused_before_anything_is_queued(tmp_path, capsys):
    from engine.core.machine_checks import usable_cores

    too_many = usable_cores() + 1
    db = tmp_path / "runs.db"
    cases = [(["--set", "train.device=cpu", "--grid", f"train.nproc=1,{too_many}"], f"train.nproc is {too_many}"),
             (["--set", "train.device=cpu", "--grid", "train.nproc=1,99"], "train.nproc is 99"),
             (["--grid", "train.strategy=ddp,fsdp"], "train.strategy = 'fsdp'"),
             (["--set", "train.nnodes=2", "--grid", "train.seed=1,2"], "train.rdzv_endpoint")]
    for args, needle in cases:
        rc, _, err = _sweep(capsys, db, *args)
        assert _one_line(rc, err, needle), (args, err)
        assert _nothing_queued(db), args


@pytest.mark.quick
@pytest.mark.parametrize("name", ["two\nlines", "x" * 201, "bell\x07"])
def test_a_sweep_name_that_is_not_one_printable_line_is_refused(tmp_path, capsys, name):
    rc, _, err = _sweep(capsys, tmp_path / "runs.db", "--grid", "train.seed=1,2", "--name", name)
    assert _one_line(rc, err, "--name"), err
    assert _nothing_queued(tmp_path / "runs.db")


def test_a_10000_point_grid_queues_and_every_entry_is_complete(tmp_path, capsys):
    """100 x 100 points, each validated and queued (asserted only as completing, never timed)."""
    import json

    from engine.orchestrate.queue import Queue

    db_path = tmp_path / "runs.db"
    assert main(["queue", "pause", "--db", str(db_path)]) == 0  # queued, not run
    seeds = ",".join(str(i) for i in range(100))
    levels = ",".join(f"{i / 100:g}" for i in range(100))
    rc, out, err = _sweep(capsys, db_path, "--grid", f"train.seed={seeds}", "--grid", f"sparsity.level={levels}",
                          "--set", "train.max_steps=5", "--json")
    assert rc == 0, err
    report = json.loads(out)
    assert len(report["entries"]) == 10_000
    entries = Queue(RunDB(db_path)).entries()
    assert len(entries) == 10_000 and len({e["label"] for e in entries}) == 10_000
    assert [e["id"] for e in entries] == report["entries"]
    e = entries[-1]
    assert e["point"] == {"train.seed": 99, "sparsity.level": 0.99} and e["status"] == "waiting"
    assert "train.max_steps=5" in e["sets"] and "sparsity.level=0.99" in e["sets"]
    name = next(s.split("=", 1)[1] for s in e["sets"] if s.startswith("name="))
    assert name_problem(name) is None
