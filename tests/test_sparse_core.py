"""Correctness of the sparse matmul core against dense masked torch references."""
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..")))

from engine.model.kernels import SparsePattern, kernel_available, sparse_linear, time_kernels  # noqa: E402


def _mask(out_f, in_f, sparsity, gen, empty_rows=(), empty_cols=()):
    m = torch.rand(out_f, in_f, generator=gen) >= sparsity
    for r in empty_rows:
        m[r, :] = False
    for c in empty_cols:
        m[:, c] = False
    return m


def _check(x, mask, bias=True, seed=0, rtol=1e-4):
    """Forward, dX, dW, db of sparse_linear vs x @ (w*mask).T + b in float64; the weight gradient
    comes back as the values' gradient, i.e. only at the mask's nonzeros."""
    g = torch.Generator().manual_seed(seed)
    out_f, in_f = mask.shape
    w = torch.randn(out_f, in_f, generator=g) * mask
    b = torch.randn(out_f, generator=g).requires_grad_() if bias else None
    x = x.detach().requires_grad_()
    p = SparsePattern.from_mask(mask)
    assert (p.out_features, p.in_features, p.nnz) == (out_f, in_f, int(mask.sum()))
    v = p.pack(w).requires_grad_()
    assert torch.equal(p.unpack(v.detach()), w)

    y = sparse_linear(x, v, b, p)
    gy = torch.randn(y.shape, generator=g)
    y.backward(gy)

    xd, wd = x.detach().double(), w.detach().double()
    ref = xd @ (wd * mask).T + (b.detach().double() if bias else 0)
    gyd = gy.double()
    ref_dx = gyd @ (wd * mask)
    ref_dw = (gyd.reshape(-1, out_f).T @ xd.reshape(-1, in_f)) * mask

    def close(a, r, what):
        scale = r.abs().max().item() + 1e-6
        err = (a.double() - r).abs().max().item()
        assert err <= rtol * scale + 1e-6, f"{what}: max err {err:.3g} vs scale {scale:.3g}"

    assert y.shape == x.shape[:-1] + (out_f,)
    close(y, ref, "forward")
    close(x.grad, ref_dx, "dX")
    assert v.grad.shape == (p.nnz,), "the weight gradient exists only at the nonzeros"
    close(p.unpack(v.grad), ref_dw, "dW")
    if bias:
        close(b.grad, gyd.reshape(-1, out_f).sum(0), "db")


def test_kernels_available():
    assert kernel_available()


@pytest.mark.parametrize("n,in_f,out_f,sp", [
    (37, 50, 19, 0.5),      # ragged everything
    (128, 64, 64, 0.75),    # exactly one tile / one column block
    (512, 96, 80, 0.75),    # even number of tiles (SDDMM takes tiles in pairs)
    (300, 200, 130, 0.9),   # partial tile, several column blocks
    (257, 96, 160, 0.0),    # dense mask
    (200, 150, 90, 0.99),   # nearly empty
    (1, 33, 17, 0.5),       # single token
    (1100, 64, 48, 0.75),   # 9 tiles: the SDDMM runs token chunks of 4, 4 and 1 tiles
    (1300, 40, 70, 0.5),    # 11 tiles: chunks of 4, 4 and 3
])
def test_matches_dense(n, in_f, out_f, sp):
    g = torch.Generator().manual_seed(n + in_f)
    _check(torch.randn(n, in_f, generator=g), _mask(out_f, in_f, sp, g), seed=n)


@pytest.mark.parametrize("n,in_f,out_f,sp", [(37, 50, 19, 0.5), (300, 200, 130, 0.9),
                                              (257, 96, 160, 0.0), (1300, 40, 70, 0.75)])
