"""The biogpt family in transformers' terms (``BioGptForCausalLM``): which config.json fields import-hf
reads and checks, the tensors a folder must hold, and the name mapping both ways.

BioGPT's projections are nn.Linear ([out, in], unfused) like ours, so the mapping is names only:
``biogpt.layers.N.self_attn.q_proj`` <-> ``blocks.N.attn.q``, ``fc1`` / ``fc2`` <-> ``mlp.fc`` / ``mlp.proj``,
``self_attn_layer_norm`` / ``final_layer_norm`` <-> ``ln1`` / ``ln2``. The position table keeps its two
leading rows (``max_position_embeddings + 2``, engine.model.family), so it too is copied as is.
transformers builds BioGPT's LayerNorms with torch's default eps (1e-5) whatever ``layer_norm_eps`` says,
so that field is not read: our norm_eps stays 1e-5, the value the model computes with.
"""
from __future__ import annotations

from pathlib import Path

import torch

from engine.model.family import BIOGPT_POSITION_OFFSET

MODEL_TYPE = "biogpt"
ARCHITECTURE = "BioGptForCausalLM"
EMBED = "biogpt.embed_tokens.weight"
HEAD = "output_projection.weight"      # the LM head (no bias), tied to EMBED unless tie_word_embeddings is false
DEFAULT_POSITIONS = 1024               # BioGptConfig's max_position_embeddings where a folder omits it
# transformers' hidden_act -> our model.activation (gelu_new and gelu_pytorch_tanh are both the tanh form)
ACTIVATIONS = {"gelu": "gelu", "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh"}
# our names -> theirs, per block
_BLOCK = {"ln1": "self_attn_layer_norm", "attn.q": "self_attn.q_proj", "attn.k": "self_attn.k_proj",
          "attn.v": "self_attn.v_proj", "attn.out": "self_attn.out_proj", "ln2": "final_layer_norm",
          "mlp.fc": "fc1", "mlp.proj": "fc2"}


def _short(v) -> str:
    s = ascii(v)
    return s if len(s) <= 60 else s[:57] + "..."


def model_fields(hf: dict, f: Path, fail, read_int) -> dict:
    """Our model.* keys from a biogpt config.json (already a JSON object); ``fail(path, problem)`` makes
    the one-line error, ``read_int(cfg, key, bounds, path, default)`` checks an integer."""
    n_layer = read_int(hf, "num_hidden_layers", (1, 256), f)
    d = read_int(hf, "hidden_size", (8, 65536), f)
    n_head = read_int(hf, "num_attention_heads", (1, 256), f)
    ff = read_int(hf, "intermediate_size", (1, 1 << 20), f)
    positions = read_int(hf, "max_position_embeddings", (8, 65536), f, DEFAULT_POSITIONS)
    if d % n_head:
        raise fail(f, f"hidden_size ({d}) must be divisible by num_attention_heads ({n_head})")
    act = hf.get("hidden_act", "gelu")
    if not isinstance(act, str) or act not in ACTIVATIONS:
        raise fail(f, f"unsupported biogpt variant: hidden_act {_short(act)} (gelu, gelu_new or gelu_pytorch_tanh)")
    flags = {}
    for key in ("scale_embedding", "tie_word_embeddings"):  # both default to true in BioGptConfig
        v = hf.get(key, True)
        if not isinstance(v, bool):
            raise fail(f, f"{key} must be true or false, got {_short(v)}")
        flags[key] = v
    if hf.get("add_cross_attention") not in (None, False):
        raise fail(f, "unsupported biogpt variant: add_cross_attention is set")
    return {"family": MODEL_TYPE, "n_layer": n_layer, "n_head": n_head, "d_model": d, "d_ff": ff,
            "n_positions": positions, "n_ctx": min(positions, 1024), "activation": ACTIVATIONS[act],
            "scale_embedding": flags["scale_embedding"], "tie_embeddings": flags["tie_word_embeddings"],
            "dropout": 0.0, "bias": True}


