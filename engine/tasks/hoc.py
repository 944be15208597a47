"""Hallmarks of Cancer: multi-label document classification over 10 hallmarks.

One abstract per record: JSON Lines (or a JSON list) with ``labels`` (a list of hallmark names,
possibly empty) and the text as ``sentences`` (a list, joined with spaces) or ``text``; CSV and
Parquet files go through `datasets`, with ``labels`` as a ``;``-separated string. As LM the label
set is written as text after the abstract: ``{abstract} hallmarks: {a}; {b}.`` (`` none.`` when
empty), and predictions are parsed from greedy generation; with ``task.head = "classifier"`` a
linear head on the last hidden state predicts each label independently (sigmoid > 0.5).
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from engine.core.errors import InputError
from engine.tasks.base import Example

NAME = "hoc"
# BLURB/BLUE index order (alphabetical)
CLASSES = (
    "activating invasion and metastasis",
    "avoiding immune destruction",
    "cellular energetics",
    "enabling replicative immortality",
    "evading growth suppressors",
    "genomic instability and mutation",
    "inducing angiogenesis",
    "resisting cell death",
    "sustaining proliferative signaling",
    "tumor promoting inflammation",
)
MULTI_LABEL = True
CUE = " hallmarks:"
NONE = "none"


def target_text(label: tuple[int, ...]) -> str:
    return " " + ("; ".join(CLASSES[c] for c in sorted(label)) if label else NONE) + "."


def parse(text: str) -> tuple[int, ...]:
    """Label names found in generated text (up to the first period); unknown pieces are ignored."""
    text = text.split(".")[0]
    found = set()
    for piece in text.split(";"):
        name = " ".join(piece.strip().lower().split())
        if name in CLASSES:
            found.add(CLASSES.index(name))
    return tuple(sorted(found))


def _records(path: str, key: str) -> list[dict]:
    p = Path(path).expanduser()
    if not p.is_file():
        raise InputError(f"HoC file not found: {path}", key=key, path=str(path))
    suffix = p.suffix.lower()
    if suffix in (".jsonl", ".json"):
        text = p.read_text(encoding="utf-8", errors="replace")
        try:
            if suffix == ".json" and text.lstrip().startswith("["):
                recs = json.loads(text)
            else:
                recs = [json.loads(line) for line in text.splitlines() if line.strip()]
        except json.JSONDecodeError as e:
            raise InputError(f"{path} is not JSON Lines (HoC expects one JSON abstract per line): {e}", key=key, path=str(path)) from None
    elif suffix in (".csv", ".parquet"):
        import datasets

        datasets.disable_progress_bars()
        try:
            ds = datasets.load_dataset("csv" if suffix == ".csv" else "parquet", data_files=str(p), split="train")
        except Exception as e:  # datasets raises many types for malformed files
            raise InputError(f"could not read {path}: {type(e).__name__}", key=key, path=str(path)) from None
        recs = [dict(r) for r in ds]
    else:
        raise InputError(f"unsupported HoC file type {suffix or '(none)'!r}: {path} (use .jsonl, .json, .csv or .parquet)", key=key, path=str(path))
    if not recs or not all(isinstance(r, dict) for r in recs):
        raise InputError(f"{path} holds no HoC records (objects with 'labels' and 'sentences' or 'text')", key=key, path=str(path))
    return recs


def read(path: str, key: str = "task.train") -> list[Example]:
    out = []
    for i, r in enumerate(_records(path, key), 1):
        where = f"{path}, record {i}"
        if "labels" not in r or r["labels"] is None:
            raise InputError(f"{where} has no 'labels' (a list of hallmarks, [] for none); a labelled file is needed", key=key, path=str(path))
        labels = r["labels"]
        if isinstance(labels, str):
            labels = [s for s in labels.split(";") if s.strip()]
        if not isinstance(labels, list):
            raise InputError(f"{where}: 'labels' must be a list of hallmark names, got {labels!r}", key=key, path=str(path))
        idx = set()
        for name in labels:
            norm = " ".join(str(name).strip().lower().split())
            if norm not in CLASSES:
                raise InputError(f"{where}: unknown hallmark {name!r} (expected one of: {', '.join(CLASSES)})", key=key, path=str(path))
            idx.add(CLASSES.index(norm))
        if isinstance(r.get("sentences"), list):
            text = " ".join(str(s) for s in r["sentences"])
        elif isinstance(r.get("text"), str):
            text = r["text"]
        else:
            raise InputError(f"{where} has no text ('sentences' list or 'text' string)", key=key, path=str(path))
        label = tuple(sorted(idx))
        out.append(Example(str(r.get("pmid", r.get("id", i))), "", text.strip(), CUE, target_text(label), label))
    return out


def train_dev(tc, val_fraction: float, seed: int, warn) -> tuple[list[Example], list[Example], dict]:
    if not tc.train:
        raise InputError("task.train is required for hoc: a JSON Lines file such as hoc/train.jsonl", key="task.train")
    train = read(tc.train, "task.train")
    info: dict = {"train_file": str(Path(tc.train).expanduser().resolve())}
    if tc.dev:
        dev = read(tc.dev, "task.dev")
        info["dev_file"] = str(Path(tc.dev).expanduser().resolve())
    else:
        order = np.random.default_rng(seed).permutation(len(train))
        n_dev = max(1, int(round(len(train) * val_fraction)))
        dev, train = [train[i] for i in order[:n_dev]], [train[i] for i in order[n_dev:]]
        info["held_out"] = n_dev
    return train, dev, info


def select(path: str, split: str, splits_path: str | None, fold: int) -> list[Example]:
    if split not in ("all", ""):
        raise InputError("HoC files are scored whole; give the split's own file (e.g. hoc/dev.jsonl) with --data", key="split")
    return read(path, "data")
