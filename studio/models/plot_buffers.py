"""Growing numpy buffers for live charts, EMA smoothing and spike-keeping thinning.

Charts append a point per event; re-allocating a numpy array per point would be O(n^2) over a long
run, so buffers double their capacity and hand out views of the filled part.
"""
from __future__ import annotations

import math

import numpy as np

# column order of every metric series: the four x-axes a chart can switch between, then the value
X_AXES = ("step", "tokens", "flops", "wall_time")
COLS = {name: i for i, name in enumerate(X_AXES + ("value",))}


class GrowingArray:
    """Fixed number of float64 columns whose length grows by appending rows (capacity doubling).

    Stored column-major, so each column is one contiguous array: plotting hands pyqtgraph views,
    never copies, and its downsampling slices stay cheap at millions of points.
    """

    def __init__(self, ncols: int, capacity: int = 256):
        self._data = np.empty((ncols, max(capacity, 1)), dtype=np.float64)
        self._n = 0
        self.cuts = 0  # times rows were dropped: whoever follows the array starts over

    def __len__(self) -> int:
        return self._n

    @property
    def capacity(self) -> int:
        return self._data.shape[1]

    def _reserve(self, n: int) -> None:
        cap = self._data.shape[1]
        if n <= cap:
            return
        while cap < n:
            cap *= 2
        grown = np.empty((self._data.shape[0], cap), dtype=np.float64)
        grown[:, : self._n] = self._data[:, : self._n]
        self._data = grown

    def append(self, row) -> None:
        self._reserve(self._n + 1)
        self._data[:, self._n] = row
        self._n += 1

    def extend(self, rows: np.ndarray) -> None:
        rows = np.asarray(rows, dtype=np.float64).reshape(-1, self._data.shape[0])
        self._reserve(self._n + len(rows))
        self._data[:, self._n : self._n + len(rows)] = rows.T
        self._n += len(rows)

    def column(self, i: int) -> np.ndarray:
        """A contiguous view (no copy) of column ``i``; plot it, do not keep it across appends."""
        return self._data[i, : self._n]

    def rows(self) -> np.ndarray:
        return self._data[:, : self._n].T

    def last(self, i: int) -> float:
        return float(self._data[i, self._n - 1]) if self._n else math.nan

    def clear(self) -> None:
        self._n = 0
        self.cuts += 1

    def truncate_after(self, step: float) -> None:
        """Drop rows whose first column (step) is greater than ``step`` (a resumed run replays them)."""
        n = int(np.searchsorted(self._data[0, : self._n], step, side="right"))
        if n < self._n:
            self._n = n
            self.cuts += 1


class Series(GrowingArray):
    """One metric over time: columns step, tokens, flops, wall_time, value."""

    def __init__(self, capacity: int = 256):
        super().__init__(len(COLS), capacity)

    def x(self, axis: str) -> np.ndarray:
        return self.column(COLS[axis])

    def y(self) -> np.ndarray:
        return self.column(COLS["value"])

    @property
    def last_step(self) -> float:
        return float(self._data[0, self._n - 1]) if self._n else -math.inf


class EMA:
    """TensorBoard's debiased exponential moving average, over a whole array at once (``ema``, the
    compare view) or extended as points arrive (``follow``, the live monitor): the same numbers either way.

    A non-finite point (NaN, ±inf) is skipped, as TensorBoard does: the average carries over it unchanged
    and the output there is the point itself, so one NaN shows as a gap instead of poisoning what follows.
    """

    def __init__(self, smoothing: float = 0.6):
        self.smoothing = float(smoothing)
        self.out = GrowingArray(1)
        self._last = 0.0  # the average before debiasing
        self._count = 0  # finite points in it
        self._cuts = 0  # the followed array's GrowingArray.cuts when it was last read

    def reset(self, smoothing: float | None = None) -> None:
        if smoothing is not None:
            self.smoothing = float(smoothing)
        self.out.clear()
        self._last, self._count = 0.0, 0

    def extend(self, values: np.ndarray) -> None:
        values = np.asarray(values, dtype=np.float64)
        ok = np.isfinite(values)
        out = values.copy()
        if ok.any():
            out[ok] = self._smooth(values[ok])
        self.out.extend(out[:, None])

    def _smooth(self, x: np.ndarray) -> np.ndarray:
        w, count = self.smoothing, self._count
        self._count += x.size
        if w <= 0.0:
            self._last = float(x[-1])
            return x
        # within a chunk s_j = w^(j+1)·s_-1 + (1-w)·w^j·Σ_{i<=j} x_i·w^-i; chunks keep w^-i below 1e200 (no
        # overflow for values below ~1e100) yet long enough that a tiny w (a thinned curve) stays vectorised
        k = max(1, min(4096, int(200.0 / max(-math.log10(w), 1e-12))))
        out = np.empty_like(x)
        last = self._last
        for s in range(0, x.size, k):
            c = x[s:s + k]
            wj = w ** np.arange(c.size, dtype=np.float64)
            acc = w * wj * last + (1.0 - w) * wj * np.cumsum(c / wj)
            out[s:s + c.size] = acc / (1.0 - w ** (count + 1 + np.arange(c.size)))
            last, count = float(acc[-1]), count + c.size
        self._last = last
        return out

    def follow(self, values: np.ndarray, cuts: int = 0) -> np.ndarray:
        """The smoothed ``values`` of a growing array, averaging only its new tail. When it lost rows (a
        resumed run replays the steps after its checkpoint: ``cuts`` changed, or it got shorter), start over."""
        if cuts != self._cuts or len(values) < len(self.out):
            self.reset()
            self._cuts = cuts
        self.extend(values[len(self.out):])
        return self.values()

    def values(self) -> np.ndarray:
        return self.out.column(0)


