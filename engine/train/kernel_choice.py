"""Which matmul path each sparse layer takes (``sparsity.kernel``): forced, or for ``auto`` timed once
per layer shape in the run's precision and then confirmed by a whole-step trial over the first
training steps. A dense candidate that would not fit in memory is skipped, not tried."""
from __future__ import annotations

import torch

from engine.core.config import RunConfig
from engine.model.gpt import GPT


TIMED_NOTE = ("sparsity.kernel = 'auto' timed the sparse core against the dense path on this run's first steps: "
              "the two paths sum in different orders, so another run may keep other kernels and part from this "
              "one in the last bits (a resume keeps this run's choice; set sparsity.kernel to 'sparse' or "
              "'dense' for bitwise repeatable runs)")


def choose_kernels(report, cfg: RunConfig, model: GPT, tokens_per_batch: int, device: torch.device,
                   precision: str = "fp32", available: int | None = None, info: dict | None = None) -> dict[str, str]:
    """Pick the matmul path per sparse layer, for the run's precision: forced by sparsity.kernel, or
    timed once per shape (auto). A dense candidate whose memory would not fit is never tried.
    ``report``: where the timings and the choice are told (engine.train.reporter). ``info``, when
    given, gets ``timed = True`` if the choice came from timings (so another run may choose otherwise)."""
    layers = {n: m for n, m in model.sparse_layers().items() if m.is_sparse}
    want = cfg.sparsity.kernel
    if not layers:
        return {}
    if device.type != "cpu":
        choice = {n: "dense" for n in layers}  # GPU runs use cuBLAS on the masked weight
    else:
        try:
            from engine.model.kernels import ops
            ok = ops.kernel_available(precision)
        except ImportError:
            ok = False
        if not ok:
            if want == "sparse":
                report.warn(f"the sparse matmul core is unavailable here for {precision}; using the masked dense path")
            choice = {n: "dense" for n in layers}
        elif want in ("dense", "sparse"):
            choice = {n: want for n in layers}
        else:
            too_big = dense_path_too_big(layers, precision, available, _step_reserve(cfg))
            if too_big:
                report.info(too_big)
                report.meta(kernel_dense_skipped=too_big)
                choice = {n: "sparse" for n in layers}
            else:
                choice = _timed_choice(report, layers, tokens_per_batch, ops.time_kernels, precision)
                if info is not None:
                    info["timed"] = True
    set_kernels(model, choice)
    release_unused_paths(model)
    return choice


def dense_path_bytes(layers: dict, precision: str) -> int:
    """Memory the masked dense path adds over the sparse core: every layer's dense fp32 matrix (kept
    between steps), its bf16 copy under autocast, and the largest layer's dense weight gradient."""
    numel = [m.out_features * m.in_features for m in layers.values()]
    per = 4 + (2 if precision != "fp32" else 0)
    return per * sum(numel) + 4 * max(numel)


def dense_path_too_big(layers: dict, precision: str, available: int | None = None, reserve: int = 0) -> str:
    """Why the dense candidate must not run (it would not fit in free memory beside the ``reserve``
    bytes the step needs anyway: activations and logits), or ''."""
    from engine.core.machine_checks import available_memory

    need = dense_path_bytes(layers, precision) + reserve
    have = available_memory() if available is None else available
    if need <= 0.8 * have:
        return ""
    return (f"kernel choice: the masked dense path and the step would need {need / 2**30:.1f} GiB and "
            f"{have / 2**30:.1f} GiB is free; training on the sparse core without a dense trial")


def _step_reserve(cfg) -> int:
    """What a step holds whatever the path: activations and the head's logits (engine.train.estimate)."""
    from engine.train.estimate import memory_breakdown

    try:
        parts = memory_breakdown(cfg)
    except Exception:  # noqa: BLE001 - a config the estimate cannot size reserves nothing
        return 0
    return parts["activations"] + parts["logits"]


