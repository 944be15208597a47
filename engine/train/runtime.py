"""Where a stage runs: threads, device, precision, seeds and the process memory setting, set in one place for
every stage; and the random-number state a checkpoint carries so a resumed run repeats the
uninterrupted one."""
from __future__ import annotations

import random
from contextlib import nullcontext
from dataclasses import dataclass, field

import numpy as np
import torch

from engine.core.config import TrainConfig
from engine.core.errors import InputError
from engine.core.machine_checks import usable_cores
from engine.train.distributed import Group, from_environment
from engine.train.memory import keep_freed_memory
from engine.train.precision import Precision, choose_precision


def resolve_device(name: str) -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        raise InputError("train.device is 'cuda' but no CUDA device is available", key="train.device")
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(name)


@dataclass(frozen=True)
class Runtime:
    device: torch.device
    precision: Precision
    group: Group = field(default_factory=Group)

    def autocast(self):
        """The products in the run's precision (autocast); fp32 runs plain."""
        if self.precision.name == "fp32":
            return nullcontext()
        return torch.autocast(self.device.type, dtype=self.precision.dtype)

    def grad_scaler(self):
        """fp16 alone needs loss scaling (bf16 has fp32's exponent range)."""
        return torch.amp.GradScaler(self.device.type) if self.precision.name == "fp16" else None


def start_runtime(tc: TrainConfig, precision: Precision | None = None) -> Runtime:
    """Threads, device and seeds from train.*, and malloc keeping freed buffers for the next step
    (engine.train.memory): the first thing every stage does. ``precision``: as the run's plan decided
    it (engine.train.plan), else chosen here for the device."""
    keep_freed_memory()
    device = resolve_device(tc.device)
    group = from_environment(tc.strategy, device.type == "cuda")
    if tc.threads:
        torch.set_num_threads(tc.threads)
    elif group.local_world > 1 and device.type == "cpu":
        # the machine's cores shared among its processes: oversubscribed threads would fight for them
        torch.set_num_threads(max(1, usable_cores() // group.local_world))
    if device.type == "cuda" and group.distributed:
        device = torch.device("cuda", group.local_rank)
    precision = precision or choose_precision(tc.precision, device)
    torch.manual_seed(tc.seed)
    random.seed(tc.seed)
    np.random.seed(tc.seed % 2**32)
    return Runtime(device, precision, group)


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    # a checkpoint keeps numpy's key array as a tensor (no pickled numpy objects)
    np.random.set_state(tuple(v.numpy() if isinstance(v, torch.Tensor) else v for v in state["numpy"]))
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def bitwise_meta(device: torch.device, kernel_note: str = "", world: int = 1) -> dict:
    """What the run promises about repeating itself bitwise, for its meta (``bitwise``): two runs of
    the same config and seed on this machine (``same_seed``), and a resume against the uninterrupted
    run (``resume``), each with the reasons it cannot be (docs/reliability.md, Bitwise reproducibility)."""
    same, resume, why = True, True, []
    if device.type == "cuda":
        same = resume = False
        why.append("CUDA: some kernels (atomic adds in backward ops, cuBLAS split reductions) do not fix their "
                   "summation order, and deterministic algorithms are not forced")
    if kernel_note:
        same = False
        why.append(kernel_note)
    if world > 1:
        why.append(f"{world} processes: bitwise only when resumed on the same number of processes (the gradient "
                   "sum's order follows the world size)")
    return {"same_seed": same, "resume": resume, "why": why}
