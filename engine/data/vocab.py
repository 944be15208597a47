"""Domain vocabulary: byte-level BPE learned on the run's corpus with `tokenizers` (an imported
BioGPT keeps its own Moses + BPE: engine.data.biogpt_tokenizer; an imported model without
``<|endoftext|>`` its own tokenizer, its eos token ending documents: engine.data.role_tokenizer).

Byte-level means every string encodes (no unknown token); two special tokens delimit documents
and pad batches. The tokenizer is saved as ``tokenizer.json`` in the run folder and reused by
every child run.
"""
from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Callable, Iterable

from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

from engine.core.errors import InputError
from engine.data.special_tokens import EOT, PAD, SPECIAL_TOKENS

__all__ = ["EOT", "PAD", "SPECIAL_TOKENS"]  # (with the functions below) what the rest of the engine imports
TOKENIZER_FILE = "tokenizer.json"


def train_tokenizer(documents: list[str], vocab_size: int, min_frequency: int = 2, lowercase: bool = False,
                    progress: Callable[[int, int], None] | None = None) -> Tokenizer:
    tok = Tokenizer(models.BPE())
    if lowercase:
        tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    total = len(documents)

    def batches(size: int = 1000) -> Iterable[list[str]]:
        for i in range(0, total, size):
            if progress:
                progress(i, total)
            yield documents[i:i + size]
        if progress:
            progress(total, total)

    tok.train_from_iterator(batches(), trainer=trainer, length=total)
    return tok


def save_tokenizer(tok: Tokenizer, folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / TOKENIZER_FILE
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")  # per process
    tok.save(str(tmp))
    tmp.replace(path)
    return path


def load_tokenizer(path: str | Path) -> Tokenizer:
    """A run's tokenizer: byte-level BPE (``tokenizers``), an imported BioGPT's Moses + BPE
    (engine.data.biogpt_tokenizer), or an imported model's own tokenizer whose end-of-text token is
    not EOT (engine.data.role_tokenizer); the last two answer the same calls."""
    p = Path(path)
    if p.is_dir():
        p = p / TOKENIZER_FILE
    if not p.is_file():
        raise InputError(f"tokenizer file not found: {p}", key="tokenizer", path=str(p))
    from engine.data import biogpt_tokenizer, role_tokenizer

    try:
        with open(p, "rb") as fh:
            head = fh.read(64)
        for kind in (biogpt_tokenizer, role_tokenizer):  # the wrappers' files say so in their first bytes
            if head.startswith(kind.HEADER.encode()):
                return kind.from_file(p)
        return Tokenizer.from_file(str(p))
    except InputError:
        raise  # a BioGPT tokenizer without transformers or sacremoses: what to install, not "damaged"
    except Exception as e:  # tokenizers raises its own exception type for any unreadable file
        raise InputError(f"tokenizer file {p} is damaged: {str(e).splitlines()[0][:200] if str(e) else type(e).__name__}",
                         key="tokenizer", path=str(p)) from None


def special_ids(tok: Tokenizer) -> tuple[int, int]:
    eot, pad = tok.token_to_id(EOT), tok.token_to_id(PAD)
    if eot is None or pad is None:
        raise ValueError(f"tokenizer lacks the special tokens {EOT} and {PAD}")
    return eot, pad


def tokenizer_fingerprint(tok: Tokenizer) -> str:
    return hashlib.sha256(tok.to_str().encode("utf-8")).hexdigest()[:16]
