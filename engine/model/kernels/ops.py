"""Sparse linear layer (forward, input gradient, SDDMM weight gradient) on CPU.

Torch tensors are handed to the numba kernels as zero-copy numpy views; all
scratch buffers come from ``torch.empty`` because torch's allocator aligns to
64 bytes, so every 512-byte feature row of a tile starts on a cache line.
"""
import ctypes
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


_AVAILABLE = {}
PRECISIONS = ("fp32", "bf16")


def kernel_available(precision="fp32"):
    """True when numba imports and the kernels of ``precision`` ("fp32", or "bf16": bf16 activations
    and values, fp32 accumulation) reproduce a dense reference."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if precision not in _AVAILABLE:
        ok = False
        if _kernels() is not None:
            try:
                # the first call may come from inside a training step (a resumed run skips the kernel
                # choice): under autocast the dense references would be bf16 products, the check would
                # fail and the run would leave the core for the dense fallback, parting from the
                # uninterrupted run. The check is the same wherever it is called from.
                with torch.autocast("cpu", enabled=False), torch.no_grad():
                    ok = _self_check_fp32() if precision == "fp32" else _self_check_bf16()
            except Exception:
                ok = False
        _AVAILABLE[precision] = bool(ok)
    return _AVAILABLE[precision]


def _self_check_fp32():
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
    return (torch.allclose(y, x @ w.T, atol=1e-4)
            and torch.allclose(dx, dy @ w, atol=1e-4)
            and torch.allclose(gv, p.pack(dy.T @ x), atol=1e-4))


def _self_check_bf16():
    """The bf16 products against fp32 products of the same bf16-rounded operands: 40 tokens and 70 x
    40 features reach the vector blocks (32 tokens, 32 features, 16 outputs) and the scalar edges."""
    g = torch.Generator().manual_seed(0)
    mask = torch.rand(40, 70, generator=g) < 0.5
    w = (torch.randn(40, 70, generator=g) * mask).bfloat16()
    x = torch.randn(40, 70, generator=g).bfloat16()
    dy = torch.randn(40, 40, generator=g).bfloat16()
    p = SparsePattern.from_mask(mask)
    v = p.pack(w)
    ctx = _fwd_tiles(x, p)
    dyt = _tile(dy, bf16=True)[0]
    y, dx, gv = _forward(ctx, v, None, p), _grad_input(dy, v, p, dyt), _grad_values(ctx, dyt, p)
    wf, xf, dyf = w.float(), x.float(), dy.float()

    def close(a, r, tol):
        return a.shape == r.shape and float((a.float() - r).abs().max()) <= tol * float(r.abs().max())
    return (y.dtype == dx.dtype == torch.bfloat16 and gv.dtype == torch.float32
            and close(y, xf @ wf.T, 1e-2) and close(dx, dyf @ wf, 1e-2) and close(gv, p.pack(dyf.T @ xf), 1e-4))


def bf16_path():
    """Which bf16 path the sparse core runs on this machine, in words."""
    if _kernels() is None:
        return "none (numba kernels unavailable)"
    if _K.BF16_DOT:
        return "AVX512-BF16 dot product"
    if _K.HAS_BF16_DOT:
        return "bf16 storage, fp32 FMA (AVX512-BF16 off: MEDISWIFT_BF16_PATH=widen)"
    return "bf16 storage, fp32 FMA (no AVX512-BF16)"


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

def _tile(a2, scratch=None, bf16=None):
    """Row-major [n, f] tensor -> (flat tiled [ntiles*f*T] tensor, ntiles). ``bf16`` (default: when
    a2 is bf16): bf16 tiles, as int16 bit patterns, from fp32 (rounded to nearest even) or bf16 rows."""
    n, f = a2.shape
    nt = (n + T - 1) // T
    bf16 = a2.dtype == torch.bfloat16 if bf16 is None else bf16
    dt = torch.int16 if bf16 else a2.dtype
    if scratch is None:
        out = torch.empty(nt * f * T, dtype=dt)
    else:
        out = _scratch(scratch, nt * f * T, dt)
    if bf16:
        src = a2.reshape(-1)
        src = src.view(torch.int16) if src.dtype == torch.bfloat16 else src.float()
        _call("to_tiles16", n * f, src.numpy(), n, f, nt, out.numpy())
    else:
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


def _fwd_tiles(x2, p, bf16=None):
    xt, nt = _tile(x2, bf16=bf16)
    return _Tiles(xt, nt, x2.shape[0])


_CTYPES = {torch.float32: ctypes.c_float, torch.int16: ctypes.c_int16, torch.float64: ctypes.c_double}


def _param_view(t: torch.Tensor) -> np.ndarray:
    """Zero-copy numpy view of a contiguous CPU tensor that may be a parameter's own memory.

    ``Tensor.numpy()`` marks the storage as never resizable (numpy would otherwise be left pointing
    at freed memory), and FSDP2 frees an unsharded parameter by resizing its storage to nothing, so
    a parameter exported that way fails the next reshard. The view is taken from the address
    instead; the caller holds ``t`` for as long as the kernel runs."""
    t = t.contiguous()
    if t.numel() == 0:
        return np.empty(tuple(t.shape), dtype=torch.empty(0, dtype=t.dtype).numpy().dtype)
    ptr = ctypes.cast(t.data_ptr(), ctypes.POINTER(_CTYPES[t.dtype]))
    return np.ctypeslib.as_array(ptr, shape=(t.numel(),)).reshape(tuple(t.shape))


def _bits(t):
    """numpy view of a tensor, bf16 as its int16 bit patterns (numpy has no bf16)."""
    return (t.view(torch.int16) if t.dtype == torch.bfloat16 else t).numpy()


def _plan_values(values, p, pl, name, bf16=False):
    """A layer's values (row-major) in a plan's entry order; with ``bf16`` (or bf16 values) as bf16
    bits (int16). (torch's vectorised rounding, then the scatter, beat rounding in the scatter's
    scalar loop: 0.49 against 0.63 ms for 590k values.)"""
    if bf16 or values.dtype == torch.bfloat16:
        values = values.to(torch.bfloat16).view(torch.int16)
    out = _scratch(name, p.nnz, values.dtype)
    _call("scatter", p.nnz * SCATTER_COST, _param_view(values), pl.pos, out.numpy())
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
    b = bias.detach().to(dtype).contiguous()
    # the parameter itself (alive as long as the layer): a view that leaves its storage resizable;
    # a converted copy: numpy's own view, which keeps the copy alive
    return (_param_view(b) if b.data_ptr() == bias.data_ptr() else b.numpy()), True


def _forward(tiles, values, bias, p):
    """Y = X W^T (+ b), row-major, from tiled X and the layer's values. bf16 tiles (int16): values
    bf16, Y bf16 (fp32 accumulation, rounded once), an fp32 bias added before the rounding."""
    bf16 = tiles.xt.dtype == torch.int16
    pl = p.fwd16 if bf16 else p.fwd
    dt = torch.float32 if bf16 else tiles.xt.dtype
    vals = _plan_values(values, p, pl, "vals_fwd", bf16)
    y = torch.empty(tiles.n, p.out_features, dtype=torch.bfloat16 if bf16 else dt)
    b, use = _bias_arg(bias, dt)
    args = (tiles.xt.numpy(), p.in_features, pl.idx, vals.numpy(), pl.ptr, p.out_features, pl.ncb, tiles.nt,
            tiles.n, _bits(y.view(-1)), b, use, pl.rc)
    if bf16:
        _call("spmm16", p.nnz * tiles.nt * T, *args, _K.BF16_DOT)
    else:
        _call("spmm", p.nnz * tiles.nt * T, *args)
    return y


def _grad_input(dy2, values, p, dyt):
    """dX = dY W via W^T's column-blocked CSR (bf16 tiles dyt: bf16 values and dX)."""
    n = dy2.shape[0]
    nt = (n + T - 1) // T
    bf16 = dyt.dtype == torch.int16
    pl = p.bwd16 if bf16 else p.bwd
    vals = _plan_values(values, p, pl, "vals_bwd", bf16)
    dx = torch.empty(n, p.in_features, dtype=torch.bfloat16 if bf16 else dyt.dtype)
    dt = torch.float32 if bf16 else dyt.dtype
    args = (dyt.numpy(), p.out_features, pl.idx, vals.numpy(), pl.ptr, p.in_features, pl.ncb, nt, n,
            _bits(dx.view(-1)), _dummy(dt), False, pl.rc)
    if bf16:
        _call("spmm16", p.nnz * nt * T, *args, _K.BF16_DOT)
    else:
        _call("spmm", p.nnz * nt * T, *args)
    return dx


