"""The llama family in transformers' terms (``LlamaForCausalLM``, ``Qwen2ForCausalLM``): which config.json
fields import-hf reads and checks, the tensors a folder must hold, and the name mapping both ways.

transformers keeps these models' projections as nn.Linear ([out, in], unfused), so the mapping is names
only: ``model.layers.N.self_attn.q_proj`` <-> ``blocks.N.attn.q``, ``mlp.gate_proj`` <-> ``mlp.gate``.
Rotary scaling of the types ``linear`` and ``llama3`` (Llama 3.x) becomes model.rope_scaling and its numbers.
Variants our model does not have (other rotary scalings such as yarn, partial rotary heads, sliding windows,
biases on the output or the MLP, a head width other than hidden / heads) are refused by name, so an import is
exact or is not made.
"""
from __future__ import annotations

import math
from pathlib import Path

import torch

# model_type -> the transformers class export-hf writes
ARCHITECTURES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM"}
# config.json's default of max_position_embeddings where a folder omits it (transformers' own defaults)
DEFAULT_POSITIONS = {"llama": 2048, "qwen2": 32768}
# transformers' rope_type -> our model.rope_scaling (the ones our rotary positions compute exactly)
ROPE_TYPES = {"default": "none", "linear": "linear", "llama3": "llama3"}
# our names -> theirs, per block
_ATTN = {"q": "q_proj", "k": "k_proj", "v": "v_proj", "out": "o_proj"}
_MLP = {"gate": "gate_proj", "up": "up_proj", "down": "down_proj"}


def _short(v) -> str:
    """A config value for a one-line message."""
    s = ascii(v)
    return s if len(s) <= 60 else s[:57] + "..."


