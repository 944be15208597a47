"""BioGPT's tokenizer (Moses tokenization, then BPE with ``</w>`` word ends) behind the few methods the
engine calls on a ``tokenizers.Tokenizer``, so an imported BioGPT trains on transformers' own token ids.

Moses' rules (escaping, aggressive dash splits, its non-breaking prefixes) have no equivalent among the
``tokenizers`` pre-tokenizers, so the ids come from transformers' ``BioGptTokenizer`` itself: equal by
construction, not by imitation. transformers and sacremoses are therefore needed by BioGPT runs only,
imported when such a tokenizer is loaded; without them the load is one InputError naming what to install.

A run keeps it, as every run keeps its tokenizer, in one ``tokenizer.json``: a JSON object whose first
key is ``mediswift_tokenizer`` (engine.data.vocab.load_tokenizer routes on it), holding the model's
``vocab.json`` and ``merges.txt`` verbatim (export-hf writes them back byte for byte) and its special
tokens. The engine's two roles map onto BioGPT's tokens: a document ends with ``</s>`` (the eos token,
where ``<|endoftext|>`` would be) and batches pad with ``<pad>``.
"""
from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

from engine.core.errors import InputError
from engine.data.special_tokens import EOT, PAD

KIND = "biogpt"
HEADER = '{"mediswift_tokenizer": "biogpt"'  # how a run's tokenizer.json of this kind begins
SPECIAL_KEYS = ("bos_token", "eos_token", "sep_token", "unk_token", "pad_token")
DEFAULT_SPECIALS = {"bos_token": "<s>", "eos_token": "</s>", "sep_token": "</s>", "unk_token": "<unk>",
                    "pad_token": "<pad>"}
NEEDS = ("BioGPT's tokenizer (Moses + BPE) needs the packages transformers and sacremoses: "
         "pip install 'mediswift-studio[biogpt]' (or pip install transformers sacremoses)")


@dataclass
class Encoding:
    """What the engine reads of a ``tokenizers.Encoding``: the ids."""
    ids: list[int]


def _tokenizer_class():
    """transformers' BioGptTokenizer, imported on first use (it pulls in transformers, seconds)."""
    try:
        import sacremoses  # noqa: F401 - BioGptTokenizer needs it; checked here for one clear message
        from transformers import BioGptTokenizer
    except ImportError:
        raise InputError(NEEDS, key="tokenizer") from None
    return BioGptTokenizer


def _vocab(text: str) -> dict[str, int]:
    """vocab.json: token -> id, the ids 0 .. n-1 each once (BioGPT's embedding rows)."""
    try:
        vocab = json.loads(text)
    except ValueError as e:
        raise ValueError(f"vocab.json is not valid JSON ({str(e).splitlines()[0][:120]})") from None
    if not isinstance(vocab, dict) or not vocab:
        raise ValueError("vocab.json must map tokens to ids")
    if any(isinstance(i, bool) or not isinstance(i, int) for i in vocab.values()):
        raise ValueError("vocab.json must map every token to an integer id")
    if sorted(vocab.values()) != list(range(len(vocab))):
        raise ValueError(f"vocab.json's ids must be 0 to {len(vocab) - 1:,}, each once")
    return vocab


