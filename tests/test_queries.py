"""engine.store.queries on a real SQLite run database (rows written directly: no training needed)."""
from __future__ import annotations

import pytest

from engine.store import queries as q
from engine.core.errors import InputError
from engine.store.rundb import RunDB


def _rows(rid: str, steps, name: str, value=lambda s: 10.0 - s) -> list[tuple]:
    return [(rid, s, 64 * s, 0.1 * s, 10.0 * s, 40.0 * s, name, value(s)) for s in steps]


@pytest.fixture
def db(tmp_path):
    d = RunDB(tmp_path / "runs.db")
    root = d.create_run(name="root", stage="pretrain", config={"sparsity": {"level": 0.5}}, run_id="aaaa0001")
    child = d.create_run(name="child", stage="finetune", config={}, parent_id=root, run_id="bbbb0002")
    # written out of step order: "last" means the highest step, not the last row inserted
    d.insert_metric_rows(_rows(root, [3, 1, 2], "loss") + _rows(root, [1, 2, 3], "lr") + _rows(child, [5], "loss"))
    d.add_evaluation(root, 2, "lm", "val", {"loss": 4.0})
    d.add_evaluation(root, 3, "lm", "val", {"perplexity": 50.0})
    d.add_evaluation(child, 5, "pubmedqa", "val", {"accuracy": 0.6, "loss": 1.5, "ok": True},
                     baselines={"majority": {"accuracy": 0.55}})
    d.ids = [root, child]
    yield d
    d.close()


@pytest.mark.quick
def test_runs_resolve_by_prefix_and_unknown_ones_name_the_key(db):
    assert [r["name"] for r in q.resolve_runs(db, ["bbbb", "aaaa0001"])] == ["child", "root"]
    with pytest.raises(InputError, match="unknown run: nope") as e:
        q.resolve_runs(db, ["nope"])
    assert e.value.key == "run_id"
    assert [r["id"] for r in q.lineage(db, "bbbb0002")] == db.ids


@pytest.mark.quick
def test_metric_rows_and_names(db):
    root, child = db.ids
    rows = list(q.metric_rows(db, [child, root], names=["loss"]))
    assert [(r[0], r[1]) for r in rows] == [(child, 5), (root, 1), (root, 2), (root, 3)]  # run by run, by step
    assert dict(zip(q.METRIC_COLUMNS, rows[0])) == {"run_id": child, "step": 5, "tokens": 320, "wall_time": 0.5,
                                                      "flops": 50.0, "flops_dense": 200.0, "name": "loss", "value": 5.0}
    assert len(list(q.metric_rows(db, [root]))) == 6
    assert q.metric_names(db, db.ids) == ["loss", "lr"]


@pytest.mark.quick
def test_last_values_are_at_the_highest_step(db):
    root, child = db.ids
    assert q.last_metric_value(db, root, "loss") == 7.0
    assert q.last_metric_value(db, child, "lr") is None
    assert q.last_values(db, "loss") == {root: (7.0, 3), child: (5.0, 5)}
    # a training stage's own deferred rows count (reads commit them first)
    db.log_metrics(root, 4, 256, 0.4, 40.0, 160.0, {"loss": 0.25}, defer=True)
    db.log_metrics(root, 5, 320, 0.5, 50.0, 200.0, {"loss": 0.125}, defer=True)
    assert q.last_metric_value(db, root, "loss") == 0.125


@pytest.mark.quick
def test_evaluation_reads(db):
    root, child = db.ids
    assert q.last_eval_metrics(db, "val", "loss") == {root: None, child: 1.5}  # the latest evaluation decides
    by_run = q.evaluations_by_run(db)
    assert [e["step"] for e in by_run[root]] == [2, 3]
    assert by_run[child][0]["baselines"] == {"majority": {"accuracy": 0.55}}
    assert not q.has_task_evaluations(db, root) and q.has_task_evaluations(db, child)
    assert q.task_scores(db, child) == {"pubmedqa/val/accuracy": 0.6, "pubmedqa/val/loss": 1.5}  # no bool
    ev = q.eval_series(db, child)["pubmedqa/val/accuracy"]
    assert ev["step"].tolist() == [5] and ev["flops"].tolist() == [50.0]  # x borrowed from the loss rows


@pytest.mark.quick
def test_series_thinning_and_summary(db):
    root = db.ids[0]
    db.insert_metric_rows(_rows(root, range(10, 10_001, 10), "grad_norm", float))
    full, n = q.load_series_counted(db, root, "grad_norm")
    assert n == full.size == 1000 and full["step"][-1] == 10_000
    thin, n = q.load_series_counted(db, root, "grad_norm", max_points=100)
    assert n == 1000 and 90 <= thin.size <= 101 and thin["step"][[0, -1]].tolist() == [10, 10_000]
    assert q.load_series(db, root, "grad_norm", steps=(100, 130))["value"].tolist() == [100.0, 110.0, 120.0, 130.0]

    row = q.summary_row(db, db.get_run(root))  # no summary yet: counters of the last logged step
    assert set(row) == set(q.SUMMARY_COLUMNS)
    assert (row["tokens"], row["sparsity"], row["best_val_loss"]) == (64 * 10_000, 0.5, None)
    db.insert_metric_rows(_rows(root, [2, 3], "val_loss", lambda s: s / 2))
    assert q.best_val_loss(db, db.get_run(root)) == 1.0
