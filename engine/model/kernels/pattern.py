"""Static sparsity pattern: every index structure the kernels need, built once per mask."""
import numpy as np
import torch

# Default features per column block (empty masks); see _cb_spmm / _cb_sddmm.
CB = 64


class _Plan:
    """One column-blocked CSR (layout: see SparsePattern) plus the work-item height, and the one
    permutation its product needs: ``pos`` for a plan the values are scattered into (the SpMMs),
    ``src`` for a plan whose results go back to the values (the SDDMM). The other is None."""
    __slots__ = ("ncb", "ptr", "idx", "pos", "src", "rc", "cb", "max_item", "n_rows")

    def __init__(self, rows, cols, n_rows, n_cols, cb, rc, *, to_plan):
        self.cb, self.rc, self.n_rows = int(cb), int(rc), int(n_rows)
        self.ncb = max(1, (n_cols + cb - 1) // cb)
        blk = cols // cb
        order = np.lexsort((cols, rows, blk))
        key = blk[order] * n_rows + rows[order]
        counts = np.bincount(key, minlength=self.ncb * n_rows)
        self.ptr = np.zeros(self.ncb * n_rows + 1, dtype=np.int64)
        np.cumsum(counts, out=self.ptr[1:])
        # unsigned 32-bit indices: half the index traffic, zero-extended in the kernels
        self.idx = np.ascontiguousarray(cols[order].astype(np.uint32))
        self.pos = self.src = None
        if to_plan:
            # pos[k]: where the k-th nonzero of the weight in row-major order sits in this plan. A layer's
            # values (row-major) reach a plan by a scatter along pos: the reads stream and the writes go to
            # one sequential run per column block (a gather in plan order strides across rows, 3-4x slower
            # at 50 %)
            self.pos = np.empty(order.size, dtype=np.uint32)
            self.pos[order] = np.arange(order.size, dtype=np.uint32)
        else:
            self.src = np.ascontiguousarray(order.astype(np.uint32))  # the inverse: plan entry -> row-major k
        # most nonzeros of one work item (column block x rc rows): sizes the
        # SDDMM's per-thread scratch
        r0 = np.arange(0, max(n_rows, 1), self.rc)
        r1 = np.minimum(r0 + self.rc, n_rows)
        b = np.arange(self.ncb)[:, None] * n_rows
        self.max_item = int((self.ptr[b + r1] - self.ptr[b + r0]).max()) if n_rows else 0


class SparsePattern:
    """Index structures of a static mask ``[out_features, in_features]``.

    Entries of a plan are ordered by (column block, row, column);
    ``ptr[cb * n_rows + r]`` starts row r's segment inside block cb, so the
    segments of a run of rows in one block are contiguous.

    * ``fwd``: W cut into column blocks, for Y = X W^T.
    * ``bwd``: W^T cut into blocks of output features, for dX = dY W.
    * ``sdd``: W again (its own block width), for the weight gradient; the
      SDDMM writes each result straight to its row-major position.
    * ``fwd16``, ``bwd16``: ``fwd`` and ``bwd`` for the bf16 kernels, whose
      activation blocks are half as large per feature, so twice as wide (the
      same object where the widths agree). The SDDMM shares ``sdd``.
    * ``flat``: int64 offsets of the nonzeros into the flattened dense weight,
      row-major. A layer's trainable *values* are the weight at these offsets
      (``pack``/``unpack``); ``plan.pos`` scatters them into a plan's order,
      O(nnz) per product. No dense weight or weight gradient is involved.

    Plans are built on first use: a run that computes in one precision holds
    that precision's three plans only.
    """

    def __init__(self):
        raise TypeError("use SparsePattern.from_mask(mask)")

    @classmethod
    def from_mask(cls, mask, *, cb_fwd=None, cb_bwd=None, cb_sdd=None, rc_fwd=None, rc_sdd=None):
        """Widths given here (column blocks ``cb_*``, rows per work item ``rc_*``) hold for both
        precisions; the defaults follow the density (_cb_spmm, _cb_spmm16, _cb_sddmm)."""
        if not isinstance(mask, torch.Tensor):
            mask = torch.as_tensor(mask)
        if mask.dim() != 2:
            raise ValueError(f"mask must be 2-D [out, in], got shape {tuple(mask.shape)}")
        m = mask.detach().to("cpu", torch.bool).numpy()
        out_f, in_f = m.shape
        rows, cols = np.nonzero(m)  # row-major order
        rows = rows.astype(np.int64)
        cols = cols.astype(np.int64)
        self = object.__new__(cls)
        self.out_features = int(out_f)
        self.in_features = int(in_f)
        self.nnz = int(rows.size)
        self.flat = np.ascontiguousarray(rows * in_f + cols)
        self.flat_t = torch.from_numpy(self.flat)
        self._widths = (cb_fwd, cb_bwd, cb_sdd, rc_fwd, rc_sdd)
        self._plans = {}
        # the mask it was built from, not a copy (a layer's mask can be GPT-2-sized; masks are never
        # changed in place, a new mask means a new pattern)
        self.mask = torch.from_numpy(m)
        return self

    def _plan(self, kind, bf16=False):
        cb_fwd, cb_bwd, cb_sdd, rc_fwd, rc_sdd = self._widths
        d = self.density
        spmm_cb = _cb_spmm16(d) if bf16 else _cb_spmm(d)
        if kind == "fwd":
            key = (kind, cb_fwd or spmm_cb, rc_fwd or RC_SPMM)
        elif kind == "bwd":
            key = (kind, cb_bwd or spmm_cb, rc_fwd or RC_SPMM)
        else:
            key = (kind, cb_sdd or _cb_sddmm(d), rc_sdd or RC_SDDMM)
        pl = self._plans.get(key)
        if pl is None:
            rows = self.flat // max(self.in_features, 1)
            cols = self.flat - rows * self.in_features
            if kind == "bwd":
                pl = _Plan(cols, rows, self.in_features, self.out_features, key[1], key[2], to_plan=True)
            else:
                pl = _Plan(rows, cols, self.out_features, self.in_features, key[1], key[2], to_plan=kind == "fwd")
            self._plans[key] = pl
        return pl

    @property
    def fwd(self):
        return self._plan("fwd")

    @property
    def bwd(self):
        return self._plan("bwd")

    @property
    def sdd(self):
        return self._plan("sdd")

    @property
    def fwd16(self):
        return self._plan("fwd", bf16=True)

    @property
    def bwd16(self):
        return self._plan("bwd", bf16=True)

    def pack(self, weight):
        """The values of a dense [out, in] weight at the mask's nonzeros, row-major."""
        return weight.reshape(-1)[self.flat_t.to(weight.device)]

    def unpack(self, values):
        """Dense [out, in] weight with ``values`` at the mask's nonzeros and zeros elsewhere."""
        dense = values.new_zeros(self.out_features * self.in_features)
        return dense.index_copy(0, self.flat_t.to(values.device), values).view(self.out_features, self.in_features)

    @property
    def density(self):
        total = self.out_features * self.in_features
        return self.nnz / total if total else 0.0

    def __repr__(self):
        return (f"SparsePattern(out={self.out_features}, in={self.in_features}, "
                f"nnz={self.nnz}, density={self.density:.3f})")


# Rows per work item. An item reuses each activation block (one column block of a token tile) for all
# its rows, so taller items re-read less of it; 128 rows x 128 tokens of partial outputs (64 KB) still
# stay in L2. Measured on Zen 4 (2 threads, OpenMP pool, the three GPT-2-small layer shapes, N = 512
# and 2048, interleaved): against 32 rows, the SpMMs 0-6 % faster at 50 % and 3-17 % at 75-90 %
# (most for the input gradient of the 3072-wide layers, whose 1.5 MB dY tile does not fit in L2), the
# SDDMM 2-10 % faster at N = 2048 and on par at N = 512. 256 rows: no better than 128.
RC_SPMM = 128
RC_SDDMM = 128


def _cb_spmm(density):
    """Column-block width for the SpMMs. Wider blocks mean longer (row, block) segments, so the
    per-segment cost (load/store of 8 accumulators, the loop-exit mispredict) weighs less, but a
    larger activation block (CB x 512 B) to keep near the core. Measured on Zen 4 (2 threads, the
    three layer shapes of GPT-2 small, N = 512): 64 is best or tied from 75 % density down to 25 %
    (at 50 %: 5-15 % faster than 32, which an older rule of "16 nonzeros per segment" picked), 64 and
    128 tie at 10 %."""
    if density <= 0:
        return CB
    return 64 if density > 0.15 else 128


def _cb_spmm16(density):
    """Column-block width for the bf16 SpMMs: a bf16 activation block is CB x 256 B, so 128 features
    make the fp32 kernels' 32 KB (one L1). Measured on Zen 4 (1 thread, dot-product path, 768x3072 and
    3072x768, N = 2048, minimum of 7): at 75 % 128 is 10-20 % faster than 64 and 256 no better; at
    50 % 128 beats 64 by 6-11 % and 256 by 25 %; at 90 % 128 and 256 tie, both ~12 % ahead of 64."""
    return 128 if density > 0 else CB


def _cb_sddmm(density):
    """Column-block width for the SDDMM.  It takes token tiles in pairs, so its
    activation block is twice the SpMM's; 32 keeps it in L1 down to ~15 %
    density, below that short segments (dy reloads, loop exits) cost more
    (measured on Zen 4: 32 best at 50 % and 75 %, 128 at 90 %)."""
    return 32 if density > 0.15 else 128
