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


@pytest.mark.quick
def test_kernels_available():
    assert kernel_available()


@pytest.mark.quick
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


@pytest.mark.quick
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


@pytest.mark.quick
def test_empty_rows_and_columns_and_no_bias():
    g = torch.Generator().manual_seed(1)
    m = _mask(70, 90, 0.6, g, empty_rows=(0, 5, 69), empty_cols=(0, 1, 64, 89))
    _check(torch.randn(150, 90, generator=g), m, bias=False)


@pytest.mark.quick
def test_parameters_stay_resizable_after_a_step():
    """FSDP2 frees an unsharded parameter by resizing its storage to nothing; handing the values or
    the bias to the kernels must not make that impossible (Tensor.numpy() would)."""
    g = torch.Generator().manual_seed(3)
    m = _mask(64, 80, 0.75, g)
    p = SparsePattern.from_mask(m)
    v = p.pack(torch.randn(64, 80, generator=g) * m).requires_grad_()
    b = torch.randn(64, generator=g).requires_grad_()
    x = torch.randn(300, 80, generator=g, requires_grad=True)
    sparse_linear(x, v, b, p).sum().backward()
    for t in (v, b):
        storage = t.detach().untyped_storage()
        size = storage.nbytes()
        storage.resize_(0)  # raises "Trying to resize storage that is not resizable" when exported
        storage.resize_(size)


@pytest.mark.quick
def test_all_zero_mask():
    g = torch.Generator().manual_seed(2)
    _check(torch.randn(20, 30, generator=g), torch.zeros(10, 30, dtype=torch.bool))


@pytest.mark.quick
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


@pytest.mark.quick
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


@pytest.mark.quick
def test_bad_shapes_raise():
    p = SparsePattern.from_mask(torch.ones(4, 6, dtype=torch.bool))
    with pytest.raises(ValueError):
        sparse_linear(torch.randn(3, 5), torch.randn(24), None, p)
    with pytest.raises(ValueError):
        sparse_linear(torch.randn(3, 6), torch.randn(23), None, p)


@pytest.mark.quick
def test_gradcheck_float64():
    g = torch.Generator().manual_seed(5)
    m = _mask(7, 19, 0.6, g, empty_rows=(2,))
    p = SparsePattern.from_mask(m)
    x = torch.randn(2, 11, 19, dtype=torch.float64, generator=g, requires_grad=True)
    v = torch.randn(p.nnz, dtype=torch.float64, generator=g, requires_grad=True)
    b = torch.randn(7, dtype=torch.float64, generator=g, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, v, b: sparse_linear(x, v, b, p), (x, v, b),
                                    eps=1e-6, atol=1e-6)


@pytest.mark.quick
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


@pytest.mark.quick
def test_large_layer_fp32():
    """A GPT-2-like shape exercising many tiles and column blocks."""
    g = torch.Generator().manual_seed(7)
    _check(torch.randn(300, 768, generator=g), _mask(256, 768, 0.75, g), rtol=2e-4)


@pytest.mark.quick
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