def _grad_values(tiles, dyt, p):
    """Gradient of the layer's values: dY^T X at the mask's nonzeros only (SDDMM), row-major.
    No dense [out, in] product or gradient is ever formed. bf16 tiles: fp32 gradient."""
    pl = p.sdd
    bf16 = dyt.dtype == torch.int16
    dt = torch.float32 if bf16 else dyt.dtype
    g = torch.empty(p.nnz, dtype=dt)
    nchunks = (tiles.nt + SDDMM_CHUNK_TILES - 1) // SDDMM_CHUNK_TILES
    acc = _scratch("sdd_acc", p.nnz if nchunks > 1 else 1, dt)  # per-chunk sums meet here
    args = (tiles.xt.numpy(), p.in_features, dyt.numpy(), p.out_features, pl.idx, pl.ptr, pl.ncb, tiles.nt,
            g.numpy(), pl.src, acc.numpy(), pl.rc, pl.max_item, SDDMM_CHUNK_TILES)
    if bf16:
        _call("sddmm16", p.nnz * tiles.nt * T, *args, _K.BF16_DOT, queues=2 * nchunks)
    else:
        _call("sddmm", p.nnz * tiles.nt * T, *args, queues=2 * nchunks)
    return g


def _compute_dtype(*ts):
    dt = ts[0].dtype
    return dt if dt in (torch.float32, torch.float64) else torch.float32


