"""Dynamic sparsity in a pre-training run: the component ``PretrainStage`` composes to change its
masks on the schedule of ``sparsity.method`` (engine.core.sparsity_schedule).

- initial masks: GMP starts at ``sparsity.initial`` (all-ones masks when 0, so the layers train as
  packed values from the first step and the optimizer's parameters never change identity); SET and
  RigL start at ``sparsity.level``;
- RigL update steps: the masked layers take the masked-dense path for that step and keep the dense
  weight gradient it forms (SparseLinear.capture_dense_grad); other steps stay sparse;
- after an update step: new masks per layer (exact counts), values and AdamW moments re-packed
  (engine.model.mask_updates), the re-packing timed, ``mask_churn`` and per-layer sparsity logged.

SET's random growth draws from a generator seeded by (seed, step, layer), so a resumed run grows
exactly what the uninterrupted one grew.
"""
from __future__ import annotations

import time

import torch

from engine.core.sparsity_schedule import Schedule, nonzero_counts
from engine.model.mask_updates import drop_and_grow, install_mask, magnitude_prune
from engine.model.sparsity import apply_sparsity, measure_sparsity
from engine.train.seeds import derived_seed


class MaskSchedule:
    def __init__(self, report, model, cfg):
        self.report, self.model, self.cfg = report, model, cfg  # report: info lines (engine.train.reporter)
        self.schedule = Schedule.from_config(cfg)
        self.opt: torch.optim.Optimizer | None = None  # set once the optimizer exists (moments are re-packed)
        self.pending: dict[str, float] = {}
        self.sparsity: dict | None = None  # measured after the last update
        self._kernels: dict[str, str] | None = None
        self.updates = 0

    @property
    def dynamic(self) -> bool:
        return self.schedule.dynamic

    def init_masks(self, seed: int, from_weights: bool = False) -> None:
        """The masks a run starts with: random (a new model), or by magnitude from trained weights (an
        imported model: the SPDF recipe applied to it, one-shot to the level, or GMP's initial level)."""
        sc = self.cfg.sparsity
        if from_weights:
            level = sc.initial if sc.method == "gmp" else sc.level
            layers = self.model.sparse_layers()
            if level == 0.0 and sc.method == "static":
                return  # dense continued pre-training
            shapes = {n: (m.out_features, m.in_features) for n, m in layers.items()}
            counts = nonzero_counts(shapes, level, sc.distribution)
            for n, m in layers.items():
                m.set_mask(magnitude_prune(m.weight, None, counts[n]))
            return
        if sc.method == "gmp" and sc.initial == 0.0:
            for m in self.model.sparse_layers().values():  # dense, but already as packed values
                m.set_mask(torch.ones(m.out_features, m.in_features, dtype=torch.bool))
            return
        apply_sparsity(self.model, sc.initial if sc.method == "gmp" else sc.level, sc.distribution, seed)

    def rigl_step(self, step: int) -> bool:
        return self.schedule.method == "rigl" and self.schedule.is_update(step)

    def extra_flops_per_token(self, step: int) -> float:
        """RigL's dense weight gradient on an update step: 2 x (weights - nonzeros) more per token."""
        if not self.rigl_step(step):
            return 0.0
        layers = self.model.sparse_layers().values()
        return 2.0 * sum(m.out_features * m.in_features - int(m.mask.sum()) for m in layers if m.mask is not None)

    def before_step(self, step: int) -> None:
        if not self.rigl_step(step):
            return
        layers = self.model.sparse_layers()
        self._kernels = {n: m.kernel for n, m in layers.items()}
        for m in layers.values():
            m.set_kernel("dense")
            m.capture_dense_grad, m.dense_grad = True, None

    def after_step(self, step: int) -> bool:
        """Update the masks if ``step`` is an update step; True when they changed."""
        if not self.schedule.is_update(step):
            return False
        t0 = time.perf_counter()
        layers = self.model.sparse_layers()
        sc = self.schedule
        shapes = {n: (m.out_features, m.in_features) for n, m in layers.items()}
        stats = []
        if sc.method == "gmp":
            target = nonzero_counts(shapes, sc.gmp_sparsity(step), sc.distribution)
            for n, m in layers.items():
                if target[n] < int(m.mask.sum()):
                    stats.append(install_mask(m, magnitude_prune(m.weight, m.mask, target[n]), self.opt))
                else:
                    stats.append({"before": int(m.mask.sum()), "after": int(m.mask.sum()), "left": 0, "entered": 0})
        else:
            frac = sc.drop_fraction(step)
            for i, (n, m) in enumerate(layers.items()):
                k = int(round(frac * int(m.mask.sum())))
                if sc.method == "rigl":
                    score = m.dense_grad.abs() if m.dense_grad is not None else torch.zeros(shapes[n])
                else:
                    g = torch.Generator().manual_seed(derived_seed(self.cfg.train.seed, step, i) & (2**63 - 1))
                    score = torch.rand(shapes[n], generator=g)
                stats.append(install_mask(m, drop_and_grow(m.weight, m.mask, k, score), self.opt))
        if self._kernels is not None:  # RigL's dense step is over: back to the chosen kernels
            for n, m in layers.items():
                m.set_kernel(self._kernels[n])
                m.capture_dense_grad, m.dense_grad = False, None
            self._kernels = None
        for m in layers.values():
            if m.kernel == "sparse":
                m.pattern()  # the sparse core's plans for the new mask: part of the re-packing cost
        seconds = time.perf_counter() - t0
        before = sum(x["before"] for x in stats)
        churn = sum(x["left"] for x in stats) / max(1, before)
        sp = self.sparsity = measure_sparsity(self.model)  # the stage reports it too
        self.updates += 1
        self.pending = {"mask_churn": churn, "mask_update_s": seconds, "sparsity": sp["total"],
                        **{f"sparsity/{k}": v for k, v in sp["layers"].items()}}
        self.report.info(f"mask update {self.updates} ({sc.method}) after step {step}: sparsity {sp['total']:.4f}, "
                         f"{churn:.1%} of the connections replaced, re-packed in {seconds * 1000:.1f} ms")
        return True

    def take_metrics(self) -> dict[str, float]:
        out, self.pending = self.pending, {}
        return out