@pytest.mark.quick
@pytest.mark.parametrize("kernel", ["spmm", "sddmm", "spmm_bf16", "sddmm_bf16"])
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

    bf16 = kernel.endswith("bf16")
    assert kernel_available("bf16" if bf16 else "fp32")
    g = torch.Generator().manual_seed(12)
    # 32-row items: three row groups, the middle one empty
    p = SparsePattern.from_mask(_mask(96, 80, 0.7, g, empty_rows=range(32, 64)), rc_fwd=32, rc_sdd=32)
    assert p.fwd.rc == p.fwd16.rc == p.sdd.rc == 32
    x = torch.randn(1300, 80, generator=g)
    dy = torch.randn(1300, 96, generator=g)
    v = torch.randn(p.nnz, generator=g)
    if bf16:
        x, dy, v = x.bfloat16(), dy.bfloat16(), v.bfloat16()
    tiles = ops._fwd_tiles(x, p)
    dyt = ops._tile(dy, "dyt")[0].clone()
    nchunks = (tiles.nt + ops.SDDMM_CHUNK_TILES - 1) // ops.SDDMM_CHUNK_TILES
    assert nchunks == 3

    def launch():
        """(fresh output, part(ctr, w, nwork), number of queue counters)"""
        if kernel == "spmm_bf16":
            pl = p.fwd16
            vals = ops._plan_values(v, p, pl, "vals_fwd").clone()
            out = torch.zeros(1300, 96, dtype=torch.bfloat16)
            args = (tiles.xt.numpy(), 80, pl.idx, vals.numpy(), pl.ptr, 96, pl.ncb, tiles.nt, 1300,
                    out.view(-1).view(torch.int16).numpy(), ops._dummy(torch.float32), False, pl.rc, ops._K.BF16_DOT)
            return out, lambda ctr, w, n: ops._K.spmm16_part(*args, ctr, w, n), 1
        if kernel == "sddmm_bf16":
            pl = p.sdd
            out, acc = torch.zeros(p.nnz), torch.zeros(p.nnz)
            args = (tiles.xt.numpy(), 80, dyt.numpy(), 96, pl.idx, pl.ptr, pl.ncb, tiles.nt, out.numpy(), pl.src,
                    acc.numpy(), pl.rc, pl.max_item, ops.SDDMM_CHUNK_TILES, ops._K.BF16_DOT)
            return out, lambda ctr, w, n: ops._K.sddmm16_part(*args, ctr, w, n), 2 * nchunks
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
    if bf16:
        xf, dyf, vf = x.float(), dy.float(), v.float()
        ref = (xf @ p.unpack(vf).T) if kernel == "spmm_bf16" else p.pack(dyf.T @ xf)
        _close_bf16(serial, ref, kernel, rounded=kernel == "spmm_bf16")
    else:
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


# --- bf16 core ------------------------------------------------------------------------------------
# Tests with "bf16" in their name (and not "subprocess") also run, in subprocesses, on the widening
# path and on code compiled for a CPU without AVX-512: see the end of this file.

BF16_HALF_ULP = 2.0 ** -8  # one rounding to bf16 moves a value by at most this fraction of it


def _close_bf16(a, r, what, rounded=True, rtol=1e-4):
    """|a - r| <= (half a bf16 ulp of r, when a was rounded to bf16 once) + rtol * max|r|: the core
    accumulates in fp32 in its own order, the reference in torch's."""
    assert a.shape == r.shape, what
    if r.numel() == 0:
        return
    scale = r.abs().max().item() + 1e-6
    slack = (a.double() - r.double()).abs() - (BF16_HALF_ULP * r.double().abs() if rounded else 0)
    err = slack.max().item()
    assert err <= rtol * scale, f"{what}: error beyond bf16 rounding {err:.3g} vs scale {scale:.3g}"


def _check_bf16(x, mask, bias=True, seed=0, autocast=False):
    """Forward, dX, dW, db of the bf16 core against the dense masked products of the same bf16
    operands computed in fp32: x.bfloat16() @ w.bfloat16().T + b.bfloat16(). Y and dX are bf16
    (rounded once), dW and db fp32. ``autocast``: fp32 x under torch.autocast("cpu", bfloat16), else
    bf16 x. Returns how many forwards ran on the bf16 kernels."""
    from engine.model.kernels import ops

    g = torch.Generator().manual_seed(seed)
    out_f, in_f = mask.shape
    w = torch.randn(out_f, in_f, generator=g) * mask
    b = torch.randn(out_f, generator=g).requires_grad_() if bias else None
    xin = (x.detach() if autocast else x.detach().bfloat16()).requires_grad_()
    p = SparsePattern.from_mask(mask)
    v = p.pack(w).requires_grad_()
    calls = [0]
    fwd = ops._forward

    def counted(tiles, *a):
        calls[0] += tiles.xt.dtype == torch.int16
        return fwd(tiles, *a)
    ops._forward = counted
    try:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            y = sparse_linear(xin, v, b, p)
        gy = torch.randn(y.shape, generator=g).bfloat16()
        y.backward(gy)
    finally:
        ops._forward = fwd

    xb, wb = x.detach().bfloat16().double(), w.bfloat16().double()
    ref = xb @ wb.T + (b.detach().bfloat16().double() if bias else 0)
    gyd = gy.double()
    assert y.dtype == torch.bfloat16 and y.shape == x.shape[:-1] + (out_f,)
    _close_bf16(y, ref, "forward")
    assert xin.grad.dtype == xin.dtype
    _close_bf16(xin.grad, gyd @ wb, "dX")
    assert v.grad.dtype == torch.float32 and v.grad.shape == (p.nnz,)
    _close_bf16(v.grad, p.pack(gyd.reshape(-1, out_f).T @ xb.reshape(-1, in_f)), "dW", rounded=False)
    if bias:
        assert b.grad.dtype == torch.float32
        _close_bf16(b.grad, gyd.reshape(-1, out_f).sum(0), "db", rounded=False)
    return calls[0]