def expected_shapes(m: dict) -> dict[str, tuple]:
    """transformers' tensor names and shapes for our model fields ``m``; the embedding's rows (None) come
    from the file. An untied head is required; a tied one may be stored or not."""
    d, ff = m["d_model"], m["d_ff"]
    out: dict[str, tuple] = {EMBED: (None, d),
                             "biogpt.embed_positions.weight": (m["n_positions"] + BIOGPT_POSITION_OFFSET, d),
                             "biogpt.layer_norm.weight": (d,), "biogpt.layer_norm.bias": (d,)}
    if not m["tie_embeddings"]:
        out[HEAD] = (None, d)
    widths = {"mlp.fc": (ff, d), "mlp.proj": (d, ff)}
    for i in range(m["n_layer"]):
        for ours, theirs in _BLOCK.items():
            p = f"biogpt.layers.{i}.{theirs}."
            w = widths.get(ours, (d,) if ours.startswith("ln") else (d, d))
            out[p + "weight"], out[p + "bias"] = w, (w[0],)
    return out


def _pairs(n_layer: int):
    """(ours, theirs) for every tensor but the head."""
    yield "wte.weight", EMBED
    yield "wpe.weight", "biogpt.embed_positions.weight"
    yield "ln_f.weight", "biogpt.layer_norm.weight"
    yield "ln_f.bias", "biogpt.layer_norm.bias"
    for i in range(n_layer):
        for ours, theirs in _BLOCK.items():
            for kind in ("weight", "bias"):
                yield f"blocks.{i}.{ours}.{kind}", f"biogpt.layers.{i}.{theirs}.{kind}"


def our_names(n_layer: int, tied: bool) -> set[str]:
    """Every tensor of ours that the mapping places."""
    return {ours for ours, _ in _pairs(n_layer)} | (set() if tied else {"lm_head.weight"})


def to_ours(hf: dict[str, torch.Tensor], n_layer: int, tied: bool) -> dict[str, torch.Tensor]:
    """transformers' state dict -> ours (fp32); every tensor was checked present."""
    out = {ours: hf[theirs].float() for ours, theirs in _pairs(n_layer)}
    if not tied:
        out["lm_head.weight"] = hf[HEAD].float()
    return out


def to_theirs(state: dict[str, torch.Tensor], n_layer: int, tied: bool) -> dict[str, torch.Tensor]:
    """Our state dict -> transformers' names (the inverse of to_ours); a tied head is not stored, as
    transformers' save_pretrained leaves it out."""
    out = {theirs: state[ours] for ours, theirs in _pairs(n_layer)}
    if not tied:
        out[HEAD] = state["lm_head.weight"]
    return {k: v.detach().to("cpu").contiguous() for k, v in out.items()}


def hf_config(m, vocab_size: int, bos: int, eot: int, pad: int) -> dict:
    """config.json for our ModelConfig ``m`` of the biogpt family."""
    return {"architectures": [ARCHITECTURE], "model_type": MODEL_TYPE, "vocab_size": vocab_size,
            "hidden_size": m.d_model, "num_hidden_layers": m.n_layer, "num_attention_heads": m.n_head,
            "intermediate_size": m.inner,
            # the tanh form exactly as torch computes it (gelu_new is a separate formula, ~1e-7 apart)
            "hidden_act": "gelu_pytorch_tanh" if m.activation == "gelu_tanh" else "gelu",
            "max_position_embeddings": m.max_positions, "scale_embedding": m.scale_embedding,
            "tie_word_embeddings": m.tie_embeddings,
            "layer_norm_eps": m.norm_eps,  # informative: transformers' BioGPT norms use 1e-5, as ours do
            "hidden_dropout_prob": m.dropout, "attention_probs_dropout_prob": m.dropout, "activation_dropout": 0.0,
            "layerdrop": 0.0, "initializer_range": 0.02, "use_cache": True, "bos_token_id": bos,
            "eos_token_id": eot, "pad_token_id": pad, "dtype": "float32", "torch_dtype": "float32"}
