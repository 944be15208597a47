"""Metric, config and summary export from the run database (no training needed: rows are written directly)."""
from __future__ import annotations

import csv
import json
import math
import subprocess
import sys

import numpy as np
import pyarrow.parquet as pq
import pytest
from helpers import REPO, engine_env

from engine.core.config import RunConfig, load_config
from engine.store.queries import config_diff, eval_series, flatten_config, load_series, metric_names, summary_rows
from engine.store.rundb import RunDB
from engine.publish.run_export import METRIC_COLUMNS, export_metrics

NAMES = ("loss", "lr", "tokens_per_s", "sparsity")


def _make_run(db: RunDB, name: str, level: float, steps: int, seed: int) -> str:
    cfg = RunConfig().replace({"name": name, "sparsity.level": level, "train.max_steps": steps})
    rid = db.create_run(name=name, stage="pretrain", config=cfg.to_dict())
    rng = np.random.default_rng(seed)
    per_tok_sparse, per_tok_dense = 1000.0 * (1 - level) + 200.0, 1200.0
    rows = []
    for step in range(1, steps + 1):
        tokens = step * 128
        for n in NAMES:
            rows.append((rid, step, tokens, step * 0.01, tokens * per_tok_sparse, tokens * per_tok_dense, n, float(rng.normal())))
        if step % 10 == 0:
            rows.append((rid, step, tokens, step * 0.01, tokens * per_tok_sparse, tokens * per_tok_dense, "val_loss", 5.0 - step / 100))
            db.add_evaluation(rid, step, "lm", "val", {"loss": 5.0 - step / 100})
    db.insert_metric_rows(rows)
    db.add_evaluation(rid, steps, "pubmedqa", "test", {"accuracy": 0.5 + level / 10, "macro_f1": 0.4})
    db.update_run(rid, status="completed", meta={"params": {"total": 1000, "nonzero": int(1000 * (1 - level))}},
                  summary={"step": steps, "tokens": steps * 128, "flops": steps * 128 * per_tok_sparse,
                           "flops_dense": steps * 128 * per_tok_dense, "wall_time": steps * 0.01, "sparsity": level})
    return rid


@pytest.fixture(scope="module")
def db(tmp_path_factory):
    path = tmp_path_factory.mktemp("export") / "runs.db"
    d = RunDB(path)
    d.ids = [_make_run(d, "dense", 0.0, 40, 1), _make_run(d, "s75", 0.75, 30, 2)]
    yield d
    d.close()


def _db_rows(db: RunDB, ids) -> list[tuple]:
    out = []
    for rid in ids:
        out += [tuple(r) for r in db.db.execute(
            f"SELECT {', '.join(METRIC_COLUMNS)} FROM metrics WHERE run_id = ? ORDER BY step, rowid", [rid]).fetchall()]
    return out


def _cli(tmp, db: RunDB, *args):
    return subprocess.run([sys.executable, "-m", "engine", *args, "--db", str(db.path)], capture_output=True, text=True,
                          timeout=120, cwd=REPO, env=engine_env(tmp))


def test_cli_exports_csv_json_parquet_with_the_database_rows(db, tmp_path):
    expected = _db_rows(db, db.ids)
    assert len(expected) == 40 * 4 + 4 + 30 * 4 + 3
    for fmt in ("csv", "json", "parquet"):
        out = tmp_path / f"m.{fmt}"
        r = _cli(tmp_path, db, "export", *db.ids, "--format", fmt, "--out", str(out))
        assert r.returncode == 0, r.stderr
        assert f"{len(expected):,} metric rows" in r.stdout
        if fmt == "csv":
            with open(out, newline="") as fh:
                rd = csv.reader(fh)
                assert tuple(next(rd)) == METRIC_COLUMNS
                got = [(a, int(b), int(c), float(d), float(e), float(f), g, float(h)) for a, b, c, d, e, f, g, h in rd]
        elif fmt == "json":
            got = [tuple(o[c] for c in METRIC_COLUMNS) for o in json.loads(out.read_text())]
        else:
            table = pq.read_table(out)
            assert tuple(table.column_names) == METRIC_COLUMNS
            assert str(table.schema.field("step").type) == "int64"
            got = [tuple(o[c] for c in METRIC_COLUMNS) for o in table.to_pylist()]
        assert got == expected, fmt  # exact: floats round-trip through every format


@pytest.mark.quick
def test_export_filters_names_and_rejects_bad_input(db, tmp_path):
    n = export_metrics(db, [db.ids[1]], tmp_path / "v.csv", names=["val_loss"])
    assert n == 3
    r = _cli(tmp_path, db, "export", "nope", "--out", str(tmp_path / "x.csv"))
    assert r.returncode == 2 and "unknown run: nope" in r.stderr
    r = _cli(tmp_path, db, "export", db.ids[0], "--out", str(tmp_path / "x.xlsx"))
    assert r.returncode == 2 and "format" in r.stderr


@pytest.mark.quick
def test_config_exports_as_rerunnable_toml(db, tmp_path):
    out = tmp_path / "cfg.toml"
    r = _cli(tmp_path, db, "export-config", db.ids[1], "--out", str(out))
    assert r.returncode == 0, r.stderr
    assert load_config(out).to_dict() == db.get_run(db.ids[1])["config"]
    out2 = tmp_path / "cfg2.toml"
    r = _cli(tmp_path, db, "export", db.ids[0], "--format", "toml", "--out", str(out2))
    assert r.returncode == 0, r.stderr
    assert load_config(out2).sparsity.level == 0.0


@pytest.mark.quick
def test_config_diff_lists_only_differing_keys_by_default():
    a = RunConfig().to_dict()
    b = RunConfig().replace({"sparsity.level": 0.5, "train.lr": 1e-3}).to_dict()
    c = RunConfig().replace({"sparsity.level": 0.9}).to_dict()
    rows = config_diff({"a": a, "b": b, "c": c})
    assert [k for k, _v, _d in rows] == ["sparsity.level", "train.lr"]
    assert rows[0][1] == [0.75, 0.5, 0.9]
    everything = config_diff({"a": a, "b": b}, differences_only=False)
    assert len(everything) == len(flatten_config(a))
    assert config_diff({"a": a, "b": dict(a)}) == []


@pytest.mark.quick
def test_series_names_and_summary_match_the_database(db):
    assert metric_names(db, db.ids) == sorted(NAMES + ("val_loss",))
    s = load_series(db, db.ids[1], "loss")
    ref = db.metrics(db.ids[1], names=["loss"])
    assert s["step"].tolist() == [r["step"] for r in ref]
    assert s["flops"].tolist() == [r["flops"] for r in ref] and s["value"].tolist() == [r["value"] for r in ref]
    ev = eval_series(db, db.ids[1])
    assert ev["pubmedqa/test/accuracy"]["value"].tolist() == [pytest.approx(0.575)]
    assert ev["pubmedqa/test/accuracy"]["flops"][0] == ref[-1]["flops"]  # x borrowed from the training rows

    dense, sparse = summary_rows(db, db.ids)
    assert sparse["flops"] < sparse["flops_dense"] and dense["flops"] == dense["flops_dense"]
    assert sparse["best_val_loss"] == pytest.approx(5.0 - 30 / 100)
    assert sparse["scores"] == {"pubmedqa/test/accuracy": pytest.approx(0.575), "pubmedqa/test/macro_f1": 0.4}
    assert sparse["params_nonzero"] == 250 and sparse["sparsity"] == 0.75
    assert math.isclose(sparse["tokens"], 30 * 128)