@pytest.mark.quick
def test_bf16_kernels_available_and_path_named():
    from engine.model.kernels import bf16_path, ops

    assert kernel_available("bf16")
    assert bf16_path() in ("AVX512-BF16 dot product", "bf16 storage, fp32 FMA (no AVX512-BF16)",
                           "bf16 storage, fp32 FMA (AVX512-BF16 off: MEDISWIFT_BF16_PATH=widen)")
    assert (bf16_path() == "AVX512-BF16 dot product") == bool(ops._K.BF16_DOT)
    with pytest.raises(ValueError):
        kernel_available("fp16")
    # set by the subprocess runs at the end of this file
    if os.environ.get("MEDISWIFT_TEST_BF16_PATH"):
        assert bf16_path() == os.environ["MEDISWIFT_TEST_BF16_PATH"]
    if os.environ.get("MEDISWIFT_TEST_NO_AVX512"):
        assert not ops._K.HAS_BF16_DOT and "avx512f" not in ops._K.CPU_FEATURES
        for f in (ops._K.spmm16_part, ops._K.sddmm16_part, ops._K.to_tiles16_part):
            asm = f.inspect_asm(f.signatures[0])  # compiled in this process (fresh numba cache)
            assert "ymm" in asm and "zmm" not in asm and "vdpbf16ps" not in asm
            assert "vfmadd" in asm or f is ops._K.to_tiles16_part


BF16_CASES = [
    (37, 50, 19, 0.5),      # ragged everything: 5 tokens past a 32-token group, 18 features past 32
    (128, 64, 64, 0.75),    # exactly one tile
    (300, 200, 130, 0.9),   # partial tile, several column blocks, 130 outputs = 8 blocks of 16 + 2
    (257, 96, 160, 0.0),    # dense mask
    (200, 150, 90, 0.99),   # nearly empty: most segments empty or a single (odd) nonzero
    (1, 33, 17, 0.5),       # single token
    (1300, 40, 70, 0.5),    # 11 tiles: SDDMM chunks of 4, 4 and 3 (a tile pair and a single tile)
    (640, 288, 200, 0.75),  # 5 tiles, features in whole 32-blocks, outputs 12 x 16 + 8
]


@pytest.mark.quick
@pytest.mark.parametrize("n,in_f,out_f,sp", BF16_CASES)
def test_bf16_matches_dense_masked_bf16(n, in_f, out_f, sp):
    g = torch.Generator().manual_seed(n + in_f + 1)
    assert _check_bf16(torch.randn(n, in_f, generator=g), _mask(out_f, in_f, sp, g), seed=n) == 1


@pytest.mark.quick
@pytest.mark.parametrize("n,in_f,out_f,sp", [(37, 50, 19, 0.5), (300, 200, 130, 0.9),
                                              (257, 96, 160, 0.0), (1300, 40, 70, 0.75)])
