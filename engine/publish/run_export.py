"""Reading past runs back out: bulk metric export (CSV, JSON, Parquet), configs as TOML, per-metric
series as numpy arrays for comparison charts, summary rows and config diffs.

Imports neither torch nor Qt: the studio calls these directly; the CLI wraps them in export_cli.
"""
from __future__ import annotations

from engine.core.errors import InputError

import csv
import json
import math
from pathlib import Path
from typing import Any, Iterable

import numpy as np

from engine.core.config import from_dict
from engine.core.rundb import RunDB

# every exported metric row: the run, then the metrics table's own columns in its order
METRIC_COLUMNS = ("run_id", "step", "tokens", "wall_time", "flops", "flops_dense", "name", "value")
FORMATS = ("csv", "json", "parquet")

# the x-axes a comparison can use; each is a column of every metric row
X_AXES = ("step", "tokens", "flops", "flops_dense", "wall_time")
SERIES_DTYPE = np.dtype([("step", "i8"), ("tokens", "i8"), ("wall_time", "f8"), ("flops", "f8"),
                         ("flops_dense", "f8"), ("value", "f8")])

_CHUNK = 50_000


def resolve_runs(db: RunDB, run_ids: Iterable[str]) -> list[dict]:
    """Run rows for ids or unique id prefixes, in the given order; unknown ids raise InputError."""
    out = []
    for rid in run_ids:
        row = db.get_run(rid)
        if row is None:
            raise InputError(f"unknown run: {rid}")
        out.append(row)
    return out


# -- bulk metric export ---------------------------------------------------------------------------


def _metric_cursor(db: RunDB, run_ids: list[str], names: list[str] | None):
    sql = ("SELECT run_id, step, tokens, wall_time, flops, flops_dense, name, value FROM metrics "
           "WHERE run_id = ?")
    args_extra: list[Any] = []
    if names:
        sql += f" AND name IN ({','.join('?' * len(names))})"
        args_extra = list(names)
    sql += " ORDER BY step, rowid"
    for rid in run_ids:  # one indexed query per run keeps runs together in the file, in the order asked
        yield from db.db.conn.execute(sql, [rid, *args_extra])


def export_metrics(db: RunDB, run_ids: Iterable[str], path: str | Path, fmt: str | None = None,
                   names: list[str] | None = None) -> int:
    """Write the metric rows of ``run_ids`` to one file with a run_id column; returns the row count.

    ``fmt`` defaults to the file suffix. JSON is an array of row objects (what ``pandas.read_json``
    and ``json.load`` take); Parquet keeps integer steps/tokens as int64.
    """
    path = Path(path)
    fmt = (fmt or path.suffix.lstrip(".")).lower()
    if fmt not in FORMATS:
        raise InputError(f"unknown export format {fmt!r}: use one of {', '.join(FORMATS)}")
    ids = [r["id"] for r in resolve_runs(db, run_ids)]
    if not ids:
        raise InputError("no runs to export")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    rows = _metric_cursor(db, ids, names)
    if fmt == "csv":
        n = _write_csv(rows, tmp)
    elif fmt == "json":
        n = _write_json(rows, tmp)
    else:
        n = _write_parquet(rows, tmp)
    tmp.replace(path)  # a half-written export never sits under the final name
    return n