def _wants_bf16(x, values):
    """The bf16 core runs for bf16 inputs, and under CPU autocast to bf16 (as autocast's linear would
    compute in bf16), except in float64 (gradcheck)."""
    if x.dtype == torch.bfloat16:
        return True
    if torch.float64 in (x.dtype, values.dtype):
        return False
    return torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16


def _rows(t, n_features, bf16):
    """[..., f] -> contiguous [n, f]: bf16 or fp32 rows for the bf16 core (it rounds fp32 itself
    while tiling), the compute dtype otherwise."""
    t2 = t.detach().reshape(-1, n_features)
    if bf16 and t2.dtype not in (torch.bfloat16, torch.float32):
        t2 = t2.float()
    return t2.contiguous()


# --- autograd -----------------------------------------------------------------

class SparseLinearFunction(torch.autograd.Function):
    """fp32/fp64: products in the values' dtype. bf16 (see _wants_bf16): activations and the values
    rounded to bf16 (as autocast rounds a weight), fp32 accumulation; y and dX come out in bf16 (y
    stays bf16, dX is cast to x's dtype), the values' gradient in fp32 (master weights)."""

    @staticmethod
    def forward(ctx, x, values, bias, pattern):
        p = pattern
        if values.shape != (p.nnz,):
            raise ValueError(f"values shape {tuple(values.shape)} does not match the pattern's {p.nnz} nonzeros")
        if x.shape[-1] != p.in_features:
            raise ValueError(f"input has {x.shape[-1]} features, layer expects {p.in_features}")
        bf16 = _wants_bf16(x, values)
        dt = torch.bfloat16 if bf16 else _compute_dtype(values)
        lead = x.shape[:-1]
        x2 = _rows(x, p.in_features, bf16) if bf16 else x.detach().reshape(-1, p.in_features).to(dt).contiguous()
        v = values.detach().to(dt).contiguous()
        n = x2.shape[0]
        ctx.pattern, ctx.lead, ctx.x_dtype, ctx.dt = p, lead, x.dtype, dt
        ctx.has_bias = bias is not None
        ctx.b_dtype = bias.dtype if bias is not None else None
        ctx.save_for_backward(values)
        if n == 0 or p.nnz == 0 or not kernel_available("bf16" if bf16 else "fp32"):
            if bf16:  # dense bf16 products of the rounded operands, fp32 accumulation
                x2 = x2.to(torch.bfloat16)
                y = x2.float() @ p.unpack(v).float().T
                if bias is not None:
                    y = y + bias.detach().to(torch.bfloat16).float()
                y = y.to(torch.bfloat16)
            else:
                y = x2 @ p.unpack(v).T
                if bias is not None:
                    y = y + bias.detach().to(dt)
            ctx.dense, ctx.tiles = True, None
            ctx.x2 = x2 if ctx.needs_input_grad[1] else None
            return y.reshape(*lead, p.out_features).to(dt if bf16 else x.dtype)
        tiles = _fwd_tiles(x2, p, bf16=bf16)
        # autocast rounds the bias to bf16 too; it is added in fp32 before Y's rounding
        b = bias.detach().to(torch.bfloat16).float() if bf16 and bias is not None else bias
        y = _forward(tiles, v, b, p)
        # the tiled X is what the SDDMM reads; keep it instead of X itself
        ctx.dense, ctx.x2 = False, None
        ctx.tiles = tiles if ctx.needs_input_grad[1] else None
        return y.reshape(*lead, p.out_features).to(dt if bf16 else x.dtype)

    @staticmethod
    def backward(ctx, gy):
        (values,) = ctx.saved_tensors
        p, dt = ctx.pattern, ctx.dt
        bf16 = dt == torch.bfloat16
        need_x, need_v, need_b = ctx.needs_input_grad[:3]
        gy2 = _rows(gy, p.out_features, True) if bf16 else gy.reshape(-1, p.out_features).to(dt).contiguous()
        v = values.detach().to(dt).contiguous()
        gx = gv = gb = None
        if ctx.dense:
            # exact dense path (empty input / empty mask / no kernels)
            if bf16:
                gyf = gy2.to(torch.bfloat16).float()
                if need_x:
                    gx = (gyf @ p.unpack(v).float()).to(torch.bfloat16)
                    gx = gx.reshape(*ctx.lead, p.in_features).to(ctx.x_dtype)
                if need_v:
                    gv = p.pack(gyf.T @ ctx.x2.float()).to(values.dtype)
            else:
                if need_x:
                    gx = (gy2 @ p.unpack(v)).reshape(*ctx.lead, p.in_features).to(ctx.x_dtype)
                if need_v:
                    gv = p.pack(gy2.T @ ctx.x2).to(values.dtype)
        else:
            dyt = _tile(gy2, "dyt", bf16=bf16)[0] if (need_x or need_v) else None
            if need_x:
                gx = _grad_input(gy2, v, p, dyt).reshape(*ctx.lead, p.in_features).to(ctx.x_dtype)
            if need_v:
                gv = _grad_values(ctx.tiles, dyt, p).to(values.dtype)
        if need_b and ctx.has_bias:
            gb = (gy2.float().sum(0) if bf16 else gy2.sum(0)).to(ctx.b_dtype)
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