def test_bf16_parallel_path(monkeypatch, n, in_f, out_f, sp):
    """The multi-worker bf16 kernels (more workers than items, ragged items), as test_parallel_path."""
    import numba

    from engine.model.kernels import ops
    monkeypatch.setattr(ops, "SERIAL_WORK", 0)
    monkeypatch.setattr(numba, "get_num_threads", lambda: 3)
    monkeypatch.setattr(torch, "get_num_threads", lambda: 3)
    g = torch.Generator().manual_seed(n + 13)
    _check_bf16(torch.randn(n, in_f, generator=g), _mask(out_f, in_f, sp, g, empty_rows=(1,)), seed=n)


@pytest.mark.quick
def test_bf16_empty_rows_columns_no_bias_3d_and_non_contiguous():
    g = torch.Generator().manual_seed(21)
    m = _mask(70, 90, 0.6, g, empty_rows=(0, 5, 69), empty_cols=(0, 1, 64, 89))
    _check_bf16(torch.randn(150, 90, generator=g), m, bias=False)
    m = _mask(40, 48, 0.7, g)
    _check_bf16(torch.randn(3, 45, 48, generator=g), m)                      # [batch, seq, features]
    _check_bf16(torch.randn(45, 3, 48, generator=g).transpose(0, 1), m)      # non-contiguous 3-D
    _check_bf16(torch.randn(48, 130, generator=g).t(), m, bias=False)        # transposed view


@pytest.mark.quick
def test_bf16_under_autocast_with_fp32_input():
    """Under CPU autocast an fp32 input is rounded to bf16 by the core (as autocast's linear rounds it);
    y is bf16, dX comes back fp32 (x's dtype), dW and db fp32."""
    g = torch.Generator().manual_seed(22)
    assert _check_bf16(torch.randn(2, 150, 96, generator=g), _mask(80, 96, 0.75, g), autocast=True) == 1
    assert _check_bf16(torch.randn(77, 64, generator=g), _mask(33, 64, 0.5, g), bias=False, autocast=True) == 1


@pytest.mark.quick
def test_bf16_empty_input_and_empty_mask_fall_back_to_dense_bf16():
    g = torch.Generator().manual_seed(23)
    assert _check_bf16(torch.randn(0, 30, generator=g), _mask(10, 30, 0.5, g)) == 0
    assert _check_bf16(torch.randn(20, 30, generator=g), torch.zeros(10, 30, dtype=torch.bool)) == 0


@pytest.mark.quick
def test_bf16_rounding_is_torchs_round_to_nearest_even():
    """fp32 activations are rounded to bf16 while tiling exactly as torch's .bfloat16() rounds (ties to
    even, overflow to inf, inf, NaN, signed zero, subnormals), on the vector blocks (32 x 32) and the
    scalar edges; and Y is rounded the same way: with one nonzero per row every output is a single
    exact product (+ bias), so Y must equal torch's rounding of it bit for bit."""
    from engine.model.kernels import ops

    g = torch.Generator().manual_seed(24)
    x = torch.randn(40, 70, generator=g)
    special = torch.tensor([1 + 2 ** -8, 1 + 3 * 2 ** -8, -(1 + 2 ** -8), 1 + 2 ** -8 + 2 ** -20, 3.3961e38,
                            -3.4e38, float("inf"), -float("inf"), float("nan"), 0.0, -0.0, 1e-40, -3e-39, 65504.0])
    for r, c in [(0, 0), (3, 17), (31, 31), (35, 2), (10, 66)]:  # vector block, its corner, the edges
        x[r, c:c + 4] = special[:4]
        x[r + 1, c:c + 4] = special[4:8]
        x[r + 2, c:c + 4] = special[8:12]
        x[r + 3, c:c + 2] = special[12:]
    got = ops._tile(x, bf16=True)[0]
    want = ops._tile(x.bfloat16())[0]
    assert got.dtype == want.dtype == torch.int16
    nan = want.view(torch.bfloat16).isnan()
    assert int(nan.sum()) == 5 and torch.equal(got.view(torch.bfloat16).isnan(), nan)  # NaN payloads may differ
    assert torch.equal(got[~nan], want[~nan])  # bit for bit, signed zeros and subnormals included

    n, in_f, out_f = 70, 64, 50
    mask = torch.zeros(out_f, in_f, dtype=torch.bool)
    cols = torch.randint(0, in_f, (out_f,), generator=g)
    mask[torch.arange(out_f), cols] = True
    p = SparsePattern.from_mask(mask)
    w = torch.randn(out_f, in_f, generator=g) * mask
    xb = torch.randn(n, in_f, generator=g).bfloat16()
    b = torch.randn(out_f, generator=g).bfloat16()
    prod = xb.float()[:, cols] * w.bfloat16().float()[torch.arange(out_f), cols]
    with torch.no_grad():
        assert torch.equal(sparse_linear(xb, p.pack(w), None, p), prod.bfloat16())
        assert torch.equal(sparse_linear(xb, p.pack(w), b.float(), p), (prod + b.float()).bfloat16())


