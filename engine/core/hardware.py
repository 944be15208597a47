"""What the CPU computes natively, read from the machine (never guessed from a model name): the
features that decide the training precision and the bf16 sparse core's path, and that every
benchmark prints in its header.

Linux: /proc/cpuinfo's flags (or the file $MEDISWIFT_CPUINFO names). Elsewhere (or where that file says nothing): LLVM's host feature
list through llvmlite, which numba brings. Torch-free, so the studio can show it too.
"""
from __future__ import annotations

import os
import platform
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

# our name -> (/proc/cpuinfo flag, LLVM feature)
_FEATURES = {
    "AMX": ("amx_bf16", "amx-bf16"),
    "AVX512-BF16": ("avx512_bf16", "avx512bf16"),
    "AVX-512": ("avx512f", "avx512f"),
    "AVX2": ("avx2", "avx2"),
}


def feature_line(features: dict[str, bool]) -> str:
    """``AMX no, AVX512-BF16 yes, AVX-512 yes, AVX2 yes`` (also for features read back from a run's meta)"""
    return ", ".join(f"{k} {'yes' if v else 'no'}" for k, v in features.items())


@dataclass(frozen=True)
class CpuInfo:
    model: str
    features: dict[str, bool]  # AMX, AVX512-BF16, AVX-512, AVX2
    source: str                # where the features were read

    @property
    def native_bf16(self) -> bool:
        """bf16 products in hardware: AMX tiles or the AVX512-BF16 dot product."""
        return self.features.get("AMX", False) or self.features.get("AVX512-BF16", False)

    def feature_line(self) -> str:
        return feature_line(self.features)

    def as_meta(self) -> dict:
        return {"model": self.model, "features": dict(self.features), "source": self.source}


def _from_proc(text: str) -> tuple[str, set[str]] | None:
    model, flags = "", set()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip()
        if key == "model name" and not model:
            model = value.strip()
        elif key == "flags" and not flags:
            flags = set(value.split())
    return (model, flags) if flags else None


def _from_llvm() -> tuple[str, dict[str, bool]] | None:
    try:
        import llvmlite.binding as llvm

        llvm.initialize_native_target()
        feats = llvm.get_host_cpu_features()
        name = llvm.get_host_cpu_name()
    except Exception:  # no llvmlite, or an LLVM that cannot read this host
        return None
    return name, {ours: bool(feats.get(f_llvm, False)) for ours, (_, f_llvm) in _FEATURES.items()}


def parse_cpuinfo(text: str) -> CpuInfo | None:
    """The CPU as /proc/cpuinfo ``text`` describes it (None when it lists no flags)."""
    got = _from_proc(text)
    if got is None:
        return None
    model, flags = got
    return CpuInfo(model or platform.processor() or "unknown CPU",
                   {ours: f_proc in flags for ours, (f_proc, _) in _FEATURES.items()}, "/proc/cpuinfo")


@lru_cache(maxsize=1)
def cpu_info() -> CpuInfo:
    # MEDISWIFT_CPUINFO: a cpuinfo file to read instead (the tests describe other CPUs with it)
    proc = Path(os.environ.get("MEDISWIFT_CPUINFO") or "/proc/cpuinfo")
    if proc.is_file():
        try:
            info = parse_cpuinfo(proc.read_text(errors="replace"))
        except OSError:
            info = None
        if info is not None:
            return info
    got = _from_llvm()
    if got is not None:
        name, features = got
        return CpuInfo(platform.processor() or name, features, "LLVM host features")
    return CpuInfo(platform.processor() or "unknown CPU", {k: False for k in _FEATURES}, "not readable")


def cpu_header() -> str:
    """One line for a benchmark's header: model, cores, features."""
    c = cpu_info()
    return f"CPU: {c.model} ({os.cpu_count()} logical cores) — {c.feature_line()}"
