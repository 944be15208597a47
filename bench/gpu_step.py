"""GPU training step: tokens/s, model FLOPs utilisation, peak memory, masked-sparse vs dense, and
(with two or more GPUs) the DDP and FSDP scaling efficiency of the engine's own runs.

    python bench/gpu_step.py                 # gpt3-125m and mediswift-med shapes, bf16, a few minutes
    python bench/gpu_step.py --json          # the same as one JSON object
    python bench/gpu_step.py --smoke         # tiny shapes on the CPU: checks the script itself

What it measures, interleaved in one run:
- the GPU's bf16 matmul peak (8192^3 products, median), the denominator of MFU;
- per shape, a dense step and a 75 %-masked step on the masked-dense path (the GPU path), bf16 autocast
  with fp32 master weights as the engine trains: seconds per step, tokens/s, MFU (the dense model's
  training FLOPs over time and peak; for the masked model also its dense-equivalent), peak memory;
- ``mediswift train mediswift-med`` for a few steps through the engine (the smoke run), its status;
- with N >= 2 GPUs: the engine on 1 and on N processes (DDP, then FSDP2), tokens/s of steps after the
  first three, efficiency = tokens/s(N) / (N x tokens/s(1)).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from engine.core.config import load_config  # noqa: E402
from engine.core.hardware import cpu_header  # noqa: E402
from engine.core.paths import resolve_preset  # noqa: E402
from engine.model.flops import flop_model_for  # noqa: E402
from engine.model.gpt import GPT  # noqa: E402
from engine.model.sparsity import apply_sparsity  # noqa: E402
from engine.train.optim import make_optimizer  # noqa: E402
from engine.train.precision import choose_precision  # noqa: E402
from engine.train.runtime import Runtime  # noqa: E402
from engine.train.step import lm_micro_batch, train_step  # noqa: E402

SHAPES = ("gpt3-125m", "mediswift-med")
SMOKE = {"n_layer": 2, "n_head": 2, "d_model": 64, "n_ctx": 64, "vocab": 512, "batch": 2}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bf16_peak(device: torch.device, n: int, repeats: int = 5) -> float:
    """Median FLOP/s of n^3 bf16 products on ``device``."""
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    for _ in range(2):
        a @ b
    sync(device)
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        for _ in range(10):
            a @ b
        sync(device)
        times.append((time.perf_counter() - t) / 10)
    return 2 * n ** 3 / statistics.median(times)


def shape_of(name: str, smoke: bool) -> tuple[object, int, int]:
    """(model config, vocab, batch) of a preset (or the smoke shape)."""
    import dataclasses

    if smoke:
        cfg = load_config(resolve_preset("demo"), {})
        model = dataclasses.replace(cfg.model, n_layer=SMOKE["n_layer"], n_head=SMOKE["n_head"],
                                    d_model=SMOKE["d_model"], n_ctx=SMOKE["n_ctx"], n_positions=SMOKE["n_ctx"])
        return model, SMOKE["vocab"], SMOKE["batch"]
    cfg = load_config(resolve_preset(name), {})
    return cfg.model, cfg.tokenizer.vocab_size, cfg.train.batch_size


class Step:
    """One configuration (dense or 75 %-masked) of a shape, ready to time."""

    def __init__(self, model_cfg, vocab: int, batch: int, level: float, device: torch.device):
        from engine.core.config import TrainConfig

        torch.manual_seed(0)
        self.model = GPT(model_cfg, vocab)
        if level:
            apply_sparsity(self.model, level, "uniform", 0)  # the masked-dense path: kernel stays "dense"
        self.model.to(device)
        fm = flop_model_for(self.model)
        self.flops_dense = fm.train_per_token(False)
        self.tc = TrainConfig()
        self.opt = make_optimizer(list(self.model.named_parameters()), self.tc)
        self.rt = Runtime(device, choose_precision("auto", device))
        self.x = torch.randint(0, vocab, (batch, model_cfg.n_ctx), device=device)
        self.tokens = self.x.numel()
        self.device = device
        self.times: list[float] = []

    def run(self, record: bool) -> None:
        sync(self.device)
        t = time.perf_counter()
        train_step(self.opt, lambda: lm_micro_batch(self.model, self.x, self.x, self.rt.autocast), 1,
                   self.tc.grad_clip, self.rt.grad_scaler())
        sync(self.device)
        if record:
            self.times.append(time.perf_counter() - t)


def measure_shape(name: str, device: torch.device, steps: int, peak: float, smoke: bool) -> dict:
    model_cfg, vocab, batch = shape_of(name, smoke)
    out = {"shape": name, "n_layer": model_cfg.n_layer, "d_model": model_cfg.d_model, "n_ctx": model_cfg.n_ctx,
           "vocab": vocab, "batch": batch}
    configs = {}
    for label, level in (("dense", 0.0), ("sparse75_masked", 0.75)):
        if device.type == "cuda":
            torch.cuda.empty_cache()
        configs[label] = Step(model_cfg, vocab, batch, level, device)
    for c in configs.values():  # warm-up: kernels, allocator, autocast caches
        for _ in range(2):
            c.run(False)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    for _ in range(steps):  # interleaved, so drift in clocks or temperature hits both alike
        for c in configs.values():
            c.run(True)
    for label, c in configs.items():
        s = statistics.median(c.times)
        out[label] = {"precision": c.rt.precision.name, "s_per_step": s, "tokens_per_s": c.tokens / s,
                      "mfu_dense_equivalent": c.flops_dense * c.tokens / s / peak}
    if device.type == "cuda":
        out["peak_memory_gib_both"] = torch.cuda.max_memory_allocated(device) / 2**30
    out["sparse_vs_dense_step"] = out["sparse75_masked"]["s_per_step"] / out["dense"]["s_per_step"]
    del configs
    return out


def engine_run(args: list[str], env: dict, timeout: float) -> dict:
    """``mediswift train`` for real; tokens/s of the steps after the first three, and the final status."""
    r = subprocess.run([sys.executable, "-m", "engine", "train", *args], capture_output=True, text=True, cwd=REPO,
                       env=env, timeout=timeout)
    events = [json.loads(ln) for ln in r.stdout.splitlines() if ln.startswith("{")]
    tps = [e["metrics"]["tokens_per_s"] for e in events if e["type"] == "metrics" and e["step"] > 3
           and "tokens_per_s" in e["metrics"]]
    fin = [e for e in events if e["type"] == "run_finished"]
    return {"rc": r.returncode, "status": fin[-1]["status"] if fin else None,
            "tokens_per_s": statistics.median(tps) if tps else None,
            "error": r.stderr.strip().splitlines()[-1] if r.returncode and r.stderr.strip() else None}


def engine_runs(n_gpus: int, smoke: bool, timeout: float) -> dict:
    tmp = Path(tempfile.mkdtemp(prefix="gpu-bench-"))
    env = {**os.environ, "MEDISWIFT_HOME": str(tmp)}
    common = ["--db", str(tmp / "runs.db"), "--set", "data.corpus=['builtin:hpo']", "--set", "train.eval_every=1000",
              "--set", "train.checkpoint_every=1000"]
    if smoke:
        common += ["--set", "model.n_layer=1", "--set", "model.d_model=32", "--set", "model.n_head=2", "--set",
                   "model.n_ctx=32", "--set", "tokenizer.vocab_size=300", "--set", "train.batch_size=2",
                   "--set", "data.max_documents=300"]
    out = {"smoke_run": engine_run(["demo" if smoke else "mediswift-med", *common, "--set", "train.max_steps=3"],
                                   env, timeout)}
    if n_gpus >= 2:
        shape = [*common, "--set", "train.max_steps=12", "--set", "model.n_ctx=1024", "--set", "train.batch_size=8"]
        one = engine_run(["gpt3-125m", *shape, "--set", "train.nproc=1"], env, timeout)
        out["scaling"] = {"gpus": n_gpus, "one_process_tokens_per_s": one["tokens_per_s"]}
        for strategy in ("ddp", "fsdp"):
            many = engine_run(["gpt3-125m", *shape, "--set", f"train.nproc={n_gpus}", "--set",
                               f"train.strategy={strategy}"], env, timeout)
            eff = (many["tokens_per_s"] / (n_gpus * one["tokens_per_s"])
                   if many["tokens_per_s"] and one["tokens_per_s"] else None)
            out["scaling"][strategy] = {**many, "efficiency": eff}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shapes", default=",".join(SHAPES))
    ap.add_argument("--steps", type=int, default=8, help="timed steps per configuration")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU (checks the script, measures nothing)")
    ap.add_argument("--no-engine", action="store_true", help="skip the engine runs (smoke run, scaling)")
    a = ap.parse_args()
    cuda = torch.cuda.is_available() and not a.smoke
    if not cuda and not a.smoke:
        print("no CUDA device here: this benchmark needs a GPU (use --smoke to check the script on the CPU)")
        sys.exit(2)
    device = torch.device("cuda" if cuda else "cpu")
    head = {"cpu": cpu_header(), "torch": torch.__version__, "smoke": a.smoke}
    if cuda:
        props = torch.cuda.get_device_properties(0)
        head.update(gpu=props.name, gpus=torch.cuda.device_count(), gpu_memory_gib=props.total_memory / 2**30,
                    cuda=torch.version.cuda)
    peak = bf16_peak(device, 256 if a.smoke else 8192)
    head["bf16_matmul_peak_tflops"] = peak / 1e12
    if not a.json:
        print(head["cpu"])
        if cuda:
            print(f"GPU: {head['gpu']} x {head['gpus']}, {head['gpu_memory_gib']:.0f} GiB, CUDA {head['cuda']}, torch "
                  f"{head['torch']}")
        print(f"bf16 matmul peak (measured): {peak / 1e12:.1f} TFLOP/s" + ("  [smoke: CPU, tiny]" if a.smoke else ""))
    shapes = []
    for name in a.shapes.split(","):
        r = measure_shape(name, device, 2 if a.smoke else a.steps, peak, a.smoke)
        shapes.append(r)
        if not a.json:
            print(f"\n{name}: {r['n_layer']} layers, d {r['d_model']}, n_ctx {r['n_ctx']}, batch {r['batch']}")
            for label in ("dense", "sparse75_masked"):
                c = r[label]
                print(f"  {label:16} {c['precision']:5} {c['s_per_step'] * 1000:8.1f} ms/step  {c['tokens_per_s']:10,.0f} "
                      f"tok/s  MFU {100 * c['mfu_dense_equivalent']:5.1f} %")
            if "peak_memory_gib_both" in r:
                print(f"  peak memory (both models resident): {r['peak_memory_gib_both']:.2f} GiB")
            print(f"  masked-sparse / dense step time: {r['sparse_vs_dense_step']:.3f}x")
    out = {"header": head, "shapes": shapes}
    if not a.no_engine:
        out["engine"] = engine_runs(head.get("gpus", 0), a.smoke, 900)
        if not a.json:
            e = out["engine"]
            print(f"\nengine smoke run: status {e['smoke_run']['status']} (exit {e['smoke_run']['rc']})"
                  + (f": {e['smoke_run']['error']}" if e['smoke_run']['error'] else ""))
            if "scaling" in e:
                s = e["scaling"]
                for strategy in ("ddp", "fsdp"):
                    eff = s[strategy]["efficiency"]
                    print(f"{strategy} on {s['gpus']} GPUs: scaling efficiency "
                          + (f"{100 * eff:.0f} %" if eff is not None else f"n/a ({s[strategy]['error']})"))
            else:
                print("scaling: needs two or more GPUs")
    if a.json:
        print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