@pytest.mark.quick
def test_bf16_grad_subsets():
    g = torch.Generator().manual_seed(25)
    m = _mask(24, 40, 0.5, g)
    p = SparsePattern.from_mask(m)
    w = torch.randn(24, 40, generator=g) * m
    b = torch.randn(24, generator=g)
    x = torch.randn(50, 40, generator=g).bfloat16()
    for need in [(True, False, False), (False, True, False), (False, False, True)]:
        xx = x.clone().requires_grad_(need[0])
        ww = p.pack(w).requires_grad_(need[1])
        bb = b.clone().requires_grad_(need[2])
        sparse_linear(xx, ww, bb, p).float().sum().backward()
        for a, nd in [(xx, need[0]), (ww, need[1]), (bb, need[2])]:
            assert (a.grad is not None) == nd
    assert xx.grad is None and bb.grad is not None
    assert torch.allclose(bb.grad, torch.full((24,), 50.0))


@pytest.mark.quick
def test_bf16_time_kernels_times_bf16_dense_products_and_the_bf16_core(monkeypatch):
    """time_kernels(precision="bf16"): the dense candidate multiplies in bf16 (the weight unpacked and
    cast, as the masked dense path under autocast), the sparse one runs the bf16 kernels."""
    from engine.model.kernels import ops

    p = SparsePattern.from_mask(_mask(96, 64, 0.75, torch.Generator().manual_seed(8)))
    seen = {"dense": set(), "tiles": set()}
    mm = torch.Tensor.__matmul__

    def matmul(a, b):
        seen["dense"].add((a.dtype, b.dtype))
        return mm(a, b)
    fwd = ops._forward

    def forward(tiles, *a):
        seen["tiles"].add(tiles.xt.dtype)
        return fwd(tiles, *a)
    monkeypatch.setattr(torch.Tensor, "__matmul__", matmul)
    monkeypatch.setattr(ops, "_forward", forward)
    r = ops.time_kernels(p, 200, repeats=1, precision="bf16")
    assert seen == {"dense": {(torch.bfloat16, torch.bfloat16)}, "tiles": {torch.int16}}
    assert r["dense_ms"] > 0 and 0 < r["sparse_ms"] < float("inf")
    with pytest.raises(ValueError):
        ops.time_kernels(p, 200, precision="fp16")


def _layers(seed, shapes, sp=0.75):
    from engine.model.sparse_linear import SparseLinear

    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    out = []
    for in_f, out_f in shapes:
        m = SparseLinear(in_f, out_f)
        m.set_mask(_mask(out_f, in_f, sp, g))
        out.append(m)
    return out