def ema(values: np.ndarray, weight: float) -> np.ndarray:
    """``values`` smoothed by an EMA of ``weight`` (0: unchanged), as a new array."""
    e = EMA(weight)
    e.extend(values)
    return e.values()


def minmax_thin(x: np.ndarray, y: np.ndarray, max_points: int) -> tuple[np.ndarray, np.ndarray]:
    """Thin to about ``max_points`` by keeping the min and the max of each bin, in order, so spikes survive."""
    n = len(x)
    if n <= max_points or max_points < 4:
        return x, y
    nbins = max_points // 2
    edges = np.linspace(0, n, nbins + 1).astype(np.int64)
    keep = []
    for a, b in zip(edges[:-1], edges[1:]):
        if b <= a:
            continue
        seg = y[a:b]
        if np.all(np.isnan(seg)):
            keep.append(a)
            continue
        i, j = a + int(np.nanargmin(seg)), a + int(np.nanargmax(seg))
        keep.extend((i, j) if i <= j else (j, i))
    idx = np.unique(np.asarray(keep, dtype=np.int64))
    return x[idx], y[idx]


class PeakDecimator:
    """Which points of a growing series to draw: the min and the max of each bin, kept incrementally.

    pyqtgraph's own peak downsampling re-reads every point on each ``setData`` (and so does its bounds
    check), which costs ~10 ms per curve at a million points. Here the bins are a power of two long;
    finished bins are computed once, the open tail on every call, and when there are more than
    ``max_bins`` bins, neighbours merge (the bin length doubles). A short series is drawn whole.
    """

    def __init__(self, max_bins: int = 2048):
        self.max_bins = max_bins
        self.reset()

    def reset(self) -> None:
        self.bin = 1
        self.lo = np.empty(0, np.int64)  # per finished bin: index of its minimum
        self.hi = np.empty(0, np.int64)  # and of its maximum
        self._n = 0

    def indices(self, y: np.ndarray) -> np.ndarray | None:
        """Indices into ``y`` to draw, in order; None when the whole series should be drawn."""
        n = len(y)
        if n <= 2 * self.max_bins:
            if len(self.lo):
                self.reset()
            return None
        if n < self._n:  # truncated (a resume): start over
            self.reset()
        self._n = n
        while n // self.bin > self.max_bins:
            k = len(self.lo) // 2  # an odd last bin is dropped and recomputed at the new length
            a, b = self.lo[0:2 * k:2], self.lo[1:2 * k:2]
            self.lo = np.where(y[b] < y[a], b, a)  # NaN compares False: keeps the other one
            a, b = self.hi[0:2 * k:2], self.hi[1:2 * k:2]
            self.hi = np.where(y[b] > y[a], b, a)
            self.bin *= 2
        done, complete = len(self.lo), n // self.bin
        if complete > done:
            block = y[done * self.bin:complete * self.bin].reshape(-1, self.bin)
            nan = np.isnan(block)
            offsets = np.arange(done, complete, dtype=np.int64) * self.bin
            self.lo = np.concatenate([self.lo, np.argmin(np.where(nan, np.inf, block), axis=1) + offsets])
            self.hi = np.concatenate([self.hi, np.argmax(np.where(nan, -np.inf, block), axis=1) + offsets])
        first, second = np.minimum(self.lo, self.hi), np.maximum(self.lo, self.hi)
        idx = np.empty(2 * len(first), np.int64)
        idx[0::2], idx[1::2] = first, second
        start = complete * self.bin
        if start < n:  # the open bin: its extremes, and its last point so the curve reaches "now"
            tail = y[start:]
            t = np.isnan(tail)
            ends = sorted({start + int(np.argmin(np.where(t, np.inf, tail))),
                           start + int(np.argmax(np.where(t, -np.inf, tail))), n - 1})
            idx = np.concatenate([idx, np.asarray(ends, np.int64)])
        return idx


def peak_indices(y: np.ndarray, i0: int, i1: int, max_bins: int) -> np.ndarray:
    """Min/max indices of ``y[i0:i1]`` in at most ``max_bins`` equal bins (a zoomed-in part, at once)."""
    n = i1 - i0
    if n <= 2 * max_bins:
        return np.arange(i0, i1, dtype=np.int64)
    b = -(-n // max_bins)
    m = n // b
    block = y[i0:i0 + m * b].reshape(m, b)
    nan = np.isnan(block)
    off = i0 + np.arange(m, dtype=np.int64) * b
    lo = np.argmin(np.where(nan, np.inf, block), axis=1) + off
    hi = np.argmax(np.where(nan, -np.inf, block), axis=1) + off
    idx = np.empty(2 * m, np.int64)
    idx[0::2], idx[1::2] = np.minimum(lo, hi), np.maximum(lo, hi)
    return np.concatenate([idx, np.arange(i0 + m * b, i1, dtype=np.int64)])
