"""Training-step throughput, measured in one run on this machine.

Prints tokens/s of:
  * our dense training step vs Hugging Face transformers' GPT2LMHeadModel of the same shape
    (same batch, same AdamW settings, gradient clipping on both) — target ratio >= 1.0;
  * our 75 %-sparse step (sparse matmul core, kernel "sparse", and the engine's "auto" choice)
    vs our dense step, next to the theoretical training-FLOP ratio of the two.

Usage: python bench/train_step.py [--quick] [--shape gpt2-small|demo] [--steps N] [--batch B] [--json]
The default shape is GPT-2 small (12 layers, d 768, n_ctx 512, vocab 50,257); --quick uses the demo
shape. All configurations run round-robin (per round, each runs an untimed step and then a timed
one, after warm-up rounds); each figure is the median over the rounds. The process keeps freed
memory for reuse, as the engine's training stages do (engine/train/memory.py), for every configuration
alike.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as the engine's CLI runs (engine/cli/commands.py)

import torch  # noqa: E402

from engine.core.config import ModelConfig, TrainConfig  # noqa: E402
from engine.model.flops import flop_model_for  # noqa: E402
from engine.model.gpt import GPT  # noqa: E402
from engine.model.sparsity import apply_sparsity  # noqa: E402
from engine.train.memory import keep_freed_memory  # noqa: E402
from engine.train.optim import make_optimizer  # noqa: E402
from engine.train.step import lm_micro_batch, train_step  # noqa: E402

try:
    import resource
except ImportError:  # not on Windows
    resource = None


def minor_faults() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt if resource else 0


SHAPES = {
    "gpt2-small": dict(n_layer=12, n_head=12, d_model=768, n_ctx=512, vocab=50257, batch=1),
    "demo": dict(n_layer=4, n_head=4, d_model=128, n_ctx=128, vocab=4096, batch=16),
}


def ours(shape: dict, level: float, kernel: str):
    torch.manual_seed(0)
    cfg = ModelConfig(n_layer=shape["n_layer"], n_head=shape["n_head"], d_model=shape["d_model"], n_ctx=shape["n_ctx"])
    model = GPT(cfg, shape["vocab"])
    apply_sparsity(model, level, "uniform", seed=0)
    for m in model.sparse_layers().values():
        m.set_kernel(kernel)
    opt = make_optimizer(list(model.named_parameters()), TrainConfig())
    x = torch.randint(0, shape["vocab"], (shape["batch"], shape["n_ctx"]))
    # the engine's own optimizer step (engine/train/step.py), one micro-batch, fp32 as the CPU stages train
    return model, lambda: train_step(opt, lambda: lm_micro_batch(model, x, x, contextlib.nullcontext), 1, 1.0)


def auto_kernels(model, n_tokens: int) -> dict:
    from engine.model.kernels import time_kernels

    chosen = {}
    for m in model.sparse_layers().values():
        key = tuple(m.weight.shape)
        if key not in chosen:
            t = time_kernels(m.pattern(), n_tokens)
            chosen[key] = "sparse" if t["sparse_ms"] < t["dense_ms"] else "dense"
        m.set_kernel(chosen[key])
    return {"x".join(map(str, k)): v for k, v in chosen.items()}


def hf(shape: dict):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(vocab_size=shape["vocab"], n_positions=shape["n_ctx"], n_embd=shape["d_model"],
                        n_layer=shape["n_layer"], n_head=shape["n_head"], activation_function="gelu",
                        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    config._attn_implementation = "sdpa"
    model = GPT2LMHeadModel(config)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-4, betas=(0.9, 0.95), weight_decay=0.1)
    x = torch.randint(0, shape["vocab"], (shape["batch"], shape["n_ctx"]))

    def step():
        opt.zero_grad(set_to_none=True)
        out = model(input_ids=x, labels=x)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()

    return model, step


def logging_overhead_ms(n: int = 300) -> float:
    """Cost of one step's metrics call through the real sinks (JSON line to a pipe-like sink + SQLite)."""
    import tempfile

    from engine.core.events import EventWriter
    from engine.core.rundb import RunDB
    from engine.train.metrics import DatabaseSink, EventSink, MetricsLogger, Point

    with tempfile.TemporaryDirectory() as tmp, open(os.devnull, "w") as devnull:
        db = RunDB(Path(tmp) / "bench.db")
        run_id = db.create_run(name="bench", stage="pretrain", config={})
        logger = MetricsLogger([EventSink(EventWriter(devnull), run_id), DatabaseSink(db, run_id)])
        metrics = {"loss": 3.2, "lr": 1e-3, "grad_norm": 0.9, "tokens_per_s": 9000.0, "step_time": 0.2, "sparsity": 0.75}
        t = time.perf_counter()
        for step in range(1, n + 1):
            logger.log(metrics, Point(step, step * 2048, step * 0.2, step * 1e10, step * 2e10))
        elapsed = time.perf_counter() - t
        db.close()
    return elapsed / n * 1000


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", choices=SHAPES, default="gpt2-small")
    ap.add_argument("--quick", action="store_true", help="the demo shape (seconds instead of minutes)")
    ap.add_argument("--steps", type=int, default=5, help="timed rounds")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--level", type=float, default=0.75)
    ap.add_argument("--batch", type=int, default=None, help="sequences per step (default: the shape's)")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    kept = keep_freed_memory()  # as every engine stage runs (engine/train/loop.py); for all configurations
    shape = dict(SHAPES["demo" if args.quick else args.shape])
    if args.batch:
        shape["batch"] = args.batch
    tokens = shape["batch"] * shape["n_ctx"]
    rows = {}

    dense_model, dense_step = ours(shape, 0.0, "dense")
    _hf_model, hf_step = hf(shape)
    sparse_model, sparse_step = ours(shape, args.level, "sparse")
    fm_dense, fm_sparse = flop_model_for(dense_model), flop_model_for(sparse_model)
    chosen_by_shape = auto_kernels(sparse_model, tokens)
    auto_choice = {n: m.kernel for n, m in sparse_model.sparse_layers().items()}
    chosen = chosen_by_shape

    def with_kernels(kernel: str | None):
        def step():
            for n, m in sparse_model.sparse_layers().items():
                m.set_kernel(auto_choice[n] if kernel is None else kernel)
            sparse_step()
        return step

    configs = {
        "ours_dense": dense_step,
        "hf_gpt2_dense": hf_step,
        "ours_sparse_core": with_kernels("sparse"),
        "ours_sparse_masked_dense": with_kernels("dense"),
        "ours_sparse_auto": with_kernels(None),
    }
    # round-robin: each configuration's steps once per round, so drifts in machine speed (other
    # processes, clocks) hit every configuration alike; the median over rounds is reported
    for _ in range(args.warmup):  # warm-up rounds alike, so the heap reaches what every configuration needs
        for fn in configs.values():
            fn()
    times: dict[str, list[float]] = {k: [] for k in configs}
    # The five models share one heap, and a step right after another model's may first have to grow it
    # (at 4 sequences per step, ~100,000 fresh pages for the dense model, every round). In a training
    # run a step follows a step of the same model, so each timed step follows an untimed one of its own
    # configuration. Minor page faults per timed step are reported: a timed step that still grew the
    # heap (seen for the dense model at 8 sequences per step) shows there.
    faults: dict[str, list[int]] = {k: [] for k in configs}
    for _ in range(args.steps):
        for name, fn in configs.items():
            fn()
            f0 = minor_faults()
            t = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t)
            faults[name].append(minor_faults() - f0)
    rows = {k: statistics.median(v) for k, v in times.items()}

    log_ms = logging_overhead_ms()
    from engine.model.kernels.ops import thread_pool

    pool = thread_pool()  # the sparse kernels' thread pool (engine/model/kernels/_kernels.py)
    flop_ratio = fm_dense.train_per_token(False) / fm_sparse.train_per_token(True)
    result = {
        "shape": {k: v for k, v in shape.items()}, "tokens_per_step": tokens, "threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(), "torch": torch.__version__, "sparsity": args.level,
        "malloc_keeps_freed_memory": kept, "numba_threading_layer": pool,
        "seconds_per_step": rows, "tokens_per_s": {k: tokens / v for k, v in rows.items()},
        "page_faults_per_step": {k: int(statistics.median(v)) for k, v in faults.items()},
        "ratio_ours_dense_vs_hf": rows["hf_gpt2_dense"] / rows["ours_dense"],
        "ratio_sparse_core_vs_dense": rows["ours_dense"] / rows["ours_sparse_core"],
        "ratio_sparse_auto_vs_dense": rows["ours_dense"] / rows["ours_sparse_auto"],
        "theoretical_flop_ratio": flop_ratio, "auto_kernels": chosen,
        "logging_ms_per_step": log_ms, "logging_overhead_vs_dense_step": log_ms / 1000 / rows["ours_dense"],
    }
    if args.json:
        print(json.dumps(result))
        return
    print(f"shape {shape} — {tokens} tokens/step, {torch.get_num_threads()} threads, torch {torch.__version__}, "
          f"freed memory kept for reuse: {'yes' if kept else 'no'}, sparse kernels' thread pool: {pool}")
    print(f"{'step':28} {'s/step':>9} {'tokens/s':>10} {'page faults/step':>17}")
    for k, v in rows.items():
        print(f"{k:28} {v:9.3f} {tokens / v:10.0f} {result['page_faults_per_step'][k]:17,}")
    print(f"ours dense vs HF GPT2LMHeadModel (tokens/s ratio, target >= 1.0): {result['ratio_ours_dense_vs_hf']:.2f}x")
    print(f"{args.level:.0%}-sparse step vs dense step, sparse core:   {result['ratio_sparse_core_vs_dense']:.2f}x faster")
    print(f"{args.level:.0%}-sparse step vs dense step, auto kernels:  {result['ratio_sparse_auto_vs_dense']:.2f}x faster  {chosen}")
    print(f"theoretical training-FLOP ratio (dense / sparse):    {flop_ratio:.2f}x")
    print(f"metrics logging (event line + SQLite rows) per step: {log_ms:.2f} ms = "
          f"{result['logging_overhead_vs_dense_step']:.2%} of the dense step (target < 2 % for the demo model)")


if __name__ == "__main__":
    main()
