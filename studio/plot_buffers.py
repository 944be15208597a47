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

    def truncate_after(self, step: float) -> None:
        """Drop rows whose first column (step) is greater than ``step`` (a resumed run replays them)."""
        if self._n:
            self._n = int(np.searchsorted(self._data[0, : self._n], step, side="right"))


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
    """TensorBoard-style debiased exponential moving average, extended incrementally as points arrive."""

    def __init__(self, smoothing: float = 0.6):
        self.smoothing = float(smoothing)
        self.out = GrowingArray(1)
        self._last = 0.0
        self._count = 0

    def reset(self, smoothing: float | None = None) -> None:
        if smoothing is not None:
            self.smoothing = float(smoothing)
        self.out.clear()
        self._last, self._count = 0.0, 0

    def extend(self, values: np.ndarray) -> None:
        values = np.asarray(values, dtype=np.float64)
        if values.size == 0:
            return
        w = self.smoothing
        if w <= 0.0:
            self.out.extend(values[:, None])
            self._count += values.size
            return
        # chunks short enough that w**-k stays far from overflow keep the vectorised form exact
        k = max(1, min(4096, int(12.0 / max(-math.log10(w), 1e-12))))
        for s in range(0, values.size, k):
            x = np.nan_to_num(values[s : s + k], nan=self._last)  # a missing value keeps the average
            j = np.arange(x.size, dtype=np.float64)
            wj = w**j
            last = w * wj * self._last + (1.0 - w) * wj * np.cumsum(x / wj)
            counts = self._count + 1 + j
            self.out.extend((last / (1.0 - w**counts))[:, None])
            self._last, self._count = float(last[-1]), int(counts[-1])

    def values(self) -> np.ndarray:
        return self.out.column(0)


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
