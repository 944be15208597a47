"""Bulk export of past runs: metric rows to CSV, JSON or Parquet, and a run's config as TOML.

The reads go through engine.store.queries; imports neither torch nor Qt (the studio calls these directly,
the CLI wraps them in export_cmd).
"""
from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from typing import Iterable

from engine.core.config import from_dict
from engine.core.errors import InputError
from engine.store.queries import METRIC_COLUMNS, metric_rows, resolve_runs
from engine.store.rundb import RunDB

FORMATS = ("csv", "json", "parquet")

_CHUNK = 50_000


# -- bulk metric export ---------------------------------------------------------------------------


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
    rows = metric_rows(db, ids, names)
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
