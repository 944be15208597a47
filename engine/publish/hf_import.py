"""``mediswift import-hf DIR``: a local Hugging Face model folder of a supported family (gpt2, llama, qwen2, biogpt)
as a run of stage ``import``, usable as a parent everywhere (sparse continued pre-training, dense fine-tuning, soft prompting).

What is read, and nothing else: ``config.json`` (JSON), the weights as ``model.safetensors`` (or
sharded ``model-*.safetensors`` with their index) or ``pytorch_model.bin`` loaded with
``weights_only=True`` (tensors only, no code), and ``tokenizer.json`` (or GPT-2's ``vocab.json`` +
``merges.txt``, or BioGPT's, which are Moses + BPE: engine.data.biogpt_tokenizer). A tokenizer without
``<|endoftext|>`` ends documents with the model's own eos token (engine.data.role_tokenizer), which
``tokenizer_config.json`` names, else ``config.json`` or ``generation_config.json``. All of it is
checked before a tensor is read (engine.publish.hf_folder_check): a hostile folder is one line and
exit 2, and leaves no run row or folder behind. The weights are mapped back from GPT-2's layout
(Conv1D, fused q/k/v) to ours, the inverse of engine.publish.hf_export, so export-hf -> import-hf
gives the same function; the llama family's and BioGPT's are renamed only (engine.publish.hf_llama,
engine.publish.hf_biogpt).
"""
from __future__ import annotations

import contextlib
import shutil
from pathlib import Path

import torch

from engine.core.errors import InputError
from engine.core.registry import IMPORT
from engine.data.vocab import TOKENIZER_FILE, save_tokenizer
from engine.model.checkpoint import FORMAT, checkpoint_name, file_sha256, save_checkpoint
from engine.model.gpt import GPT
from engine.publish import hf_biogpt, hf_llama
from engine.publish.hf_folder_check import SUPPORTED, CheckedFolder, check_folder, is_buffer, show_path
from engine.store.rundb import TOKENIZER_ARTIFACT, RunDB

__all__ = ["SUPPORTED", "check_folder", "import_hf", "our_state_dict", "read_weights"]


def read_weights(checked: CheckedFolder) -> dict[str, torch.Tensor]:
    """The tensors of a checked folder: its safetensors files, or the .bin it mapped (tensors only)."""
    from safetensors.torch import load_file

    if checked.bin_state is not None:
        return checked.bin_state
    out: dict[str, torch.Tensor] = {}
    for f in checked.weight_files:
        try:
            out.update(load_file(str(f)))
        except Exception as e:  # noqa: BLE001 - the header held; the data could not be read (changed, I/O error)
            raise InputError(f"{show_path(f)}: the weights cannot be read ({type(e).__name__}: {str(e).strip()[:160]})",
                             key="dir", path=str(f)) from None
    return out


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


def import_hf(db: RunDB, folder: str | Path, runs_dir: Path, name: str | None = None, warn=print,
              available: int | None = None) -> dict:
    """Register ``folder`` as a run of stage ``import``; returns a report (run id, shape, files).
    Everything is checked first (engine.publish.hf_folder_check.check_folder, ``available`` bytes of
    memory, default: this machine's); a folder that fails leaves no run row and no run folder."""
    checked = check_folder(folder, name, available)
    folder, hf_cfg, cfg = checked.folder, checked.hf_config, checked.config
    n_layer, d, n_head, positions = checked.n_layer, checked.n_embd, checked.n_head, checked.n_positions
    tok, vocab, rows, notes = checked.tokenizer, checked.vocab, checked.rows, list(checked.notes)
    hf = read_weights(checked)
    for raw, t in hf.items():
        key = raw.removeprefix("transformer.")
        if key in checked.tensor_file and not is_buffer(key) and not bool(torch.isfinite(t).all()):
            where = checked.tensor_file[key]
            raise InputError(f"{show_path(where)}: the tensor {raw} holds NaN or infinite values", key="dir", path=str(where))
    m = cfg.model
    if m.family == "gpt2":
        state = our_state_dict(hf, n_layer)
    elif m.family == hf_biogpt.MODEL_TYPE:
        state = hf_biogpt.to_ours(hf, n_layer, m.tie_embeddings)
    else:
        state = hf_llama.to_ours(hf, n_layer, m.family, m.tie_embeddings)
    del hf
    if vocab > rows:  # the <|pad|> row the tokenizer gained: zeros (an untied head's too, so its logit is 0)
        for key in ("wte.weight", "lm_head.weight"):
            if key in state:
                state[key] = torch.cat([state[key], state[key].new_zeros(vocab - rows, d)])
    act = checked.activation
    model = GPT(cfg.model, vocab)
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not (m.tie_embeddings and k.endswith("lm_head.weight"))]
    if missing or unexpected:
        raise InputError(f"the weights do not fit a {n_layer}-layer {m.family} of width {d}: missing {missing[:3]}, "
                         f"unexpected {unexpected[:3]}", key="dir", path=str(folder))
    del state
    run_id = db.create_run(name=cfg.name, stage=IMPORT, config=cfg.to_dict())
    run_dir = Path(runs_dir).expanduser().resolve() / run_id
    try:
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
                      params={"total": params, "nonzero": params,
                              "sparse_numel": sum(m.weight.numel() for m in model.sparse_layers().values())})
        db.update_run(run_id, summary={"step": 0, "params": params, "vocab_size": vocab})
        db.set_status(run_id, "completed")
    except BaseException:
        # nothing half-made stays: no run row, no run folder
        with contextlib.suppress(Exception):
            db.delete_run(run_id)
        shutil.rmtree(run_dir, ignore_errors=True)
        raise
    for n in notes:
        warn(n)
    return {"run_id": run_id, "name": cfg.name, "from": str(folder), "family": m.family, "n_layer": n_layer, "d_model": d, "n_head": n_head,
            "n_positions": positions, "vocab_size": vocab, "params": params, "activation": act,
            "checkpoint": str(path), "notes": notes}
