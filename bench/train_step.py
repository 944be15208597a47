"""Training-step throughput and model FLOPs utilisation, measured in one run on this machine.

Configurations (one optimizer step each: forward, backward, gradient clipping, AdamW):
  hf_fp32             Hugging Face transformers' model of the same shape, fp32 (GPT2LMHeadModel, or
                      LlamaForCausalLM for --shape smollm2-135m)
  hf_bf16             the same under torch.autocast("cpu", dtype=torch.bfloat16), as its docs suggest
  ours_fp32           our dense step in fp32
  ours_auto           our dense step as the engine runs it: train.precision = "auto"
  ours_sparse75_core  75 %-sparse, every sparse layer on the sparse core, precision auto
  ours_sparse75_auto  75 %-sparse as the engine runs it: precision auto, sparsity.kernel = "auto" (the
                      engine's per-shape timing and whole-step trial, engine/train/kernel_choice.py)

Model FLOPs utilisation (MFU) = the step's training FLOPs by the engine's own FLOP formula
(engine/model/flops.py; for a sparse model both the sparse count and the dense-equivalent one) divided
by the step time, over the peak measured in this run: the median of dense n^3 products (x @ W^T, as
nn.Linear multiplies; n = 4096, or less where bf16 has no native instructions) in that precision on all
threads. A configuration whose step would take longer than --step-budget even at that peak is not timed.

Usage: python bench/train_step.py [--quick] [--shape gpt2-small|demo|mediswift-xl|smollm2-135m] [--steps N]
                                  [--batch B] [--json]
All configurations of the default mode run round-robin in one process (per round each runs an
untimed step, then a timed one, after warm-up rounds); each figure is the median over the rounds.
`--shape mediswift-xl` runs each configuration in its own subprocess instead, so that one's
high-water mark of resident memory never counts for another, and prints each one's peak RSS; a
configuration whose computed memory does not fit this machine is not run, and the line says why.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as the engine's CLI runs (engine/cli/main.py)

import torch  # noqa: E402

from engine.core.config import from_dict  # noqa: E402
from engine.core.hardware import cpu_header, cpu_info  # noqa: E402
from engine.model.flops import flop_model_for, flop_model_for_model  # noqa: E402
from engine.model.gpt import GPT  # noqa: E402
from engine.model.sparsity import apply_sparsity  # noqa: E402
from engine.train.kernel_choice import KernelTrial, choose_kernels  # noqa: E402
from engine.train.memory import keep_freed_memory  # noqa: E402
from engine.train.optim import make_optimizer  # noqa: E402
from engine.train.precision import choose_precision  # noqa: E402
from engine.train.runtime import Runtime  # noqa: E402
from engine.train.step import lm_micro_batch, train_step  # noqa: E402

try:
    import resource
except ImportError:  # not on Windows
    resource = None

CPU = torch.device("cpu")
SHAPES = {
    "gpt2-small": dict(n_layer=12, n_head=12, d_model=768, n_ctx=512, vocab=50257, batch=1),
    "demo": dict(n_layer=4, n_head=4, d_model=128, n_ctx=128, vocab=4096, batch=16),
    "mediswift-xl": dict(n_layer=24, n_head=16, d_model=2048, n_ctx=2048, vocab=42384, batch=1),
    # SmolLM2-135M's shape (llama family: grouped-query attention with 3 key/value heads, SwiGLU MLP,
    # tied head), at a 512-token window
    "smollm2-135m": dict(family="llama", n_layer=30, n_head=9, n_kv_head=3, d_model=576, d_ff=1536,
                         rope_theta=100000.0, n_ctx=512, vocab=49152, batch=1),
}
MODEL_KEYS = ("family", "n_layer", "n_head", "n_kv_head", "d_model", "d_ff", "rope_theta", "n_ctx")
CONFIGS = ("hf_fp32", "hf_bf16", "ours_fp32", "ours_auto", "ours_sparse75_core", "ours_sparse75_auto")
XL_CONFIGS = ("hf_fp32", "ours_auto", "ours_sparse75_core")  # the dense ones only to say they cannot fit


def minor_faults() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt if resource else 0


def peak_rss_gib() -> float | None:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20 if resource else None  # KiB on Linux


@dataclass
class Config:
    name: str
    precision: str
    kernel: str
    flops: float        # training FLOPs of one step, by the engine's formula (sparse count)
    flops_dense: float  # the same, dense-equivalent
    step: Callable[[], object]


def run_config(shape: dict, level: float):
    """The engine's config for this shape, as a run would build it (precision auto)."""
    return from_dict({"model": {k: shape[k] for k in MODEL_KEYS if k in shape},
                      "tokenizer": {"vocab_size": shape["vocab"]}, "sparsity": {"level": level, "kernel": "auto"},
                      "train": {"batch_size": shape["batch"], "precision": "auto"}})


