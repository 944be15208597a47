"""Benchmark of the sparse matmul core against dense MKL, torch.sparse and sparseprop.

One training step of one linear layer = forward Y = X W^T, input gradient
dX = dY W, weight gradient dW = dY^T X (for the sparse kernels only at the
mask's nonzeros), no bias.  Implementations are run interleaved
(every repeat runs each of them once) so load changes on a shared machine hit
all of them alike; reported times are medians after one warm-up round.

--precision fp32 (default): fp32 everywhere; baseline dense MKL.
--precision bf16: bf16 activations; baseline the dense bf16 products (torch's bf16 matmul, oneDNN),
against our fp32 core and our bf16 core (bf16 activations and values, fp32 accumulation, bf16 Y and
dX, fp32 dW); a summary gives the bf16 core's speed-up over the fp32 core per sparsity.

GFLOP/s are *dense-equivalent*: 2*N*in*out per product divided by the time,
whatever the sparsity, so they compare directly with the dense column.

Usage:  python bench/sparse_core.py [--quick] [--json] [--repeats R] [--precision fp32|bf16]
"""
import argparse
import json
import math
import os
import platform
import statistics
import sys
import time

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..")))
# as the engine's CLI runs (engine/cli/main.py): OpenMP workers that spin after a dense product would hold
# the cores the next implementation's threads need
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402

from engine.model.kernels import ops  # noqa: E402
from engine.model.kernels import SparsePattern, kernel_available  # noqa: E402
from engine.train.memory import keep_freed_memory  # noqa: E402

try:  # optional third-party baseline
    from sparseprop.modules.linear import SparseLinear as _SPLinear
except Exception:  # not installed / does not build
    _SPLinear = None

SHAPES = [(768, 3072), (3072, 768), (768, 768)]
SPARSITIES = [0.5, 0.75, 0.9]


_clock = time.perf_counter  # --cpu-time switches to this thread's CPU time


def _timed(fn):
    t0 = _clock()
    r = fn()
    return (_clock() - t0) * 1e3, r


class Dense:
    name = "dense"

    def __init__(self, x, w, dy, mask):
        self.x, self.w, self.dy = x, w, dy

    def step(self):
        x, w, dy = self.x, self.w, self.dy
        f, _ = _timed(lambda: x @ w.T)
        d, _ = _timed(lambda: dy @ w)
        g, _ = _timed(lambda: dy.T @ x)
        return {"fwd": f, "dx": d, "dw": g}


class DenseBF16(Dense):
    """torch's bf16 matmul (oneDNN) on bf16 activations and a bf16 weight: what autocast's linear runs."""
    name = "dense bf16"

    def __init__(self, x, w, dy, mask):
        super().__init__(x.bfloat16(), w.bfloat16(), dy.bfloat16(), mask)


class Ours:
    """Exactly the calls sparse_linear makes on a layer's packed values (the weight at the mask's
    nonzeros, as SparseLinear stores it): X/dY tiling, values scattered into each plan's order, the
    row-major outputs, and the weight gradient at the nonzeros (values-shaped; no dense dW exists).
    The tiling of dY is shared by dX and dW and is counted in dX."""
    name = "ours"

    def __init__(self, x, w, dy, mask):
        self.x, self.dy = x, dy
        self.p = SparsePattern.from_mask(mask)
        self.v = self.p.pack(w)

    def step(self):
        x, v, dy, p = self.x, self.v, self.dy, self.p
        t0 = _clock()
        tiles = ops._fwd_tiles(x, p)
        ops._forward(tiles, v, None, p)
        t1 = _clock()
        dyt = ops._tile(dy, "dyt")[0]
        ops._grad_input(dy, v, p, dyt)
        t2 = _clock()
        ops._grad_values(tiles, dyt, p)
        t3 = _clock()
        return {"fwd": (t1 - t0) * 1e3, "dx": (t2 - t1) * 1e3, "dw": (t3 - t2) * 1e3}


class OursBF16(Ours):
    """The bf16 core, as sparse_linear runs it under autocast: bf16 activations, the fp32 master values
    rounded to bf16 for each product, bf16 Y and dX, fp32 dW."""
    name = "ours bf16"

    def __init__(self, x, w, dy, mask):
        super().__init__(x.bfloat16(), w, dy.bfloat16(), mask)


class TorchSparse:
    """torch.sparse CSR: W and W^T as CSR built once (values not refreshed per
    step, which favours this baseline), sampled_addmm for dW at the mask."""
    name = "torch.sparse"

    def __init__(self, x, w, dy, mask):
        self.x, self.dy = x, dy
        self.w_csr = w.to_sparse_csr()
        self.wt_csr = w.T.contiguous().to_sparse_csr()
        self.m_csr = mask.to(torch.float32).to_sparse_csr()
        self.dyt = dy.T.contiguous()

    def step(self):
        x, dy = self.x, self.dy
        f, _ = _timed(lambda: torch.mm(self.w_csr, x.T).T)
        d, _ = _timed(lambda: torch.mm(self.wt_csr, dy.T).T)
        g, _ = _timed(lambda: torch.sparse.sampled_addmm(self.m_csr, dy.T, x, beta=0.0))
        return {"fwd": f, "dx": d, "dw": g}