def _bf16_core_calls(monkeypatch):
    """Count the bf16 core's products (forward, dX, dW) from here on."""
    from engine.model.kernels import ops

    calls = {"fwd": 0, "dx": 0, "dw": 0}
    fwd, dx, dw = ops._forward, ops._grad_input, ops._grad_values

    def f(tiles, *a):
        calls["fwd"] += tiles.xt.dtype == torch.int16
        return fwd(tiles, *a)

    def gi(dy2, values, p, dyt):
        calls["dx"] += dyt.dtype == torch.int16
        return dx(dy2, values, p, dyt)

    def gv(tiles, dyt, p):
        calls["dw"] += dyt.dtype == torch.int16
        return dw(tiles, dyt, p)
    monkeypatch.setattr(ops, "_forward", f)
    monkeypatch.setattr(ops, "_grad_input", gi)
    monkeypatch.setattr(ops, "_grad_values", gv)
    return calls


@pytest.mark.quick
def test_bf16_sparse_linear_under_autocast_runs_on_the_core_and_matches_the_masked_dense_path(monkeypatch):
    """A SparseLinear on the sparse core under torch.autocast("cpu", bfloat16) runs the bf16 core (all
    three products) and gives what the masked dense path gives under autocast: bf16 outputs, fp32
    gradients, equal up to bf16 rounding. The dense path's products are bf16 too: its weight gradient
    is torch's bf16 product of the bf16 operands."""
    import copy

    (sparse,) = _layers(30, [(96, 80)])
    dense = copy.deepcopy(sparse)
    sparse.set_kernel("sparse")
    dense.set_kernel("dense")
    g = torch.Generator().manual_seed(31)
    x = torch.randn(3, 70, 96, generator=g)
    r = torch.randn(3, 70, 80, generator=g)
    calls = _bf16_core_calls(monkeypatch)
    out = {}
    for name, m in (("sparse", sparse), ("dense", dense)):
        xx = x.clone().requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert m.uses_sparse_core(xx) == (name == "sparse")
            y = m(xx)
        (y.float() * r).sum().backward()
        out[name] = (y, xx.grad, m.values.grad, m.bias.grad)
        if name == "sparse":
            assert calls == {"fwd": 1, "dx": 1, "dw": 1}
    assert calls == {"fwd": 1, "dx": 1, "dw": 1}  # the dense layer never reached the core
    (ys, gxs, gvs, gbs), (yd, gxd, gvd, gbd) = out["sparse"], out["dense"]
    assert ys.dtype == yd.dtype == torch.bfloat16
    assert gxs.dtype == gxd.dtype == gvs.dtype == gvd.dtype == gbs.dtype == gbd.dtype == torch.float32
    # both sides round once to bf16: allow two half-ulps
    for a, d, what in [(ys, yd, "y"), (gxs, gxd, "dX"), (gvs, gvd, "dW"), (gbs, gbd, "db")]:
        scale = d.abs().max().item()
        err = ((a.double() - d.double()).abs() - 2 * BF16_HALF_ULP * d.double().abs()).max().item()
        assert err <= 1e-3 * scale, f"{what}: {err:.3g} vs scale {scale:.3g}"
    xb = x.bfloat16().reshape(-1, 96)
    want = (r.bfloat16().reshape(-1, 80).T @ xb).reshape(-1)[dense.flat].float()
    assert torch.allclose(gvd, want, rtol=1e-6, atol=0)  # bf16 products on the dense path


@pytest.mark.quick
def test_bf16_sparse_group_under_autocast_is_one_core_product(monkeypatch):
    """q, k and v under autocast run as one bf16 product over their stacked masks, with each layer's
    outputs and gradients those of its own layer on the core."""
    import copy

    from engine.model.sparse_linear import SparseGroup

    layers = _layers(32, [(64, 64), (64, 64), (64, 48)])
    single = [copy.deepcopy(m) for m in layers]
    for m in layers + single:
        m.set_kernel("sparse")
    x = torch.randn(2, 90, 64, generator=torch.Generator().manual_seed(33))
    calls = _bf16_core_calls(monkeypatch)
    xg = x.clone().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ys = SparseGroup()(tuple(layers), xg)
    sum(y.float().sum() * (i + 1) for i, y in enumerate(ys)).backward()
    assert calls == {"fwd": 1, "dx": 1, "dw": 1}
    xs = x.clone().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y1 = [m(xs) for m in single]
    sum(y.float().sum() * (i + 1) for i, y in enumerate(y1)).backward()
    assert calls == {"fwd": 4, "dx": 4, "dw": 4}
    for a, b in zip(ys, y1):
        assert a.dtype == b.dtype == torch.bfloat16 and torch.equal(a, b)
    for m, s in zip(layers, single):
        assert torch.allclose(m.values.grad, s.values.grad, rtol=1e-5, atol=1e-5)
        assert torch.allclose(m.bias.grad, s.bias.grad, rtol=1e-5, atol=1e-5)
    assert torch.allclose(xg.grad, xs.grad, rtol=2e-2, atol=2e-2)  # one bf16 rounding vs a sum of three


