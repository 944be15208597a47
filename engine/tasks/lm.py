"""Plain causal LM on the user's own corpus (continued domain training), scored by loss and perplexity.

Training text comes from ``data.corpus`` through the same loaders as pre-training (txt, jsonl,
json, csv, parquet, folders); evaluation files too, so ``mediswift eval --task lm`` takes any of them.
"""
from __future__ import annotations

import numpy as np

from engine.core.errors import InputError
from engine.data.corpus import load_corpus
from engine.data.vocab import special_ids

NAME = "lm"


def read_tokens(path: str, tok, text_field: str = "text") -> np.ndarray:
    """Every document of a file or folder, tokenized and joined with end-of-text separators."""
    try:
        corpus = load_corpus([path], text_field)
    except InputError as e:
        raise InputError(str(e), key="data", path=e.path) from None
    eot, _ = special_ids(tok)
    chunks = []
    for enc in tok.encode_batch(list(corpus.documents), add_special_tokens=False):
        chunks.append(np.asarray(enc.ids, dtype=np.int32))
        chunks.append(np.asarray([eot], dtype=np.int32))
    return np.concatenate(chunks)
