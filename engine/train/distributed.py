"""Data-parallel training inside a torchrun process group: who this process is (rank, world), the
few collectives the loop needs, the trained modules wrapped for DDP or FSDP2, and sharded state
consolidated for checkpoints.

A run without torchrun is the same code with ``Group()`` (world 1): every collective is the
identity, so the single-process engine is unchanged.

Why it is exact across world sizes: every rank draws the same seeded batch order and keeps its
own micro-batch of each ``world`` drawn (engine.data.tokens.SeededOrder.shard), the gradients are
averaged over ranks, and the loss is divided by the micro-batches per rank, so one optimizer step
sees the same examples and the same mean gradient as one process accumulating ``world x
grad_accum`` micro-batches.
"""
from __future__ import annotations

import hashlib
import os
from contextlib import nullcontext
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Callable

import torch
import torch.distributed as dist
import torch.nn as nn

from engine.train.seeds import derived_seed

COLLECTIVE_TIMEOUT = timedelta(minutes=10)  # a checkpoint gather of a large model on a slow link fits


@dataclass
class Group:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    local_world: int = 1
    strategy: str = "ddp"
    backend: str = ""
    device: str = "cpu"  # where collective tensors live (NCCL: the rank's GPU)
    grad_bytes: dict = field(default_factory=dict)  # gradient bytes exchanged, measured by the DDP hook

    @property
    def distributed(self) -> bool:
        return self.world > 1

    @property
    def is_writer(self) -> bool:
        return self.rank == 0

    def as_meta(self) -> dict:
        return {"size": self.world, "nproc": self.local_world, "nnodes": self.world // max(1, self.local_world),
                "strategy": self.strategy if self.distributed else "single", "backend": self.backend or None}

    # -- collectives (identity on one process) ---------------------------------------------------
    def sum(self, values: list[float]) -> list[float]:
        if not self.distributed:
            return list(values)
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return t.tolist()

    def any(self, *flags: bool) -> tuple[bool, ...]:
        """Each flag true on any rank: stop and pause are decided for the whole group at once, so every
        rank leaves the loop at the same step."""
        if not self.distributed:
            return flags
        t = torch.tensor([int(f) for f in flags], dtype=torch.int32, device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return tuple(bool(v) for v in t.tolist())

    def broadcast(self, obj):
        """Rank 0's value on every rank (the run's id, the kernel choice)."""
        if not self.distributed:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0, device=torch.device(self.device))
        return box[0]

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    def writer_first(self, fn: Callable):
        """Rank 0 runs ``fn`` (learning a vocabulary, building a token cache), then the others, which
        find its files instead of racing it for them."""
        if not self.distributed:
            return fn()
        if self.is_writer:
            out = fn()
            self.barrier()
            return out
        self.barrier()
        return fn()

    def check_same(self, what: str, digest: str) -> None:
        """Fail loudly when ranks disagree on something that must be identical (the masks)."""
        if not self.distributed:
            return
        mine = [None] * self.world
        dist.all_gather_object(mine, digest)
        if len(set(mine)) != 1:
            raise RuntimeError(f"the {what} differ between ranks ({', '.join(d[:8] for d in mine)}); every rank must "
                               "build the same model from the same seed")

    def step_seed(self, seed: int, step: int) -> None:
        """Per-rank, per-step random state (dropout): ranks must not repeat each other's dropout masks,
        and a step's state must not depend on how the run got there (resume on another world size)."""
        if self.distributed:
            torch.manual_seed(derived_seed(seed, self.rank, step))

    def close(self) -> None:
        if self.distributed and dist.is_initialized():
            dist.destroy_process_group()


