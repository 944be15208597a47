"""What this machine can run, without torch: its usable cores, memory and NVIDIA GPUs (from /dev), and the
checks of a run's processes against them. ``mediswift train`` (engine.train.group.check_group) and a
sweep, before it queues a point (engine.orchestrate.sweep), refuse the same configs with the same words."""
from __future__ import annotations

import os
import re

from engine.core import registry
from engine.core.errors import InputError


def usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def available_memory() -> int:
    """Bytes this machine has available (MemAvailable): what `train`'s and `import-hf`'s memory checks
    compare a need with (8 GiB where /proc/meminfo cannot be read)."""
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return 8 << 30


def gpu_count() -> int | None:
    """NVIDIA GPUs this machine has, from /dev; None if unknown."""
    try:
        return sum(1 for n in os.listdir("/dev") if re.fullmatch(r"nvidia\d+", n))
    except OSError:
        return None


def check_processes(cfg, gpus: int | None, resuming: bool = False) -> None:
    """Refuse a process layout this machine cannot run (exit 2, naming the key). ``gpus``: the GPUs the
    run would use (0 or None: it runs on the CPU cores)."""
    tc, spec = cfg.train, registry.stage(cfg.stage)
    world = tc.nproc * tc.nnodes
    if tc.strategy == "fsdp" and not spec.shards and world > 1:
        raise InputError("train.strategy = 'fsdp' cannot shard a soft-prompting run: it trains only the prompt "
                         "vectors on a frozen model; use train.strategy = 'ddp'", key="train.strategy")
    if tc.strategy == "fsdp" and world == 1 and not resuming:
        raise InputError("train.strategy = 'fsdp' shards the model across processes, and train.nproc x train.nnodes "
                         "is 1: there is nothing to shard it across; raise train.nproc or use 'ddp'", key="train.strategy")
    if world == 1:
        return
    if "sparsity" in spec.sections and cfg.sparsity.method != "static":
        raise InputError(f"sparsity.method = {cfg.sparsity.method!r} runs on one process for now (a mask update would "
                         "have to change every rank's masks and its DDP/FSDP buckets alike); use train.nproc = 1",
                         key="sparsity.method")
    if gpus:
        if tc.nproc > gpus:
            raise InputError(f"train.nproc is {tc.nproc} but this machine has {gpus} GPU{'s' if gpus != 1 else ''}; "
                             "one process per GPU", key="train.nproc")
    else:
        cores = usable_cores()
        if tc.nproc > cores:
            raise InputError(f"train.nproc is {tc.nproc} but this machine has {cores} CPU core{'s' if cores != 1 else ''} "
                             "available; each process needs at least one", key="train.nproc")
        if tc.threads and tc.threads * tc.nproc > cores:
            raise InputError(f"train.threads = {tc.threads} for each of {tc.nproc} processes needs "
                             f"{tc.threads * tc.nproc} cores and this machine has {cores}; lower train.threads (0 "
                             "shares the cores out)", key="train.threads")
    if tc.nnodes > 1 and not tc.rdzv_endpoint:
        raise InputError(f"train.nnodes is {tc.nnodes}: the machines need a meeting point; set train.rdzv_endpoint "
                         "= 'HOST:PORT' of one of them (the same on every machine)", key="train.rdzv_endpoint")
