"""Report a checkpoint from its tensors: measured sparsity per layer, parameters, FLOPs per token, and
the matmul path (kernel) each sparse layer trained with, and the precision it trained in."""
from __future__ import annotations

import re

import torch

from engine.core.config import from_dict
from engine.model.checkpoint import load_checkpoint
from engine.model.flops import FlopModel
from engine.model.runs import model_source, resolve_run

# attention q/k/v/out and MLP fc/proj (SwiGLU: gate/up/down) weights: the sparse-eligible matrices
SPARSE_WEIGHT = re.compile(r"^blocks\.\d+\.(attn\.(q|k|v|out)|mlp\.(fc|proj|gate|up|down))\.weight$")


def inspect_state(model_state: dict[str, torch.Tensor], n_layer: int, d_model: int, n_ctx: int, vocab_size: int) -> dict:
    layers: dict[str, float] = {}
    sparse_numel = sparse_nnz = 0
    total = nonzero = 0
    seen: set[int] = set()
    for name, t in model_state.items():
        key = t.untyped_storage().data_ptr()
        nz = int(torch.count_nonzero(t))
        if SPARSE_WEIGHT.match(name):
            layers[name.removesuffix(".weight")] = 1.0 - nz / t.numel()
            sparse_numel += t.numel()
            sparse_nnz += nz
        if key in seen:  # tied embeddings share storage: count once
            continue
        seen.add(key)
        total += t.numel()
        nonzero += nz
    fm = FlopModel(n_layer, d_model, n_ctx, vocab_size, sparse_numel, sparse_nnz)
    return {
        "sparsity": {"total": 1.0 - sparse_nnz / sparse_numel if sparse_numel else 0.0, "layers": layers},
        "params": {"total": total, "nonzero": nonzero, "sparse_eligible": sparse_numel, "sparse_nonzero": sparse_nnz},
        "flops_per_token": {"dense": fm.train_per_token(False), "sparse": fm.train_per_token(True),
                            "forward_dense": fm.forward_per_token(False), "forward_sparse": fm.forward_per_token(True)},
    }


def inspect_run(db, run_id: str) -> dict:
    """The report of a run's latest checkpoint (a prompt run: its parent's weights, engine.model.runs)."""
    ref = resolve_run(db, run_id)
    ck = load_checkpoint(ref.checkpoint)
    _, source = model_source(db, ref, state=ck)
    if source != ref.checkpoint:
        ck = {**ck, "model": load_checkpoint(source)["model"]}
    cfg = from_dict(ck["config"])
    report = inspect_state(ck["model"], cfg.model.n_layer, cfg.model.d_model, cfg.model.n_ctx, ck["vocab_size"])
    report["stage"] = ck.get("stage", cfg.stage)
    report["masks"] = bool(ck.get("masks"))
    # the matmul path each sparse layer trained with ("sparse" core or masked "dense"), as pre-training chose it
    report["kernels"] = dict(ck.get("kernels") or {})
    report.update({"run_id": ref.id, "checkpoint": str(ref.checkpoint), "step": int(ck["step"])})
    # the precision the run trained in and the CPU features it was chosen from (engine.train.precision)
    meta = (db.get_run(ref.id) or {}).get("meta") or {}
    report["precision"] = ck.get("precision") or meta.get("precision")
    report["precision_reason"] = meta.get("precision_reason")
    report["cpu"] = meta.get("cpu")
    return report
