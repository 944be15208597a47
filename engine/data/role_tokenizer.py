"""An imported model's own tokenizer whose end-of-text token is not ``<|endoftext|>`` (Llama 2's and
TinyLlama's ``</s>``, Llama 3's ``<|end_of_text|>``): the ``tokenizers.Tokenizer`` the model ships,
unchanged, so the ids stay transformers', with the engine's EOT role (engine.data.vocab) played by the
model's own eos token, as engine.data.biogpt_tokenizer does for BioGPT.

A run keeps it, as every run keeps its tokenizer, in one ``tokenizer.json``: a JSON object whose first
key is ``mediswift_tokenizer`` (engine.data.vocab.load_tokenizer routes on it), holding the model's
special tokens (``eos_token`` ends every document) and its tokenizer as ``tokenizers`` writes it. The
roles cannot ride inside a plain tokenizer.json: ``tokenizers`` refuses a file with a key it does not
know. export-hf writes the inner tokenizer back, with the special tokens in tokenizer_config.json.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

from tokenizers import Tokenizer

from engine.data.special_tokens import EOT

KIND = "roles"
HEADER = '{"mediswift_tokenizer": "roles"'  # how a run's tokenizer.json of this kind begins
SPECIAL_KEYS = ("bos_token", "eos_token", "unk_token")


class RoleTokens:
    """``token_to_id(EOT)`` answers the model's eos id (so does ``special_ids``); every other call is the
    wrapped ``tokenizers.Tokenizer``'s own (encode, decode, get_vocab_size, add_special_tokens, ...)."""

    def __init__(self, tok: Tokenizer, specials: dict[str, str]):
        """``specials``: the model's bos/eos/unk tokens, eos required; raises ValueError if the tokenizer lacks one."""
        self.specials = {k: specials[k] for k in SPECIAL_KEYS if specials.get(k)}
        absent = [t for t in self.specials.values() if tok.token_to_id(t) is None]
        if "eos_token" not in self.specials or absent:
            raise ValueError(f"the tokenizer lacks its special token {absent[0] if absent else 'eos_token'!r}")
        self.tok = tok
        self.roles = {EOT: self.specials["eos_token"]}

    def token_to_id(self, token: str) -> int | None:
        return self.tok.token_to_id(self.roles.get(token, token))

    def __getattr__(self, name: str):
        if name == "tok":  # not set yet (pickle looks for __setstate__ first): no endless lookup
            raise AttributeError(name)
        return getattr(self.tok, name)

    def to_str(self, pretty: bool = False) -> str:
        """Always compact (``pretty`` is tokenizers' argument, ignored): the file must begin with HEADER."""
        obj = {"mediswift_tokenizer": KIND, "version": 1, "special_tokens": self.specials,
               "tokenizer": json.loads(self.tok.to_str())}
        return json.dumps(obj, ensure_ascii=False)

    def save(self, path: str, pretty: bool = True) -> None:
        Path(path).write_text(self.to_str(), encoding="utf-8")

    def shipped(self) -> str:
        """The model's tokenizer.json (with ``<|pad|>`` where the import added it), for export-hf."""
        return self.tok.to_str()


def from_str(text: str) -> RoleTokens:
    obj = json.loads(text)
    if not isinstance(obj, dict) or obj.get("mediswift_tokenizer") != KIND or obj.get("version") != 1:
        raise ValueError("not a tokenizer with an end-of-text token of its own, of this version")
    inner, specials = obj.get("tokenizer"), obj.get("special_tokens")
    if not isinstance(inner, dict) or not isinstance(specials, dict):
        raise ValueError("the tokenizer lacks its tokenizer or its special tokens")
    return RoleTokens(Tokenizer.from_str(json.dumps(inner, ensure_ascii=False)),
                      {k: v for k, v in specials.items() if isinstance(v, str)})


def from_file(path: str | os.PathLike) -> RoleTokens:
    return from_str(Path(path).read_text(encoding="utf-8"))