class BioGptTokens:
    """The tokenizer of a BioGPT run: ``encode``, ``encode_batch``, ``decode``, ``token_to_id``,
    ``id_to_token``, ``get_vocab_size``, ``get_vocab``, ``to_str`` and ``save`` as ``tokenizers``
    has them. ``add_special_tokens`` (tokenizers' default, True) puts ``</s>`` in front, as
    transformers does; the engine's data paths ask for False."""

    def __init__(self, vocab_text: str, merges_text: str, specials: dict[str, str] | None = None):
        """Raises ValueError (what is wrong with the files) or InputError (transformers or sacremoses missing)."""
        self.vocab_text, self.merges_text = vocab_text, merges_text
        self.specials = {k: (specials or {}).get(k) or DEFAULT_SPECIALS[k] for k in SPECIAL_KEYS}
        self.vocab = _vocab(vocab_text)
        absent = [t for t in dict.fromkeys(self.specials.values()) if t not in self.vocab]
        if absent:
            raise ValueError(f"vocab.json lacks the special token {absent[0]!r} its tokenizer config names")
        self.inverse = {i: t for t, i in self.vocab.items()}
        # the engine's roles (engine.data.special_tokens): documents end with the eos token, batches pad with pad
        self.roles = {EOT: self.specials["eos_token"], PAD: self.specials["pad_token"]}
        cls = _tokenizer_class()
        with tempfile.TemporaryDirectory(prefix="mediswift-biogpt-") as tmp:  # it reads files, not strings
            vocab_file, merges_file = Path(tmp) / "vocab.json", Path(tmp) / "merges.txt"
            vocab_file.write_text(vocab_text, encoding="utf-8")
            merges_file.write_text(merges_text, encoding="utf-8")
            # no length limit: the engine cuts windows itself, and a long document is not worth a warning
            self.hf = cls(str(vocab_file), str(merges_file), model_max_length=int(1e30), **self.specials)
        if len(self.hf) != len(self.vocab):
            raise ValueError(f"the tokenizer has {len(self.hf):,} tokens where vocab.json has {len(self.vocab):,}")

    # -- what the engine calls --------------------------------------------------------------------

    def encode(self, text: str, add_special_tokens: bool = True) -> Encoding:
        return Encoding(self.hf.encode(text, add_special_tokens=add_special_tokens))

    def encode_batch(self, texts: list[str], add_special_tokens: bool = True) -> list[Encoding]:
        if not texts:
            return []
        return [Encoding(ids) for ids in self.hf(list(texts), add_special_tokens=add_special_tokens)["input_ids"]]

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self.hf.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def token_to_id(self, token: str) -> int | None:
        return self.vocab.get(self.roles.get(token, token))

    def id_to_token(self, i: int) -> str | None:
        return self.inverse.get(i)

    def get_vocab_size(self, with_added_tokens: bool = True) -> int:
        return len(self.vocab)

    def get_vocab(self, with_added_tokens: bool = True) -> dict[str, int]:
        return dict(self.vocab)

    def to_str(self, pretty: bool = False) -> str:
        """Always compact (``pretty`` is tokenizers' argument, ignored): the file must begin with HEADER."""
        obj = {"mediswift_tokenizer": KIND, "version": 1, "special_tokens": self.specials,
               "vocab.json": self.vocab_text, "merges.txt": self.merges_text}
        return json.dumps(obj, ensure_ascii=False)

    def save(self, path: str, pretty: bool = True) -> None:
        Path(path).write_text(self.to_str(), encoding="utf-8")

    # -- export-hf --------------------------------------------------------------------------------

    def files(self) -> dict[str, str]:
        """The files the model ships, as it shipped them: ``vocab.json`` and ``merges.txt``."""
        return {"vocab.json": self.vocab_text, "merges.txt": self.merges_text}

    def __getstate__(self) -> dict:
        return {"text": self.to_str()}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(from_str(state["text"]).__dict__)


def from_str(text: str) -> BioGptTokens:
    obj = json.loads(text)
    if not isinstance(obj, dict) or obj.get("mediswift_tokenizer") != KIND or obj.get("version") != 1:
        raise ValueError("not a BioGPT tokenizer of this version")
    vocab, merges, specials = obj.get("vocab.json"), obj.get("merges.txt"), obj.get("special_tokens")
    if not isinstance(vocab, str) or not isinstance(merges, str) or not isinstance(specials, dict):
        raise ValueError("the BioGPT tokenizer lacks vocab.json, merges.txt or its special tokens")
    return BioGptTokens(vocab, merges, {k: v for k, v in specials.items() if isinstance(v, str)})


def from_file(path: str | os.PathLike) -> BioGptTokens:
    return from_str(Path(path).read_text(encoding="utf-8"))