class _Reporter:
    """What engine/train/kernel_choice.py reports (engine.train.reporter): meta and log lines."""

    def __init__(self, verbose: bool):
        self.meta_items, self.verbose = {}, verbose

    def meta(self, **kw):
        self.meta_items.update(kw)

    def info(self, msg):
        if self.verbose:
            print(f"  [engine] {msg}", file=sys.stderr)

    warn = info


def ours(name: str, shape: dict, verbose: bool) -> Config:
    level = 0.75 if "sparse75" in name else 0.0
    cfg = run_config(shape, level)
    precision = choose_precision("fp32" if name == "ours_fp32" else "auto", CPU)
    torch.manual_seed(0)
    model = GPT(cfg.model, shape["vocab"])
    apply_sparsity(model, level, "uniform", seed=0)
    fm = flop_model_for(model)
    opt = make_optimizer(list(model.named_parameters()), cfg.train)
    rt = Runtime(CPU, precision)
    x = torch.randint(0, shape["vocab"], (shape["batch"], shape["n_ctx"]))
    tokens = x.numel()

    def step():  # the engine's own optimizer step (engine/train/step.py)
        return train_step(opt, lambda: lm_micro_batch(model, x, x, rt.autocast), 1, 1.0, rt.grad_scaler())

    kernel = "dense"
    if level:
        report = _Reporter(verbose)
        if name == "ours_sparse75_core":
            for m in model.sparse_layers().values():
                m.set_kernel("sparse")
            kernel = "sparse core"
        else:
            mix = choose_kernels(report, cfg, model, tokens, CPU, precision.name)
            if "sparse" in mix.values():  # the whole-step trial the engine runs over its first steps
                trial = KernelTrial(report, model, mix)
                while not trial.done:
                    trial.before_step()
                    t = time.perf_counter()
                    step()
                    trial.after_step(time.perf_counter() - t)
                mix = trial.kernels
            kinds = sorted(set(mix.values()))
            kernel = "auto: " + ("+".join(kinds) if kinds else "dense")
    return Config(name, precision.name, kernel, fm.train_per_token(True) * tokens, fm.train_per_token(False) * tokens, step)


def hf_model(shape: dict):
    """transformers' own model class of the shape's family, randomly initialised, attention through SDPA."""
    if shape.get("family", "gpt2") == "gpt2":
        from transformers import GPT2Config, GPT2LMHeadModel

        config = GPT2Config(vocab_size=shape["vocab"], n_positions=shape["n_ctx"], n_embd=shape["d_model"],
                            n_layer=shape["n_layer"], n_head=shape["n_head"], activation_function="gelu",
                            resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, loss_type="ForCausalLM")
        config._attn_implementation = "sdpa"
        return GPT2LMHeadModel(config)
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=shape["vocab"], hidden_size=shape["d_model"], intermediate_size=shape["d_ff"],
                         num_hidden_layers=shape["n_layer"], num_attention_heads=shape["n_head"],
                         num_key_value_heads=shape["n_kv_head"], max_position_embeddings=shape["n_ctx"],
                         rope_theta=shape["rope_theta"], rms_norm_eps=1e-5, tie_word_embeddings=True,
                         attention_dropout=0.0, loss_type="ForCausalLM")
    config._attn_implementation = "sdpa"
    return LlamaForCausalLM(config)


def hf(name: str, shape: dict) -> Config:
    torch.manual_seed(0)
    model = hf_model(shape)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-4, betas=(0.9, 0.95), weight_decay=0.1)
    x = torch.randint(0, shape["vocab"], (shape["batch"], shape["n_ctx"]))
    bf16 = name == "hf_bf16"

    def step():
        opt.zero_grad(set_to_none=True)
        if bf16:
            with torch.autocast("cpu", dtype=torch.bfloat16):
                loss = model(input_ids=x, labels=x).loss
        else:
            loss = model(input_ids=x, labels=x).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()

    fm = flop_model_for_model(run_config(shape, 0.0).model, shape["vocab"], 0.0)  # the family's formula
    tokens = x.numel()
    return Config(name, "bf16" if bf16 else "fp32", "dense", fm.train_per_token(False) * tokens,
                  fm.train_per_token(False) * tokens, step)


