"""Token data: tokenize a corpus once (cached), split by document, pack into n_ctx blocks.

Cache key = corpus content hash + tokenizer hash + split settings, so the same corpus with the same
tokenizer is never tokenized twice. Documents are joined with end-of-text separators. The batch
order is a permutation of blocks drawn from (seed, epoch), so a position (epoch, index) is all a
checkpoint needs to resume the exact same stream.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from engine.core.errors import InputError
from engine.data.corpus import Corpus
from engine.data.vocab import special_ids, tokenizer_fingerprint


@dataclass
class TokenSplits:
    train: np.ndarray  # int32 [n_train_tokens], memory-mapped from the token cache
    val: np.ndarray    # int32 [n_val_tokens]
    n_train_docs: int
    n_val_docs: int
    cache_path: Path | None = None
    from_cache: bool = False


def split_documents(n_docs: int, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Hold out whole documents (never a block straddling train and val)."""
    order = np.random.default_rng(seed).permutation(n_docs)
    n_val = max(1, int(round(n_docs * val_fraction))) if n_docs >= 2 else 0
    return np.sort(order[n_val:]), np.sort(order[:n_val])


class _TokenFile:
    """Tokens appended to a file in chunks: the whole split is never in memory at once."""

    def __init__(self, path: Path):
        self.path = path
        self.fh = path.open("wb")
        self.n = 0

    def add(self, ids: np.ndarray) -> None:
        ids.astype(np.int32, copy=False).tofile(self.fh)
        self.n += len(ids)

    def close(self) -> None:
        self.fh.close()


def _open_tokens(path: Path, n: int) -> np.ndarray:
    if n == 0:
        return np.zeros(0, dtype=np.int32)
    return np.memmap(path, dtype=np.int32, mode="r", shape=(n,))


def tokenize_corpus(corpus: Corpus, tok, val_fraction: float, seed: int, cache_dir: Path | None,
                    progress: Callable[[int, int], None] | None = None) -> TokenSplits:
    """Train and validation tokens, documents joined with end-of-text separators, streamed in
    batches to memory-mapped int32 files in the cache (``tokens-KEY.train.bin``, ``.val.bin`` and a
    JSON index): peak memory is one batch of documents, whatever the corpus size. The validation
    split is the corpus's own when it has one, else ``val_fraction`` of its documents, held out whole."""
    own_val = corpus.validation is not None
    key = hashlib.sha256(
        json.dumps([corpus.fingerprint, tokenizer_fingerprint(tok), val_fraction if not own_val else "own", seed, 2]).encode()
    ).hexdigest()[:20]
    cache = cache_dir / f"tokens-{key}.json" if cache_dir else None
    if cache and cache.is_file():
        try:
            meta = json.loads(cache.read_text())
            return TokenSplits(_open_tokens(cache.with_suffix(".train.bin"), meta["train"]),
                               _open_tokens(cache.with_suffix(".val.bin"), meta["val"]), meta["n_train_docs"],
                               meta["n_val_docs"], cache, True)
        except (OSError, ValueError, KeyError):
            pass  # a damaged cache is rebuilt
    eot, _ = special_ids(tok)
    if own_val:
        plan = (("train", corpus.documents, np.arange(len(corpus.documents))),
                ("val", corpus.validation, np.arange(len(corpus.validation))))
    else:
        train_idx, val_idx = split_documents(len(corpus.documents), val_fraction, seed)
        plan = (("train", corpus.documents, train_idx), ("val", corpus.documents, val_idx))
    folder = cache.parent if cache else Path(tempfile.mkdtemp(prefix="mediswift-tokens-"))
    folder.mkdir(parents=True, exist_ok=True)
    # unique temporary names: runs starting together may build the same cache at once
    stem = f"tokens-{key}.{os.getpid()}.{threading.get_ident()}"
    files = {name: _TokenFile(folder / f"{stem}.{name}.tmp") for name, _, _ in plan}
    done, total = 0, sum(len(idx) for _, _, idx in plan)
    sep = np.asarray([eot], dtype=np.int32)
    try:
        for name, docs, idx in plan:
            out = files[name]
            for start in range(0, len(idx), 2000):
                batch = docs[idx[start:start + 2000]]
                for sub in range(0, len(batch), ENCODE_DOCS):
                    _encode_into(out, tok, batch[sub:sub + ENCODE_DOCS], sep)
                done += len(batch)
                if progress:
                    progress(done, total)
    finally:
        for f in files.values():
            f.close()
    counts = {name: files[name].n for name in files}
    n_docs = {name: len(idx) for name, _, idx in plan}
    if cache:
        for name in files:
            files[name].path.replace(cache.with_suffix(f".{name}.bin"))
        tmp = cache.with_name(f"{stem}.json.tmp")
        tmp.write_text(json.dumps({"train": counts["train"], "val": counts["val"], "n_train_docs": n_docs["train"],
                                   "n_val_docs": n_docs["val"]}))
        tmp.replace(cache)  # last: a cache is complete once its index exists
        paths = {name: cache.with_suffix(f".{name}.bin") for name in files}
    else:
        paths = {name: files[name].path for name in files}
    return TokenSplits(_open_tokens(paths["train"], counts["train"]), _open_tokens(paths["val"], counts["val"]),
                       n_docs["train"], n_docs["val"], cache, False)


ENCODE_DOCS = 128  # documents per tokenizer call: parallel on all cores, yet few Encoding objects alive at once


