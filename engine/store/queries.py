"""The read side of the run database: past runs for charts, tables, exports and run summaries.

Every read the studio, the exports and the training stages make of metric and evaluation rows goes
through a named function here (the studio holds no SQL of its own), so a schema change is one file's
business. The store: numpy, no torch, no Qt. Reads commit the rows this process deferred first
(RunDB's contract: any read of metrics sees every row logged before it).
"""
from __future__ import annotations

import json
import math
import sqlite3
from typing import Any, Iterable, Iterator

import numpy as np

from engine.core import registry
from engine.core.errors import InputError
from engine.store.rundb import RunDB

# a metric row: the run, then the metrics table's own columns in its order (the bulk export's columns)
METRIC_COLUMNS = ("run_id", "step", "tokens", "wall_time", "flops", "flops_dense", "name", "value")
# the x-axes a comparison can use; each is a column of every metric row
X_AXES = ("step", "tokens", "flops", "flops_dense", "wall_time")
SERIES_DTYPE = np.dtype([("step", "i8"), ("tokens", "i8"), ("wall_time", "f8"), ("flops", "f8"),
                         ("flops_dense", "f8"), ("value", "f8")])
SUMMARY_COLUMNS = (
    "id", "name", "status", "stage", "params_total", "params_nonzero", "sparsity", "tokens", "flops",
    "flops_dense", "wall_time", "best_val_loss", "scores", "parent", "tags",
)


def _conn(db: RunDB) -> sqlite3.Connection:
    db.flush_metrics()  # rows this process deferred are part of what it reads
    return db.db.conn


# -- runs -------------------------------------------------------------------------------------------


def find_run(db: RunDB, run_id: str, key: str = "run_id", what: str = "run") -> dict:
    """The row of a run id or unique id prefix; InputError naming ``key`` when there is none."""
    row = db.get_run(run_id) if run_id else None
    if row is None:
        raise InputError(f"{'unknown run' if what == 'run' else what + ' not found'}: {run_id} (see `mediswift runs list`)", key=key)
    return row


def resolve_runs(db: RunDB, run_ids: Iterable[str]) -> list[dict]:
    """Run rows for ids or unique id prefixes, in the given order; unknown ids raise InputError."""
    return [find_run(db, rid) for rid in run_ids]


def lineage(db: RunDB, run_id: str) -> list[dict]:
    """The run and its ancestors, root first (a missing or cyclic parent ends the chain)."""
    chain: list[dict] = []
    seen: set[str] = set()
    row = db.get_run(run_id)
    while row is not None and row["id"] not in seen:
        chain.append(row)
        seen.add(row["id"])
        row = db.get_run(row["parent_id"]) if row.get("parent_id") else None
    return chain[::-1]


# -- metric rows ------------------------------------------------------------------------------------


def metric_rows(db: RunDB, run_ids: Iterable[str], names: Iterable[str] | None = None) -> Iterator[tuple]:
    """Metric rows (METRIC_COLUMNS tuples) of the runs, run by run in the order given, each by step;
    a cursor, so a million rows never sit in memory at once."""
    sql = f"SELECT {', '.join(METRIC_COLUMNS)} FROM metrics WHERE run_id = ?"
    names = list(names or ())
    if names:
        sql += f" AND name IN ({','.join('?' * len(names))})"
    sql += " ORDER BY step, rowid"
    conn = _conn(db)
    for rid in run_ids:  # one indexed query per run keeps runs together, in the order asked
        yield from conn.execute(sql, [rid, *names])


def metric_names(db: RunDB, run_ids: Iterable[str]) -> list[str]:
    """Distinct metric names of the runs by skipping along the (run_id, name, step) index: one probe
    per name instead of a scan of every row (a 100k-row run has ~15 names)."""
    names: set[str] = set()
    conn = _conn(db)
    for rid in run_ids:
        last = ""
        while True:
            row = conn.execute("SELECT name FROM metrics WHERE run_id = ? AND name > ? ORDER BY name LIMIT 1",
                               [rid, last]).fetchone()
            if row is None:
                break
            last = row[0]
            names.add(last)
    return sorted(names)


