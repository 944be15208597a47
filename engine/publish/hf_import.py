"""``mediswift import-hf DIR``: a local Hugging Face GPT-2-architecture model folder as a run of stage
``import``, usable as a parent everywhere (sparse continued pre-training, dense fine-tuning, soft prompting).

What is read, and nothing else: ``config.json`` (JSON), the weights as ``model.safetensors`` (or
sharded ``model-*.safetensors`` with their index) or ``pytorch_model.bin`` loaded with
``weights_only=True`` (tensors only, no code), and ``tokenizer.json`` (or GPT-2's ``vocab.json`` +
``merges.txt``). The weights are mapped back from GPT-2's layout (Conv1D, fused q/k/v) to ours, the
inverse of engine.publish.hf_export, so export-hf -> import-hf gives the same function.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from engine.core.config import from_dict
from engine.core.registry import IMPORT, PRETRAIN
from engine.core.errors import InputError
from engine.store.rundb import TOKENIZER_ARTIFACT, RunDB
from engine.data.vocab import EOT, PAD, TOKENIZER_FILE, save_tokenizer
from engine.model.checkpoint import FORMAT, checkpoint_name, file_sha256, save_checkpoint
from engine.model.gpt import GPT

SUPPORTED = "GPT-2-architecture models (config.json model_type 'gpt2', GPT2LMHeadModel)"


def read_config(folder: Path) -> dict:
    f = folder / "config.json"
    if not folder.is_dir():
        raise InputError(f"{folder} is not a folder", key="dir", path=str(folder))
    if not f.is_file():
        raise InputError(f"{folder} has no config.json: import-hf reads {SUPPORTED}", key="dir", path=str(f))
    try:
        cfg = json.loads(f.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise InputError(f"{f} is not valid JSON ({e})", key="dir", path=str(f)) from None
    arch = cfg.get("model_type")
    if arch != "gpt2":
        names = ", ".join(cfg.get("architectures") or []) or "unknown"
        raise InputError(f"unsupported architecture: {folder} holds a {arch or '?'} model ({names}); import-hf reads "
                         f"{SUPPORTED}", key="dir", path=str(f))
    for key, want in (("scale_attn_by_inverse_layer_idx", False), ("reorder_and_upcast_attn", False),
                      ("add_cross_attention", False)):
        if bool(cfg.get(key, want)) != want:
            raise InputError(f"unsupported GPT-2 variant: config.json sets {key} = {cfg.get(key)}", key="dir", path=str(f))
    if cfg.get("tie_word_embeddings", True) is False:
        raise InputError("unsupported GPT-2 variant: the LM head is not tied to the token embedding", key="dir", path=str(f))
    inner = cfg.get("n_inner")
    if inner not in (None, 4 * cfg["n_embd"]):
        raise InputError(f"unsupported GPT-2 variant: n_inner {inner} (ours is 4 x n_embd)", key="dir", path=str(f))
    act = cfg.get("activation_function", "gelu_new")
    if act not in ("gelu", "gelu_new", "gelu_pytorch_tanh"):
        raise InputError(f"unsupported activation_function {act!r} (gelu, gelu_new)", key="dir", path=str(f))
    if abs(float(cfg.get("layer_norm_epsilon", 1e-5)) - 1e-5) > 1e-12:
        raise InputError(f"unsupported layer_norm_epsilon {cfg.get('layer_norm_epsilon')} (ours is 1e-5)", key="dir")
    return cfg


def read_weights(folder: Path) -> dict[str, torch.Tensor]:
    """Tensors only: safetensors, or a .bin through ``torch.load(weights_only=True)``."""
    from safetensors.torch import load_file

    single = folder / "model.safetensors"
    if single.is_file():
        return load_file(str(single))
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        out: dict[str, torch.Tensor] = {}
        for name in files:
            if not (folder / name).is_file():
                raise InputError(f"{folder} lacks the weight shard {name} named in its index", key="dir", path=str(folder / name))
            out.update(load_file(str(folder / name)))
        return out
    binf = folder / "pytorch_model.bin"
    if binf.is_file():
        try:
            state = torch.load(binf, map_location="cpu", weights_only=True)  # data only: no code from a file
        except Exception as e:  # noqa: BLE001 - a pickle that is not plain tensors is refused, whatever it holds
            raise InputError(f"{binf} cannot be read as plain tensors (weights_only=True refused it: "
                             f"{type(e).__name__}); convert it to safetensors", key="dir", path=str(binf)) from None
        return state
    raise InputError(f"{folder} has no weights: model.safetensors, model.safetensors.index.json or pytorch_model.bin",
                     key="dir", path=str(folder))


def read_tokenizer(folder: Path):
    from tokenizers import Tokenizer

    f = folder / TOKENIZER_FILE
    if f.is_file():
        return Tokenizer.from_file(str(f))
    vocab, merges = folder / "vocab.json", folder / "merges.txt"
    if vocab.is_file() and merges.is_file():
        from tokenizers import decoders, models, pre_tokenizers

        tok = Tokenizer(models.BPE.from_file(str(vocab), str(merges)))
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        return tok
    raise InputError(f"{folder} has no tokenizer: tokenizer.json, or vocab.json with merges.txt", key="dir",
                     path=str(folder))


def our_state_dict(hf: dict[str, torch.Tensor], n_layer: int) -> dict[str, torch.Tensor]:
    """GPT-2's names and layout -> ours (the inverse of hf_export.gpt2_state_dict)."""
    src = {(k[len("transformer."):] if k.startswith("transformer.") else k): v.float() for k, v in hf.items()}

    def take(key: str) -> torch.Tensor:
        if key not in src:
            raise InputError(f"the weights lack {key}", key="dir")
        return src[key]

    out = {"wte.weight": take("wte.weight"), "wpe.weight": take("wpe.weight"), "ln_f.weight": take("ln_f.weight"),
           "ln_f.bias": take("ln_f.bias")}
    for i in range(n_layer):
        h, b = f"h.{i}.", f"blocks.{i}."
        out[b + "ln1.weight"], out[b + "ln1.bias"] = take(h + "ln_1.weight"), take(h + "ln_1.bias")
        out[b + "ln2.weight"], out[b + "ln2.bias"] = take(h + "ln_2.weight"), take(h + "ln_2.bias")
        q, k, v = take(h + "attn.c_attn.weight").t().chunk(3, dim=0)  # Conv1D [d, 3d] -> three [d, d] (out, in)
        qb, kb, vb = take(h + "attn.c_attn.bias").chunk(3)
        for name, w, bias in (("q", q, qb), ("k", k, kb), ("v", v, vb)):
            out[f"{b}attn.{name}.weight"], out[f"{b}attn.{name}.bias"] = w.contiguous(), bias.contiguous()
        out[b + "attn.out.weight"] = take(h + "attn.c_proj.weight").t().contiguous()
        out[b + "attn.out.bias"] = take(h + "attn.c_proj.bias")
        out[b + "mlp.fc.weight"] = take(h + "mlp.c_fc.weight").t().contiguous()
        out[b + "mlp.fc.bias"] = take(h + "mlp.c_fc.bias")
        out[b + "mlp.proj.weight"] = take(h + "mlp.c_proj.weight").t().contiguous()
        out[b + "mlp.proj.bias"] = take(h + "mlp.c_proj.bias")
    return out