def build(name: str, shape: dict, verbose: bool = False) -> Config:
    return hf(name, shape) if name.startswith("hf_") else ours(name, shape, verbose)


def matmul_peak(dtype: torch.dtype, n_max: int = 4096, repeats: int = 3, budget_s: float = 4.0) -> float:
    """Median FLOP/s of n^3 dense products in ``dtype`` on all threads, in nn.Linear's layout (x @ W^T), n
    up to ``n_max``: the largest power of two whose product takes under ``budget_s`` (a CPU without native
    bf16 multiplies bf16 about ten times slower than fp32, where a 4096^3 product takes minutes)."""
    g = torch.Generator().manual_seed(0)
    n = 256
    while True:
        a = torch.randn(n, n, generator=g).to(dtype)
        w = torch.randn(n, n, generator=g).to(dtype)
        a @ w.t()
        t = time.perf_counter()
        a @ w.t()
        if n >= n_max or (time.perf_counter() - t) * 8 > budget_s:  # the next size takes 8x as long
            break
        n *= 2
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        a @ w.t()
        times.append(time.perf_counter() - t)
    return 2 * n ** 3 / statistics.median(times)


def row(c: Config, seconds: float, tokens: int, peaks: dict, faults: int | None, rss: float | None) -> dict:
    peak = peaks["bf16" if c.precision == "bf16" else "fp32"]
    return {"config": c.name, "precision": c.precision, "kernel": c.kernel, "s_per_step": seconds,
            "tokens_per_s": tokens / seconds, "mfu": c.flops / seconds / peak,
            "mfu_dense_equivalent": c.flops_dense / seconds / peak, "flops_per_step": c.flops,
            "flops_dense_per_step": c.flops_dense, "peak_rss_gib": rss, "page_faults_per_step": faults}


def too_slow(c: Config, peaks: dict, budget_s: float) -> str:
    """Why a configuration is not timed: even at this CPU's measured matmul peak in its precision (a bound
    no step reaches) one step would take longer than ``budget_s``; '' otherwise."""
    peak = peaks["bf16" if c.precision == "bf16" else "fp32"]
    bound = c.flops / peak
    if bound <= budget_s:
        return ""
    return (f"not run: {c.flops:.3g} FLOPs a step at this CPU's measured {c.precision} matmul peak "
            f"({peak / 1e9:.1f} GFLOP/s) take at least {bound:.0f} s (over --step-budget {budget_s:g} s)")


def interleaved(shape: dict, names, steps: int, warmup: int, verbose: bool, peaks: dict,
                budget_s: float) -> tuple[list[Config], dict, dict, list[dict]]:
    configs, skipped = [], []
    for n in names:
        c = build(n, shape, verbose)
        why = too_slow(c, peaks, budget_s)
        if why:
            skipped.append({"config": n, "skipped": why})
        else:
            configs.append(c)
    for _ in range(warmup):  # warm-up rounds alike, so the heap reaches what every configuration needs
        for c in configs:
            c.step()
    times = {c.name: [] for c in configs}
    # A step right after another model's may first have to grow the shared heap; in a training run a step
    # follows a step of the same model, so each timed step follows an untimed one of its own configuration.
    # Minor page faults per timed step show a timed step that still grew the heap.
    faults = {c.name: [] for c in configs}
    for _ in range(steps):
        for c in configs:
            c.step()
            f0 = minor_faults()
            t = time.perf_counter()
            c.step()
            times[c.name].append(time.perf_counter() - t)
            faults[c.name].append(minor_faults() - f0)
    return (configs, {k: statistics.median(v) for k, v in times.items()},
            {k: int(statistics.median(v)) for k, v in faults.items()}, skipped)


def worker(name: str, shape: dict, steps: int) -> dict:
    """One configuration alone in this process (--shape mediswift-xl): an untimed step, then ``steps``."""
    c = build(name, shape)
    c.step()
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        c.step()
        times.append(time.perf_counter() - t)
    return {"config": c.name, "precision": c.precision, "kernel": c.kernel, "seconds": statistics.median(times),
            "flops": c.flops, "flops_dense": c.flops_dense, "peak_rss_gib": peak_rss_gib()}


