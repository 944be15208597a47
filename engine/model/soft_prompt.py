"""Soft prompts (Lester et al. 2021): N learned vectors in front of the input of a frozen model.

The vectors live in the model's embedding space; they are initialised from the embeddings of
sampled vocabulary tokens or of a text, trained alone (the model gets no gradient step), and saved
alone as ``prompt.safetensors`` (a few KB) with a reference to the parent model.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from engine.core.config import PromptConfig
from engine.data.vocab import SPECIAL_TOKENS

PROMPT_FILE = "prompt.safetensors"
TENSOR = "prompt"  # the prompt vectors' name in that file and in a prompt run's checkpoint


class SoftPrompt(nn.Module):
    def __init__(self, n_tokens: int, d_model: int):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(n_tokens, d_model))

    def forward(self, batch_size: int) -> torch.Tensor:
        return self.weight.unsqueeze(0).expand(batch_size, -1, -1)  # [B, P, C]


def init_ids(tok, pc: PromptConfig, seed: int) -> list[int]:
    """Token ids whose embeddings start the prompt: sampled without replacement, or the tokens of init_text."""
    n = pc.n_tokens
    if pc.init == "text":
        ids = tok.encode(pc.init_text, add_special_tokens=False).ids if pc.init_text.strip() else []
        if not ids:
            raise ValueError("prompt.init is 'text' but prompt.init_text is empty")
        return [ids[i % len(ids)] for i in range(n)]  # repeat a short text, cut a long one
    specials = {tok.token_to_id(t) for t in SPECIAL_TOKENS}
    V = tok.get_vocab_size()
    # learned merges (ids past the 256 byte symbols) look like words; fall back to all ids for tiny vocabularies
    pool = [i for i in range(V) if i not in specials and i >= 258] or [i for i in range(V) if i not in specials]
    g = torch.Generator().manual_seed(seed + 104729)
    pick = torch.randperm(len(pool), generator=g)
    return [pool[int(pick[i % len(pool)])] for i in range(n)]


@torch.no_grad()
def nearest_tokens(vectors: torch.Tensor, wte: torch.Tensor, tok, k: int = 5) -> list[list[dict]]:
    """For each prompt vector, the k vocabulary tokens of highest cosine similarity."""
    sim = F.normalize(vectors.float(), dim=-1) @ F.normalize(wte.float(), dim=-1).T  # [P, V]
    top = sim.topk(min(k, sim.shape[1]), dim=-1)
    return [[{"id": int(i), "token": tok.decode([int(i)]), "piece": tok.id_to_token(int(i)), "cos": round(float(s), 4)}
             for s, i in zip(top.values[p], top.indices[p])] for p in range(vectors.shape[0])]


def save_prompt(path: Path, vectors: torch.Tensor, meta: dict) -> int:
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")  # per process
    save_file({TENSOR: vectors.detach().float().cpu().contiguous()}, str(tmp),
              metadata={k: json.dumps(v) for k, v in meta.items()})
    tmp.replace(path)
    return path.stat().st_size


def load_prompt(path: str | Path) -> tuple[torch.Tensor, dict]:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        meta = {k: json.loads(v) for k, v in (f.metadata() or {}).items()}
        return f.get_tensor(TENSOR), meta
