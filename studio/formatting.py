"""Human-readable numbers for labels: counts, FLOPs, bytes, durations."""
from __future__ import annotations

import math


def si(value: float | None, unit: str = "", digits: int = 3) -> str:
    """1234567 -> '1.23 M' (k, M, G, T, P, E)."""
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "–"
    v = float(value)
    for prefix in ("", "k", "M", "G", "T", "P", "E", "Z"):
        if abs(v) < 1000 or prefix == "Z":
            text = f"{v:.{digits}g}"
            return f"{text} {prefix}{unit}".rstrip()
        v /= 1000.0
    return str(value)  # pragma: no cover


def flops(value: float | None) -> str:
    return si(value, "FLOP")


def nbytes(value: float | None) -> str:
    if value is None:
        return "–"
    v = float(value)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(v) < 1024 or unit == "TiB":
            return f"{v:.3g} {unit}" if unit != "B" else f"{int(v)} B"
        v /= 1024.0
    return str(value)  # pragma: no cover


def duration(seconds: float | None) -> str:
    if seconds is None or not math.isfinite(seconds) or seconds < 0:
        return "–"
    s = int(round(seconds))
    if s < 60:
        return f"{s} s"
    m, s = divmod(s, 60)
    if m < 60:
        return f"{m} min {s:02d} s"
    h, m = divmod(m, 60)
    if h < 48:
        return f"{h} h {m:02d} min"
    d, h = divmod(h, 24)
    return f"{d} d {h} h"


def number(value: float | None, digits: int = 4) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "–"
    if isinstance(value, int) or float(value).is_integer() and abs(value) < 1e15:
        return f"{int(value):,}"
    return f"{value:.{digits}g}"