def time_kernels(pattern, n_tokens, repeats=5, precision="fp32"):
    """Median ms of forward + dX + dW for this layer shape: the dense path vs our kernels, in
    ``precision``. "bf16": bf16 activations; the dense candidate is what the masked dense path does
    under CPU autocast to bf16 (the unpacked weight cast to bf16 for the forward and again for dX, bf16
    products), ours the bf16 core."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    bf16 = precision == "bf16"
    p = pattern
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n_tokens, p.in_features, generator=g)
    w = torch.randn(p.out_features, p.in_features, generator=g) * p.mask
    v = p.pack(w)
    dy = torch.randn(n_tokens, p.out_features, generator=g)
    if bf16:
        x, dy = x.bfloat16(), dy.bfloat16()

    def dense():  # the dense path of a packed layer: unpack, three dense products, pack the gradient
        wd = p.unpack(v)
        if bf16:
            x @ wd.to(torch.bfloat16).T
            dy @ wd.to(torch.bfloat16)
            p.pack(dy.T @ x).float()
        else:
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
        if not kernel_available(precision):
            return {"dense_ms": float(_interleaved_ms([dense], repeats)[0]), "sparse_ms": float("inf")}
        d, s = _interleaved_ms([dense, sparse], repeats)
    return {"dense_ms": float(d), "sparse_ms": float(s)}