def last_metric_value(db: RunDB, run_id: str, name: str) -> float | None:
    """The metric's value at the run's highest logged step; None when it has none."""
    row = _conn(db).execute("SELECT value FROM metrics WHERE run_id = ? AND name = ? ORDER BY step DESC LIMIT 1",
                            [run_id, name]).fetchone()
    return None if row is None else float(row[0])


def runs_signature(db: RunDB) -> tuple[int, int]:
    """(how many runs, the highest rowid): one cheap read that moves when a run is added or deleted, so a
    poller can notice a new run without reading the whole list."""
    count, top = _conn(db).execute("SELECT COUNT(*), MAX(rowid) FROM runs").fetchone()
    return int(count), int(top or 0)


def last_values(db: RunDB, name: str) -> dict[str, tuple[float, int]]:
    """Run id -> (value, step) of the metric at each run's highest step, for every run, in one query
    (the runs browser lists thousands)."""
    sql = ("SELECT m.run_id, m.value, m.step FROM metrics m JOIN (SELECT run_id, MAX(step) s FROM metrics "
           "WHERE name = ? GROUP BY run_id) t ON m.run_id = t.run_id AND m.step = t.s WHERE m.name = ?")
    return {rid: (value, step) for rid, value, step in _conn(db).execute(sql, [name, name])}


def last_points(db: RunDB, name: str, run_ids: Iterable[str] | None = None) -> dict[str, dict]:
    """Run id -> {value, step, flops, wall_time} of the metric's row at each run's highest step: the value and
    the run's counters there (FLOPs spent so far, training seconds), for every run or only ``run_ids``."""
    ids = None if run_ids is None else list(run_ids)
    if ids is not None and not ids:
        return {}
    where = "" if ids is None else f" AND run_id IN ({', '.join('?' * len(ids))})"
    sql = ("SELECT m.run_id, m.value, m.step, m.flops, m.wall_time FROM metrics m JOIN (SELECT run_id, MAX(step) s "
           f"FROM metrics WHERE name = ?{where} GROUP BY run_id) t ON m.run_id = t.run_id AND m.step = t.s "
           "WHERE m.name = ?")
    rows = _conn(db).execute(sql, [name, *(ids or []), name])
    return {rid: {"value": value, "step": step, "flops": flops, "wall_time": wall}
            for rid, value, step, flops, wall in rows}


def load_series(db: RunDB, run_id: str, name: str, max_points: int | None = None,
                steps: tuple[int, int] | None = None) -> np.ndarray:
    return load_series_counted(db, run_id, name, max_points, steps)[0]


def load_series_counted(db: RunDB, run_id: str, name: str, max_points: int | None = None,
                        steps: tuple[int, int] | None = None) -> tuple[np.ndarray, int]:
    """One metric of one run as a structured array (SERIES_DTYPE) ordered by step, and the number of
    rows it has in the database (estimated from the logging interval when thinned).

    ``steps`` limits it to an inclusive step range. With ``max_points``, a longer series is thinned to
    about that many rows by keeping every k-th step (plus the first and last): the stride is tested on
    the (run_id, name, step) index alone and only the kept rows are read from the table, which is what
    makes 20 runs × 100k rows cheap to overview. Charts re-read a zoomed range at full resolution.
    """
    conn = _conn(db)
    where = "run_id = ? AND name = ?"
    args: list[Any] = [run_id, name]
    if steps is not None:
        where += " AND step BETWEEN ? AND ?"
        args += [int(steps[0]), int(steps[1])]
    cols = "step, tokens, wall_time, flops, flops_dense, value"
    if max_points:
        # three index seeks instead of a COUNT scan: first two steps (the logging gap) and the last
        head = [r[0] for r in conn.execute(f"SELECT step FROM metrics WHERE {where} ORDER BY step LIMIT 2", args)]
        tail = conn.execute(f"SELECT step FROM metrics WHERE {where} ORDER BY step DESC LIMIT 1", args).fetchone()
        if len(head) == 2:
            lo, hi = head[0], tail[0]
            gap = max(head[1] - head[0], 1)  # steps between logged rows (train.log_every)
            n = (hi - lo) // gap + 1
            if n > max_points:
                stride = gap * math.ceil(n / max_points)
                # generate the kept steps (lo, lo + stride, …, and hi) and seek each one in the covering
                # (run_id, name, step, …) index: ~max_points lookups instead of a scan of the series
                kept = ("WITH RECURSIVE s(v) AS (SELECT ? UNION ALL SELECT v + ? FROM s WHERE v + ? <= ?), "
                        "t(v) AS (SELECT v FROM s UNION SELECT ?) ")
                cur = conn.execute(
                    kept + f"SELECT {', '.join('m.' + c for c in cols.split(', '))} FROM t CROSS JOIN metrics m "
                    "ON m.run_id = ? AND m.name = ? AND m.step = t.v ORDER BY m.step",
                    [lo, stride, stride, hi, hi, run_id, name])
                return np.fromiter(cur, dtype=SERIES_DTYPE), n
    # one query on the (run_id, name, step) index, fed straight into numpy: no per-row dicts
    arr = np.fromiter(conn.execute(f"SELECT {cols} FROM metrics WHERE {where} ORDER BY step", args), dtype=SERIES_DTYPE)
    return arr, arr.size