def from_environment(strategy: str, want_cuda: bool) -> Group:
    """The group torchrun started this process in (RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE), or
    a group of one."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1 or "RANK" not in os.environ:
        return Group(strategy=strategy)
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    cuda = want_cuda and torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(local_rank)
    backend = "nccl" if cuda else "gloo"
    if not dist.is_initialized():
        dist.init_process_group(backend, timeout=COLLECTIVE_TIMEOUT)
    return Group(rank=dist.get_rank(), world=dist.get_world_size(), local_rank=local_rank,
                 local_world=int(os.environ.get("LOCAL_WORLD_SIZE", "1")), strategy=strategy, backend=backend,
                 device=f"cuda:{local_rank}" if cuda else "cpu")


# -- the trained modules, wrapped ------------------------------------------------------------------


class StepModule(nn.Module):
    """The modules a stage trains, as one module whose forward runs a closure. DDP and FSDP2 act on
    module calls, while a stage's forward may be any code over its modules (a task feed through a
    scorer, a soft prompt in front of a frozen model); the closure keeps that code as it is."""

    def __init__(self, modules: dict[str, nn.Module]):
        super().__init__()
        self.parts = nn.ModuleDict(modules)

    def forward(self, fn: Callable):
        return fn()


def mask_digest(modules: dict[str, nn.Module]) -> str:
    h = hashlib.sha256()
    for name, mod in modules.items():
        for bname, b in mod.named_buffers():
            if bname.endswith("mask") and b is not None:
                h.update(f"{name}.{bname}".encode())
                h.update(b.detach().cpu().numpy().tobytes())
    return h.hexdigest()


class Parallel:
    """How the loop trains a stage's modules on a group: ``micro`` wraps the stage's micro-batch so its
    forward goes through DDP or FSDP2 (gradient sync on the last micro-batch of a step only); ``run``
    calls other code that must see unsharded weights (FSDP evaluation)."""

    def __init__(self, group: Group, modules: dict[str, nn.Module], device: torch.device):
        self.group = group
        self.modules = modules
        self.kind = group.strategy if group.distributed else "single"
        self.wrapped: nn.Module | None = None
        if not group.distributed:
            return
        group.check_same("sparsity masks", mask_digest(modules))
        step = StepModule(modules)
        if self.kind == "fsdp":
            from torch.distributed.fsdp import fully_shard

            for mod in modules.values():
                for block in getattr(mod, "blocks", []):
                    fully_shard(block)  # one unit per transformer block: its packed values and moments shard
            fully_shard(step)  # the rest (embeddings, norms, a head) in the root unit
            self.wrapped = step
        else:
            from torch.nn.parallel import DistributedDataParallel as DDP

            # the masks and offsets are identical by construction (checked above) and never change
            # during a step: no buffer broadcast before every forward
            self.wrapped = DDP(step, device_ids=[device.index] if device.type == "cuda" else None,
                               forward_sync_buffers=False)
            self._count_gradient_bytes()

    def micro(self, micro_batch: Callable, n_micro: int) -> Callable:
        """The stage's micro-batch with its forward through the wrapper; gradients are exchanged after
        the last of the step's ``n_micro`` backward passes only."""
        if self.wrapped is None:
            return micro_batch
        calls = {"i": 0}

        def wrapped_micro():
            last = calls["i"] % n_micro == n_micro - 1
            calls["i"] += 1
            box = {}

            def forward():
                box["mb"] = micro_batch()
                return box["mb"].loss

            if self.kind == "fsdp":
                self.wrapped.set_requires_gradient_sync(last)
                loss = self.wrapped(forward)
            else:
                with nullcontext() if last else self.wrapped.no_sync():
                    loss = self.wrapped(forward)
            mb = box["mb"]
            mb.loss = loss
            return mb

        return wrapped_micro

    def run(self, fn: Callable):
        """``fn`` with the weights gathered (FSDP's root unit), e.g. an evaluation."""
        if self.kind == "fsdp":
            return self.wrapped(fn)
        return fn()

    # -- gradient bytes (DDP) ----------------------------------------------------------------------
    def _count_gradient_bytes(self) -> None:
        """A DDP communication hook that counts the bytes it all-reduces, per step and for the masked
        layers apart (whose gradients are those of their packed nonzeros), then all-reduces as DDP's
        default hook does."""
        from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

        from engine.model.sparse_linear import SparseLinear

        masked = {}
        for mod in self.modules.values():
            for m in mod.modules():
                if isinstance(m, SparseLinear):
                    p = m._parameters.get("values") if m.is_sparse else m._parameters.get("weight")
                    if p is not None and p.requires_grad:
                        masked[id(p)] = m.out_features * m.in_features
        counts = self.group.grad_bytes
        counts.update(bytes=0, masked_bytes=0, masked_dense_bytes=0)

        def hook(_state, bucket):
            buf = bucket.buffer()
            counts["bytes"] += buf.numel() * buf.element_size()
            for p in bucket.parameters():
                if id(p) in masked:
                    counts["masked_bytes"] += p.numel() * buf.element_size()
                    counts["masked_dense_bytes"] += masked[id(p)] * buf.element_size()
            return default_hooks.allreduce_hook(None, bucket)

        self.wrapped.register_comm_hook(None, hook)

    def take_grad_bytes(self) -> dict | None:
        """The gradient bytes exchanged since the last call (one step), or None (not DDP)."""
        c = self.group.grad_bytes
        if self.kind != "ddp" or not c.get("bytes"):
            return None
        out = dict(c)
        c.update(bytes=0, masked_bytes=0, masked_dense_bytes=0)
        return out


# -- sharded state ---------------------------------------------------------------------------------


def consolidate(obj):
    """``obj`` with every DTensor (an FSDP shard) replaced by the full tensor on the CPU: the
    all-gather DCP's full_state_dict option makes, so a checkpoint is one ordinary, world-size-free
    file. Every rank must call it in the same order (it is a collective per tensor)."""
    from torch.distributed.tensor import DTensor

    from engine.model.checkpoint import MaskedWeight

    if isinstance(obj, DTensor):
        return obj.full_tensor().cpu()
    if isinstance(obj, MaskedWeight):
        return MaskedWeight(consolidate(obj.values), obj.mask)
    if isinstance(obj, dict):
        return {k: consolidate(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(consolidate(v) for v in obj)
    return obj


def shard_optimizer_state(opt: torch.optim.Optimizer, state: dict) -> dict:
    """A full (consolidated) optimizer state dict cut to this rank's shards of the FSDP parameters,
    ready for ``opt.load_state_dict``: the way back from ``consolidate`` on any world size."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    params = [p for g in opt.param_groups for p in g["params"]]
    out = {}
    for key, st in state["state"].items():
        p = params[int(key)]
        if isinstance(p, DTensor):
            # every rank holds the full tensor (read from the checkpoint): each keeps its own shard, no traffic
            st = {k: distribute_tensor(v.to(p.device), p.device_mesh, p.placements, src_data_rank=None)
                  if torch.is_tensor(v) and tuple(v.shape) == tuple(p.shape) else v for k, v in st.items()}
        out[key] = st
    return {**state, "state": out}


def total_grad_norm(params: list[torch.Tensor], clip: float) -> float:
    """The global gradient norm before clipping (clipping in place when ``clip`` > 0), over plain or
    FSDP-sharded gradients."""
    if clip > 0:
        norm = torch.nn.utils.clip_grad_norm_(params, clip)
    else:
        norm = torch.nn.utils.get_total_norm([p.grad for p in params])
    if hasattr(norm, "full_tensor"):
        norm = norm.full_tensor()
    return float(norm)