class SparseProp:
    """sparseprop's SparseLinear; its backward computes dX and dW together."""
    name = "sparseprop"

    def __init__(self, x, w, dy, mask):
        self.x, self.dy = x, dy
        self.m = _SPLinear(dense_weight=w.clone())

    def step(self):
        x = self.x.detach().requires_grad_()
        with torch.enable_grad():
            f, y = _timed(lambda: self.m(x))
            b, _ = _timed(lambda: y.backward(self.dy))
        self.m.W_val.grad = None
        return {"fwd": f, "bwd": b}


def run_case(n, fin, fout, sp, impls, repeats, seed=0):
    g = torch.Generator().manual_seed(seed)
    mask = torch.rand(fout, fin, generator=g) >= sp
    x = torch.randn(n, fin, generator=g)
    w = torch.randn(fout, fin, generator=g) * mask
    dy = torch.randn(n, fout, generator=g)
    objs = [cls(x, w, dy, mask) for cls in impls]
    times = {o.name: [] for o in objs}
    with torch.no_grad():
        for o in objs:  # warm-up round (JIT cache load, first touch of buffers)
            o.step()
        for _ in range(repeats):
            for o in objs:
                times[o.name].append(o.step())
    flop = 2.0 * n * fin * fout  # dense-equivalent FLOPs of one product
    rows = []
    for o in objs:
        keys = times[o.name][0].keys()
        med = {k: statistics.median(t[k] for t in times[o.name]) for k in keys}
        total = statistics.median(sum(t.values()) for t in times[o.name])
        rows.append({"n": n, "in": fin, "out": fout, "sparsity": sp, "impl": o.name,
                     "ms_fwd": med.get("fwd"), "ms_dx": med.get("dx"), "ms_dw": med.get("dw"),
                     "ms_bwd": med.get("bwd", (med.get("dx") or 0) + (med.get("dw") or 0)),
                     "ms_total": total,
                     "gflops_fwd": flop / med["fwd"] / 1e6,
                     "gflops_total": 3 * flop / total / 1e6})
    dense_total = rows[0]["ms_total"]  # the first implementation is the baseline
    for r in rows:
        r["speedup_vs_dense"] = dense_total / r["ms_total"]
        for k in ("dx", "dw"):
            r["gflops_" + k] = flop / r["ms_" + k] / 1e6 if r["ms_" + k] else None
    return rows


def cpu_description():
    """(CPU model, the features that decide the matmul paths, torch's own CPU capability)."""
    model = platform.processor() or "unknown CPU"
    try:
        with open("/proc/cpuinfo") as f:
            model = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), model)
    except OSError:
        pass
    try:
        from llvmlite import binding as ll
        feats = {k for k, v in ll.get_host_cpu_features().items() if v}
    except Exception:  # noqa: BLE001 - features unknown: say so
        feats = None

    def has(*names):
        return "?" if feats is None else ("yes" if all(n in feats for n in names) else "no")
    flags = (f"AMX {has('amx-tile', 'amx-bf16')}, AVX512-BF16 {has('avx512bf16')}, AVX-512 {has('avx512f')}, "
             f"AVX2 {has('avx2')}")
    return model, flags, torch.backends.cpu.get_cpu_capability()


def _ratio_summary(all_rows, num, den, what):
    """One line per sparsity: min-max and geometric mean over shapes and N of time(num) / time(den)."""
    lines = []
    for sp in sorted({r["sparsity"] for r in all_rows}):
        by = {}
        for r in all_rows:
            if r["sparsity"] == sp:
                by.setdefault((r["n"], r["in"], r["out"]), {})[r["impl"]] = r["ms_total"]
        q = [v[num] / v[den] for v in by.values() if num in v and den in v]
        if q:
            gm = math.exp(sum(math.log(x) for x in q) / len(q))
            lines.append(f"  {what} at {sp:.0%} sparsity: {min(q):.2f}-{max(q):.2f}x (geometric mean {gm:.2f}x, "
                         f"{len(q)} cases)")
    return lines