def test_parallel_path(monkeypatch, n, in_f, out_f, sp):
    """Small products run serially; force the multi-worker kernels (ragged
    items, more workers than items) through the same checks."""
    import numba

    from engine.model.kernels import ops
    monkeypatch.setattr(ops, "SERIAL_WORK", 0)
    monkeypatch.setattr(numba, "get_num_threads", lambda: 3)
    monkeypatch.setattr(torch, "get_num_threads", lambda: 3)
    g = torch.Generator().manual_seed(n + 11)
    _check(torch.randn(n, in_f, generator=g), _mask(out_f, in_f, sp, g, empty_rows=(1,)), seed=n)


def test_empty_rows_and_columns_and_no_bias():
    g = torch.Generator().manual_seed(1)
    m = _mask(70, 90, 0.6, g, empty_rows=(0, 5, 69), empty_cols=(0, 1, 64, 89))
    _check(torch.randn(150, 90, generator=g), m, bias=False)


def test_all_zero_mask():
    g = torch.Generator().manual_seed(2)
    _check(torch.randn(20, 30, generator=g), torch.zeros(10, 30, dtype=torch.bool))


def test_non_contiguous_and_3d_inputs():
    g = torch.Generator().manual_seed(3)
    m = _mask(40, 48, 0.7, g)
    xt = torch.randn(48, 130, generator=g).t()           # transposed view
    assert not xt.is_contiguous()
    _check(xt, m)
    xs = torch.randn(130, 96, generator=g)[:, ::2]       # strided slice
    _check(xs, m)
    x3 = torch.randn(3, 45, 48, generator=g)             # [batch, seq, features]
    _check(x3, m)
    x3nc = torch.randn(45, 3, 48, generator=g).transpose(0, 1)
    _check(x3nc, m)


def test_grad_subsets():
    g = torch.Generator().manual_seed(4)
    m = _mask(24, 40, 0.5, g)
    p = SparsePattern.from_mask(m)
    w = torch.randn(24, 40, generator=g) * m
    b = torch.randn(24, generator=g)
    x = torch.randn(50, 40, generator=g)
    for need in [(True, False, False), (False, True, False), (False, False, True), (True, True, False)]:
        xx = x.clone().requires_grad_(need[0])
        ww = p.pack(w).requires_grad_(need[1])
        bb = b.clone().requires_grad_(need[2])
        sparse_linear(xx, ww, bb, p).square().sum().backward()
        xr, wr, br = (x.clone().requires_grad_(need[0]), p.pack(w).requires_grad_(need[1]),
                      b.clone().requires_grad_(need[2]))
        (xr @ p.unpack(wr).T + br).square().sum().backward()
        for a, r, nd in [(xx, xr, need[0]), (ww, wr, need[1]), (bb, br, need[2])]:
            if nd:
                assert torch.allclose(a.grad, r.grad, rtol=1e-4, atol=1e-4)
            else:
                assert a.grad is None


def test_bad_shapes_raise():
    p = SparsePattern.from_mask(torch.ones(4, 6, dtype=torch.bool))
    with pytest.raises(ValueError):
        sparse_linear(torch.randn(3, 5), torch.randn(24), None, p)
    with pytest.raises(ValueError):
        sparse_linear(torch.randn(3, 6), torch.randn(23), None, p)


def test_gradcheck_float64():
    g = torch.Generator().manual_seed(5)
    m = _mask(7, 19, 0.6, g, empty_rows=(2,))
    p = SparsePattern.from_mask(m)
    x = torch.randn(2, 11, 19, dtype=torch.float64, generator=g, requires_grad=True)
    v = torch.randn(p.nnz, dtype=torch.float64, generator=g, requires_grad=True)
    b = torch.randn(7, dtype=torch.float64, generator=g, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, v, b: sparse_linear(x, v, b, p), (x, v, b),
                                    eps=1e-6, atol=1e-6)


def test_float64_matches_float32_path():
    g = torch.Generator().manual_seed(6)
    m = _mask(33, 70, 0.75, g)
    p = SparsePattern.from_mask(m)
    x = torch.randn(140, 70, generator=g)
    w = torch.randn(33, 70, generator=g) * m
    y32 = sparse_linear(x, p.pack(w), None, p)
    y64 = sparse_linear(x.double(), p.pack(w.double()), None, p)
    assert y64.dtype == torch.float64
    assert torch.allclose(y32.double(), y64, rtol=1e-4, atol=1e-4)
    assert torch.allclose(y64, x.double() @ (w.double() * m).T, rtol=1e-10, atol=1e-10)


