"""Human-readable numbers for labels: counts, FLOPs, bytes, durations."""
from __future__ import annotations

import math

from engine.core.hardware import feature_line


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


def precision_badge(meta: dict | None) -> tuple[str, str]:
    """(short text, tooltip) for a run header: the precision a run trains in and the CPU features it
    was chosen from (engine.train.precision records both in the run's meta); ("", "") before then."""
    meta = meta or {}
    name = meta.get("precision")
    if not name:
        return "", ""
    cpu = meta.get("cpu") or {}
    feats = cpu.get("features") or {}
    native = [k for k in ("AMX", "AVX512-BF16") if feats.get(k)]
    text = name + (f" · {'+'.join(native)}" if native else (" · no bf16 units" if feats else ""))
    tip = "\n".join(x for x in (
        meta.get("precision_reason") or "",
        f"CPU: {cpu.get('model')}" if cpu.get("model") else "",
        feature_line(feats),
    ) if x)
    return text, tip


def world_badge(meta: dict | None, tokens_per_s: float | None = None) -> tuple[str, str]:
    """(short text, tooltip) for the header of a run on several processes: world size, strategy and
    each rank's throughput (the run's tokens/s are the whole group's); ("", "") for one process."""
    world = (meta or {}).get("world") or {}
    size = int(world.get("size") or 1)
    if size <= 1:
        return "", ""
    text = f"{size} processes · {world.get('strategy', '?')}"
    if tokens_per_s:
        text += f" · {si(tokens_per_s / size)} tok/s per rank"
    nodes = int(world.get("nnodes") or 1)
    tip = (f"{size} processes ({world.get('nproc')} per machine on {nodes} machine{'s' if nodes > 1 else ''}), "
           f"{world.get('strategy')} over {world.get('backend')}; rank 0 writes the run's rows and events")
    return text, tip


def elide(text: str, limit: int) -> str:
    """``text`` cut to ``limit`` characters, the last one an ellipsis ("a-long-run-na…"); shorter text as is."""
    return text if len(text) <= limit else text[: max(limit - 1, 0)].rstrip() + "…"