def _fmt(v, spec):
    return format(v, spec) if v is not None else "-".rjust(len(format(0.0, spec)))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="only N = 512 (under two minutes)")
    ap.add_argument("--json", action="store_true", help="one JSON object per line")
    ap.add_argument("--repeats", type=int, default=9, help="timed repeats per case (median)")
    ap.add_argument("--precision", choices=("fp32", "bf16"), default="fp32",
                    help="bf16: bf16 dense products vs our fp32 and bf16 cores")
    ap.add_argument("--sparsities", type=float, nargs="+", default=SPARSITIES, help="sparsities to run")
    ap.add_argument("--threads", type=int, default=None,
                    help="threads for torch and numba (default: all cores)")
    ap.add_argument("--cpu-time", action="store_true",
                    help="with --threads 1: time with this thread's CPU time instead of wall "
                         "clock, which is robust to other processes sharing the cores")
    args = ap.parse_args(argv)
    global _clock
    # as every engine stage runs (engine/train/memory.py), for all implementations alike: without it each
    # fresh multi-MB output (dense and sparse) is mmap'ed and page-faulted anew on every call
    kept = keep_freed_memory()
    if args.threads:
        torch.set_num_threads(args.threads)
        if _SPLinear is not None:
            os.environ["OMP_NUM_THREADS"] = str(args.threads)
    if args.cpu_time:
        if args.threads != 1:
            ap.error("--cpu-time needs --threads 1 (CPU time of one thread)")
        _clock = time.thread_time

    bf16 = args.precision == "bf16"
    if not kernel_available() or (bf16 and not kernel_available("bf16")):
        print(f"numba kernels not available ({args.precision})", file=sys.stderr)
        return 1
    if args.threads:
        import numba
        numba.set_num_threads(args.threads)
        # numba's OpenMP pool shares torch's libgomp and resets its thread count to all cores as it
        # starts: set torch's again (MKL keeps its own, oneDNN's bf16 matmul follows OpenMP's)
        torch.set_num_threads(args.threads)
    if bf16:  # torch.sparse and sparseprop have no bf16 path worth timing
        impls = [DenseBF16, Ours, OursBF16]
    else:
        impls = [Dense, Ours, TorchSparse] + ([SparseProp] if _SPLinear is not None else [])
    ns = [512] if args.quick else [512, 2048]

    if not args.json:
        model, flags, capability = cpu_description()
        print(f"CPU: {model}; {flags}; torch CPU capability {capability}; "
              f"sparse core bf16 path: {ops.bf16_path()}")
        print(f"Sparse linear core: one training step of one linear layer, {args.precision}, no bias, "
              f"{torch.get_num_threads()} threads, "
              + ("thread CPU time" if args.cpu_time else "wall clock")
              + f", load average at start {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores, "
              f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY')}, "
              f"freed memory kept for reuse: {'yes' if kept else 'no'}")
        print("  fwd: Y = X W^T   dX = dY W   dW = dY^T X (sparse impls: only at mask nonzeros)")
        print(f"  median of {args.repeats} interleaved repeats after a warm-up; GF/s = dense-equivalent "
              "GFLOP/s (2*N*in*out per product / time, regardless of sparsity)")
        print("  ours includes X/dY tiling, value scatters, row-major Y/dX; its dW is the gradient of the "
              "packed nonzeros (no dense dW)"
              + ("; bf16: activations bf16 for 'dense bf16' and 'ours bf16', fp32 for 'ours' (the fp32 core); "
                 "'vs dense' is against 'dense bf16'" if bf16 else
                 "; sparseprop reports dX+dW together (in the dW column)" if _SPLinear else
                 "; sparseprop not installed"))
        hdr = (f"{'N':>5} {'in':>5} {'out':>5} {'sp':>5} {'impl':<13}"
               f"{'fwd ms':>9}{'dX ms':>9}{'dW ms':>9}{'total ms':>10}"
               f"{'fwd GF/s':>10}{'dX GF/s':>9}{'dW GF/s':>9}{'tot GF/s':>10}{'vs dense':>10}")
        print(hdr)
        print("-" * len(hdr))
    all_rows = []
    for n in ns:
        for fin, fout in SHAPES:
            for sp in args.sparsities:
                rows = run_case(n, fin, fout, sp, impls, args.repeats)
                all_rows += rows
                for r in rows:
                    if args.json:
                        print(json.dumps({**r, "precision": args.precision, "malloc_keeps_freed_memory": kept}),
                              flush=True)
                        continue
                    dw = r["ms_dw"] if r["ms_dw"] is not None else r["ms_bwd"]
                    dwg = r["gflops_dw"] if r["ms_dw"] is not None else 2 * 2.0 * n * fin * fout / dw / 1e6
                    print(f"{n:>5} {fin:>5} {fout:>5} {sp:>5.2f} {r['impl']:<13}"
                          f"{_fmt(r['ms_fwd'], '9.2f')}{_fmt(r['ms_dx'], '9.2f')}{_fmt(dw, '9.2f')}"
                          f"{r['ms_total']:>10.2f}{r['gflops_fwd']:>10.1f}{_fmt(r['gflops_dx'], '9.1f')}"
                          f"{dwg:>9.1f}{r['gflops_total']:>10.1f}{r['speedup_vs_dense']:>9.2f}x",
                          flush=True)
                if not args.json:
                    print()
    if not args.json:
        print(f"numba threading layer: {ops.thread_pool()}, load average at end {os.getloadavg()[0]:.1f}")
        if bf16:
            print("Summary, total step time, ratio over shapes and N:")
            for line in (_ratio_summary(all_rows, "ours", "ours bf16", "bf16 core vs fp32 core (fp32 ms / bf16 ms)")
                         + _ratio_summary(all_rows, "dense bf16", "ours bf16", "bf16 core vs dense bf16")):
                print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