def _write_csv(rows, path: Path) -> int:
    n = 0
    with open(path, "w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh, lineterminator="\n")
        w.writerow(METRIC_COLUMNS)
        for r in rows:
            w.writerow(r)
            n += 1
    return n


def _json_number(v):
    if isinstance(v, float) and not math.isfinite(v):
        return None  # JSON has no NaN/inf
    return v


def _write_json(rows, path: Path) -> int:
    n = 0
    with open(path, "w", encoding="utf-8") as fh:
        fh.write("[")
        for r in rows:  # streamed: a million rows never sit in memory as dicts
            obj = {c: _json_number(v) for c, v in zip(METRIC_COLUMNS, r)}
            fh.write(("\n" if n == 0 else ",\n") + json.dumps(obj))
            n += 1
        fh.write("\n]\n")
    return n


def _write_parquet(rows, path: Path) -> int:
    import pyarrow as pa
    import pyarrow.parquet as pq

    schema = pa.schema([("run_id", pa.string()), ("step", pa.int64()), ("tokens", pa.int64()),
                        ("wall_time", pa.float64()), ("flops", pa.float64()), ("flops_dense", pa.float64()),
                        ("name", pa.string()), ("value", pa.float64())])
    n = 0
    with pq.ParquetWriter(str(path), schema) as writer:
        batch: list[tuple] = []

        def flush() -> None:
            cols = list(zip(*batch))
            writer.write_table(pa.Table.from_arrays([pa.array(c, type=f.type) for c, f in zip(cols, schema)], schema=schema))
            batch.clear()

        for r in rows:
            batch.append(r)
            n += 1
            if len(batch) >= _CHUNK:
                flush()
        if batch:
            flush()
        if n == 0:
            writer.write_table(schema.empty_table())
    return n


# -- configs --------------------------------------------------------------------------------------


def config_toml(db: RunDB, run_id: str) -> str:
    """The run's config as TOML that ``mediswift train FILE`` re-runs as is (validated on the way)."""
    (row,) = resolve_runs(db, [run_id])
    cfg = from_dict(row["config"])  # rejects a config this version could not run, before writing
    header = (f"# MediSwift run {row['id']} ({row['name']}, stage {row['stage']}, status {row['status']})\n"
              f"# re-run with: mediswift train THIS_FILE\n")
    return header + cfg.to_toml()


def export_config(db: RunDB, run_id: str, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(config_toml(db, run_id), encoding="utf-8")
    return path


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


# -- series for comparison charts ------------------------------------------------------------------


def metric_names(db: RunDB, run_ids: Iterable[str]) -> list[str]:
    """Distinct metric names of the runs by skipping along the (run_id, name, step) index: one probe
    per name instead of a scan of every row (a 100k-row run has ~15 names)."""
    names: set[str] = set()
    conn = db.db.conn
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
    conn = db.db.conn
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


def eval_series(db: RunDB, run_id: str, frames: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """Numeric evaluation scores as series ``"{task}/{split}/{metric}"`` (SERIES_DTYPE).

    Evaluations carry only a step; their other x columns are interpolated from ``frames`` (the run's
    training-loss series, read here unless the caller has it already).
    """
    by_key: dict[str, list[tuple[int, float]]] = {}
    for r in db.evaluations(run_id):
        for metric, v in (r["metrics"] or {}).items():
            if isinstance(v, (int, float)) and not isinstance(v, bool):
                by_key.setdefault(f"{r['task']}/{r['split']}/{metric}", []).append((int(r["step"]), float(v)))
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


# -- summary -----------------------------------------------------------------------------------------


SUMMARY_COLUMNS = (
    "id", "name", "status", "stage", "params_total", "params_nonzero", "sparsity", "tokens", "flops",
    "flops_dense", "wall_time", "best_val_loss", "scores", "parent", "tags",
)


def best_val_loss(db: RunDB, run: dict) -> float | None:
    row = db.db.conn.execute("SELECT MIN(value) FROM metrics WHERE run_id = ? AND name = 'val_loss'", [run["id"]]).fetchone()
    if row and row[0] is not None:
        return float(row[0])
    v = (run.get("summary") or {}).get("best_val_loss")
    return float(v) if v is not None else None


def task_scores(db: RunDB, run_id: str) -> dict[str, float]:
    """Latest score per task/split/metric, language-model validation excluded (it has its own column)."""
    out: dict[str, float] = {}
    for r in db.evaluations(run_id):
        if r["task"] == "lm":
            continue
        for metric, v in (r["metrics"] or {}).items():
            if isinstance(v, (int, float)) and not isinstance(v, bool):
                out[f"{r['task']}/{r['split']}/{metric}"] = float(v)
    return out


def summary_row(db: RunDB, run: dict) -> dict:
    s, meta = run.get("summary") or {}, run.get("meta") or {}
    params = meta.get("params") or {}
    last = db.db.conn.execute(  # counters of the last logged step, for runs still going or without a summary
        "SELECT tokens, flops, flops_dense, wall_time FROM metrics WHERE run_id = ? ORDER BY step DESC LIMIT 1",
        [run["id"]]).fetchone()
    last = last or (None, None, None, None)
    sparsity = s.get("sparsity")
    if sparsity is None:
        sparsity = (run.get("config") or {}).get("sparsity", {}).get("level") if run["stage"] == "pretrain" else None
    return {
        "id": run["id"], "name": run.get("name") or "", "status": run["status"], "stage": run["stage"],
        "params_total": params.get("total"), "params_nonzero": params.get("nonzero"), "sparsity": sparsity,
        "tokens": s.get("tokens", last[0]), "flops": s.get("flops", last[1]), "flops_dense": s.get("flops_dense", last[2]),
        "wall_time": s.get("wall_time", last[3]), "best_val_loss": best_val_loss(db, run),
        "scores": task_scores(db, run["id"]), "parent": run.get("parent_id") or "", "tags": list(run.get("tags") or []),
    }


def summary_rows(db: RunDB, run_ids: Iterable[str]) -> list[dict]:
    return [summary_row(db, r) for r in resolve_runs(db, run_ids)]


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