def import_hf(db: RunDB, folder: str | Path, runs_dir: Path, name: str | None = None, warn=print) -> dict:
    """Register ``folder`` as a run of stage ``import``; returns a report (run id, shape, files)."""
    folder = Path(folder).expanduser().resolve()
    hf_cfg = read_config(folder)
    tensors = read_weights(folder)
    tok = read_tokenizer(folder)
    n_layer, d, n_head = int(hf_cfg["n_layer"]), int(hf_cfg["n_embd"]), int(hf_cfg["n_head"])
    state = our_state_dict(tensors, n_layer)
    rows = state["wte.weight"].shape[0]
    notes = []
    if tok.token_to_id(EOT) is None:
        raise InputError(f"the tokenizer lacks {EOT}, which every document ends with here", key="dir", path=str(folder))
    if tok.token_to_id(PAD) is None:
        # our batches pad with <|pad|>; a new row of zeros gives it logit 0 (it is never a target)
        tok.add_special_tokens([PAD])
        notes.append(f"added {PAD} to the tokenizer (id {tok.token_to_id(PAD)}) with a zero embedding row")
    vocab = tok.get_vocab_size()
    if vocab < rows:
        raise InputError(f"the tokenizer has {vocab} tokens but the embedding {rows} rows", key="dir", path=str(folder))
    if vocab > rows:
        if vocab - rows > 1 or not notes:
            raise InputError(f"the tokenizer has {vocab} tokens but the embedding only {rows} rows", key="dir",
                             path=str(folder))
        state["wte.weight"] = torch.cat([state["wte.weight"], state["wte.weight"].new_zeros(vocab - rows, d)])
    positions = int(hf_cfg.get("n_positions", 1024))
    act = "gelu" if hf_cfg.get("activation_function", "gelu_new") == "gelu" else "gelu_tanh"
    cfg = from_dict({"name": name or folder.name, "stage": PRETRAIN,
                     "model": {"n_layer": n_layer, "n_head": n_head, "d_model": d, "n_ctx": min(positions, 1024),
                               "n_positions": positions, "dropout": 0.0, "bias": True, "activation": act},
                     "tokenizer": {"vocab_size": vocab}, "sparsity": {"level": 0.0}})
    model = GPT(cfg.model, vocab)
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.endswith("lm_head.weight")]
    if missing or unexpected:
        raise InputError(f"the weights do not fit a {n_layer}-layer GPT-2 of width {d}: missing {missing[:3]}, "
                         f"unexpected {unexpected[:3]}", key="dir", path=str(folder))
    run_id = db.create_run(name=cfg.name, stage=IMPORT, config=cfg.to_dict())
    run_dir = Path(runs_dir).expanduser().resolve() / run_id
    db.update_run(run_id, run_dir=str(run_dir))
    tok_path = save_tokenizer(tok, run_dir)
    db.add_artifact(run_id, TOKENIZER_ARTIFACT, str(tok_path), {"vocab_size": vocab, "from": str(folder)})
    path = run_dir / "checkpoints" / checkpoint_name(0)
    ck = {"format": FORMAT, "stage": IMPORT, "config": cfg.to_dict(), "vocab_size": vocab,
          "tokenizer": TOKENIZER_FILE, "model": model.state_dict(), "masks": {}, "kernels": {}, "step": 0,
          "tokens": 0, "flops": 0.0, "flops_dense": 0.0, "wall_time": 0.0}
    nbytes = save_checkpoint(ck, path)
    db.add_checkpoint(run_id, 0, 0, str(path), nbytes, True, file_sha256(path))
    params = model.num_params()
    db.merge_meta(run_id, imported_from=str(folder), hf_config=hf_cfg, vocab_size=vocab, notes=notes,
                  params={"total": params, "sparse_numel": sum(m.weight.numel() for m in model.sparse_layers().values()),
                          "nonzero": params})
    db.update_run(run_id, summary={"step": 0, "params": params, "vocab_size": vocab})
    db.set_status(run_id, "completed")
    for n in notes:
        warn(n)
    return {"run_id": run_id, "name": cfg.name, "from": str(folder), "n_layer": n_layer, "d_model": d, "n_head": n_head,
            "n_positions": positions, "vocab_size": vocab, "params": params, "activation": act,
            "checkpoint": str(path), "notes": notes}
