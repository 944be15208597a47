"""Bulk export of past runs: metric rows to CSV, JSON or Parquet, and a run's config as TOML.

The reads go through engine.store.queries; imports neither torch nor Qt (the studio calls these directly,
the CLI wraps them in export_cmd).

Every export file is written the same way (``check_target`` + ``write_atomic``, also used by hf_export):
the target must be absent or a regular file (an existing one only with ``overwrite``); a device node, FIFO,
socket or folder, or a symlink to one, is refused with one line whatever ``overwrite`` says; the bytes go
to a fresh temporary file in the target's folder that is renamed into place, and removed on any failure.
"""
from __future__ import annotations

import csv
import json
import math
import os
import secrets
import stat
from pathlib import Path
from typing import Callable, Iterable

from engine.core.config import from_dict, safe_name
from engine.core.errors import InputError
from engine.store.queries import METRIC_COLUMNS, metric_rows, resolve_runs
from engine.store.rundb import RunDB

FORMATS = ("csv", "json", "parquet")

_CHUNK = 50_000


# -- export targets -------------------------------------------------------------------------------


def file_kind(mode: int) -> str:
    for test, name in ((stat.S_ISDIR, "folder"), (stat.S_ISFIFO, "FIFO (named pipe)"), (stat.S_ISCHR, "character device"),
                       (stat.S_ISBLK, "block device"), (stat.S_ISSOCK, "socket")):
        if test(mode):
            return name
    return "special file"


def check_target(path: str | Path, overwrite: bool, key: str = "out") -> Path:
    """``path`` may receive an export file: absent, or a regular file (a symlink to one counts: the rename
    replaces the link, never writes through it) when ``overwrite`` is set. Anything else is InputError."""
    path = Path(path)
    try:
        link = os.lstat(path)
    except FileNotFoundError:
        return path
    except OSError as e:
        raise InputError(f"{path}: cannot use it as an export target ({e.strerror})", key=key, path=str(path)) from None
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:  # a dangling symlink: an existing entry the rename would replace
        mode = link.st_mode
    except OSError as e:
        raise InputError(f"{path}: cannot use it as an export target ({e.strerror})", key=key, path=str(path)) from None
    via = " (through a symlink)" if stat.S_ISLNK(link.st_mode) and not stat.S_ISLNK(mode) else ""
    if not stat.S_ISREG(mode) and not stat.S_ISLNK(mode):
        raise InputError(f"{path} is a {file_kind(mode)}{via}, not a regular file: an export never replaces one "
                         f"(give a file path)", key=key, path=str(path))
    if not overwrite:
        raise InputError(f"{path} exists (use --overwrite to replace it)", key=key, path=str(path))
    return path


def write_atomic(path: str | Path, write: Callable[[Path], object], overwrite: bool = True, key: str = "out") -> Path:
    """Write one export file: ``write(tmp)`` fills a fresh temporary file in ``path``'s folder (created
    exclusively, so nothing already there is opened), which is then renamed over ``path``. The target is
    checked before and again just before the rename; the temporary file never outlives the call."""
    path = check_target(path, overwrite, key)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise InputError(f"{path.parent}: cannot create the folder for {path.name} ({e.strerror})", key=key,
                         path=str(path.parent)) from None
    tmp = path.parent / f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp"
    try:
        os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))  # the umask applies, as to a plain open
    except OSError as e:
        raise InputError(f"{path.parent}: cannot write there ({e.strerror})", key=key, path=str(path.parent)) from None
    try:
        write(tmp)
        check_target(path, overwrite, key)  # nothing special slipped in while the file was written
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


# -- bulk metric export ---------------------------------------------------------------------------


def export_metrics(db: RunDB, run_ids: Iterable[str], path: str | Path, fmt: str | None = None,
                   names: list[str] | None = None, overwrite: bool = True) -> int:
    """Write the metric rows of ``run_ids`` to one file with a run_id column; returns the row count.

    ``fmt`` defaults to the file suffix. JSON is an array of row objects (what ``pandas.read_json``
    and ``json.load`` take); Parquet keeps integer steps/tokens as int64. An existing file at ``path``
    is replaced only with ``overwrite`` (the CLI's --overwrite; the studio's save dialog has asked).
    """
    path = Path(path)
    fmt = (fmt or path.suffix.lstrip(".")).lower()
    if fmt not in FORMATS:
        raise InputError(f"unknown export format {fmt!r}: use one of {', '.join(FORMATS)}")
    ids = [r["id"] for r in resolve_runs(db, run_ids)]
    if not ids:
        raise InputError("no runs to export")
    check_target(path, overwrite)  # before the rows are read
    writer = {"csv": _write_csv, "json": _write_json, "parquet": _write_parquet}[fmt]
    counted: list[int] = []
    # a half-written export never sits under the final name, and never a temporary file beside it
    write_atomic(path, lambda tmp: counted.append(writer(metric_rows(db, ids, names), tmp)), overwrite)
    return counted[0]


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
    """The run's config as TOML that ``mediswift train FILE`` re-runs as is (validated on the way).

    A name stored before names were checked (a newline or other control character, too long) is made
    safe first (``safe_name``), and the comment header holds only printable text, so the file always
    reads back."""
    (row,) = resolve_runs(db, [run_id])
    d = dict(row["config"])
    d["name"] = safe_name(d.get("name", ""))
    cfg = from_dict(d)  # rejects a config this version could not run, before writing
    header = (f"# MediSwift run {row['id']} ({safe_name(row['name'] or '')}, stage {row['stage']}, "
              f"status {row['status']})\n"
              f"# re-run with: mediswift train THIS_FILE\n")
    return header + cfg.to_toml()


def export_config(db: RunDB, run_id: str, path: str | Path, overwrite: bool = True) -> Path:
    """The run's config as a TOML file at ``path`` (an existing file replaced only with ``overwrite``)."""
    check_target(path, overwrite)
    text = config_toml(db, run_id)
    return write_atomic(path, lambda tmp: tmp.write_text(text, encoding="utf-8"), overwrite)
