"""PubMedQA (PQA-L format), cast as causal LM the way BioGPT did.

Input ``question: {Q} context: {C} the answer to the question given the context is`` and answer
`` {yes|no|maybe}.``. A file is a JSON object keyed by PMID whose records carry QUESTION,
CONTEXTS and final_decision (the label). The official 10-fold split file (``pqal_splits.json``)
is ``{"test": [...], "cv_pool": [...], "folds": [{"fold": k, "train": [...], "dev": [...]}, ...]}``.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np

from engine.core.errors import InputError
from engine.tasks.base import CONTENT_FREE_TEXTS, Example

NAME = "pubmedqa"
CLASSES = ("yes", "no", "maybe")
MULTI_LABEL = False
CUE = " the answer to the question given the context is"
SPLITS_FILE = "pqal_splits.json"


def target_text(label: int) -> str:
    return f" {CLASSES[label]}."


def candidates() -> list[str]:
    return [target_text(c) for c in range(len(CLASSES))]


def make_example(pmid: str, question: str, context: str, label: int | None) -> Example:
    """One question in the prompt template: ``question: {Q} context:`` + `` {C}`` + the answer cue."""
    q, c = question.strip(), context.strip()
    return Example(pmid, "question:" + (f" {q}" if q else "") + " context:", f" {c}" if c else "", CUE,
                   target_text(label) if label is not None else "", label)


def content_free() -> list[Example]:
    """The prompt template with question and context both replaced by "N/A", then by nothing: inputs
    with nothing to read, whose answer log-probabilities are the model's prior over yes/no/maybe.
    They carry no label; calibrated scoring subtracts their (averaged) answer log-probabilities."""
    return [make_example(f"content-free:{text or 'empty'}", text, text, None) for text in CONTENT_FREE_TEXTS]


_ANSWER = re.compile(r"\b(yes|no|maybe)\b", re.IGNORECASE)


def parse(text: str) -> int:
    """The first yes/no/maybe in generated text; -1 when there is none."""
    m = _ANSWER.search(text)
    return CLASSES.index(m.group(1).lower()) if m else -1


def _load_json(path: str, key: str):
    p = Path(path).expanduser()
    if not p.is_file():
        raise InputError(f"PubMedQA file not found: {path}", key=key, path=str(path))
    try:
        return json.loads(p.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise InputError(f"{path} is not a JSON file (PubMedQA expects PQA-L JSON keyed by PMID): {e}", key=key, path=str(path)) from None


def read(path: str, key: str = "task.train") -> dict[str, Example]:
    """Every labelled record of a PQA-L file, in file order."""
    data = _load_json(path, key)
    if not isinstance(data, dict) or not data:
        raise InputError(f"{path} is not in PQA-L format: expected a non-empty JSON object keyed by PMID "
                        f"with QUESTION, CONTEXTS and final_decision", key=key, path=str(path))
    out: dict[str, Example] = {}
    for pmid, rec in data.items():
        if not isinstance(rec, dict) or "QUESTION" not in rec or "CONTEXTS" not in rec:
            raise InputError(f"{path}: record {pmid} is not in PQA-L format (needs QUESTION and CONTEXTS)", key=key, path=str(path))
        label = rec.get("final_decision")
        if label is None:
            raise InputError(f"{path}: record {pmid} has no label (final_decision); a labelled PQA-L file is needed", key=key, path=str(path))
        if str(label).lower() not in CLASSES:
            raise InputError(f"{path}: record {pmid} has label {label!r}; expected yes, no or maybe", key=key, path=str(path))
        contexts = rec["CONTEXTS"]
        context = " ".join(contexts) if isinstance(contexts, list) else str(contexts)
        y = CLASSES.index(str(label).lower())
        out[str(pmid)] = make_example(str(pmid), str(rec["QUESTION"]), context, y)
    return out


def read_splits(path: str, key: str = "task.splits") -> dict:
    s = _load_json(path, key)
    if not isinstance(s, dict) or not isinstance(s.get("folds"), list) or not s["folds"]:
        raise InputError(f"{path} is not a PubMedQA split file: expected an object with a 'folds' list "
                        f"of {{fold, train, dev}}", key=key, path=str(path))
    return s


def fold_ids(splits: dict, fold: int, path: str) -> tuple[list[str], list[str]]:
    folds = splits["folds"]
    for i, f in enumerate(folds):
        if isinstance(f, dict) and f.get("fold", i) == fold:
            if "train" not in f or "dev" not in f:
                break
            return [str(x) for x in f["train"]], [str(x) for x in f["dev"]]
    raise InputError(f"{path} has no fold {fold} with train and dev lists ({len(folds)} folds)", key="task.fold", path=path)


def _splits_path(tc) -> str | None:
    if tc.splits:
        return tc.splits
    beside = Path(tc.train).expanduser().parent / SPLITS_FILE
    return str(beside) if beside.is_file() else None


def _pick(data: dict[str, Example], ids: list[str], path: str, key: str) -> list[Example]:
    missing = [i for i in ids if i not in data]
    if missing:
        raise InputError(f"{len(missing)} of {len(ids)} PMIDs of the split are not in {path} (e.g. {missing[0]})", key=key, path=path)
    return [data[i] for i in ids]


def train_dev(tc, val_fraction: float, seed: int, warn) -> tuple[list[Example], list[Example], dict]:
    """Training and development examples for a run: the fold of the split file, or a held-out part."""
    if not tc.train:
        raise InputError("task.train is required for pubmedqa: a PQA-L JSON file such as pqal_trainval.json", key="task.train")
    data = read(tc.train, "task.train")
    info: dict = {"train_file": str(Path(tc.train).expanduser().resolve())}
    sp = _splits_path(tc)
    train = dev = None
    if sp:
        splits = read_splits(sp)
        tr_ids, dev_ids = fold_ids(splits, tc.fold, sp)
        if all(i in data for i in tr_ids + dev_ids):
            train, dev = [data[i] for i in tr_ids], [data[i] for i in dev_ids]
            info.update(splits=str(Path(sp).resolve()), fold=tc.fold)
        elif tc.splits:
            _pick(data, tr_ids + dev_ids, tc.train, "task.splits")
        else:
            warn(f"{sp} does not describe {tc.train}; holding out {val_fraction:.0%} of it for development instead")
    if train is None:
        ex = list(data.values())
        order = np.random.default_rng(seed).permutation(len(ex))
        n_dev = max(1, int(round(len(ex) * val_fraction)))
        dev, train = [ex[i] for i in order[:n_dev]], [ex[i] for i in order[n_dev:]]
        info["held_out"] = n_dev
    if tc.dev:
        dev = list(read(tc.dev, "task.dev").values())
        info["dev_file"] = str(Path(tc.dev).expanduser().resolve())
    return train, dev, info


def select(path: str, split: str, splits_path: str | None, fold: int) -> list[Example]:
    """Examples of an evaluation file: all of it, or one split of the split file (test, cv_pool, train, dev)."""
    data = read(path, "data")
    if split in ("all", ""):
        return list(data.values())
    sp = splits_path or str(Path(path).expanduser().parent / SPLITS_FILE)
    if not Path(sp).is_file():
        raise InputError(f"--split {split} needs a split file (--splits; none found at {sp})", key="splits", path=sp)
    splits = read_splits(sp, "splits")
    if split in ("train", "dev"):
        ids = fold_ids(splits, fold, sp)[0 if split == "train" else 1]
    elif isinstance(splits.get(split), list):
        ids = [str(i) for i in splits[split]]
    else:
        raise InputError(f"{sp} has no split {split!r}", key="split", path=sp)
    return _pick(data, ids, path, "data")
