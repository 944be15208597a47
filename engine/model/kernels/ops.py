"""Sparse linear layer (forward, input gradient, SDDMM weight gradient) on CPU.

Torch tensors are handed to the numba kernels as zero-copy numpy views; all
scratch buffers come from ``torch.empty`` because torch's allocator aligns to
64 bytes, so every 512-byte feature row of a tile starts on a cache line.
"""
import statistics
import threading
import time

import numpy as np
import torch

from engine.model.kernels.pattern import SparsePattern

T = 128  # must match _kernels.T

_K = None
_K_ERR = None


def _kernels():
    """Import the numba module lazily (it is heavy, and optional)."""
    global _K, _K_ERR
    if _K is None and _K_ERR is None:
        try:
            from engine.model.kernels import _kernels as k
            _K = k
        except Exception as e:  # numba/llvmlite missing or broken
            _K_ERR = e
    return _K


_AVAILABLE = None


def kernel_available():
    """True when numba imports and the kernels reproduce a dense reference."""
    global _AVAILABLE
    if _AVAILABLE is None:
        _AVAILABLE = False
        if _kernels() is not None:
            try:
                g = torch.Generator().manual_seed(0)
                mask = torch.rand(9, 70, generator=g) < 0.5
                w = torch.randn(9, 70, generator=g) * mask
                x = torch.randn(5, 70, generator=g)
                dy = torch.randn(5, 9, generator=g)
                p = SparsePattern.from_mask(mask)
                v = p.pack(w)
                ctx = _fwd_tiles(x, p)
                y = _forward(ctx, v, None, p)
                dx = _grad_input(dy, v, p, _tile(dy)[0])
                gv = _grad_values(ctx, _tile(dy)[0], p)
                ok = (torch.allclose(y, x @ w.T, atol=1e-4)
                      and torch.allclose(dx, dy @ w, atol=1e-4)
                      and torch.allclose(gv, p.pack(dy.T @ x), atol=1e-4))
                _AVAILABLE = bool(ok)
            except Exception:
                _AVAILABLE = False
    return _AVAILABLE


_WS = threading.local()


def _scratch(name, numel, dtype):
    """Reusable scratch buffer per thread.  Fresh multi-MB allocations are
    mmap'ed and page-faulted on every step, which costs as much as a small
    layer's whole kernel; intermediates (tiled dY, values in plan order,
    SDDMM values) never escape."""
    bufs = getattr(_WS, "bufs", None)
    if bufs is None:
        bufs = _WS.bufs = {}
    key = (name, dtype)
    b = bufs.get(key)
    if b is None or b.numel() < numel:
        b = bufs[key] = torch.empty(max(numel, 1), dtype=dtype)
    return b[:numel]


# --- building blocks (each one of the timed products uses them) -------------

def _tile(a2, scratch=None):
    """Row-major [n, f] tensor -> (flat tiled [ntiles*f*T] tensor, ntiles)."""
    n, f = a2.shape
    nt = (n + T - 1) // T
    if scratch is None:
        out = torch.empty(nt * f * T, dtype=a2.dtype)
    else:
        out = _scratch(scratch, nt * f * T, a2.dtype)
    _call("to_tiles", n * f, a2.reshape(-1).numpy(), n, f, nt, out.numpy(), _dummy(a2.dtype))
    return out, nt


_DUMMIES = {}


def _dummy(dtype):
    if dtype not in _DUMMIES:
        _DUMMIES[dtype] = torch.zeros(1, dtype=dtype).numpy()
    return _DUMMIES[dtype]


class _Tiles:
    __slots__ = ("xt", "nt", "n")

    def __init__(self, xt, nt, n):
        self.xt, self.nt, self.n = xt, nt, n


def _fwd_tiles(x2, p):
    xt, nt = _tile(x2)
    return _Tiles(xt, nt, x2.shape[0])


def _plan_values(values, p, pl, name):
    """A layer's values (row-major) in a plan's entry order."""
    out = _scratch(name, p.nnz, values.dtype)
    _call("scatter", p.nnz * SCATTER_COST, values.numpy(), pl.pos, out.numpy())
    return out


# Below this much work (elements moved, or multiply-adds) a product runs on the
# calling thread: a numba parallel launch costs tens of microseconds, more
# when torch's OpenMP workers are still spinning on the other core, and the
# demo model's 128x128 layers are only ~100 us of work in all.
SERIAL_WORK = 1 << 21
# Token tiles per SDDMM chunk (even: the SDDMM takes tiles in pairs). 4 tiles = 512 tokens: a chunk of
# dY for 3072 outputs is 6 MB, which stays in L3 while every column block re-reads it
SDDMM_CHUNK_TILES = 4
# A scatter moves one value per nonzero and is memory-bound: two threads only pay off from ~1M values
SCATTER_COST = 2