def _timed_choice(report, layers: dict, tokens_per_batch: int, time_kernels, precision: str) -> dict[str, str]:
    by_shape: dict[tuple, str] = {}
    timings = {}
    choice = {}
    for name, m in layers.items():
        key = (m.out_features, m.in_features)
        if key not in by_shape:
            t = time_kernels(m.pattern(), tokens_per_batch, precision=precision)
            by_shape[key] = "sparse" if t["sparse_ms"] < t["dense_ms"] else "dense"
            timings["x".join(map(str, key))] = {**t, "kernel": by_shape[key]}
        choice[name] = by_shape[key]
    report.meta(kernel_timings=timings, kernel_precision=precision)
    report.info(f"kernel choice per layer shape (out x in), {precision}: " + ", ".join(
        f"{k}: {v['kernel']} (dense {v['dense_ms']:.1f} ms, sparse {v['sparse_ms']:.1f} ms)" for k, v in timings.items()))
    return choice


def set_kernels(model: GPT, choice: dict[str, str]) -> None:
    for name, m in model.sparse_layers().items():
        if name in choice:
            m.set_kernel(choice[name])


def release_unused_paths(model: GPT) -> None:
    """Once the choice is final, free what only the other path needs (the trial ran both): a layer on
    the sparse core keeps no dense copy, a dense one no index plans, nor its stacked q/k/v group."""
    from engine.model.sparse_linear import SparseGroup

    for m in model.sparse_layers().values():
        m.release_unused()
    for mod in model.modules():
        for v in vars(mod).values():
            if isinstance(v, SparseGroup):
                v.release()  # rebuilt on first use if its layers are on the core


class KernelTrial:
    """Per-shape timings of isolated matmuls do not always predict a whole step (caches, threads):
    the first real steps alternate the per-shape mix with all-dense and keep the faster."""

    ROUNDS = 3

    def __init__(self, report, model: GPT, mix: dict[str, str], group=None):
        self.report, self.model, self.mix = report, model, dict(mix)
        self.group = group  # in a process group rank 0's timings decide, so every rank keeps the same kernels
        self.plan = ["dense", "mix"] * self.ROUNDS
        self.times: dict[str, list[float]] = {"dense": [], "mix": []}
        self.current: str | None = None
        self.kernels = dict(mix)  # the choice in force once the trial has ended

    @property
    def done(self) -> bool:
        return not self.plan and self.current is None

    def state(self) -> dict | None:
        """What a checkpoint keeps of a trial still under way (None once it has ended): the steps
        still to try and the times so far, so a resumed run takes the same kernels at the same
        steps as the uninterrupted one (whether it then keeps the same ones depends on its own
        timings: see docs/reliability.md, Bitwise reproducibility)."""
        if self.done:
            return None
        return {"plan": list(self.plan), "mix": dict(self.mix),
                "times": {k: list(v) for k, v in self.times.items()}}

    @classmethod
    def resumed(cls, report, model: GPT, state: dict, group=None) -> "KernelTrial":
        trial = cls(report, model, state["mix"], group)
        trial.plan = list(state["plan"])
        trial.times = {k: [float(t) for t in state["times"].get(k, [])] for k in ("dense", "mix")}
        return trial

    def before_step(self) -> None:
        self.current = self.plan.pop(0) if self.plan else None
        if self.current:
            set_kernels(self.model, self.mix if self.current == "mix" else {n: "dense" for n in self.mix})

    def after_step(self, seconds: float) -> None:
        if not self.current:
            return
        self.times[self.current].append(seconds)
        self.current = None
        if self.plan:
            return
        dense, mix = min(self.times["dense"]), min(self.times["mix"])  # min: the first steps also pay warm-up costs
        if self.group is not None:
            dense, mix = self.group.broadcast((dense, mix))
        self.kernels = self.mix if mix < dense else {n: "dense" for n in self.mix}
        set_kernels(self.model, self.kernels)
        release_unused_paths(self.model)
        self.report.meta(kernels=self.kernels, kernel_trial={"dense_step_s": dense, "mix_step_s": mix})
        self.report.info(f"kernel trial over the first steps: per-shape choice {mix * 1000:.0f} ms/step, all dense "
                         f"{dense * 1000:.0f} ms/step; keeping {'the per-shape choice' if mix < dense else 'dense'}")