def best_val_loss(db: RunDB, run: dict) -> float | None:
    row = _conn(db).execute("SELECT MIN(value) FROM metrics WHERE run_id = ? AND name = 'val_loss'",
                            [run["id"]]).fetchone()
    if row and row[0] is not None:
        return float(row[0])
    v = (run.get("summary") or {}).get("best_val_loss")
    return float(v) if v is not None else None


# -- evaluations ------------------------------------------------------------------------------------


def numeric_metrics(metrics: dict | None) -> dict[str, float]:
    """The numbers among an evaluation's metrics (a bool or a text is no score)."""
    return {k: float(v) for k, v in (metrics or {}).items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


def evaluations_by_run(db: RunDB) -> dict[str, list[dict]]:
    """Run id -> its evaluation rows (metrics and baselines decoded) in the order written, for every run
    in one query (what the runs browser scores)."""
    out: dict[str, list[dict]] = {}
    for rid, step, task, split, metrics, baselines in db.db.execute(
            "SELECT run_id, step, task, split, metrics, baselines FROM evaluations ORDER BY id").fetchall():
        out.setdefault(rid, []).append({"step": step, "task": task, "split": split,
                                        "metrics": json.loads(metrics or "{}"), "baselines": json.loads(baselines or "{}")})
    return out


def last_eval_metrics(db: RunDB, split: str, metric: str) -> dict[str, float | None]:
    """Run id -> ``metric`` of its latest evaluation on ``split`` (None where that one lacks it)."""
    return {rid: json.loads(m or "{}").get(metric) for rid, m in db.db.execute(
        "SELECT run_id, metrics FROM evaluations WHERE split = ? ORDER BY id", [split]).fetchall()}


def has_task_evaluations(db: RunDB, run_id: str) -> bool:
    """Whether the run has task evaluations (any but the language model's own validation)."""
    return db.db.execute("SELECT 1 FROM evaluations WHERE run_id = ? AND task != ? LIMIT 1",
                         [run_id, registry.LM]).fetchone() is not None


def eval_series(db: RunDB, run_id: str, frames: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """Numeric evaluation scores as series ``"{task}/{split}/{metric}"`` (SERIES_DTYPE).

    Evaluations carry only a step; their other x columns are interpolated from ``frames`` (the run's
    training-loss series, read here unless the caller has it already).
    """
    by_key: dict[str, list[tuple[int, float]]] = {}
    for r in db.evaluations(run_id):
        for metric, v in numeric_metrics(r["metrics"]).items():
            by_key.setdefault(f"{r['task']}/{r['split']}/{metric}", []).append((int(r["step"]), v))
    if not by_key:
        return {}
    if frames is None:
        frames = load_series(db, run_id, "loss", max_points=4096)  # only to interpolate x positions
    out = {}
    for key, pts in by_key.items():
        pts.sort()
        arr = np.zeros(len(pts), dtype=SERIES_DTYPE)
        arr["step"] = [p[0] for p in pts]
        arr["value"] = [p[1] for p in pts]
        if len(frames):
            for col in ("tokens", "wall_time", "flops", "flops_dense"):
                arr[col] = np.interp(arr["step"], frames["step"], frames[col])
        out[key] = arr
    return out


def task_scores(db: RunDB, run_id: str) -> dict[str, float]:
    """Latest score per task/split/metric, language-model validation excluded (it has its own column)."""
    out: dict[str, float] = {}
    for r in db.evaluations(run_id):
        if r["task"] != registry.LM:
            out.update({f"{r['task']}/{r['split']}/{m}": v for m, v in numeric_metrics(r["metrics"]).items()})
    return out


# -- summaries --------------------------------------------------------------------------------------


def summary_row(db: RunDB, run: dict) -> dict:
    """One run's SUMMARY_COLUMNS: its summary where it has one, else the counters of its last logged step."""
    s, meta = run.get("summary") or {}, run.get("meta") or {}
    params = meta.get("params") or {}
    last = _conn(db).execute(  # counters of the last logged step, for runs still going or without a summary
        "SELECT tokens, flops, flops_dense, wall_time FROM metrics WHERE run_id = ? ORDER BY step DESC LIMIT 1",
        [run["id"]]).fetchone()
    last = last or (None, None, None, None)
    sparsity = s.get("sparsity")
    if sparsity is None and run["stage"] in registry.SPARSE_STAGES:
        sparsity = (run.get("config") or {}).get("sparsity", {}).get("level")
    return {
        "id": run["id"], "name": run.get("name") or "", "status": run["status"], "stage": run["stage"],
        "params_total": params.get("total"), "params_nonzero": params.get("nonzero"), "sparsity": sparsity,
        "tokens": s.get("tokens", last[0]), "flops": s.get("flops", last[1]), "flops_dense": s.get("flops_dense", last[2]),
        "wall_time": s.get("wall_time", last[3]), "best_val_loss": best_val_loss(db, run),
        "scores": task_scores(db, run["id"]), "parent": run.get("parent_id") or "", "tags": list(run.get("tags") or []),
    }


def summary_rows(db: RunDB, run_ids: Iterable[str]) -> list[dict]:
    return [summary_row(db, r) for r in resolve_runs(db, run_ids)]


# -- configs ----------------------------------------------------------------------------------------


def flatten_config(config: dict, prefix: str = "") -> dict[str, Any]:
    """Nested config -> {"train.lr": 0.003, ...}; lists stay lists."""
    out: dict[str, Any] = {}
    for key, value in config.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten_config(value, dotted + "."))
        else:
            out[dotted] = value
    return out


_MISSING = object()


def config_diff(configs: dict[str, dict], differences_only: bool = True) -> list[tuple[str, list[Any], bool]]:
    """Rows (key, [value per run, None where absent], differs) over the union of keys, sorted by key."""
    flat = {rid: flatten_config(c) for rid, c in configs.items()}
    keys = sorted(set().union(*flat.values())) if flat else []
    rows = []
    for key in keys:
        values = [f.get(key, _MISSING) for f in flat.values()]
        differs = any(json.dumps(v, sort_keys=True, default=str) != json.dumps(values[0], sort_keys=True, default=str)
                      for v in values[1:])
        if differs or not differences_only:
            rows.append((key, [None if v is _MISSING else v for v in values], differs))
    return rows


def disk_usage(run: dict, checkpoints: list[dict]) -> dict:
    """Bytes a run holds on disk: its checkpoints (as recorded, present files only) and its whole folder."""
    import os

    ck = sum(int(c["bytes"] or 0) for c in checkpoints if c.get("path") and os.path.isfile(c["path"]))
    total = 0
    folder = run.get("run_dir")
    if folder and os.path.isdir(folder):
        for root, _dirs, files in os.walk(folder):  # links are not followed: only what the run itself holds
            for f in files:
                p = os.path.join(root, f)
                if not os.path.islink(p):
                    try:
                        total += os.path.getsize(p)
                    except OSError:
                        pass
    return {"checkpoints": len(checkpoints), "checkpoint_bytes": ck, "run_dir_bytes": total}
