"""Cost of a run before it starts: parameters, FLOPs, memory, and an ETA from a measured probe."""
from __future__ import annotations

import math
import os
import time
from dataclasses import asdict, dataclass

import torch

from engine.core import registry
from engine.core.config import RunConfig
from engine.core.machine_checks import available_memory
from engine.model.flops import flop_model_for_model
from engine.model.gpt import GPT
from engine.model.sparsity import apply_sparsity
from engine.train.optim import make_optimizer
from engine.train.precision import choose_precision
from engine.train.runtime import Runtime
from engine.train.step import lm_micro_batch, train_step


def sparse_stage(cfg: RunConfig) -> bool:
    """The run's stage trains masked (sparse) layers: it reads the sparsity section."""
    return "sparsity" in registry.stage(cfg.stage).sections


@dataclass(frozen=True)
class StepShape:
    """What a run's training micro-batches really hold where that is not ``batch_size`` sequences of
    ``n_ctx`` tokens: a classification head reads each long example as several windows, so a micro-batch
    of ``batch_size`` examples is every window of those examples (engine.tasks.base.collate_windows).
    Counted by engine.train.plan.step_shape, which replays the run's own batch order."""
    peak_rows: int          # windows in the largest micro-batch
    peak_tokens: int        # its positions (windows x the longest window's length): what activations hold
    tokens: int             # positions over the whole run (every micro-batch of every process)
    micro_batches: int
    windows_per_example: float
    lm_logits: bool = False  # the step computes no [tokens, vocab] logits (a classification head)

    def as_dict(self) -> dict:
        return asdict(self)


def memory_breakdown(cfg: RunConfig, shape: StepShape | None = None) -> dict[str, int]:
    """Bytes a training run holds, by part (CPU; the sparse core's index only where it can run).

    * states: fp32 values, gradients and two AdamW moments of what trains (a masked matrix trains as
      its packed nonzeros: 16 bytes per nonzero);
    * masks: per masked matrix its bool mask and the int64 offsets of its nonzeros;
    * sparse_index: the sparse core's three column-blocked index plans (4-byte column indices and
      4-byte permutations: 24 bytes per nonzero);
    * dense_path: the dense fp32 copy of each masked matrix the masked-dense path multiplies with
      (and its bf16 copy under autocast); held only when a layer runs that path;
    * activations: kept for backward, 34·d bytes per token and layer in 16-bit precision, twice that in
      fp32 (Korthikanti et al. 2022, without the attention-score term: scaled_dot_product_attention
      never stores the score matrix); measured: a 75 %-sparse mediswift-xl step (bf16, one 2,048-token
      sequence) peaked at 18.8 GiB where this estimate gives 19.4 (docs/performance.md);
    * logits: the head loss keeps one [tokens, vocab] gradient in the product's dtype, plus fp32 chunks
      (none with a classification head).

    The tokens are one micro-batch's: ``batch_size`` x n_ctx, or with ``shape`` the largest micro-batch
    the run's loader builds (every window of its examples).
    """
    m, tc = cfg.model, cfg.train
    vocab = cfg.tokenizer.vocab_size
    sparse = sparse_stage(cfg)
    level = cfg.sparsity.level if sparse else 0.0
    if sparse and cfg.sparsity.method == "gmp":
        level = cfg.sparsity.initial  # GMP holds its densest masks first
    fm = flop_model_for_model(m, vocab, level)
    with torch.device("meta"):
        total = GPT(m, vocab).num_params()
    nonzero = total - fm.sparse_numel + fm.sparse_nonzero
    masked = fm.sparse_nonzero < fm.sparse_numel
    bf16 = tc.precision in ("bf16", "fp16") or (tc.precision == "auto" and _auto_low_precision(tc))
    width = 2 if bf16 else 4
    tokens = shape.peak_tokens if shape is not None else tc.batch_size * m.n_ctx
    lm_logits = shape is None or shape.lm_logits
    return {
        "states": 16 * nonzero,
        "masks": fm.sparse_numel + 8 * fm.sparse_nonzero if masked else 0,
        "sparse_index": 24 * fm.sparse_nonzero if masked and cfg.sparsity.kernel != "dense" else 0,
        "dense_path": (4 + (2 if bf16 else 0)) * fm.sparse_numel if masked and cfg.sparsity.kernel != "sparse" else 0,
        "activations": width // 2 * m.n_layer * tokens * 34 * m.d_model,
        "logits": width * tokens * vocab + 4 * (1 << 23) * 2 if lm_logits else 0,
    }


def _auto_low_precision(tc) -> bool:
    from engine.train.precision import choose_precision

    try:
        return choose_precision("auto", torch.device("cuda" if tc.device != "cpu" and torch.cuda.is_available() else "cpu")).name != "fp32"
    except Exception:  # noqa: BLE001 - an estimate never fails on the precision
        return False


