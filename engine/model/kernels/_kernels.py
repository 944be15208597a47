"""Numba kernels for the three products of a sparse linear layer.

Layout: the SpMM/SDDMM inputs are kept feature-major in token tiles,
``[ntiles, features, T]`` with T = 128 tokens, so one feature of one tile is 512
contiguous bytes (eight AVX-512 vectors); the SpMMs write their outputs
straight back to row-major.  Every hot loop is emitted as explicit LLVM vector IR through
``numba.extending.intrinsic``: plain numba loops keep the accumulators in memory
(load + store per FMA), which costs ~3x.  Intrinsics live in this file on purpose:
numba's on-disk cache is keyed on the njit function's source file, so code
generators kept elsewhere could be served stale from the cache.

All functions are dtype-generic; float32 uses 16 lanes, float64 8 lanes (the
float64 specialisation exists for gradcheck). The bf16 kernels (``*16_part``, the
last section) take bf16 bit patterns in int16 arrays and accumulate in fp32, with
the AVX512-BF16 dot product where the CPU has it, widening to fp32 FMAs elsewhere.
"""
import os

# Must be set before numba is imported (reads it once); the reduction loops
# only vectorise with SLP on.
os.environ.setdefault("NUMBA_SLP_VECTORIZE", "1")
# numba's thread pool (an explicit NUMBA_THREADING_LAYER wins). Its OpenMP pool brings a second
# libgomp next to torch's. Where OMP_WAIT_POLICY=PASSIVE (the engine's CLI and the benchmarks set it)
# idle OpenMP workers sleep, and that pool is the better one: the calling thread computes its share of
# every product at once instead of handing all of it to woken workers. GPT-2 small at 75 %, one
# 512-token sequence per step, 2 cores, two runs each: 1.54x and 1.73x faster than dense vs 1.50x and
# 1.34x on the workqueue pool. Without that policy both runtimes' idle workers spin, and on a busy
# 2-core machine a 128x128 layer step took 50 ms instead of 2 ms; there the workqueue pool, whose idle
# threads sleep. Where OpenMP does not load (no libgomp), numba falls back to the workqueue pool.
_LAYER_SET = "NUMBA_THREADING_LAYER" in os.environ
_PRIORITY_SET = "NUMBA_THREADING_LAYER_PRIORITY" in os.environ  # a user's own order wins too
_OMP_SLEEPS = os.environ.get("OMP_WAIT_POLICY", "").strip().upper() == "PASSIVE"
_PRIORITY = ["omp", "workqueue", "tbb"]  # numba wants all three named
if not _LAYER_SET:
    if _OMP_SLEEPS:
        os.environ.setdefault("NUMBA_THREADING_LAYER_PRIORITY", " ".join(_PRIORITY))
    else:
        os.environ["NUMBA_THREADING_LAYER"] = "workqueue"

import numpy as np  # noqa: E402
import numba  # noqa: E402
from numba import njit, prange, types  # noqa: E402
from numba.extending import intrinsic  # noqa: E402
from llvmlite import ir  # noqa: E402

if not numba.config.SLP_VECTORIZE:  # numba imported earlier by someone else
    numba.config.SLP_VECTORIZE = True
if not _LAYER_SET and numba.config.THREADING_LAYER == "default":  # numba imported earlier by someone else
    # (no effect once numba's pool has started)
    if _OMP_SLEEPS:
        if not _PRIORITY_SET:
            numba.config.THREADING_LAYER_PRIORITY = _PRIORITY
    else:
        numba.config.THREADING_LAYER = "workqueue"

T = 128        # tokens per tile (one feature of a tile = 512 B for fp32)
VEC_BYTES = 64  # AVX-512 register


def _lanes(dtype):
    return VEC_BYTES // dtype.bitwidth * 8


def _llvm_float(dtype):
    return ir.FloatType() if dtype.bitwidth == 32 else ir.DoubleType()


def _data_ptr(context, builder, aryty, ary):
    return context.make_array(aryty)(context, builder, ary).data


def _vload(builder, base_ptr, elem_off, vty):
    p = builder.gep(base_ptr, [elem_off])
    return builder.load(builder.bitcast(p, vty.as_pointer()), align=4)


def _vstore(builder, val, base_ptr, elem_off, vty):
    p = builder.gep(base_ptr, [elem_off])
    builder.store(val, builder.bitcast(p, vty.as_pointer()), align=4)


def _splat(builder, scalar, vty):
    i32 = ir.IntType(32)
    v = builder.insert_element(ir.Constant(vty, ir.Undefined), scalar, ir.Constant(i32, 0))
    mask = ir.Constant(ir.VectorType(i32, vty.count), [0] * vty.count)
    return builder.shuffle_vector(v, ir.Constant(vty, ir.Undefined), mask)


def _fma(builder, a, b, c):
    vty = a.type
    suffix = "v%df%d" % (vty.count, 32 if isinstance(vty.element, ir.FloatType) else 64)
    fn = builder.module.declare_intrinsic("llvm.fma." + suffix, fnty=ir.FunctionType(vty, [vty] * 3))
    return builder.call(fn, [a, b, c])


@intrinsic
def _take(typingctx, ctr, i):
    """Atomically ``old = ctr[i]; ctr[i] += 1; return old`` (int64): the next work item of a queue
    that all workers of a product draw from."""
    sig = types.int64(ctr, types.intp)

    def codegen(context, builder, signature, args):
        a, i = args
        p = builder.gep(_data_ptr(context, builder, signature.args[0], a), [i])
        return builder.atomic_rmw("add", p, ir.Constant(ir.IntType(64), 1), "seq_cst")

    return sig, codegen


@intrinsic
def _peek(typingctx, ctr, i):
    """Atomic (acquire) read of ``ctr[i]``, for a wait on the other workers' progress."""
    sig = types.int64(ctr, types.intp)

    def codegen(context, builder, signature, args):
        a, i = args
        p = builder.gep(_data_ptr(context, builder, signature.args[0], a), [i])
        return builder.load_atomic(p, "acquire", 8)

    return sig, codegen


@intrinsic
def _spmm_seg(typingctx, x, xbase, idx, val, start, end, y, ybase, accumulate):
    """y[ybase:ybase+T] (+)= sum_j val[j] * x[xbase + idx[j]*T : +T], j in [start, end).

    The T outputs live in registers for the whole segment: per nonzero one
    broadcast and T/lanes FMAs with a memory operand.
    """
    sig = types.void(x, xbase, idx, val, start, end, y, ybase, accumulate)

    def codegen(context, builder, signature, args):
        xa, xbase, idxa, vala, start, end, ya, ybase, accumulate = args
        xty, _, idxty, valty, _, _, yty, _, _ = signature.args
        ft = _llvm_float(xty.dtype)
        L = _lanes(xty.dtype)
        nv = T // L
        vty = ir.VectorType(ft, L)
        i64 = ir.IntType(64)
        xp = _data_ptr(context, builder, xty, xa)
        ip = _data_ptr(context, builder, idxty, idxa)
        wp = _data_ptr(context, builder, valty, vala)
        yp = _data_ptr(context, builder, yty, ya)
        xbase = builder.sext(xbase, i64) if xbase.type.width < 64 else xbase
        ybase = builder.sext(ybase, i64) if ybase.type.width < 64 else ybase
        start = builder.sext(start, i64) if start.type.width < 64 else start
        end = builder.sext(end, i64) if end.type.width < 64 else end

        zero = ir.Constant(vty, [0.0] * L)
        pre = builder.basic_block
        ld = builder.append_basic_block("spmm.load")
        ent = builder.append_basic_block("spmm.entry")
        loop = builder.append_basic_block("spmm.loop")
        done = builder.append_basic_block("spmm.done")
        acc_flag = builder.icmp_unsigned("!=", accumulate, ir.Constant(accumulate.type, 0))
        builder.cbranch(acc_flag, ld, ent)

        builder.position_at_end(ld)
        loaded = [_vload(builder, yp, builder.add(ybase, ir.Constant(i64, k * L)), vty)
                  for k in range(nv)]
        builder.branch(ent)

        builder.position_at_end(ent)
        init = []
        for k in range(nv):
            ph = builder.phi(vty)
            ph.add_incoming(loaded[k], ld)
            ph.add_incoming(zero, pre)
            init.append(ph)
        nonempty = builder.icmp_signed("<", start, end)
        builder.cbranch(nonempty, loop, done)

        builder.position_at_end(loop)
        j = builder.phi(i64)
        j.add_incoming(start, ent)
        accs = []
        for k in range(nv):
            ph = builder.phi(vty)
            ph.add_incoming(init[k], ent)
            accs.append(ph)
        # unsigned column index: zext lets LLVM fold it straight into the address
        c = builder.zext(builder.load(builder.gep(ip, [j])), i64)
        w = _splat(builder, builder.load(builder.gep(wp, [j])), vty)
        off = builder.add(xbase, builder.mul(c, ir.Constant(i64, T)))
        new = []
        for k in range(nv):
            v = _vload(builder, xp, builder.add(off, ir.Constant(i64, k * L)), vty)
            new.append(_fma(builder, w, v, accs[k]))
        jn = builder.add(j, ir.Constant(i64, 1))
        j.add_incoming(jn, loop)
        for k in range(nv):
            accs[k].add_incoming(new[k], loop)
        builder.cbranch(builder.icmp_signed("<", jn, end), loop, done)

        builder.position_at_end(done)
        fin = []
        for k in range(nv):
            ph = builder.phi(vty)
            ph.add_incoming(init[k], ent)
            ph.add_incoming(new[k], loop)
            fin.append(ph)
        for k in range(nv):
            _vstore(builder, fin[k], yp, builder.add(ybase, ir.Constant(i64, k * L)), vty)
        return context.get_dummy_value()

    return sig, codegen