def test_large_layer_fp32():
    """A GPT-2-like shape exercising many tiles and column blocks."""
    g = torch.Generator().manual_seed(7)
    _check(torch.randn(300, 768, generator=g), _mask(256, 768, 0.75, g), rtol=2e-4)


def test_time_kernels_runs_both_paths_and_reports_the_median_of_the_timed_rounds(monkeypatch):
    """time_kernels times the dense path (unpack + three products) and the sparse core's forward, dX
    and SDDMM, one warm-up call each and then ``repeats`` timed rounds. Each path here also moves a fake
    clock by a set amount per call, so the reported ms must be the median of that path's timed rounds
    (not of the warm-up, not the other path's)."""
    from types import SimpleNamespace

    from engine.model.kernels import ops

    assert kernel_available()
    p = SparsePattern.from_mask(_mask(96, 64, 0.75, torch.Generator().manual_seed(8)))
    clock = [0.0]
    # seconds per call, warm-up first: medians of the timed rounds are 2 ms and 5 ms (with the warm-up 2.5 and 5.5)
    costs = {"dense": [1.0, 0.003, 0.001, 0.002], "sparse": [2.0, 0.006, 0.004, 0.005]}
    calls = {"unpack": 0, "_fwd_tiles": 0, "_forward": 0, "_grad_input": 0, "_grad_values": 0}

    def counted(name, fn, path=None):
        def wrapper(*args, **kwargs):
            if path is not None:
                clock[0] += costs[path][calls[name]]
            calls[name] += 1
            return fn(*args, **kwargs)
        return wrapper

    monkeypatch.setattr(ops, "time", SimpleNamespace(perf_counter=lambda: clock[0]))
    monkeypatch.setattr(p, "unpack", counted("unpack", p.unpack, "dense"))
    monkeypatch.setattr(ops, "_forward", counted("_forward", ops._forward, "sparse"))
    for name in ("_fwd_tiles", "_grad_input", "_grad_values"):
        monkeypatch.setattr(ops, name, counted(name, getattr(ops, name)))
    r = time_kernels(p, 256, repeats=3)
    assert calls == dict.fromkeys(calls, 4)  # warm-up + 3 rounds, each path in full
    assert r == {"dense_ms": pytest.approx(2.0), "sparse_ms": pytest.approx(5.0)}