def estimate(cfg: RunConfig, probe_steps: int = 3, shape: StepShape | None = None) -> dict:
    """Parameters, FLOPs, tokens and memory of ``cfg`` as it will run (train.max_steps as
    engine.train.plan derived it, from train.epochs where they count), and a measured step time and
    ETA from ``probe_steps`` timed steps. ``shape``: what the micro-batches really hold where a
    classification head reads examples in windows (engine.train.plan.step_shape)."""
    m, tc = cfg.model, cfg.train
    vocab = cfg.tokenizer.vocab_size
    with torch.device("meta"):
        model = GPT(m, vocab)
    total = model.num_params()
    sparse = sparse_stage(cfg)
    # a classification head's step forms no vocabulary logits: no LM-head term, as the run counts it
    logits_vocab = vocab if shape is None or shape.lm_logits else 0
    fm = flop_model_for_model(m, logits_vocab, cfg.sparsity.level if sparse else 0.0)
    nonzero = total - fm.sparse_numel + fm.sparse_nonzero
    world = tc.nproc * tc.nnodes
    tokens = shape.tokens if shape is not None else tc.max_steps * tc.batch_size * tc.grad_accum * m.n_ctx * world
    parts = memory_breakdown(cfg, shape)
    memory = sum(parts.values())
    if cfg.sparsity.kernel == "auto":
        # one of the two paths stays: the dense one is never tried where it does not fit, and the
        # structures of the path not chosen are dropped after the choice
        memory -= max(parts["sparse_index"], parts["dense_path"])
    sparse_flops = fm.train_per_token(True) * tokens
    if sparse and cfg.sparsity.method != "static":
        # a dynamic method's planned FLOPs (GMP's denser early steps, RigL's dense-gradient updates),
        # summed per mask update rather than per step: a long run's estimate stays instant
        from engine.core.sparsity_schedule import Schedule, layer_shapes, planned_flops_per_token

        per_run = planned_flops_per_token(Schedule.from_config(cfg), layer_shapes(m), tc.max_steps,
                                          flop_model_for_model(m, vocab, 0.0))
        sparse_flops = per_run * tokens / tc.max_steps
    # each process of a group holds its own activations and paths; FSDP shards the trained state
    shards = world if tc.strategy == "fsdp" else 1
    per_process = memory - parts["states"] + parts["states"] // shards
    out = {
        "params": {"total": total, "nonzero": nonzero},
        "flops": {"dense": fm.train_per_token(False) * tokens, "sparse": sparse_flops,
                  "saving": fm.train_per_token(False) * tokens / sparse_flops, "per_token_dense": fm.train_per_token(False), "per_token_sparse": fm.train_per_token(True)},
        "tokens": tokens, "memory_bytes": memory, "memory_parts": parts, "step_seconds": None, "eta_seconds": None,
        "processes": world, "strategy": tc.strategy if world > 1 else "single", "memory_per_process_bytes": per_process,
        "device": "cuda" if (tc.device != "cpu" and torch.cuda.is_available()) else "cpu",
        "max_steps": tc.max_steps, "epochs": tc.epochs,
    }
    if shape is not None:
        out["step_shape"] = shape.as_dict()
    if probe_steps <= 0:
        return out
    if memory > 0.5 * available_memory():
        out["probe_skipped"] = f"the model needs about {memory / 2**30:.1f} GiB, more than half of this machine's free memory"
        return out
    # a probe micro-batch of as many positions as the run's micro-batches hold on average
    rows = max(1, math.ceil(shape.tokens / (shape.micro_batches * m.n_ctx))) if shape is not None else tc.batch_size
    out.update(_probe(cfg, vocab, probe_steps, torch.device(out["device"]), rows))
    out["eta_seconds"] = out["step_seconds"] * tc.max_steps
    return out


def _probe(cfg: RunConfig, vocab: int, steps: int, device: torch.device, rows: int) -> dict:
    """Time real optimizer steps on random tokens, ``rows`` sequences of n_ctx per micro-batch (the
    first step is a warm-up and not counted)."""
    m, tc = cfg.model, cfg.train
    if tc.threads:
        torch.set_num_threads(tc.threads)
    torch.manual_seed(0)
    model = GPT(m, vocab)
    if sparse_stage(cfg):
        apply_sparsity(model, cfg.sparsity.level, cfg.sparsity.distribution, 0)
        if cfg.sparsity.kernel == "sparse" and device.type == "cpu":
            for layer in model.sparse_layers().values():
                layer.set_kernel("sparse")
    model.to(device)
    opt = make_optimizer(list(model.named_parameters()), tc)
    x = torch.randint(0, vocab, (rows, m.n_ctx), device=device)
    rt = Runtime(device, choose_precision(tc.precision, device))
    autocast, scaler = rt.autocast, rt.grad_scaler()
    times = []
    for i in range(steps + 1):
        t = time.perf_counter()
        train_step(opt, lambda: lm_micro_batch(model, x, x, autocast), tc.grad_accum, tc.grad_clip, scaler)
        if device.type == "cuda":
            torch.cuda.synchronize()
        if i:
            times.append(time.perf_counter() - t)
    times.sort()
    return {"step_seconds": times[len(times) // 2], "probe_steps": steps, "threads": torch.get_num_threads() or os.cpu_count()}