def _sddmm_codegen(context, builder, tys, arrays, xbase, xstride, start, end, dybase, dystride, pbase, first,
                   ntiles):
    """Body of the SDDMM segment intrinsics for ``ntiles`` (1 or 2) token tiles at once: the tiles'
    dy rows stay in registers; per nonzero, two independent FMA chains per tile, one partial-sum
    read-modify-write for all of them."""
    xty, idxty, dyty, pty = tys
    xa, idxa, dya, pa = arrays
    ft = _llvm_float(xty.dtype)
    L = _lanes(xty.dtype)
    nv = T // L
    vty = ir.VectorType(ft, L)
    i64 = ir.IntType(64)

    def w64(v):
        return builder.sext(v, i64) if v.type.width < 64 else v
    xbase, xstride, start, end, dybase, dystride, pbase = map(
        w64, (xbase, xstride, start, end, dybase, dystride, pbase))
    xp = _data_ptr(context, builder, xty, xa)
    ip = _data_ptr(context, builder, idxty, idxa)
    dp = _data_ptr(context, builder, dyty, dya)
    pp = _data_ptr(context, builder, pty, pa)
    dybases = [dybase, builder.add(dybase, dystride)][:ntiles]
    d = [_vload(builder, dp, builder.add(b, ir.Constant(i64, k * L)), vty) for b in dybases for k in range(nv)]
    ent = builder.basic_block
    loop = builder.append_basic_block("sddmm.loop")
    done = builder.append_basic_block("sddmm.done")
    builder.cbranch(builder.icmp_signed("<", start, end), loop, done)

    builder.position_at_end(loop)
    j = builder.phi(i64)
    j.add_incoming(start, ent)
    c = builder.zext(builder.load(builder.gep(ip, [j])), i64)
    off = builder.add(xbase, builder.mul(c, ir.Constant(i64, T)))
    offs = [off, builder.add(off, xstride)][:ntiles]
    # independent FMA chains (two per tile) halve the dependency latency per nonzero
    s = [None] * (2 * ntiles)
    for q, o in enumerate(offs):
        for k in range(nv):
            v = _vload(builder, xp, builder.add(o, ir.Constant(i64, k * L)), vty)
            h = (k & 1) + 2 * q
            dv = d[q * nv + k]
            s[h] = builder.fmul(dv, v) if s[h] is None else _fma(builder, dv, v, s[h])
    per_tile = [builder.fadd(s[2 * q], s[2 * q + 1]) if s[2 * q + 1] is not None else s[2 * q]
                for q in range(ntiles)]
    tot = per_tile[0] if ntiles == 1 else builder.fadd(per_tile[0], per_tile[1])
    poff = builder.add(pbase, builder.mul(builder.sub(j, start), ir.Constant(i64, L)))
    # the first tile stores, later ones accumulate: the buffer needs no zeroing
    prev = builder.select(first, ir.Constant(vty, [0.0] * L), _vload(builder, pp, poff, vty))
    _vstore(builder, builder.fadd(prev, tot), pp, poff, vty)
    jn = builder.add(j, ir.Constant(i64, 1))
    j.add_incoming(jn, loop)
    builder.cbranch(builder.icmp_signed("<", jn, end), loop, done)
    builder.position_at_end(done)
    return context.get_dummy_value()


@intrinsic
def _sddmm_seg(typingctx, x, xbase, idx, start, end, dy, dybase, p, pbase, first):
    """p[pbase + (j-start)*L : +L] += lane-partial of dot(dy[dybase:+T], x[xbase+idx[j]*T:+T]).

    The dy row stays in registers; each nonzero keeps an L-lane partial sum that
    is reduced to a scalar only once, after all token tiles.
    """
    sig = types.void(x, xbase, idx, start, end, dy, dybase, p, pbase, first)

    def codegen(context, builder, signature, args):
        xa, xbase, idxa, start, end, dya, dybase, pa, pbase, first = args
        xty, _, idxty, _, _, dyty, _, pty, _, _ = signature.args
        zero = ir.Constant(ir.IntType(64), 0)
        return _sddmm_codegen(context, builder, (xty, idxty, dyty, pty), (xa, idxa, dya, pa), xbase, zero,
                              start, end, dybase, zero, pbase, first, 1)

    return sig, codegen


@intrinsic
def _sddmm_seg2(typingctx, x, xbase, xstride, idx, start, end, dy, dybase, dystride, p, pbase, first):
    """Like _sddmm_seg for two token tiles at once (x and dy offsets + stride):
    both dy rows (16 registers) stay live, so the partial-sum read-modify-write
    and the loop overhead are paid once per nonzero for 256 tokens."""
    sig = types.void(x, xbase, xstride, idx, start, end, dy, dybase, dystride, p, pbase, first)

    def codegen(context, builder, signature, args):
        xa, xbase, xstride, idxa, start, end, dya, dybase, dystride, pa, pbase, first = args
        xty, _, _, idxty, _, _, dyty, _, _, pty, _, _ = signature.args
        return _sddmm_codegen(context, builder, (xty, idxty, dyty, pty), (xa, idxa, dya, pa), xbase, xstride,
                              start, end, dybase, dystride, pbase, first, 2)

    return sig, codegen