@pytest.mark.parametrize("kernel", ["spmm", "sddmm"])
def test_work_queue_gives_the_serial_result_however_workers_run(kernel):
    """The parallel kernels' workers draw items from a shared queue. Whether two workers run at the
    same time (real threads; the kernels release the GIL), one after the other (a worker that only
    starts once the other is done must find nothing left, and the SDDMM's wait between token chunks
    must not wait on it), or a single worker does it all, every item is computed once and in the
    same way, so the result is bitwise the serial one. 1300 tokens = 11 tiles = 3 SDDMM chunks; rows
    32-63 are empty, so whole work items have no nonzeros (they count as done all the same)."""
    import threading

    import numpy as np

    from engine.model.kernels import ops

    assert kernel_available()
    g = torch.Generator().manual_seed(12)
    # 32-row items: three row groups, the middle one empty
    p = SparsePattern.from_mask(_mask(96, 80, 0.7, g, empty_rows=range(32, 64)), rc_fwd=32, rc_sdd=32)
    assert p.fwd.rc == p.sdd.rc == 32
    x = torch.randn(1300, 80, generator=g)
    dy = torch.randn(1300, 96, generator=g)
    v = torch.randn(p.nnz, generator=g)
    tiles = ops._fwd_tiles(x, p)
    dyt = ops._tile(dy, "dyt")[0].clone()
    nchunks = (tiles.nt + ops.SDDMM_CHUNK_TILES - 1) // ops.SDDMM_CHUNK_TILES
    assert nchunks == 3

    def launch():
        """(fresh output, part(ctr, w, nwork), number of queue counters)"""
        if kernel == "spmm":
            pl = p.fwd
            vals = ops._plan_values(v, p, pl, "vals_fwd").clone()
            out = torch.zeros(1300, 96)
            args = (tiles.xt.numpy(), 80, pl.idx, vals.numpy(), pl.ptr, 96, pl.ncb, tiles.nt, 1300,
                    out.view(-1).numpy(), ops._dummy(torch.float32), False, pl.rc)
            return out, lambda ctr, w, n: ops._K.spmm_part(*args, ctr, w, n), 1
        pl = p.sdd
        out, acc = torch.zeros(p.nnz), torch.zeros(p.nnz)
        args = (tiles.xt.numpy(), 80, dyt.numpy(), 96, pl.idx, pl.ptr, pl.ncb, tiles.nt, out.numpy(), pl.src,
                acc.numpy(), pl.rc, pl.max_item, ops.SDDMM_CHUNK_TILES)
        return out, lambda ctr, w, n: ops._K.sddmm_part(*args, ctr, w, n), 2 * nchunks

    serial, part, nq = launch()
    part(np.zeros(nq, dtype=np.int64), 0, 1)
    ref = (x @ p.unpack(v).T) if kernel == "spmm" else p.pack(dy.T @ x)
    assert torch.allclose(serial, ref, rtol=1e-4, atol=1e-4)

    one_after_other, part, nq = launch()
    ctr = np.zeros(nq, dtype=np.int64)
    part(ctr, 0, 2)
    part(ctr, 1, 2)
    assert torch.equal(one_after_other, serial)

    for _ in range(5):
        together, part, nq = launch()
        ctr = np.zeros(nq, dtype=np.int64)
        threads = [threading.Thread(target=part, args=(ctr, w, 2)) for w in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert torch.equal(together, serial)


_POOL_PROBE = """
import json, sys
import torch
sys.path.insert(0, {repo!r})
torch.set_num_threads(2)
from engine.model.kernels import SparsePattern, kernel_available, ops
import numba
assert kernel_available()
g = torch.Generator().manual_seed(0)
mask = torch.rand(384, 512, generator=g) >= 0.5
p = SparsePattern.from_mask(mask)
x = torch.randn(1024, 512, generator=g)
w = torch.randn(384, 512, generator=g) * mask
assert ops._nwork(p.nnz * 1024) == 2  # large enough for the thread pool
y = ops._forward(ops._fwd_tiles(x, p), p.pack(w), None, p)
print(json.dumps({{"layer": numba.threading_layer(), "err": float((y - x @ w.T).abs().max())}}))
"""


@pytest.mark.parametrize("policy, pool", [("PASSIVE", "omp"), ("passive", "omp"), (None, "workqueue")])
def test_kernels_run_on_the_openmp_pool_where_idle_openmp_workers_sleep(policy, pool):
    """With OMP_WAIT_POLICY=PASSIVE (the engine's CLI sets it) the parallel kernels use numba's OpenMP
    pool, whose calling thread computes its share at once; without it, idle OpenMP workers would spin
    on the cores the products need, and the kernels use numba's workqueue pool. Either way a product
    large enough for two threads matches the dense one. (A fresh process: numba picks its pool once.)"""
    import ctypes.util
    import json
    import subprocess

    if pool == "omp" and not ctypes.util.find_library("gomp"):
        pytest.skip("no libgomp on this machine: numba falls back to its workqueue pool")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("NUMBA_THREADING_LAYER", "OMP_WAIT_POLICY"))}
    env["NUMBA_NUM_THREADS"] = "2"  # two threads even on a one-core machine
    if policy:
        env["OMP_WAIT_POLICY"] = policy
    from helpers import REPO

    r = subprocess.run([sys.executable, "-c", _POOL_PROBE.format(repo=str(REPO))], env=env, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["layer"] == pool
    assert out["err"] < 1e-3