@pytest.mark.quick
def test_fp16_autocast_leaves_the_core():
    """Autocast to another dtype is not the core's: the layer takes the dense path, which autocast runs."""
    (m,) = _layers(34, [(32, 16)])
    m.set_kernel("sparse")
    x = torch.randn(4, 32)
    with torch.autocast("cpu", dtype=torch.float16):
        assert not m.uses_sparse_core(x)
    assert m.uses_sparse_core(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert m.uses_sparse_core(x)


_HASWELL = ("+64bit,+avx,+avx2,+bmi,+bmi2,+cmov,+cx16,+f16c,+fma,+fsgsbase,+lzcnt,+movbe,+pclmul,+popcnt,+sse,"
            "+sse2,+sse3,+sse4.1,+sse4.2,+ssse3,+xsave")


@pytest.mark.parametrize("target", ["widening", "avx2"])
def test_bf16_tests_pass_in_a_subprocess_on_the_other_paths(target, tmp_path):
    """Every bf16 test above again, in a fresh process (numba fixes its target and the path at import):
    "widening" forces the bf16-storage, fp32-FMA path where AVX512-BF16 exists (MEDISWIFT_BF16_PATH=
    widen); "avx2" compiles the kernels for a Haswell (AVX2, no AVX-512; NUMBA_CPU_NAME/FEATURES, own
    cache) as on a machine without AVX512-BF16, and checks that the compiled code uses no 512-bit
    register and no vdpbf16ps."""
    import subprocess

    from engine.model.kernels import ops

    assert kernel_available("bf16")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MEDISWIFT_BF16", "MEDISWIFT_TEST", "NUMBA_CPU"))}
    if target == "widening":
        if not ops._K.HAS_BF16_DOT:
            pytest.skip("no AVX512-BF16 here: the default run already takes the widening path")
        env["MEDISWIFT_BF16_PATH"] = "widen"
        env["MEDISWIFT_TEST_BF16_PATH"] = "bf16 storage, fp32 FMA (AVX512-BF16 off: MEDISWIFT_BF16_PATH=widen)"
    else:
        env.update(NUMBA_CPU_NAME="haswell", NUMBA_CPU_FEATURES=_HASWELL, NUMBA_CACHE_DIR=str(tmp_path / "numba"),
                   MEDISWIFT_TEST_BF16_PATH="bf16 storage, fp32 FMA (no AVX512-BF16)", MEDISWIFT_TEST_NO_AVX512="1")
    # the AVX2 build compiles from scratch (its own cache, for the asm check): there, the products on
    # one worker (the multi-worker wrappers add compile time, not code of their own)
    select = "bf16 and not subprocess" + (" and not parallel and not autocast and not group" if target == "avx2" else "")
    r = subprocess.run([sys.executable, "-m", "pytest", os.path.abspath(__file__), "-q", "-x", "-p", "no:cacheprovider",
                        "-k", select], env=env, capture_output=True, text=True, timeout=600, cwd=str(tmp_path))
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-2000:]
    import re
    m = re.search(r"(\d+) passed", r.stdout)
    assert m and int(m.group(1)) >= (14 if target == "avx2" else 20), r.stdout[-800:]
    assert "skipped" not in r.stdout.splitlines()[-1], r.stdout[-800:]