@intrinsic
def _reduce_lanes(typingctx, part, pbase, ngroups, red):
    """red[g*L + i] = sum of the L lanes of partial row g*L + i of ``part``.

    A pairwise fold tree over L rows at a time (L-1 folds of two shuffles and
    one add) instead of L scalar adds per row.
    """
    sig = types.void(part, pbase, ngroups, red)

    def codegen(context, builder, signature, args):
        pa, pbase, ngroups, ra = args
        pty, _, _, rty = signature.args
        ft = _llvm_float(pty.dtype)
        L = _lanes(pty.dtype)
        vty = ir.VectorType(ft, L)
        i32 = ir.IntType(32)
        i64 = ir.IntType(64)
        pbase = builder.sext(pbase, i64) if pbase.type.width < 64 else pbase
        ngroups = builder.sext(ngroups, i64) if ngroups.type.width < 64 else ngroups
        pp = _data_ptr(context, builder, pty, pa)
        rp = _data_ptr(context, builder, rty, ra)
        ent = builder.basic_block
        loop = builder.append_basic_block("red.loop")
        done = builder.append_basic_block("red.done")
        builder.cbranch(builder.icmp_signed("<", ir.Constant(i64, 0), ngroups), loop, done)
        builder.position_at_end(loop)
        g = builder.phi(i64)
        g.add_incoming(ir.Constant(i64, 0), ent)
        base = builder.add(pbase, builder.mul(g, ir.Constant(i64, L * L)))
        # each entry: (vector, list of row ids of its lane groups)
        vecs = [(_vload(builder, pp, builder.add(base, ir.Constant(i64, r * L)), vty), [r])
                for r in range(L)]
        width = L
        while width > 1:
            half = width // 2
            nxt = []
            for a in range(0, len(vecs), 2):
                (u, ug), (v, vg) = vecs[a], vecs[a + 1]
                lo, hi, groups = [], [], []
                for q in range(2 * len(ug)):
                    src = (q % 2) * L + (q // 2) * width
                    lo += [src + i for i in range(half)]
                    hi += [src + half + i for i in range(half)]
                    groups.append((ug if q % 2 == 0 else vg)[q // 2])
                mlo = ir.Constant(ir.VectorType(i32, L), lo)
                mhi = ir.Constant(ir.VectorType(i32, L), hi)
                nxt.append((builder.fadd(builder.shuffle_vector(u, v, mlo),
                                         builder.shuffle_vector(u, v, mhi)), groups))
            vecs = nxt
            width = half
        vec, order = vecs[0]
        # lane q now holds row order[q]; put row r in lane r
        inv = [order.index(r) for r in range(L)]
        vec = builder.shuffle_vector(vec, ir.Constant(vty, ir.Undefined),
                                     ir.Constant(ir.VectorType(i32, L), inv))
        _vstore(builder, vec, rp, builder.mul(g, ir.Constant(i64, L)), vty)
        gn = builder.add(g, ir.Constant(i64, 1))
        g.add_incoming(gn, loop)
        builder.cbranch(builder.icmp_signed("<", gn, ngroups), loop, done)
        builder.position_at_end(done)
        return context.get_dummy_value()

    return sig, codegen


# Every parallel kernel is a serial ``*_part(..., ctr, w, nwork)`` plus a ``*_par(..., ctr, nwork)``
# wrapper that runs nwork parts in a prange. The parts draw work items in order from a shared queue
# (``_take`` on the int64 counters ``ctr``, zeroed per call) instead of a fixed share each: on a
# machine where one core is busy with something else, or wakes late, the other core takes over its
# items rather than waiting for them at the end. Items still start in order, so neighbouring items
# (which share an activation block or tile) run at the same time on all workers. numba's parfor
# lowering compiles plain scalar loops inside a prange body poorly (a zero-fill + scatter ran 4-5x
# slower than the same loop in a serial njit), and small products call the part directly, skipping
# the thread pool (see ops._nwork).

# RC (an argument) = rows per work item.  Within an item the loop runs column
# block by column block, so one activation block (CB features x T tokens) is
# reused from L1/L2 by all RC rows while their partial outputs stay in L1/L2.


@njit(cache=True, nogil=True)
def spmm_part(xt, nin, idx, val, ptr, nout, ncb, ntiles, n, y, bias, use_bias, RC, ctr, w, nwork):
    """y[r, o] = sum_i W[o, i] x[r, i] (+ bias[o]) for the work items this worker takes
    (item = token tile x RC output rows), W as column-blocked CSR, x tiled,
    y row-major [n, nout] (flat).

    An item's RC x T outputs build up in a small scratch that stays in L1/L2 and
    are transposed into y as soon as its last column block is done: no tiled
    copy of the whole output makes a round trip through memory."""
    L = 64 // xt.itemsize
    nrc = (nout + RC - 1) // RC
    buf = np.empty(RC * T + L, dtype=xt.dtype)
    acc = buf[((-buf.ctypes.data) % 64) // xt.itemsize:]
    nitems = ntiles * nrc
    while True:
        item = _take(ctr, 0)
        if item >= nitems:
            break
        t = item // nrc
        r0 = (item - t * nrc) * RC
        r1 = min(r0 + RC, nout)
        xbase = t * nin * T
        for cb in range(ncb):
            prow = cb * nout
            for o in range(r0, r1):
                s = ptr[prow + o]
                e = ptr[prow + o + 1]
                if e > s or cb == 0:
                    _spmm_seg(xt, xbase, idx, val, s, e, acc, (o - r0) * T, cb > 0)
        kmax = min(T, n - t * T)
        kfast = kmax - kmax % L
        ofast = r0 + (r1 - r0) - (r1 - r0) % L
        for o0 in range(r0, ofast, L):
            for k0 in range(0, kfast, L):
                _transpose_block(acc, (o0 - r0) * T + k0, T, y, (t * T + k0) * nout + o0, nout,
                                 bias, o0, use_bias)
        for o in range(r0, r1):
            k1 = kfast if o < ofast else 0
            for k in range(k1, kmax):
                v = acc[(o - r0) * T + k]
                if use_bias:
                    v += bias[o]
                y[(t * T + k) * nout + o] = v


@njit(parallel=True, cache=True, nogil=True)
def spmm_par(xt, nin, idx, val, ptr, nout, ncb, ntiles, n, y, bias, use_bias, RC, ctr, nwork):
    for w in prange(nwork):
        spmm_part(xt, nin, idx, val, ptr, nout, ncb, ntiles, n, y, bias, use_bias, RC, ctr, w, nwork)


@njit(cache=True, nogil=True)
def sddmm_part(xt, nin, dyt, nout, idx, ptr, ncb, ntiles, out, src, acc, RC, maxnnz, CT, ctr, w, nwork):
    """out[src[j]] = sum_n dy[n, row(j)] x[n, idx[j]] for the stored nonzeros j of
    the work items this worker takes (item = column block x RC rows): the gradient of the
    layer's row-major values. Token tiles are taken in pairs (_sddmm_seg2), an odd last one alone.

    Tokens run in chunks of CT tiles, all items of a chunk before the next chunk: each column
    block re-reads dY, and a chunk of dY stays in L3 where the whole of it (N = 2048, 3072
    outputs: 25 MB) would come from memory once per column block. Per-chunk sums meet in ``acc``
    (plan order) before the scatter into ``out``. Chunk c's items are queue ctr[2c]; ctr[2c + 1]
    counts the finished ones, and no worker starts chunk c + 1 before all of chunk c is done, since
    an item of the next chunk adds to the same ``acc`` entries. (A worker that never got to run has
    taken no item, so this wait never waits on it.)"""
    L = 64 // xt.itemsize
    nrc = (nout + RC - 1) // RC
    ngmax = (maxnnz + L - 1) // L
    # one scratch per worker, reused by all its items (a fresh buffer per
    # item cost as much as the reduction itself).  numba aligns new arrays to
    # 32 B only; a partial sum straddling two cache lines costs a split load
    # and store per nonzero, so realign to 64 B
    buf = np.empty((ngmax * L + 1) * L, dtype=xt.dtype)
    a0 = ((-buf.ctypes.data) % 64) // xt.itemsize
    part = buf[a0:]
    red = np.empty(ngmax * L + 1, dtype=xt.dtype)
    nchunks = (ntiles + CT - 1) // CT
    nitems = ncb * nrc
    for c in range(nchunks):
        c0 = c * CT
        c1 = min(c0 + CT, ntiles)
        if c > 0:
            while _peek(ctr, 2 * c - 1) < nitems:
                pass
        # items in order: neighbouring row groups of one column block run at
        # the same time on all workers and share the activation block in L3
        while True:
            item = _take(ctr, 2 * c)
            if item >= nitems:
                break
            cb = item // nrc
            r0 = (item - cb * nrc) * RC
            r1 = min(r0 + RC, nout)
            prow = cb * nout
            s0 = ptr[prow + r0]
            nnz = ptr[prow + r1] - s0
            if nnz == 0:
                _take(ctr, 2 * c + 1)
                continue
            # no zeroing: the chunk's first tile stores every live row; padding rows only
            # feed lanes of red that are never read
            for t in range(c0, c1 - 1, 2):
                xbase = t * nin * T
                for o in range(r0, r1):
                    s = ptr[prow + o]
                    e = ptr[prow + o + 1]
                    if e > s:
                        _sddmm_seg2(xt, xbase, nin * T, idx, s, e, dyt, (t * nout + o) * T,
                                    nout * T, part, (s - s0) * L, t == c0)
            if (c1 - c0) % 2 == 1:
                t = c1 - 1
                xbase = t * nin * T
                for o in range(r0, r1):
                    s = ptr[prow + o]
                    e = ptr[prow + o + 1]
                    if e > s:
                        _sddmm_seg(xt, xbase, idx, s, e, dyt, (t * nout + o) * T, part,
                                   (s - s0) * L, t == c0)
            _reduce_lanes(part, 0, (nnz + L - 1) // L, red)
            if nchunks == 1:
                for j in range(nnz):
                    out[src[s0 + j]] = red[j]
            elif c == 0:
                for j in range(nnz):
                    acc[s0 + j] = red[j]
            elif c < nchunks - 1:
                for j in range(nnz):
                    acc[s0 + j] += red[j]
            else:
                for j in range(nnz):
                    out[src[s0 + j]] = acc[s0 + j] + red[j]
            _take(ctr, 2 * c + 1)


@njit(parallel=True, cache=True, nogil=True)
def sddmm_par(xt, nin, dyt, nout, idx, ptr, ncb, ntiles, out, src, acc, RC, maxnnz, CT, ctr, nwork):
    """out[src[j]] = sum_n dy[n, row(j)] x[n, idx[j]] for every stored nonzero j."""
    for w in prange(nwork):
        sddmm_part(xt, nin, dyt, nout, idx, ptr, ncb, ntiles, out, src, acc, RC, maxnnz, CT, ctr, w, nwork)


@njit(cache=True, nogil=True)
def scatter_part(src, pos, out, ctr, w, nwork):
    """out[pos[k]] = src[k] for this worker's share of k: a layer's values (row-major) in a plan's
    entry order. The reads stream; the writes fall in one sequential run per column block.
    (A fixed share: the work is uniform and too short for a queue to matter.)"""
    n = src.size
    for k in range(w * n // nwork, (w + 1) * n // nwork):
        out[pos[k]] = src[k]


@njit(parallel=True, cache=True, nogil=True)
def scatter_par(src, pos, out, ctr, nwork):
    for w in prange(nwork):
        scatter_part(src, pos, out, ctr, w, nwork)


def _transpose_regs(builder, v):
    """Transpose L vectors of L lanes in registers: log2(L) butterfly rounds of two-input shuffles
    (round b swaps bit b of the row index with bit b of the lane index)."""
    L = len(v)
    i32 = ir.IntType(32)
    m = 1
    while m < L:
        nv = list(v)
        for r0 in range(L):
            if r0 & m:
                continue
            r1 = r0 | m
            lo = [c if not (c & m) else L + (c ^ m) for c in range(L)]
            hi = [L + c if (c & m) else (c ^ m) for c in range(L)]
            nv[r0] = builder.shuffle_vector(v[r0], v[r1], ir.Constant(ir.VectorType(i32, L), lo))
            nv[r1] = builder.shuffle_vector(v[r0], v[r1], ir.Constant(ir.VectorType(i32, L), hi))
        v = nv
        m <<= 1
    return v


@intrinsic
def _transpose_block(typingctx, src, soff, sstride, dst, doff, dstride, bias, boff, use_bias):
    """Transpose one LxL block (L = lanes): dst[doff + c*dstride + r] = src[soff + r*sstride + c].

    L vector loads, log2(L) butterfly rounds of two-input shuffles, L vector
    stores: full cache lines on both sides instead of scalar strided copies.
    With ``use_bias`` bias[boff + r] is added to every element of output row c
    (i.e. to lane r), which is how the forward adds b to the row-major Y.
    """
    sig = types.void(src, soff, sstride, dst, doff, dstride, bias, boff, use_bias)

    def codegen(context, builder, signature, args):
        sa, soff, sstride, da, doff, dstride, ba, boff, use_bias = args
        sty, _, _, dty, _, _, bty, _, _ = signature.args
        ft = _llvm_float(sty.dtype)
        L = _lanes(sty.dtype)
        vty = ir.VectorType(ft, L)
        i64 = ir.IntType(64)

        def w64(v):
            return builder.sext(v, i64) if v.type.width < 64 else v
        soff, sstride, doff, dstride, boff = map(w64, (soff, sstride, doff, dstride, boff))
        sp = _data_ptr(context, builder, sty, sa)
        dp = _data_ptr(context, builder, dty, da)
        bp = _data_ptr(context, builder, bty, ba)
        v = _transpose_regs(builder, [
            _vload(builder, sp, builder.add(soff, builder.mul(ir.Constant(i64, r), sstride)), vty)
            for r in range(L)])
        flag = builder.icmp_unsigned("!=", use_bias, ir.Constant(use_bias.type, 0))
        with builder.if_then(flag):
            bvec = _vload(builder, bp, boff, vty)  # only touched when there is a bias
            for c in range(L):
                _vstore(builder, builder.fadd(v[c], bvec), dp,
                        builder.add(doff, builder.mul(ir.Constant(i64, c), dstride)), vty)
        with builder.if_then(builder.not_(flag)):
            for c in range(L):
                _vstore(builder, v[c], dp, builder.add(doff, builder.mul(ir.Constant(i64, c), dstride)), vty)
        return context.get_dummy_value()

    return sig, codegen


@njit(cache=True, nogil=True)
def to_tiles_part(x, n, f, ntiles, out, dummy, ctr, w, nwork):
    """Row-major x[n, f] (flat) -> out[ntiles, f, T], zero-padding the last tile."""
    L = 64 // x.itemsize
    nfb = (f + L - 1) // L
    nitems = ntiles * nfb
    while True:
        item = _take(ctr, 0)
        if item >= nitems:
            break
        t = item // nfb
        f0 = (item - t * nfb) * L
        f1 = min(f0 + L, f)
        kmax = min(T, n - t * T)
        kfast = 0
        if f1 - f0 == L:
            kfast = kmax - kmax % L
            for k0 in range(0, kfast, L):
                _transpose_block(x, (t * T + k0) * f + f0, f, out, (t * f + f0) * T + k0, T,
                                 dummy, 0, False)
        for k in range(kfast, kmax):
            r = t * T + k
            for i in range(f0, f1):
                out[(t * f + i) * T + k] = x[r * f + i]
        for i in range(f0, f1):
            for k in range(kmax, T):
                out[(t * f + i) * T + k] = 0


@njit(parallel=True, cache=True, nogil=True)
def to_tiles_par(x, n, f, ntiles, out, dummy, ctr, nwork):
    for w in prange(nwork):
        to_tiles_part(x, n, f, ntiles, out, dummy, ctr, w, nwork)


# --- bf16 ----------------------------------------------------------------------------------------
# numba has no bf16 type: bf16 activations and values travel as their bit patterns in int16 arrays
# (torch.bfloat16 tensors viewed as int16). Tiles keep the fp32 layout, [ntiles, features, T] with
# tokens in natural order (one feature of a tile = 256 B, four vectors of 32). Every product
# accumulates in fp32; the SpMMs round their outputs to bf16 as they write them, the SDDMM writes
# fp32 (the gradient of fp32 master values).


def _cpu_features():
    """The CPU features numba compiles for: NUMBA_CPU_FEATURES where set, else the host's. numba's
    cache is keyed on them, so code generated for one feature set is never served to another CPU."""
    if numba.config.CPU_FEATURES is not None:
        return {f.strip()[1:] for f in numba.config.CPU_FEATURES.split(",") if f.strip().startswith("+")}
    try:
        from llvmlite import binding as ll
        return {k for k, v in ll.get_host_cpu_features().items() if v}
    except Exception:  # a platform llvmlite cannot query: assume nothing
        return set()


CPU_FEATURES = frozenset(_cpu_features())
# vdpbf16ps exists: its code is generated (elsewhere the widening path is the only one compiled)
HAS_BF16_DOT = {"avx512f", "avx512bw", "avx512bf16"} <= CPU_FEATURES
# The path the bf16 products take. MEDISWIFT_BF16_PATH=widen forces widening where the dot product
# exists, so one machine tests both. A run-time argument of the kernels, not a compile-time
# switch: numba's cache knows nothing of this variable.
BF16_DOT = HAS_BF16_DOT and os.environ.get("MEDISWIFT_BF16_PATH", "").strip().lower() != "widen"


class _BFloat(ir.Type):
    """LLVM's ``bfloat``, which llvmlite.ir cannot name; the AVX512-BF16 intrinsics take <32 x bfloat>
    (the IR is text to LLVM, so naming the type is all it takes)."""

    def _to_string(self):
        return "bfloat"

    def __eq__(self, other):
        return isinstance(other, _BFloat)

    def __hash__(self):
        return hash("bfloat")


_I16, _I32, _I64 = ir.IntType(16), ir.IntType(32), ir.IntType(64)
_V16F = ir.VectorType(ir.FloatType(), 16)
_V16I = ir.VectorType(_I32, 16)
_V32H = ir.VectorType(_I16, 32)  # 32 bf16 bit patterns
_V32B = ir.VectorType(_BFloat(), 32)
# vpunpck{l,h}wd: in each 128-bit lane, words 0-3 (lo) or 4-7 (hi) of a and b interleaved
_UNPACK_LO = [32 * s + 8 * l + i for l in range(4) for i in range(4) for s in (0, 1)]
_UNPACK_HI = [32 * s + 8 * l + 4 + i for l in range(4) for i in range(4) for s in (0, 1)]


def _const(ty, v):
    return ir.Constant(ty, [v] * ty.count) if isinstance(ty, ir.VectorType) else ir.Constant(ty, v)


def _load(builder, base_ptr, elem_off, ty, align=2):
    """Load a ``ty`` at element ``elem_off`` of base_ptr (int16 data is only 2-byte aligned)."""
    p = builder.gep(base_ptr, [elem_off])
    return builder.load(builder.bitcast(p, ty.as_pointer()), align=align)


def _store(builder, val, base_ptr, elem_off, align=2):
    p = builder.gep(base_ptr, [elem_off])
    builder.store(val, builder.bitcast(p, val.type.as_pointer()), align=align)


def _widen(builder, v):
    """32 bf16 (one 512-bit vector) -> their even and odd elements as two <16 x float>: a bf16 is the
    high half of an fp32, so the low half of each 32-bit lane widens by a shift, the high half by a
    mask."""
    v = builder.bitcast(v, _V16I)
    even = builder.shl(v, _const(_V16I, 16))
    odd = builder.and_(v, _const(_V16I, -65536))
    return builder.bitcast(even, _V16F), builder.bitcast(odd, _V16F)


def _bf16_dot(builder, acc, a, b):
    """acc[k] + a[2k] b[2k] + a[2k+1] b[2k+1] for 16 fp32 lanes (vdpbf16ps; a, b: 32 bf16)."""
    fnty = ir.FunctionType(_V16F, [_V16F, _V32B, _V32B])
    fn = builder.module.declare_intrinsic("llvm.x86.avx512bf16.dpbf16ps.512", fnty=fnty)
    return builder.call(fn, [acc, builder.bitcast(a, _V32B), builder.bitcast(b, _V32B)])


def _round_bf16(builder, f):
    """fp32 (scalar or vector) -> bf16 bits (i16), rounded to nearest even; a NaN stays a NaN."""
    vec = isinstance(f.type, ir.VectorType)
    ity = ir.VectorType(_I32, f.type.count) if vec else _I32
    hty = ir.VectorType(_I16, f.type.count) if vec else _I16
    u = builder.bitcast(f, ity)
    lsb = builder.and_(builder.lshr(u, _const(ity, 16)), _const(ity, 1))
    r = builder.lshr(builder.add(u, builder.add(lsb, _const(ity, 0x7FFF))), _const(ity, 16))
    r = builder.select(builder.fcmp_unordered("uno", f, f), _const(ity, 0x7FC0), r)
    return builder.trunc(r, hty)


def _w64(builder, v):
    return builder.sext(v, _I64) if v.type.width < 64 else v


def _counted_loop(builder, start, end, step, init, body, name):
    """Emit ``j = start; while j + step <= end: vals = body(j, vals); j += step``. Returns (j, vals)
    as they leave the loop, valid in the block the builder is left in."""
    pre = builder.basic_block
    head = builder.append_basic_block(name + ".head")
    loop = builder.append_basic_block(name + ".body")
    out = builder.append_basic_block(name + ".exit")
    builder.branch(head)
    builder.position_at_end(head)
    j = builder.phi(_I64)
    j.add_incoming(start, pre)
    vals = []
    for v in init:
        ph = builder.phi(v.type)
        ph.add_incoming(v, pre)
        vals.append(ph)
    jn = builder.add(j, ir.Constant(_I64, step))
    builder.cbranch(builder.icmp_signed("<=", jn, end), loop, out)
    builder.position_at_end(loop)
    new = body(j, vals)
    last = builder.basic_block
    j.add_incoming(jn, last)
    for ph, v in zip(vals, new):
        ph.add_incoming(v, last)
    builder.branch(head)
    builder.position_at_end(out)
    return j, vals


def _merge(builder, arms):
    """Join ``arms`` [(values, block)], each block not yet terminated, into a new block; returns the
    values there."""
    done = builder.append_basic_block("merge")
    for _, blk in arms:
        builder.position_at_end(blk)
        builder.branch(done)
    builder.position_at_end(done)
    return _phis(builder, arms)


def _phis(builder, arms):
    """Phis in the current block for ``arms`` [(values, predecessor block)]."""
    out = []
    for k in range(len(arms[0][0])):
        ph = builder.phi(arms[0][0][k].type)
        for vals, blk in arms:
            ph.add_incoming(vals[k], blk)
        out.append(ph)
    return out


@intrinsic
def _spmm16_seg(typingctx, x, xbase, idx, val, start, end, y, ybase, accumulate, dot):
    """y[ybase:ybase+T] (+)= sum_j val[j] * x[xbase + idx[j]*T : +T], j in [start, end): x and val
    bf16 bits, y fp32 with the tokens in the order of ``_spmm16_pos``.

    Widening: per nonzero four 64-byte loads of 32 tokens, each widened into its even and odd tokens,
    eight fp32 FMAs (accumulator 2q: even tokens of 32q.., 2q+1: odd ones). Dot (``dot``, where
    vdpbf16ps exists): two nonzeros at a time, their 32-token vectors interleaved word by word
    (vpunpck{l,h}wd), times the pair of values (one 32-bit broadcast of val[j:j+2]) in one vdpbf16ps
    per 16 tokens: four multiply instructions per nonzero instead of eight, and no widening."""
    sig = types.void(x, xbase, idx, val, start, end, y, ybase, accumulate, dot)

    def codegen(context, builder, signature, args):
        xa, xbase, idxa, vala, start, end, ya, ybase, accumulate, dot = args
        xty, _, idxty, valty, _, _, yty, _, _, _ = signature.args
        nv = T // 16
        xp = _data_ptr(context, builder, xty, xa)
        ip = _data_ptr(context, builder, idxty, idxa)
        wp = _data_ptr(context, builder, valty, vala)
        yp = _data_ptr(context, builder, yty, ya)
        xbase, ybase, start, end = (_w64(builder, v) for v in (xbase, ybase, start, end))

        zero = _const(_V16F, 0.0)
        pre = builder.basic_block
        ld = builder.append_basic_block("spmm16.load")
        ent = builder.append_basic_block("spmm16.entry")
        builder.cbranch(builder.icmp_unsigned("!=", accumulate, _const(accumulate.type, 0)), ld, ent)
        builder.position_at_end(ld)
        loaded = [_load(builder, yp, builder.add(ybase, ir.Constant(_I64, 16 * k)), _V16F, 4) for k in range(nv)]
        builder.branch(ent)
        builder.position_at_end(ent)
        init = []
        for k in range(nv):
            ph = builder.phi(_V16F)
            ph.add_incoming(loaded[k], ld)
            ph.add_incoming(zero, pre)
            init.append(ph)

        def col_off(j):
            c = builder.zext(builder.load(builder.gep(ip, [j])), _I64)
            return builder.add(xbase, builder.mul(c, ir.Constant(_I64, T)))

        def widen_body(j, accs):
            off = col_off(j)
            w = builder.shl(builder.zext(builder.load(builder.gep(wp, [j])), _I32), ir.Constant(_I32, 16))
            w = _splat(builder, builder.bitcast(w, ir.FloatType()), _V16F)
            new = list(accs)
            for q in range(T // 32):
                ev, od = _widen(builder, _load(builder, xp, builder.add(off, ir.Constant(_I64, 32 * q)), _V16I))
                new[2 * q] = _fma(builder, w, ev, accs[2 * q])
                new[2 * q + 1] = _fma(builder, w, od, accs[2 * q + 1])
            return new

        def dot_body(j, accs, pair, live=None):
            off0 = col_off(j)
            if pair:
                off1 = col_off(builder.add(j, ir.Constant(_I64, 1)))
                w2 = _load(builder, wp, j, _I32)  # val[j] low, val[j+1] high
            else:  # the odd one out, paired with zeros; nothing at all unless ``live``
                w2 = builder.select(live, builder.zext(builder.load(builder.gep(wp, [j])), _I32), ir.Constant(_I32, 0))
            wv = _splat(builder, w2, _V16I)
            new = list(accs)
            for q in range(T // 32):
                a = _load(builder, xp, builder.add(off0, ir.Constant(_I64, 32 * q)), _V32H)
                if pair:
                    b = _load(builder, xp, builder.add(off1, ir.Constant(_I64, 32 * q)), _V32H)
                else:
                    a = builder.select(live, a, _const(_V32H, 0))
                    b = _const(_V32H, 0)
                lo = builder.shuffle_vector(a, b, ir.Constant(ir.VectorType(_I32, 32), _UNPACK_LO))
                hi = builder.shuffle_vector(a, b, ir.Constant(ir.VectorType(_I32, 32), _UNPACK_HI))
                new[2 * q] = _bf16_dot(builder, accs[2 * q], lo, wv)
                new[2 * q + 1] = _bf16_dot(builder, accs[2 * q + 1], hi, wv)
            return new

        if HAS_BF16_DOT:
            bd = builder.append_basic_block("spmm16.dot")
            bw = builder.append_basic_block("spmm16.widen")
            builder.cbranch(builder.icmp_unsigned("!=", dot, _const(dot.type, 0)), bd, bw)
            builder.position_at_end(bd)
            go = builder.append_basic_block("spmm16.go")
            joined = builder.append_basic_block("spmm16.joined")
            builder.cbranch(builder.icmp_signed("<", start, end), go, joined)
            builder.position_at_end(go)
            j, accs = _counted_loop(builder, start, end, 2, init, lambda j, a: dot_body(j, a, True), "spmm16.pairs")
            # an odd count's last nonzero, branch-free: a taken-or-not branch here mispredicts on
            # about every other segment (~15 cycles), more than the eight dot products it would skip
            live = builder.icmp_signed("<", j, end)
            last = builder.select(live, j, builder.sub(end, ir.Constant(_I64, 1)))
            tailed = dot_body(last, accs, False, live)
            tail_end = builder.basic_block
            builder.branch(joined)
            builder.position_at_end(joined)
            dvals = _phis(builder, [(init, bd), (tailed, tail_end)])
            d_end = builder.basic_block
            builder.position_at_end(bw)
            _, wvals = _counted_loop(builder, start, end, 1, init, widen_body, "spmm16.widen")
            fin = _merge(builder, [(dvals, d_end), (wvals, builder.basic_block)])
        else:
            _, fin = _counted_loop(builder, start, end, 1, init, widen_body, "spmm16.widen")
        for k in range(nv):
            _store(builder, fin[k], yp, builder.add(ybase, ir.Constant(_I64, 16 * k)), 4)
        return context.get_dummy_value()

    return sig, codegen


def _sddmm16_codegen(context, builder, tys, arrays, xbase, xstride, start, end, dybase, dystride, pbase, first,
                     dot, ntiles):
    """Body of the bf16 SDDMM segment intrinsics for ``ntiles`` token tiles at once: the tiles' dy
    rows stay in registers; per nonzero one fp32 partial (16 lanes) read-modify-write for all of them.

    The reduction runs along tokens, contiguous in the tiles, so with vdpbf16ps (``dot``) x and dy
    pair up as they lie: four dot products of 32 tokens per tile, no widening. Widening: dy widened once, x per nonzero (shift and mask), eight FMAs per tile; even and
    odd tokens pair with even and odd, so the sum is the same."""
    xty, idxty, dyty, pty = tys
    xa, idxa, dya, pa = arrays
    xbase, xstride, start, end, dybase, dystride, pbase = (
        _w64(builder, v) for v in (xbase, xstride, start, end, dybase, dystride, pbase))
    xp = _data_ptr(context, builder, xty, xa)
    ip = _data_ptr(context, builder, idxty, idxa)
    dp = _data_ptr(context, builder, dyty, dya)
    pp = _data_ptr(context, builder, pty, pa)
    zero = _const(_V16F, 0.0)
    nq = T // 32
    dyb = [builder.add(dybase, builder.mul(ir.Constant(_I64, q), dystride)) for q in range(ntiles)]
    xoffs = [builder.mul(ir.Constant(_I64, q), xstride) for q in range(ntiles)]

    def finish(j, s):
        per_tile = [builder.fadd(s[2 * q], s[2 * q + 1]) for q in range(ntiles)]
        while len(per_tile) > 1:
            per_tile = [builder.fadd(per_tile[i], per_tile[i + 1]) if i + 1 < len(per_tile) else per_tile[i]
                        for i in range(0, len(per_tile), 2)]
        poff = builder.add(pbase, builder.mul(builder.sub(j, start), ir.Constant(_I64, 16)))
        # the first tile of a chunk stores, later ones accumulate: the buffer needs no zeroing
        prev = builder.select(first, zero, _load(builder, pp, poff, _V16F, 4))
        _store(builder, builder.fadd(prev, per_tile[0]), pp, poff, 4)

    def col_off(j):
        c = builder.zext(builder.load(builder.gep(ip, [j])), _I64)
        return builder.add(xbase, builder.mul(c, ir.Constant(_I64, T)))

    def widen_loop():
        d = [[_widen(builder, _load(builder, dp, builder.add(dyb[q], ir.Constant(_I64, 32 * k)), _V16I))
              for k in range(nq)] for q in range(ntiles)]

        def body(j, _):
            off = col_off(j)
            s = [None] * (2 * ntiles)
            for q in range(ntiles):
                o = builder.add(off, xoffs[q])
                for k in range(nq):
                    ev, od = _widen(builder, _load(builder, xp, builder.add(o, ir.Constant(_I64, 32 * k)), _V16I))
                    for h, v in ((0, ev), (1, od)):
                        i = 2 * q + h
                        s[i] = builder.fmul(d[q][k][h], v) if s[i] is None else _fma(builder, d[q][k][h], v, s[i])
            finish(j, s)
            return []
        _counted_loop(builder, start, end, 1, [], body, "sddmm16.widen")

    def dot_loop():
        d = [[_load(builder, dp, builder.add(dyb[q], ir.Constant(_I64, 32 * k)), _V32H) for k in range(nq)]
             for q in range(ntiles)]

        def body(j, _):
            off = col_off(j)
            s = [zero] * (2 * ntiles)  # two independent chains per tile
            for q in range(ntiles):
                o = builder.add(off, xoffs[q])
                for k in range(nq):
                    v = _load(builder, xp, builder.add(o, ir.Constant(_I64, 32 * k)), _V32H)
                    s[2 * q + (k & 1)] = _bf16_dot(builder, s[2 * q + (k & 1)], d[q][k], v)
            finish(j, s)
            return []
        _counted_loop(builder, start, end, 1, [], body, "sddmm16.dot")

    if HAS_BF16_DOT:
        bd = builder.append_basic_block("sddmm16.dot")
        bw = builder.append_basic_block("sddmm16.widen")
        builder.cbranch(builder.icmp_unsigned("!=", dot, _const(dot.type, 0)), bd, bw)
        builder.position_at_end(bd)
        dot_loop()
        d_end = builder.basic_block
        builder.position_at_end(bw)
        widen_loop()
        _merge(builder, [([], d_end), ([], builder.basic_block)])
    else:
        widen_loop()
    return context.get_dummy_value()


def _sddmm16_intrinsic(ntiles):
    @intrinsic
    def seg(typingctx, x, xbase, xstride, idx, start, end, dy, dybase, dystride, p, pbase, first, dot):
        sig = types.void(x, xbase, xstride, idx, start, end, dy, dybase, dystride, p, pbase, first, dot)

        def codegen(context, builder, signature, args):
            xa, xbase, xstride, idxa, start, end, dya, dybase, dystride, pa, pbase, first, dot = args
            xty, _, _, idxty, _, _, dyty, _, _, pty, _, _, _ = signature.args
            return _sddmm16_codegen(context, builder, (xty, idxty, dyty, pty), (xa, idxa, dya, pa), xbase, xstride,
                                    start, end, dybase, dystride, pbase, first, dot, ntiles)

        return sig, codegen
    return seg


# p[pbase + (j-start)*16 : +16] (+)= 16-lane partial of sum over ``ntiles`` token tiles of
# dot(dy[dybase + q*dystride : +T], x[xbase + q*xstride + idx[j]*T : +T]), j in [start, end)
_sddmm16_seg1 = _sddmm16_intrinsic(1)
_sddmm16_seg2 = _sddmm16_intrinsic(2)


def _spmm16_tokens(dot):
    """Token (0..31) held at accumulator position 16h + c of a 32-token group of _spmm16_seg."""
    if dot:  # vpunpck{l,h}wd: 128-bit lane l of the lo (h=0) / hi (h=1) interleave = tokens 8l+4h..+3
        return [8 * (c // 4) + 4 * h + c % 4 for h in (0, 1) for c in range(16)]
    return [2 * c + h for h in (0, 1) for c in range(16)]  # even tokens, then odd ones


@intrinsic
def _transpose_out16(typingctx, src, soff, sstride, dst, doff, dstride, bias, boff, use_bias, dot):
    """32 tokens x 16 outputs of a bf16 SpMM into row-major dst (bf16 bits, dstride per token): src
    holds, for 16 output rows (sstride apart), 32 accumulator positions (two vectors) in _spmm16_seg's
    order. Two 16x16 transposes; which token a transposed vector is only changes its store address.
    With ``use_bias`` bias[boff + r] is added to output r; then rounded to bf16."""
    sig = types.void(src, soff, sstride, dst, doff, dstride, bias, boff, use_bias, dot)

    def codegen(context, builder, signature, args):
        sa, soff, sstride, da, doff, dstride, ba, boff, use_bias, dot = args
        sty, _, _, dty, _, _, bty, _, _, _ = signature.args
        soff, sstride, doff, dstride, boff = (_w64(builder, v) for v in (soff, sstride, doff, dstride, boff))
        sp = _data_ptr(context, builder, sty, sa)
        dp = _data_ptr(context, builder, dty, da)
        bp = _data_ptr(context, builder, bty, ba)
        t = [_transpose_regs(builder, [
            _load(builder, sp, builder.add(soff, builder.add(builder.mul(ir.Constant(_I64, r), sstride),
                                                             ir.Constant(_I64, 16 * h))), _V16F, 4)
            for r in range(16)]) for h in (0, 1)]
        pre = builder.basic_block
        with builder.if_then(builder.icmp_unsigned("!=", use_bias, _const(use_bias.type, 0))):
            bvec = _load(builder, bp, boff, _V16F, 4)  # only read with a bias (a dummy has 1 element)
            with_bias = builder.basic_block
        bvec = _phis(builder, [([bvec], with_bias), ([_const(_V16F, 0.0)], pre)])[0]
        flag = builder.icmp_unsigned("!=", dot, _const(dot.type, 0))
        tw, td = _spmm16_tokens(False), _spmm16_tokens(True)
        for p in range(32):
            out = _round_bf16(builder, builder.fadd(t[p // 16][p % 16], bvec))
            tok = ir.Constant(_I64, tw[p])
            if HAS_BF16_DOT and td[p] != tw[p]:
                tok = builder.select(flag, ir.Constant(_I64, td[p]), tok)
            _store(builder, out, dp, builder.add(doff, builder.mul(tok, dstride)))
        return context.get_dummy_value()

    return sig, codegen


@intrinsic
def _tile16_block(typingctx, src, soff, sstride, dst, doff, dstride):
    """32 tokens x 32 features of row-major src (fp32, rounded to bf16 here, or bf16 bits), rows
    sstride apart -> 32 feature rows of 32 tokens in dst (dstride apart): the words of each token pair
    interleaved (vpunpck{l,h}wd), then two 16x16 transposes of the 32-bit pairs."""
    sig = types.void(src, soff, sstride, dst, doff, dstride)

    def codegen(context, builder, signature, args):
        sa, soff, sstride, da, doff, dstride = args
        sty, _, _, dty, _, _ = signature.args
        soff, sstride, doff, dstride = (_w64(builder, v) for v in (soff, sstride, doff, dstride))
        sp = _data_ptr(context, builder, sty, sa)
        dp = _data_ptr(context, builder, dty, da)
        rows = []
        for r in range(32):
            o = builder.add(soff, builder.mul(ir.Constant(_I64, r), sstride))
            if isinstance(sty.dtype, types.Float):
                lo = _round_bf16(builder, _load(builder, sp, o, _V16F, 4))
                hi = _round_bf16(builder, _load(builder, sp, builder.add(o, ir.Constant(_I64, 16)), _V16F, 4))
                rows.append(builder.shuffle_vector(lo, hi, ir.Constant(ir.VectorType(_I32, 32), list(range(32)))))
            else:
                rows.append(_load(builder, sp, o, _V32H))
        halves = []
        for mask in (_UNPACK_LO, _UNPACK_HI):
            m = ir.Constant(ir.VectorType(_I32, 32), mask)
            halves.append(_transpose_regs(builder, [
                builder.bitcast(builder.shuffle_vector(rows[2 * i], rows[2 * i + 1], m), _V16I) for i in range(16)]))
        for h in (0, 1):
            for c in range(16):  # pair c of the interleave = feature 8l + 4h + o, c = 4l + o
                f = 8 * (c // 4) + 4 * h + c % 4
                _store(builder, halves[h][c], dp, builder.add(doff, builder.mul(ir.Constant(_I64, f), dstride)))
        return context.get_dummy_value()

    return sig, codegen


@intrinsic
def _to_bf16(typingctx, v):
    """bf16 bits (int16) of a float32, rounded to nearest even; an int16 (bf16 bits already) as is."""
    if isinstance(v, types.Integer):
        def codegen(context, builder, signature, args):
            return builder.trunc(args[0], _I16) if args[0].type.width > 16 else args[0]
        return types.int16(v), codegen

    def codegen(context, builder, signature, args):
        return _round_bf16(builder, args[0])
    return types.int16(types.float32), codegen


@njit(cache=True, nogil=True)
def _spmm16_pos(k, dot):
    """Accumulator position of token k (within a tile) in _spmm16_seg's order (inverse of
    _spmm16_tokens per 32-token group)."""
    g = k - k % 32
    r = k % 32
    if dot:
        return g + 16 * ((r >> 2) & 1) + 4 * (r >> 3) + (r & 3)
    return g + 16 * (r & 1) + (r >> 1)


@njit(cache=True, nogil=True)
def spmm16_part(xt, nin, idx, val, ptr, nout, ncb, ntiles, n, y, bias, use_bias, RC, dot, ctr, w, nwork):
    """spmm_part for bf16: x tiles and values bf16 bits, fp32 accumulation, y row-major bf16 bits
    (rounded to nearest even), fp32 bias. ``dot``: the vdpbf16ps path (ignored where it does not
    exist)."""
    dot = dot and HAS_BF16_DOT
    nrc = (nout + RC - 1) // RC
    buf = np.empty(RC * T + 16, dtype=np.float32)
    acc = buf[((-buf.ctypes.data) % 64) // 4:]
    nitems = ntiles * nrc
    while True:
        item = _take(ctr, 0)
        if item >= nitems:
            break
        t = item // nrc
        r0 = (item - t * nrc) * RC
        r1 = min(r0 + RC, nout)
        xbase = t * nin * T
        for cb in range(ncb):
            prow = cb * nout
            for o in range(r0, r1):
                s = ptr[prow + o]
                e = ptr[prow + o + 1]
                if e > s or cb == 0:
                    _spmm16_seg(xt, xbase, idx, val, s, e, acc, (o - r0) * T, cb > 0, dot)
        kmax = min(T, n - t * T)
        kfast = kmax - kmax % 32
        ofast = r0 + (r1 - r0) - (r1 - r0) % 16
        for o0 in range(r0, ofast, 16):
            for k0 in range(0, kfast, 32):
                _transpose_out16(acc, (o0 - r0) * T + k0, T, y, (t * T + k0) * nout + o0, nout,
                                 bias, o0, use_bias, dot)
        for o in range(r0, r1):
            k1 = kfast if o < ofast else 0
            for k in range(k1, kmax):
                v = acc[(o - r0) * T + _spmm16_pos(k, dot)]
                if use_bias:
                    v += bias[o]
                y[(t * T + k) * nout + o] = _to_bf16(v)


@njit(parallel=True, cache=True, nogil=True)
def spmm16_par(xt, nin, idx, val, ptr, nout, ncb, ntiles, n, y, bias, use_bias, RC, dot, ctr, nwork):
    for w in prange(nwork):
        spmm16_part(xt, nin, idx, val, ptr, nout, ncb, ntiles, n, y, bias, use_bias, RC, dot, ctr, w, nwork)


@njit(cache=True, nogil=True)
def sddmm16_part(xt, nin, dyt, nout, idx, ptr, ncb, ntiles, out, src, acc, RC, maxnnz, CT, dot, ctr, w, nwork):
    """sddmm_part for bf16 tiles: fp32 partials, fp32 out and acc, token tiles in pairs on both paths
    (four at a time with the dot product, whose dy rows fit in half the registers, ran 5-20 % slower:
    the x block of 32 features x 4 tiles fills L1)."""
    dot = dot and HAS_BF16_DOT
    L = 16
    nrc = (nout + RC - 1) // RC
    ngmax = (maxnnz + L - 1) // L
    buf = np.empty((ngmax * L + 1) * L, dtype=np.float32)  # realigned to 64 B, see sddmm_part
    part = buf[((-buf.ctypes.data) % 64) // 4:]
    red = np.empty(ngmax * L + 1, dtype=np.float32)
    nchunks = (ntiles + CT - 1) // CT
    nitems = ncb * nrc
    xs = nin * T
    ds = nout * T
    for c in range(nchunks):
        c0 = c * CT
        c1 = min(c0 + CT, ntiles)
        if c > 0:
            while _peek(ctr, 2 * c - 1) < nitems:
                pass
        while True:
            item = _take(ctr, 2 * c)
            if item >= nitems:
                break
            cb = item // nrc
            r0 = (item - cb * nrc) * RC
            r1 = min(r0 + RC, nout)
            prow = cb * nout
            s0 = ptr[prow + r0]
            nnz = ptr[prow + r1] - s0
            if nnz == 0:
                _take(ctr, 2 * c + 1)
                continue
            for t in range(c0, c1 - 1, 2):
                xbase = t * xs
                for o in range(r0, r1):
                    s = ptr[prow + o]
                    e = ptr[prow + o + 1]
                    if e > s:
                        _sddmm16_seg2(xt, xbase, xs, idx, s, e, dyt, (t * nout + o) * T, ds, part,
                                      (s - s0) * L, t == c0, dot)
            if (c1 - c0) % 2 == 1:
                t = c1 - 1
                xbase = t * xs
                for o in range(r0, r1):
                    s = ptr[prow + o]
                    e = ptr[prow + o + 1]
                    if e > s:
                        _sddmm16_seg1(xt, xbase, xs, idx, s, e, dyt, (t * nout + o) * T, ds, part,
                                      (s - s0) * L, t == c0, dot)
            _reduce_lanes(part, 0, (nnz + L - 1) // L, red)
            if nchunks == 1:
                for j in range(nnz):
                    out[src[s0 + j]] = red[j]
            elif c == 0:
                for j in range(nnz):
                    acc[s0 + j] = red[j]
            elif c < nchunks - 1:
                for j in range(nnz):
                    acc[s0 + j] += red[j]
            else:
                for j in range(nnz):
                    out[src[s0 + j]] = acc[s0 + j] + red[j]
            _take(ctr, 2 * c + 1)


@njit(parallel=True, cache=True, nogil=True)
def sddmm16_par(xt, nin, dyt, nout, idx, ptr, ncb, ntiles, out, src, acc, RC, maxnnz, CT, dot, ctr, nwork):
    for w in prange(nwork):
        sddmm16_part(xt, nin, dyt, nout, idx, ptr, ncb, ntiles, out, src, acc, RC, maxnnz, CT, dot, ctr, w, nwork)


@njit(cache=True, nogil=True)
def to_tiles16_part(x, n, f, ntiles, out, ctr, w, nwork):
    """Row-major x[n, f] (flat; fp32, rounded to bf16 on the way, or bf16 bits) -> out[ntiles, f, T]
    bf16 bits, zero-padding the last tile. Item: 32 tokens of a tile, all features. Its 32 rows are
    read front to back, 32 streams the prefetcher follows; the fp32 layout's items (a tile x 16
    features) read 64 B from each of 128 rows 6-12 KB apart, which it does not (3072 features,
    2048 tokens: 3.1 ms to tile bf16 that way, against 0.9 ms for 768 features)."""
    ng = T // 32
    nitems = ntiles * ng
    ffast = f - f % 32
    while True:
        item = _take(ctr, 0)
        if item >= nitems:
            break
        t = item // ng
        k0 = (item - t * ng) * 32
        k1 = min(k0 + 32, max(n - t * T, 0))
        if k1 - k0 == 32:
            for f0 in range(0, ffast, 32):
                _tile16_block(x, (t * T + k0) * f + f0, f, out, (t * f + f0) * T + k0, T)
            i0 = ffast
        else:
            i0 = 0
        for k in range(k0, max(k1, k0)):
            r = t * T + k
            for i in range(i0, f):
                out[(t * f + i) * T + k] = _to_bf16(x[r * f + i])
        for i in range(f):
            for k in range(max(k1, k0), k0 + 32):
                out[(t * f + i) * T + k] = 0


@njit(parallel=True, cache=True, nogil=True)
def to_tiles16_par(x, n, f, ntiles, out, ctr, nwork):
    for w in prange(nwork):
        to_tiles16_part(x, n, f, ntiles, out, ctr, w, nwork)

