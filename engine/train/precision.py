"""The precision a run trains in (``train.precision``), decided once from what the device computes
natively, and said in one line: which, and why.

``auto``: bf16 on CUDA devices that compute it, fp16 with a gradient scaler on older CUDA devices;
on CPU bf16 where AMX or AVX512-BF16 computes it (read from the CPU, engine.core.hardware), fp32
elsewhere. An explicit ``bf16`` on a CPU without either still runs (PyTorch emulates it) after a
warning. Only the products run in reduced precision (autocast): master weights, optimizer
moments, the loss, FLOP counters, checkpoints and exports stay fp32.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from engine.core.errors import InputError
from engine.core.hardware import CpuInfo, cpu_info

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass(frozen=True)
class Precision:
    name: str           # fp32 | bf16 | fp16
    asked: str          # the config's train.precision
    reason: str         # one line: which and why
    warning: bool = False  # the reason is a warning (bf16 emulated)

    @property
    def dtype(self) -> torch.dtype:
        return DTYPES[self.name]

    def as_meta(self) -> dict:
        return {"precision": self.name, "precision_asked": self.asked, "precision_reason": self.reason}


def _cpu_why(cpu: CpuInfo) -> str:
    have = [k for k in ("AMX", "AVX512-BF16") if cpu.features.get(k)]
    return " and ".join(have) if have else "neither AMX nor AVX512-BF16"


def choose_precision(asked: str, device: torch.device, cpu: CpuInfo | None = None) -> Precision:
    if device.type == "cuda":
        return _cuda_precision(asked, device)
    cpu = cpu or cpu_info()
    if asked == "fp16":
        raise InputError("train.precision = 'fp16' needs a CUDA device; on CPU use 'bf16', 'fp32' or 'auto'",
                         key="train.precision")
    why = _cpu_why(cpu)
    if asked == "fp32":
        return Precision("fp32", asked, f"precision fp32 (train.precision = 'fp32'; the CPU has {why})")
    if asked == "bf16":
        if cpu.native_bf16:
            return Precision("bf16", asked, f"precision bf16 (train.precision = 'bf16'; the CPU has {why})")
        return Precision("bf16", asked, f"precision bf16 as asked, but this CPU ({cpu.model}) has {why}: PyTorch "
                         "emulates bf16 and training will be slow; 'auto' would train in fp32", warning=True)
    if cpu.native_bf16:
        return Precision("bf16", asked, f"precision bf16 (auto): the CPU ({cpu.model}) has {why}")
    return Precision("fp32", asked, f"precision fp32 (auto): the CPU ({cpu.model}) has {why}, so bf16 would be emulated")


def _cuda_precision(asked: str, device: torch.device) -> Precision:
    name = torch.cuda.get_device_name(device)
    bf16_ok = torch.cuda.is_bf16_supported()
    if asked == "auto":
        if bf16_ok:
            return Precision("bf16", asked, f"precision bf16 (auto): {name} computes bf16")
        return Precision("fp16", asked, f"precision fp16 with a gradient scaler (auto): {name} has no bf16")
    if asked == "bf16" and not bf16_ok:
        return Precision("bf16", asked, f"precision bf16 as asked, but {name} has no native bf16: expect it to be slow",
                         warning=True)
    extra = " with a gradient scaler" if asked == "fp16" else ""
    return Precision(asked, asked, f"precision {asked}{extra} (train.precision = '{asked}') on {name}")