def fits(name: str, shape: dict) -> str:
    """Why a configuration is not run (its memory, computed by the engine's estimate, does not fit), or ''."""
    from engine.train.estimate import available_memory, estimate

    level = 0.75 if "sparse75" in name else 0.0
    est = estimate(run_config(shape, level), probe_steps=0)
    need = est["memory_bytes"]
    if name.startswith("hf_"):  # HF's fp32 states of every parameter, at the least
        need = max(need, 16 * est["params"]["total"])
    have = available_memory()
    if need <= 0.9 * have:
        return ""
    return f"not run: needs about {need / 2**30:.1f} GiB (the engine's estimate), {have / 2**30:.1f} GiB is available"


def isolated(shape_name: str, shape: dict, names, steps: int) -> list[dict]:
    out = []
    for name in names:
        why = fits(name, shape)
        if why:
            out.append({"config": name, "skipped": why})
            continue
        cmd = [sys.executable, __file__, "--worker", name, "--shape", shape_name, "--steps", str(steps)]
        if shape.get("batch") != SHAPES[shape_name]["batch"]:
            cmd += ["--batch", str(shape["batch"])]
        p = subprocess.run(cmd, capture_output=True, text=True)
        if p.returncode != 0:
            out.append({"config": name, "skipped": f"failed: {p.stderr.strip().splitlines()[-1:]}"})
            continue
        out.append(json.loads(p.stdout.strip().splitlines()[-1]))
    return out


def logging_overhead_ms(n: int = 300) -> float:
    """Cost of one step's metrics call through the real sinks (JSON line to a pipe-like sink + SQLite)."""
    import tempfile

    from engine.core.events import EventWriter
    from engine.store.rundb import RunDB
    from engine.train.metrics import EventSink, MetricsLogger, Point
    from engine.train.reporter import DatabaseSink

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


def summary(rows: list[dict]) -> dict:
    by = {r["config"]: r for r in rows if "s_per_step" in r}
    hf_best = min((by[k]["s_per_step"] for k in ("hf_fp32", "hf_bf16") if k in by), default=None)
    out = {"summary": True, "best_hf": min((k for k in ("hf_fp32", "hf_bf16") if k in by),
                                           key=lambda k: by[k]["s_per_step"], default=None)}
    for key, name in (("auto_vs_best_hf", "ours_auto"), ("sparse75_auto_vs_best_hf", "ours_sparse75_auto"),
                      ("sparse75_core_vs_best_hf", "ours_sparse75_core")):
        out[key] = hf_best / by[name]["s_per_step"] if hf_best and name in by else None
    for ref in ("hf_fp32", "hf_bf16"):  # each of what a user would pick instead, where it was timed
        for key, name in (("auto", "ours_auto"), ("sparse75_auto", "ours_sparse75_auto")):
            if ref in by and name in by:
                out[f"{key}_vs_{ref}"] = by[ref]["s_per_step"] / by[name]["s_per_step"]
    if "ours_auto" in by and "ours_sparse75_auto" in by:
        out["sparse75_auto_vs_ours_auto"] = by["ours_auto"]["s_per_step"] / by["ours_sparse75_auto"]["s_per_step"]
    return out


