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
float64 specialisation exists for gradcheck).
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
        i32 = ir.IntType(32)
        i64 = ir.IntType(64)

        def w64(v):
            return builder.sext(v, i64) if v.type.width < 64 else v
        soff, sstride, doff, dstride, boff = map(w64, (soff, sstride, doff, dstride, boff))
        sp = _data_ptr(context, builder, sty, sa)
        dp = _data_ptr(context, builder, dty, da)
        bp = _data_ptr(context, builder, bty, ba)
        v = [_vload(builder, sp, builder.add(soff, builder.mul(ir.Constant(i64, r), sstride)), vty)
             for r in range(L)]
        # round b swaps bit b of the row index with bit b of the lane index
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
