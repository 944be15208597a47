"""Static sparsity pattern: every index structure the kernels need, built once per mask."""
import numpy as np
import torch

# Features per column block.  One block of one token tile is CB * 128 * 4 B =
# 32 KiB for fp32, i.e. it stays in L1 while a group of rows streams over it.
CB = 64


def _blocked_csr(rows, cols, n_rows, n_cols, n_in_flat):
    """CSR of (rows, cols) cut into CB-column blocks.

    Entries are ordered by (column block, row, column); ``ptr[cb * n_rows + r]``
    starts the segment of row r inside block cb, so the segments of a run of
    rows in one block are contiguous.  ``flat`` is each entry's offset in the
    row-major dense weight (of shape [.., n_in_flat]) used to gather values.
    """
    ncb = max(1, (n_cols + CB - 1) // CB)
    cb = cols // CB
    order = np.lexsort((cols, rows, cb))
    key = cb[order] * n_rows + rows[order]
    counts = np.bincount(key, minlength=ncb * n_rows)
    ptr = np.zeros(ncb * n_rows + 1, dtype=np.int64)
    np.cumsum(counts, out=ptr[1:])
    idx = cols[order].astype(np.uint32)
    return ncb, ptr, idx, order


class SparsePattern:
    """Index structures of a static mask ``[out_features, in_features]``.

    * ``fwd_*``: W as column-blocked CSR, for Y = X W^T and for the weight
      gradient (SDDMM results come out in this entry order).
    * ``bwd_*``: W^T as column-blocked CSR (blocks over output features), for
      dX = dY W.
    * ``*_flat``: int64 offsets into the flattened dense weight, used to gather
      the values (forward) and scatter the gradient (backward) in O(nnz).
    """

    def __init__(self):
        raise TypeError("use SparsePattern.from_mask(mask)")

    @classmethod
    def from_mask(cls, mask):
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
        flat = rows * in_f + cols

        self.fwd_ncb, self.fwd_ptr, self.fwd_idx, order = _blocked_csr(rows, cols, out_f, in_f, in_f)
        self.fwd_flat = torch.from_numpy(flat[order].copy())
        self.bwd_ncb, self.bwd_ptr, self.bwd_idx, order_t = _blocked_csr(cols, rows, in_f, out_f, in_f)
        self.bwd_flat = torch.from_numpy(flat[order_t].copy())
        self.mask = torch.from_numpy(m.copy())
        return self

    @property
    def density(self):
        total = self.out_features * self.in_features
        return self.nnz / total if total else 0.0

    def __repr__(self):
        return (f"SparsePattern(out={self.out_features}, in={self.in_features}, "
                f"nnz={self.nnz}, density={self.density:.3f})")
