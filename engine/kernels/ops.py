"""Sparse linear layer (forward, input gradient, SDDMM weight gradient) on CPU.

Torch tensors are handed to the numba kernels as zero-copy numpy views; all
scratch buffers come from ``torch.empty`` because torch's allocator aligns to
64 bytes, so every 512-byte feature row of a tile starts on a cache line.
"""
import statistics
import time

import torch

from .pattern import SparsePattern

T = 128  # must match _kernels.T

_K = None
_K_ERR = None


def _kernels():
    """Import the numba module lazily (it is heavy, and optional)."""
    global _K, _K_ERR
    if _K is None and _K_ERR is None:
        try:
            from . import _kernels as k
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
                ctx = _fwd_tiles(x, p)
                y = _forward(ctx, w, None, p)
                dx = _grad_input(dy, w, p, _tile(dy)[0])
                dw = _grad_weight_values(ctx, _tile(dy)[0], p)
                gw = _scatter(dw, p, torch.float32)
                ok = (torch.allclose(y, x @ w.T, atol=1e-4)
                      and torch.allclose(dx, dy @ w, atol=1e-4)
                      and torch.allclose(gw, (dy.T @ x) * mask, atol=1e-4))
                _AVAILABLE = bool(ok)
            except Exception:
                _AVAILABLE = False
    return _AVAILABLE


# --- building blocks (each one of the timed products uses them) -------------

def _tile(a2):
    """Row-major [n, f] tensor -> (flat tiled [ntiles*f*T] tensor, ntiles)."""
    n, f = a2.shape
    nt = (n + T - 1) // T
    out = torch.empty(nt * f * T, dtype=a2.dtype)
    _K.to_tiles(a2.reshape(-1).numpy(), n, f, nt, out.numpy(), _dummy(a2.dtype))
    return out, nt


def _untile(yt, n, f, nt, bias):
    y = torch.empty(n, f, dtype=yt.dtype)
    if bias is None:
        b, use = _dummy(yt.dtype), False
    else:
        b, use = bias.detach().to(yt.dtype).contiguous().numpy(), True
    _K.from_tiles(yt.numpy(), n, f, nt, b, use, y.view(-1).numpy())
    return y


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


def _forward(tiles, weight, bias, p):
    """Y = X W^T (+ b) from tiled X; gathers W's values (O(nnz))."""
    vals = weight.reshape(-1).index_select(0, p.fwd_flat)
    yt = torch.empty(tiles.nt * p.out_features * T, dtype=tiles.xt.dtype)
    _K.spmm_tiles(tiles.xt.numpy(), p.in_features, p.fwd_idx, vals.numpy(), p.fwd_ptr,
                  p.out_features, p.fwd_ncb, tiles.nt, yt.numpy())
    return _untile(yt, tiles.n, p.out_features, tiles.nt, bias)


def _grad_input(dy2, weight, p, dyt):
    """dX = dY W via W^T's column-blocked CSR."""
    n = dy2.shape[0]
    nt = (n + T - 1) // T
    vals = weight.reshape(-1).index_select(0, p.bwd_flat)
    dxt = torch.empty(nt * p.in_features * T, dtype=dyt.dtype)
    _K.spmm_tiles(dyt.numpy(), p.out_features, p.bwd_idx, vals.numpy(), p.bwd_ptr,
                  p.in_features, p.bwd_ncb, nt, dxt.numpy())
    return _untile(dxt, n, p.in_features, nt, None)


def _grad_weight_values(tiles, dyt, p):
    """dW at the mask's nonzeros only (SDDMM), in the forward entry order."""
    out = torch.empty(p.nnz, dtype=dyt.dtype)
    _K.sddmm_tiles(tiles.xt.numpy(), p.in_features, dyt.numpy(), p.out_features, p.fwd_idx,
                   p.fwd_ptr, p.fwd_ncb, tiles.nt, out.numpy())
    return out


def _scatter(vals, p, dtype):
    g = torch.zeros(p.out_features * p.in_features, dtype=dtype)
    g[p.fwd_flat] = vals.to(dtype)
    return g.view(p.out_features, p.in_features)


def _compute_dtype(*ts):
    dt = ts[0].dtype
    return dt if dt in (torch.float32, torch.float64) else torch.float32


