"""Cost of a run before it starts: parameters, FLOPs, memory, and an ETA from a measured probe."""
from __future__ import annotations

import os
import time

import torch

from engine.core.config import RunConfig
from engine.model.flops import flop_model_for_config
from engine.model.gpt import GPT
from engine.model.sparsity import apply_sparsity
from engine.train.optim import make_optimizer
from engine.train.runtime import Runtime
from engine.train.step import lm_micro_batch, train_step


def available_memory() -> int:
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 8 << 30


def estimate(cfg: RunConfig, probe_steps: int = 3) -> dict:
    m, tc = cfg.model, cfg.train
    vocab = cfg.tokenizer.vocab_size
    with torch.device("meta"):
        model = GPT(m, vocab)
    total = model.num_params()
    fm = flop_model_for_config(m.n_layer, m.d_model, m.n_ctx, vocab, cfg.sparsity.level if cfg.stage == "pretrain" else 0.0)
    nonzero = total - fm.sparse_numel + fm.sparse_nonzero
    tokens = tc.max_steps * tc.batch_size * tc.grad_accum * m.n_ctx
    # what the run holds: fp32 values + grads + two AdamW moments of the parameters that train (a masked
    # matrix trains as its packed nonzeros), and per masked matrix its bool mask, the int64 offsets of
    # its nonzeros and the dense fp32 copy the masked-dense path multiplies with; activations kept for
    # backward (≈ 34·d + 5·h·T values per token and layer, after Korthikanti et al. 2022, doubled for fp32)
    masked = fm.sparse_nonzero < fm.sparse_numel
    states = 16 * nonzero + (fm.sparse_numel * (1 + 4) + 8 * fm.sparse_nonzero if masked else 0)
    activations = 2 * m.n_layer * tc.batch_size * m.n_ctx * (34 * m.d_model + 5 * m.n_head * m.n_ctx)
    logits = 3 * 4 * tc.batch_size * m.n_ctx * vocab
    memory = states + activations + logits
    out = {
        "params": {"total": total, "nonzero": nonzero},
        "flops": {"dense": fm.train_per_token(False) * tokens, "sparse": fm.train_per_token(True) * tokens,
                  "saving": fm.saving(), "per_token_dense": fm.train_per_token(False), "per_token_sparse": fm.train_per_token(True)},
        "tokens": tokens, "memory_bytes": memory, "step_seconds": None, "eta_seconds": None,
        "device": "cuda" if (tc.device != "cpu" and torch.cuda.is_available()) else "cpu",
    }
    if probe_steps <= 0:
        return out
    if memory > 0.5 * available_memory():
        out["probe_skipped"] = f"the model needs about {memory / 2**30:.1f} GiB, more than half of this machine's free memory"
        return out
    out.update(_probe(cfg, vocab, probe_steps, torch.device(out["device"])))
    out["eta_seconds"] = out["step_seconds"] * tc.max_steps
    return out


def _probe(cfg: RunConfig, vocab: int, steps: int, device: torch.device) -> dict:
    """Time real optimizer steps on random tokens (the first is a warm-up and not counted)."""
    m, tc = cfg.model, cfg.train
    if tc.threads:
        torch.set_num_threads(tc.threads)
    torch.manual_seed(0)
    model = GPT(m, vocab)
    if cfg.stage == "pretrain":
        apply_sparsity(model, cfg.sparsity.level, cfg.sparsity.distribution, 0)
        if cfg.sparsity.kernel == "sparse" and device.type == "cpu":
            for layer in model.sparse_layers().values():
                layer.set_kernel("sparse")
    model.to(device)
    opt = make_optimizer(list(model.named_parameters()), tc)
    x = torch.randint(0, vocab, (tc.batch_size, m.n_ctx), device=device)
    autocast = Runtime(device).autocast
    times = []
    for i in range(steps + 1):
        t = time.perf_counter()
        train_step(opt, lambda: lm_micro_batch(model, x, x, autocast), tc.grad_accum, tc.grad_clip)
        if device.type == "cuda":
            torch.cuda.synchronize()
        if i:
            times.append(time.perf_counter() - t)
    times.sort()
    return {"step_seconds": times[len(times) // 2], "probe_steps": steps, "threads": torch.get_num_threads() or os.cpu_count()}