def _encode_into(out: "_TokenFile", tok, docs: list[str], sep: np.ndarray) -> None:
    """Append ``docs``' tokens, each document followed by the end-of-text separator."""
    pieces, ends = [], []
    for doc in docs:
        pieces.extend(split_long(doc))
        ends.append(len(pieces))
    encoded = tok.encode_batch(pieces, add_special_tokens=False)
    first = 0
    for end in ends:
        for piece in encoded[first:end]:
            out.add(np.asarray(piece.ids, dtype=np.int32))
        out.add(sep)
        first = end


PIECE_CHARS = 1 << 16


def split_long(doc: str, limit: int = PIECE_CHARS) -> list[str]:
    """A document cut into pieces of at most ~``limit`` characters, each cut just before a whitespace
    character. Byte-level BPE splits words at that whitespace anyway, so the pieces encode to exactly
    the document's tokens, while a 50 MB single-line corpus no longer goes through the tokenizer (and
    its memory) in one piece."""
    if len(doc) <= limit:
        return [doc]
    pieces, start = [], 0
    while len(doc) - start > limit:
        cut = start + limit
        while cut > start and not doc[cut].isspace():
            cut -= 1
        if cut == start:  # no whitespace in the window: a cut inside one long "word" (rare; not exact)
            cut = start + limit
        pieces.append(doc[start:cut])
        start = cut
    pieces.append(doc[start:])
    return pieces


class SeededOrder:
    """Batches of indices 0..n-1 in a seeded per-epoch order; ``state`` (epoch, position) is all a
    checkpoint needs to resume the exact same stream. Shared by token blocks and task examples.

    In a process group every rank walks the same order and keeps batch ``rank`` of each ``world``
    consecutive batches (``shard``): 2 ranks with 1 micro-batch each see what 1 process sees with 2,
    and the position stays the group's, so a checkpoint resumes on any world size."""

    def __init__(self, n: int, batch_size: int, seed: int, shuffle: bool = True):
        self.n = n
        self.batch_size = batch_size
        self.seed = seed
        self.shuffle = shuffle
        self.epoch = 0
        self.pos = 0
        self.rank, self.world = 0, 1
        self._order = self._make_order(0)

    def shard(self, rank: int, world: int) -> None:
        self.rank, self.world = rank, world

    def _make_order(self, epoch: int) -> np.ndarray:
        if not self.shuffle:
            return np.arange(self.n)
        return np.random.default_rng([self.seed, epoch]).permutation(self.n)

    def state(self) -> dict:
        return {"epoch": self.epoch, "pos": self.pos}

    def load_state(self, state: dict) -> None:
        self.epoch, self.pos = int(state["epoch"]), int(state["pos"])
        self._order = self._make_order(self.epoch)

    def next_indices(self) -> list[int]:
        batches = [self._next_batch() for _ in range(self.world)]
        return batches[self.rank]

    def _next_batch(self) -> list[int]:
        idx: list[int] = []
        while len(idx) < self.batch_size:
            if self.pos >= self.n:
                self.epoch += 1
                self.pos = 0
                self._order = self._make_order(self.epoch)
            take = min(self.batch_size - len(idx), self.n - self.pos)
            idx.extend(self._order[self.pos:self.pos + take].tolist())
            self.pos += take
        return idx


class BlockLoader(SeededOrder):
    """Non-overlapping n_ctx blocks in a seeded per-epoch order; ``state`` is the resume position.
    The tokens stay as they are given (int32, memory-mapped from the token cache): a batch's rows are
    read and widened to int64 when it is drawn, never the whole split."""

    def __init__(self, tokens: np.ndarray, n_ctx: int, batch_size: int, seed: int, shuffle: bool = True):
        self.tokens = tokens
        self.n_ctx = n_ctx
        self.n_blocks = (len(tokens) - 1) // n_ctx
        super().__init__(self.n_blocks, batch_size, seed, shuffle)

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self._gather(self.next_indices())

    def _gather(self, idx: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        starts = np.asarray(idx, dtype=np.int64) * self.n_ctx
        rows = np.asarray(self.tokens[starts[:, None] + np.arange(self.n_ctx + 1)[None, :]], dtype=np.int64)  # [B, n_ctx+1]
        rows = torch.from_numpy(rows)
        return rows[:, :-1].contiguous(), rows[:, 1:].contiguous()

    def fixed_batches(self, n_batches: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """The first blocks in file order (validation: the same batches every evaluation)."""
        n = min(self.n_blocks, n_batches * self.batch_size)
        return [self._gather(list(range(i, min(i + self.batch_size, n)))) for i in range(0, n, self.batch_size)]


def check_enough_tokens(splits: TokenSplits, n_ctx: int) -> None:
    if len(splits.train) < n_ctx + 1:
        raise InputError(f"corpus too small: {len(splits.train)} training tokens, need at least model.n_ctx + 1 = {n_ctx + 1}", key="data.corpus")
    if len(splits.val) < n_ctx + 1:
        raise InputError(f"validation split too small: {len(splits.val)} tokens from {splits.n_val_docs} documents, need "
            f"{n_ctx + 1}; raise data.val_fraction or use a larger corpus", key="data.val_fraction")


def epochs_for(steps: int, batch_size: int, grad_accum: int, n_blocks: int) -> float:
    return steps * batch_size * grad_accum / max(1, n_blocks) if n_blocks else math.inf