# --- autograd -----------------------------------------------------------------

class SparseLinearFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, pattern):
        p = pattern
        if weight.shape != (p.out_features, p.in_features):
            raise ValueError(f"weight shape {tuple(weight.shape)} does not match pattern "
                             f"[{p.out_features}, {p.in_features}]")
        if x.shape[-1] != p.in_features:
            raise ValueError(f"input has {x.shape[-1]} features, layer expects {p.in_features}")
        dt = _compute_dtype(weight)
        lead = x.shape[:-1]
        x2 = x.detach().reshape(-1, p.in_features).to(dt).contiguous()
        w = weight.detach().to(dt).contiguous()
        n = x2.shape[0]
        ctx.pattern, ctx.lead, ctx.x_dtype, ctx.dt = p, lead, x.dtype, dt
        ctx.has_bias = bias is not None
        ctx.save_for_backward(weight)
        if n == 0 or p.nnz == 0 or not kernel_available():
            y = x2 @ (w * p.mask.to(dt)).T
            if bias is not None:
                y = y + bias.detach().to(dt)
            ctx.dense, ctx.tiles = True, None
            ctx.x2 = x2 if ctx.needs_input_grad[1] else None
            return y.reshape(*lead, p.out_features).to(x.dtype)
        tiles = _fwd_tiles(x2, p)
        y = _forward(tiles, w, bias, p)
        # the tiled X is what the SDDMM reads; keep it instead of X itself
        ctx.dense, ctx.x2 = False, None
        ctx.tiles = tiles if ctx.needs_input_grad[1] else None
        return y.reshape(*lead, p.out_features).to(x.dtype)

    @staticmethod
    def backward(ctx, gy):
        (weight,) = ctx.saved_tensors
        p, dt = ctx.pattern, ctx.dt
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        gy2 = gy.reshape(-1, p.out_features).to(dt).contiguous()
        w = weight.detach().to(dt).contiguous()
        gx = gw = gb = None
        if ctx.dense:
            # exact dense path (empty input / empty mask / no kernels)
            wm = w * p.mask.to(dt)
            if need_x:
                gx = (gy2 @ wm).reshape(*ctx.lead, p.in_features).to(ctx.x_dtype)
            if need_w:
                gw = ((gy2.T @ ctx.x2) * p.mask.to(dt)).to(weight.dtype)
        else:
            dyt = _tile(gy2)[0] if (need_x or need_w) else None
            if need_x:
                gx = _grad_input(gy2, w, p, dyt).reshape(*ctx.lead, p.in_features).to(ctx.x_dtype)
            if need_w:
                gw = _scatter(_grad_weight_values(ctx.tiles, dyt, p), p, weight.dtype)
        if need_b and ctx.has_bias:
            gb = gy2.sum(0)
        return gx, gw, gb, None


def sparse_linear(x, weight, bias, pattern):
    """``x @ (weight * mask).T + bias`` with sparse kernels; differentiable in x, weight, bias."""
    return SparseLinearFunction.apply(x, weight, bias, pattern)


# --- timing for the engine's per-shape "auto" choice ---------------------------

def _median_ms(fn, repeats):
    fn()  # warm-up (JIT / cache load, first-touch of buffers)
    ts = []
    for _ in range(max(1, repeats)):
        t0 = time.perf_counter()
        fn()
        ts.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(ts)


def time_kernels(pattern, n_tokens, repeats=3):
    """Median ms of forward + dX + dW for this layer shape: dense torch vs our kernels."""
    p = pattern
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n_tokens, p.in_features, generator=g)
    w = torch.randn(p.out_features, p.in_features, generator=g) * p.mask
    dy = torch.randn(n_tokens, p.out_features, generator=g)

    def dense():
        x @ w.T
        dy @ w
        dy.T @ x

    def sparse():
        tiles = _fwd_tiles(x, p)
        _forward(tiles, w, None, p)
        dyt = _tile(dy)[0]
        _grad_input(dy, w, p, dyt)
        _scatter(_grad_weight_values(tiles, dyt, p), p, torch.float32)

    with torch.no_grad():
        d = _median_ms(dense, repeats)
        s = _median_ms(sparse, repeats) if kernel_available() else float("inf")
    return {"dense_ms": float(d), "sparse_ms": float(s)}