def header(shape: dict, tokens: int, peaks: dict, kept: bool) -> dict:
    from engine.model.kernels import ops

    c = cpu_info()
    bf16_path = getattr(ops, "bf16_path", lambda: "n/a")()
    auto = choose_precision("auto", CPU)
    return {"header": True, "cpu": c.model, "cpu_features": c.features, "threads": torch.get_num_threads(),
            "cpu_count": os.cpu_count(), "torch": torch.__version__, "shape": shape, "tokens_per_step": tokens,
            "peak_tflops": {k: v / 1e12 for k, v in peaks.items()}, "auto_precision": auto.name,
            "auto_precision_reason": auto.reason, "sparse_core_bf16_path": bf16_path,
            "malloc_keeps_freed_memory": kept}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", choices=SHAPES, default="gpt2-small")
    ap.add_argument("--quick", action="store_true", help="the demo shape (seconds instead of minutes)")
    ap.add_argument("--steps", type=int, default=5, help="timed rounds (mediswift-xl: timed steps per configuration)")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--batch", type=int, default=None, help="sequences per step (default: the shape's)")
    ap.add_argument("--configs", default=None, help="comma-separated subset of: " + ", ".join(CONFIGS))
    ap.add_argument("--json", action="store_true", help="one JSON object per configuration, then a summary object")
    ap.add_argument("--verbose", action="store_true", help="the engine's kernel-choice lines on stderr")
    ap.add_argument("--step-budget", type=float, default=600.0,
                    help="seconds: a configuration whose step would take longer even at the measured matmul peak "
                         "of its precision is not timed (its row says why)")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    kept = keep_freed_memory()  # as every engine stage runs (engine/train/memory.py); for all configurations
    shape_name = "demo" if args.quick else args.shape
    shape = dict(SHAPES[shape_name])
    if args.batch:
        shape["batch"] = args.batch
    if args.worker:
        print(json.dumps(worker(args.worker, shape, args.steps)))
        return
    tokens = shape["batch"] * shape["n_ctx"]
    xl = shape_name == "mediswift-xl"
    names = args.configs.split(",") if args.configs else (XL_CONFIGS if xl else CONFIGS)
    peaks = {"fp32": matmul_peak(torch.float32), "bf16": matmul_peak(torch.bfloat16)}
    head = header(shape, tokens, peaks, kept)
    if xl:
        results = isolated(shape_name, shape, names, args.steps)
    else:
        configs, times, faults, skipped = interleaved(shape, names, args.steps, args.warmup, args.verbose, peaks,
                                                      args.step_budget)
    peaks_after = {"fp32": matmul_peak(torch.float32), "bf16": matmul_peak(torch.bfloat16)}
    head["peak_tflops_after"] = {k: v / 1e12 for k, v in peaks_after.items()}
    # MFU against the higher of the two measurements: a peak taken while the machine was slow must
    # not flatter the configurations
    peak = {k: max(peaks[k], peaks_after[k]) for k in peaks}
    rows: list[dict] = []
    if xl:
        for r in results:
            if "skipped" in r:
                rows.append(r)
                continue
            c = Config(r["config"], r["precision"], r["kernel"], r["flops"], r["flops_dense"], lambda: None)
            rows.append(row(c, r["seconds"], tokens, peak, None, r["peak_rss_gib"]))
    else:
        rows = [row(c, times[c.name], tokens, peak, faults[c.name], None) for c in configs] + skipped
    summ = summary(rows)
    summ["logging_ms_per_step"] = logging_overhead_ms()
    if args.json:
        for obj in (head, *rows, summ):
            print(json.dumps(obj))
        return
    print(cpu_header())
    print(f"shape {shape} — {tokens} tokens/step, {head['threads']} threads, torch {torch.__version__}; "
          f"auto precision here: {head['auto_precision']}; sparse core bf16 path: {head['sparse_core_bf16_path']}")
    print("matmul peak (x @ W^T, n^3 up to 4096, all threads): " + ", ".join(
        f"{k} {peaks[k] / 1e12:.3f} TFLOP/s before, {peaks_after[k] / 1e12:.3f} after" for k in peaks)
        + " (MFU against the higher)")
    print(f"{'config':20} {'precision':9} {'kernel':20} {'s/step':>8} {'tokens/s':>9} {'MFU':>6} {'MFU dense-eq':>12} "
          f"{'peak RSS GiB':>12}")
    for r in rows:
        if "skipped" in r:
            print(f"{r['config']:20} {r['skipped']}")
            continue
        rss = f"{r['peak_rss_gib']:.2f}" if r["peak_rss_gib"] is not None else "shared"
        print(f"{r['config']:20} {r['precision']:9} {r['kernel']:20} {r['s_per_step']:8.3f} {r['tokens_per_s']:9.0f} "
              f"{r['mfu']:6.1%} {r['mfu_dense_equivalent']:12.1%} {rss:>12}")
    for key in ("auto_vs_best_hf", "sparse75_auto_vs_best_hf", "sparse75_core_vs_best_hf", "auto_vs_hf_fp32",
                "sparse75_auto_vs_hf_fp32", "auto_vs_hf_bf16", "sparse75_auto_vs_hf_bf16", "sparse75_auto_vs_ours_auto"):
        if summ.get(key) is not None:
            print(f"{key:28} {summ[key]:.2f}x" + (f"  (best HF: {summ['best_hf']})" if "hf" in key else ""))
    print(f"metrics logging (event line + SQLite rows) per step: {summ['logging_ms_per_step']:.2f} ms")


if __name__ == "__main__":
    main()