def model_fields(hf: dict, f: Path, fail, read_int) -> dict:
    """Our model.* keys from a llama/qwen2 config.json (already a JSON object); ``fail(path, problem)``
    makes the one-line error, ``read_int(cfg, key, bounds, path, default)`` checks an integer."""
    kind = hf["model_type"]
    n_layer = read_int(hf, "num_hidden_layers", (1, 256), f)
    d = read_int(hf, "hidden_size", (8, 65536), f)
    n_head = read_int(hf, "num_attention_heads", (1, 256), f)
    n_kv = read_int(hf, "num_key_value_heads", (1, 256), f, n_head) if hf.get("num_key_value_heads") is not None \
        else n_head
    ff = read_int(hf, "intermediate_size", (1, 1 << 20), f)
    positions = read_int(hf, "max_position_embeddings", (8, 1 << 20), f, DEFAULT_POSITIONS[kind])  # model.n_positions
    if d % n_head or (d // n_head) % 2:
        raise fail(f, f"hidden_size ({d}) must be num_attention_heads ({n_head}) heads of even width")
    if n_head % n_kv:
        raise fail(f, f"num_attention_heads ({n_head}) must be a multiple of num_key_value_heads ({n_kv})")
    if hf.get("head_dim") not in (None, d // n_head):
        raise fail(f, f"unsupported {kind} variant: head_dim {_short(hf['head_dim'])} (ours is hidden_size / "
                      f"num_attention_heads = {d // n_head})")
    act = hf.get("hidden_act", "silu")
    if act != "silu":
        raise fail(f, f"unsupported {kind} variant: hidden_act {_short(act)} (SwiGLU uses silu)")
    if kind == "llama" and hf.get("sliding_window") is not None:
        raise fail(f, f"unsupported {kind} variant: sliding_window is set (not supported yet)")
    rope = _rope_fields(hf, kind, positions, f, fail, read_int)
    for key in ("attention_bias", "mlp_bias", "use_sliding_window"):
        if hf.get(key) not in (None, False):
            raise fail(f, f"unsupported {kind} variant: {key} = {_short(hf[key])}")
    eps = _positive(hf, "rms_norm_eps", 1e-6, f, fail)
    tie = hf.get("tie_word_embeddings", False)
    if not isinstance(tie, bool):
        raise fail(f, f"tie_word_embeddings must be true or false, got {_short(tie)}")
    return {"family": kind, "n_layer": n_layer, "n_head": n_head, "n_kv_head": n_kv if n_kv != n_head else 0,
            "d_model": d, "d_ff": ff, "n_positions": positions, "n_ctx": min(positions, 1024),
            **rope, "norm_eps": eps, "tie_embeddings": tie, "dropout": 0.0, "bias": False}


def _positive(cfg: dict, key: str, default, f: Path, fail, where: str = "") -> float:
    """A positive finite number ``cfg[key]`` (``default`` where absent); ``where`` names the dict it is in."""
    v = cfg.get(key, default)
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0:
        raise fail(f, f"{where}{key} must be a positive number, got {_short(v)}")
    return float(v)


def _rope_fields(hf: dict, kind: str, positions: int, f: Path, fail, read_int) -> dict:
    """model.rope_* from config.json. transformers 5 writes the rotary settings as rope_parameters (theta
    included), older versions as rope_theta + rope_scaling; where both are given, transformers reads
    rope_scaling (its rope_theta, else the top-level one)."""
    rope, name = hf.get("rope_scaling"), "rope_scaling"
    if rope is None or rope == {}:  # transformers passes over an empty one too
        rope, name = hf.get("rope_parameters"), "rope_parameters"
    rope = {} if rope is None else rope
    if not isinstance(rope, dict):
        raise fail(f, f"{name} must be an object, got {_short(rope)}")
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if not isinstance(rope_type, str) or rope_type not in ROPE_TYPES:
        raise fail(f, f"unsupported {kind} variant: {name} of type {_short(rope_type)} (supported: "
                      f"{', '.join(map(repr, ROPE_TYPES))})")
    for where, d in ((f"{name}.", rope), ("", hf)):
        if d.get("partial_rotary_factor") not in (None, 1, 1.0):
            raise fail(f, f"unsupported {kind} variant: {where}partial_rotary_factor = "
                          f"{_short(d['partial_rotary_factor'])} (every feature of a head is rotated here)")
    theta = _positive(rope, "rope_theta", hf.get("rope_theta", 10000.0), f, fail,
                      f"{name}." if "rope_theta" in rope else "")
    out = {"rope_theta": theta, "rope_scaling": ROPE_TYPES[rope_type]}
    if rope_type == "default":
        return out
    where = f"{name}."
    if "factor" not in rope:
        raise fail(f, f"{name} of type {rope_type!r} lacks factor")
    out["rope_factor"] = _positive(rope, "factor", None, f, fail, where)
    if rope_type == "llama3":
        for key in ("low_freq_factor", "high_freq_factor"):
            if key not in rope:
                raise fail(f, f"{name} of type 'llama3' lacks {key}")
            out[f"rope_{key}"] = _positive(rope, key, None, f, fail, where)
        if out["rope_high_freq_factor"] <= out["rope_low_freq_factor"]:
            raise fail(f, f"{where}high_freq_factor ({out['rope_high_freq_factor']:g}) must exceed low_freq_factor "
                          f"({out['rope_low_freq_factor']:g})")
        # the pre-training context: the dict's, else the model's (transformers' default)
        key = "original_max_position_embeddings"
        original = read_int(rope, key, (1, 1 << 20), f, positions)
        if hf.get(key, original) != original:  # transformers' versions differ on which one wins
            raise fail(f, f"{key} ({_short(hf[key])}) contradicts {where}{key} ({original})")
        out["rope_original_max_positions"] = original
    return out


def expected_shapes(m: dict) -> dict[str, tuple]:
    """transformers' tensor names and shapes for our model fields ``m``; the embedding's rows (None) come
    from the file. An untied head is required; a tied one may be stored or not."""
    d, ff, layers = m["d_model"], m["d_ff"], m["n_layer"]
    kv = (m["n_kv_head"] or m["n_head"]) * (d // m["n_head"])
    out: dict[str, tuple] = {"model.embed_tokens.weight": (None, d), "model.norm.weight": (d,)}
    if not m["tie_embeddings"]:
        out["lm_head.weight"] = (None, d)
    for i in range(layers):
        p = f"model.layers.{i}."
        out.update({p + "input_layernorm.weight": (d,), p + "post_attention_layernorm.weight": (d,),
                    p + "self_attn.q_proj.weight": (d, d), p + "self_attn.k_proj.weight": (kv, d),
                    p + "self_attn.v_proj.weight": (kv, d), p + "self_attn.o_proj.weight": (d, d),
                    p + "mlp.gate_proj.weight": (ff, d), p + "mlp.up_proj.weight": (ff, d),
                    p + "mlp.down_proj.weight": (d, ff)})
        if m["family"] == "qwen2":
            out.update({p + "self_attn.q_proj.bias": (d,), p + "self_attn.k_proj.bias": (kv,),
                        p + "self_attn.v_proj.bias": (kv,)})
    return out


def _pairs(n_layer: int, qkv_bias: bool):
    """(ours, theirs) for every tensor but the embedding and the head."""
    yield "ln_f.weight", "model.norm.weight"
    for i in range(n_layer):
        b, p = f"blocks.{i}.", f"model.layers.{i}."
        yield b + "ln1.weight", p + "input_layernorm.weight"
        yield b + "ln2.weight", p + "post_attention_layernorm.weight"
        for ours, theirs in _ATTN.items():
            yield f"{b}attn.{ours}.weight", f"{p}self_attn.{theirs}.weight"
            if qkv_bias and ours != "out":
                yield f"{b}attn.{ours}.bias", f"{p}self_attn.{theirs}.bias"
        for ours, theirs in _MLP.items():
            yield f"{b}mlp.{ours}.weight", f"{p}mlp.{theirs}.weight"


def our_names(n_layer: int, family: str, tied: bool) -> set[str]:
    """Every tensor of ours that the mapping places."""
    return {ours for ours, _ in _pairs(n_layer, family == "qwen2")} | {"wte.weight"} | (set() if tied else {"lm_head.weight"})


def to_ours(hf: dict[str, torch.Tensor], n_layer: int, family: str, tied: bool) -> dict[str, torch.Tensor]:
    """transformers' state dict -> ours (fp32); every tensor was checked present."""
    out = {ours: hf[theirs].float() for ours, theirs in _pairs(n_layer, family == "qwen2")}
    out["wte.weight"] = hf["model.embed_tokens.weight"].float()
    if not tied:
        out["lm_head.weight"] = hf["lm_head.weight"].float()
    return out


def to_theirs(state: dict[str, torch.Tensor], n_layer: int, family: str, tied: bool) -> dict[str, torch.Tensor]:
    """Our state dict -> transformers' names (the inverse of to_ours)."""
    out = {theirs: state[ours] for ours, theirs in _pairs(n_layer, family == "qwen2")}
    out["model.embed_tokens.weight"] = state["wte.weight"]
    if not tied:
        out["lm_head.weight"] = state["lm_head.weight"]
    return {k: v.detach().to("cpu").contiguous() for k, v in out.items()}


def hf_config(m, vocab_size: int, bos: int, eot: int, pad: int) -> dict:
    """config.json for our ModelConfig ``m`` of the llama family."""
    scaling = rope_scaling(m)
    cfg = {"architectures": [ARCHITECTURES[m.family]], "model_type": m.family, "vocab_size": vocab_size,
           "hidden_size": m.d_model, "intermediate_size": m.inner, "num_hidden_layers": m.n_layer,
           "num_attention_heads": m.n_head, "num_key_value_heads": m.kv_heads, "hidden_act": "silu",
           "max_position_embeddings": m.max_positions, "rms_norm_eps": m.norm_eps, "rope_theta": m.rope_theta,
           "rope_parameters": {"rope_type": "default", "rope_theta": m.rope_theta, **(scaling or {})},
           "tie_word_embeddings": m.tie_embeddings, "attention_dropout": m.dropout,
           "initializer_range": 0.02, "use_cache": True, "bos_token_id": bos, "eos_token_id": eot,
           "pad_token_id": pad, "torch_dtype": "float32"}
    if scaling:  # transformers before 5 reads rope_scaling (with rope_theta beside it); 5 reads either
        cfg["rope_scaling"] = scaling
    if m.family == "llama":
        cfg.update({"attention_bias": False, "mlp_bias": False})
    else:
        cfg.update({"use_sliding_window": False, "sliding_window": None})
    return cfg


def rope_scaling(m) -> dict | None:
    """transformers' rope_scaling for our ModelConfig ``m`` (rope_type and its numbers); None without scaling."""
    if m.rope_scaling == "none":
        return None
    out = {"rope_type": m.rope_scaling, "factor": m.rope_factor}
    if m.rope_scaling == "llama3":
        out.update({"low_freq_factor": m.rope_low_freq_factor, "high_freq_factor": m.rope_high_freq_factor,
                    "original_max_position_embeddings": m.rope_original_max_positions or m.max_positions})
    return out
