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
    train: np.ndarray  # int32 [n_train_tokens]
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


def tokenize_corpus(corpus: Corpus, tok, val_fraction: float, seed: int, cache_dir: Path | None,
                    progress: Callable[[int, int], None] | None = None) -> TokenSplits:
    key = hashlib.sha256(
        json.dumps([corpus.fingerprint, tokenizer_fingerprint(tok), val_fraction, seed]).encode()
    ).hexdigest()[:20]
    cache = cache_dir / f"tokens-{key}.npz" if cache_dir else None
    if cache and cache.is_file():
        try:
            with np.load(cache) as z:
                return TokenSplits(z["train"], z["val"], int(z["n_train_docs"]), int(z["n_val_docs"]), cache, True)
        except (OSError, ValueError, KeyError):
            pass  # a damaged cache is rebuilt
    eot, _ = special_ids(tok)
    train_idx, val_idx = split_documents(len(corpus.documents), val_fraction, seed)
    parts = {}
    done, total = 0, len(corpus.documents)
    for name, idx in (("train", train_idx), ("val", val_idx)):
        chunks = []
        for start in range(0, len(idx), 2000):
            batch = [corpus.documents[i] for i in idx[start:start + 2000]]
            for doc in batch:
                for piece in tok.encode_batch(split_long(doc), add_special_tokens=False):
                    chunks.append(np.asarray(piece.ids, dtype=np.int32))
                chunks.append(np.asarray([eot], dtype=np.int32))
            done += len(batch)
            if progress:
                progress(done, total)
        parts[name] = np.concatenate(chunks) if chunks else np.zeros(0, dtype=np.int32)
    splits = TokenSplits(parts["train"], parts["val"], len(train_idx), len(val_idx), cache, False)
    if cache:
        cache.parent.mkdir(parents=True, exist_ok=True)
        # unique temporary name: runs starting together may build the same cache at once
        tmp = cache.with_name(f"{cache.stem}.{os.getpid()}.{threading.get_ident()}.tmp.npz")
        np.savez(tmp, train=splits.train, val=splits.val, n_train_docs=splits.n_train_docs, n_val_docs=splits.n_val_docs)
        tmp.replace(cache)
    return splits


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
    """Non-overlapping n_ctx blocks in a seeded per-epoch order; ``state`` is the resume position."""

    def __init__(self, tokens: np.ndarray, n_ctx: int, batch_size: int, seed: int, shuffle: bool = True):
        self.tokens = torch.from_numpy(tokens.astype(np.int64))
        self.n_ctx = n_ctx
        self.n_blocks = (len(tokens) - 1) // n_ctx
        super().__init__(self.n_blocks, batch_size, seed, shuffle)

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self._gather(self.next_indices())

    def _gather(self, idx: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        starts = torch.tensor(idx, dtype=torch.int64) * self.n_ctx
        offsets = torch.arange(self.n_ctx + 1)
        rows = self.tokens[starts[:, None] + offsets[None, :]]  # [B, n_ctx+1]
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