def _nwork(work):
    # numba's workqueue pool (used where the OpenMP one is not, see _kernels) aborts the process on
    # concurrent launches from two Python threads, so only the main thread uses a pool
    if work < SERIAL_WORK or threading.current_thread() is not threading.main_thread():
        return 1
    import numba

    # the engine sizes its thread use with torch.set_num_threads; follow it
    return max(1, min(numba.get_num_threads(), torch.get_num_threads()))


def thread_pool() -> str:
    """Name of the numba thread pool the parallel kernels run on (see _kernels), or "not started"
    while every product so far ran on the calling thread."""
    import numba
    try:
        return numba.threading_layer()
    except ValueError:
        return "not started"


def _call(name, work, *args, queues=1):
    """Run kernel ``name``: its serial part directly, or the prange wrapper. ``queues`` zeroed int64
    counters go with it (the work queues its parts draw items from; see _kernels)."""
    nw = _nwork(work)
    ctr = np.zeros(queues, dtype=np.int64)
    if nw == 1:
        getattr(_K, name + "_part")(*args, ctr, 0, 1)
    else:
        getattr(_K, name + "_par")(*args, ctr, nw)


def _bias_arg(bias, dtype):
    if bias is None:
        return _dummy(dtype), False
    return bias.detach().to(dtype).contiguous().numpy(), True


def _forward(tiles, values, bias, p):
    """Y = X W^T (+ b), row-major, from tiled X and the layer's values."""
    pl = p.fwd
    dt = tiles.xt.dtype
    vals = _plan_values(values, p, pl, "vals_fwd")
    y = torch.empty(tiles.n, p.out_features, dtype=dt)
    b, use = _bias_arg(bias, dt)
    _call("spmm", p.nnz * tiles.nt * T, tiles.xt.numpy(), p.in_features, pl.idx, vals.numpy(),
          pl.ptr, p.out_features, pl.ncb, tiles.nt, tiles.n, y.view(-1).numpy(), b, use, pl.rc)
    return y


def _grad_input(dy2, values, p, dyt):
    """dX = dY W via W^T's column-blocked CSR."""
    n = dy2.shape[0]
    nt = (n + T - 1) // T
    pl = p.bwd
    vals = _plan_values(values, p, pl, "vals_bwd")
    dx = torch.empty(n, p.in_features, dtype=dyt.dtype)
    _call("spmm", p.nnz * nt * T, dyt.numpy(), p.out_features, pl.idx, vals.numpy(), pl.ptr,
          p.in_features, pl.ncb, nt, n, dx.view(-1).numpy(), _dummy(dyt.dtype), False, pl.rc)
    return dx


def _grad_values(tiles, dyt, p):
    """Gradient of the layer's values: dY^T X at the mask's nonzeros only (SDDMM), row-major.
    No dense [out, in] product or gradient is ever formed."""
    pl = p.sdd
    g = torch.empty(p.nnz, dtype=dyt.dtype)
    nchunks = (tiles.nt + SDDMM_CHUNK_TILES - 1) // SDDMM_CHUNK_TILES
    acc = _scratch("sdd_acc", p.nnz if nchunks > 1 else 1, dyt.dtype)  # per-chunk sums meet here
    _call("sddmm", p.nnz * tiles.nt * T, tiles.xt.numpy(), p.in_features, dyt.numpy(),
          p.out_features, pl.idx, pl.ptr, pl.ncb, tiles.nt, g.numpy(), pl.src, acc.numpy(), pl.rc, pl.max_item,
          SDDMM_CHUNK_TILES, queues=2 * nchunks)
    return g


def _compute_dtype(*ts):
    dt = ts[0].dtype
    return dt if dt in (torch.float32, torch.float64) else torch.float32


# --- autograd -----------------------------------------------------------------

class SparseLinearFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, values, bias, pattern):
        p = pattern
        if values.shape != (p.nnz,):
            raise ValueError(f"values shape {tuple(values.shape)} does not match the pattern's {p.nnz} nonzeros")
        if x.shape[-1] != p.in_features:
            raise ValueError(f"input has {x.shape[-1]} features, layer expects {p.in_features}")
        dt = _compute_dtype(values)
        lead = x.shape[:-1]
        x2 = x.detach().reshape(-1, p.in_features).to(dt).contiguous()
        v = values.detach().to(dt).contiguous()
        n = x2.shape[0]
        ctx.pattern, ctx.lead, ctx.x_dtype, ctx.dt = p, lead, x.dtype, dt
        ctx.has_bias = bias is not None
        ctx.b_dtype = bias.dtype if bias is not None else None
        ctx.save_for_backward(values)
        if n == 0 or p.nnz == 0 or not kernel_available():
            y = x2 @ p.unpack(v).T
            if bias is not None:
                y = y + bias.detach().to(dt)
            ctx.dense, ctx.tiles = True, None
            ctx.x2 = x2 if ctx.needs_input_grad[1] else None
            return y.reshape(*lead, p.out_features).to(x.dtype)
        tiles = _fwd_tiles(x2, p)
        y = _forward(tiles, v, bias, p)
        # the tiled X is what the SDDMM reads; keep it instead of X itself
        ctx.dense, ctx.x2 = False, None
        ctx.tiles = tiles if ctx.needs_input_grad[1] else None
        return y.reshape(*lead, p.out_features).to(x.dtype)

    @staticmethod
    def backward(ctx, gy):
        (values,) = ctx.saved_tensors
        p, dt = ctx.pattern, ctx.dt
        need_x, need_v, need_b = ctx.needs_input_grad[:3]
        gy2 = gy.reshape(-1, p.out_features).to(dt).contiguous()
        v = values.detach().to(dt).contiguous()
        gx = gv = gb = None
        if ctx.dense:
            # exact dense path (empty input / empty mask / no kernels)
            if need_x:
                gx = (gy2 @ p.unpack(v)).reshape(*ctx.lead, p.in_features).to(ctx.x_dtype)
            if need_v:
                gv = p.pack(gy2.T @ ctx.x2).to(values.dtype)
        else:
            dyt = _tile(gy2, "dyt")[0] if (need_x or need_v) else None
            if need_x:
                gx = _grad_input(gy2, v, p, dyt).reshape(*ctx.lead, p.in_features).to(ctx.x_dtype)
            if need_v:
                gv = _grad_values(ctx.tiles, dyt, p).to(values.dtype)
        if need_b and ctx.has_bias:
            gb = gy2.sum(0).to(ctx.b_dtype)
        return gx, gv, gb, None


def sparse_linear(x, values, bias, pattern):
    """``x @ W.T + bias`` where W holds ``values`` at the pattern's nonzeros (row-major) and zeros
    elsewhere, with sparse kernels; differentiable in x, values and bias."""
    return SparseLinearFunction.apply(x, values, bias, pattern)


# --- timing for the engine's per-shape "auto" choice ---------------------------

def _interleaved_ms(fns, repeats):
    """Median ms of each function, run in turns (one call of each per round, after a warm-up round),
    so a change in machine load during the timing hits every candidate alike."""
    for fn in fns:
        fn()  # warm-up (JIT / cache load, first-touch of buffers)
    ts = [[] for _ in fns]
    for _ in range(max(1, repeats)):
        for fn, out in zip(fns, ts):
            t0 = time.perf_counter()
            fn()
            out.append((time.perf_counter() - t0) * 1e3)
    return [statistics.median(t) for t in ts]


def time_kernels(pattern, n_tokens, repeats=5):
    """Median ms of forward + dX + dW for this layer shape: dense torch vs our kernels."""
    p = pattern
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n_tokens, p.in_features, generator=g)
    w = torch.randn(p.out_features, p.in_features, generator=g) * p.mask
    v = p.pack(w)
    dy = torch.randn(n_tokens, p.out_features, generator=g)

    def dense():  # the dense path of a packed layer: unpack, three dense products, pack the gradient
        wd = p.unpack(v)
        x @ wd.T
        dy @ wd
        p.pack(dy.T @ x)

    def sparse():
        tiles = _fwd_tiles(x, p)
        _forward(tiles, v, None, p)
        dyt = _tile(dy, "dyt")[0]
        _grad_input(dy, v, p, dyt)
        _grad_values(tiles, dyt, p)

    with torch.no_grad():
        if not kernel_available():
            return {"dense_ms": float(_interleaved_ms([dense], repeats)[0]), "sparse_ms": float("inf")}
        d, s = _interleaved_ms([dense, sparse], repeats)
    return {"dense_ms": float(d), "sparse_ms": float(s)}
