"""When and how far the masks change: the schedules of the sparsity methods, and their FLOPs.

Plain arithmetic (no torch): the engine's mask updates follow it, and the studio's schedule preview
draws it before launch, so what the form shows is what the run does.

Steps count completed optimizer steps (1, 2, ...). The masks are updated after step ``t`` when ``t``
is an update step: ``start_step <= t <= end_step`` with ``(t - start_step) % update_every == 0``; GMP
also prunes at ``end_step`` itself, so it always reaches the final sparsity.

- **static**: never (MediSwift's recipe).
- **gmp** (Zhu & Gupta 2017): prune by magnitude to
  ``s_t = s_f + (s_i - s_f) (1 - (t - t0) / span)^3`` with t0 = start_step, span = end_step - start_step,
  s_i = sparsity.initial and s_f = sparsity.level. Before t0 the model is at s_i, after end_step at s_f.
- **set** (Mocanu et al. 2018) and **rigl** (Evci et al. 2020): drop ``round(a_t * nnz)`` of a layer's
  nonzeros and regrow as many, with ``a_t = a/2 (1 + cos(pi (t - t0) / span))`` (a = drop_fraction;
  RigL's cosine decay, which SET adopts here), so every layer keeps its count of nonzeros.

Per-layer levels follow ``sparsity.distribution`` at every sparsity (``layer_densities``).
"""
from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass

DYNAMIC = ("gmp", "set", "rigl")
DEFAULT_END_FRACTION = 0.75  # RigL: masks stop changing at 75 % of training


def layer_densities(shapes: dict[str, tuple[int, int]], level: float, distribution: str) -> dict[str, float]:
    """Density of each matrix for an overall sparsity ``level``: ``uniform`` (every matrix at the
    level) or ``erk`` (Erdős–Rényi-Kernel: density proportional to (n_in + n_out) / (n_in * n_out),
    scaled so the total number of nonzeros matches; matrices that would exceed density 1 stay dense
    and the rest is redistributed)."""
    if distribution == "uniform" or level == 0.0:
        return {name: 1.0 - level for name in shapes}
    if distribution != "erk":
        raise ValueError(f"unknown sparsity distribution {distribution!r}")
    numel = {n: s[0] * s[1] for n, s in shapes.items()}
    raw = {n: (s[0] + s[1]) / (s[0] * s[1]) for n, s in shapes.items()}
    budget = (1.0 - level) * sum(numel.values())
    dense: set[str] = set()
    while True:
        free = [n for n in shapes if n not in dense]
        remaining = budget - sum(numel[n] for n in dense)
        scale = remaining / sum(raw[n] * numel[n] for n in free)
        over = [n for n in free if scale * raw[n] > 1.0]
        if not over:
            out = {n: 1.0 for n in dense}
            out.update({n: scale * raw[n] for n in free})
            return out
        dense.update(over)


def nonzero_counts(shapes: dict[str, tuple[int, int]], level: float, distribution: str) -> dict[str, int]:
    """The exact count of nonzeros each matrix keeps at an overall sparsity ``level``."""
    dens = layer_densities(shapes, level, distribution)
    return {n: s[0] * s[1] - int(round((1.0 - dens[n]) * s[0] * s[1])) for n, s in shapes.items()}


def layer_shapes(m) -> dict[str, tuple[int, int]]:
    """(out, in) of every masked matrix of a model of config ``m`` (engine.core.config.ModelConfig), any
    family, by the names ``GPT.sparse_layers()`` gives: grouped-query attention's k and v are n_kv_head
    heads wide, SwiGLU has three matrices (gate, up, down) where GELU's MLP has two (fc, proj; biogpt's
    model.d_ff wide)."""
    if m.family == "gpt2":
        return gpt_layer_shapes(m.n_layer, m.d_model)
    d, ff, kv = m.d_model, m.inner, m.kv_heads * (m.d_model // m.n_head)
    out = {}
    for i in range(m.n_layer):
        b = f"blocks.{i}."
        if m.family == "biogpt":  # GPT-2's matrices, the MLP model.d_ff wide
            out.update({b + "attn.q": (d, d), b + "attn.k": (d, d), b + "attn.v": (d, d), b + "attn.out": (d, d),
                        b + "mlp.fc": (ff, d), b + "mlp.proj": (d, ff)})
            continue
        out.update({b + "attn.q": (d, d), b + "attn.k": (kv, d), b + "attn.v": (kv, d), b + "attn.out": (d, d),
                    b + "mlp.gate": (ff, d), b + "mlp.up": (ff, d), b + "mlp.down": (d, ff)})
    return out


def gpt_layer_shapes(n_layer: int, d_model: int) -> dict[str, tuple[int, int]]:
    """(out, in) of every masked matrix of our GPT, by the names ``GPT.sparse_layers()`` gives."""
    out = {}
    for i in range(n_layer):
        for name in ("q", "k", "v", "out"):
            out[f"blocks.{i}.attn.{name}"] = (d_model, d_model)
        out[f"blocks.{i}.mlp.fc"] = (4 * d_model, d_model)
        out[f"blocks.{i}.mlp.proj"] = (d_model, 4 * d_model)
    return out


@dataclass(frozen=True)
class Schedule:
    method: str
    level: float      # final sparsity
    initial: float    # GMP's starting sparsity
    start: int
    end: int
    every: int
    drop: float       # SET/RigL initial drop fraction
    distribution: str = "uniform"

    @classmethod
    def from_config(cls, cfg) -> "Schedule":
        sc, steps = cfg.sparsity, cfg.train.max_steps
        end = sc.end_step or max(1, int(DEFAULT_END_FRACTION * steps))
        return cls(sc.method, sc.level, sc.initial if sc.method == "gmp" else sc.level, sc.start_step, end,
                   sc.update_every, sc.drop_fraction, sc.distribution)

    @property
    def dynamic(self) -> bool:
        return self.method in DYNAMIC

    def is_update(self, step: int) -> bool:
        if not self.dynamic or step < 1 or step < self.start or step > self.end:
            return False
        return (step - self.start) % self.every == 0 or (self.method == "gmp" and step == self.end)

    def _progress(self, step: int) -> float:
        return min(1.0, max(0.0, (step - self.start) / max(1, self.end - self.start)))

    def gmp_sparsity(self, step: int) -> float:
        """GMP's target at ``step`` (the cubic schedule)."""
        return self.level + (self.initial - self.level) * (1.0 - self._progress(step)) ** 3

    def drop_fraction(self, step: int) -> float:
        """SET/RigL: the fraction of nonzeros replaced at update step ``step`` (cosine decay to 0)."""
        return self.drop / 2.0 * (1.0 + math.cos(math.pi * self._progress(step)))

    def sparsity_during(self, step: int) -> float:
        """The overall target sparsity in force while step ``step`` trains (set by the last update before it)."""
        if self.method != "gmp":
            return self.level
        t = min(step - 1, self.end)
        if t < max(1, self.start):
            return self.initial
        last = self.end if t == self.end else self.start + (t - self.start) // self.every * self.every  # last update <= t
        return self.initial if last < 1 else self.gmp_sparsity(last)

    def updates(self, max_steps: int) -> list[int]:
        return [t for t in range(1, max_steps + 1) if self.is_update(t)]

    def update_steps(self, max_steps: int) -> list[int]:
        """``updates(max_steps)`` by arithmetic: O(updates), not O(steps)."""
        if not self.dynamic:
            return []
        lo, hi = max(1, self.start), min(max_steps, self.end)
        if hi < lo:
            return []
        first = self.start + -(-(lo - self.start) // self.every) * self.every  # the first grid step >= lo
        out = list(range(first, hi + 1, self.every))
        if self.method == "gmp" and self.end <= hi and (not out or out[-1] != self.end):
            out.append(self.end)  # GMP also prunes at end_step
        return out

    def update_count(self, max_steps: int) -> int:
        """``len(updates(max_steps))`` in closed form."""
        if not self.dynamic:
            return 0
        lo, hi = max(1, self.start), min(max_steps, self.end)
        if hi < lo:
            return 0
        n = (hi - self.start) // self.every - -(-(lo - self.start) // self.every) + 1
        if self.method == "gmp" and self.end <= hi and (self.end - self.start) % self.every:
            n += 1
        return max(0, n)

    def phases(self, max_steps: int) -> list[tuple[float, int]]:
        """``(sparsity, steps)`` of each stretch of steps 1..max_steps that trains at one sparsity, in
        order: what ``sparsity_during`` gives step by step, one entry per mask update instead of per step.
        Only GMP changes the sparsity; the others hold ``level`` throughout."""
        if max_steps < 1:
            return []
        if self.method != "gmp":
            return [(self.level, max_steps)]
        out, prev, s = [], 0, self.initial
        start, span, level, initial = self.start, max(1, self.end - self.start), self.level, self.initial
        for u in self.update_steps(max_steps - 1):  # the mask change after step u holds from step u + 1
            out.append((s, u - prev))
            # gmp_sparsity(u), inlined operation for operation (a phase per update: this loop is the cost)
            s, prev = level + (initial - level) * (1.0 - min(1.0, max(0.0, (u - start) / span))) ** 3, u
        out.append((s, max_steps - prev))
        return [(s, k) for s, k in out if k > 0]


def step_flops_per_token(flops_model, nonzero: int, rigl_update: bool) -> float:
    """Training FLOPs per token of one step with ``nonzero`` weights in the masked matrices (the FLOP
    model's formula, engine/core/flops.py), plus, on a RigL update step, the dense weight gradient RigL reads:
    2 * (N_sparse - nonzero) more per token (its backward forms every entry of dW, not only the nonzeros)."""
    extra = 2.0 * (flops_model.sparse_numel - nonzero) if rigl_update else 0.0
    return flops_model.train_per_token_at(nonzero) + extra


def planned(schedule: Schedule, shapes: dict[str, tuple[int, int]], max_steps: int, flops_model=None) -> dict:
    """The plan over a run, for the preview: per step the overall sparsity, each layer group's
    sparsity (attention, MLP) and, with a FLOP model, the training FLOPs per token."""
    groups = {"attention": [n for n in shapes if ".attn." in n], "mlp": [n for n in shapes if ".mlp." in n]}
    numel = {n: s[0] * s[1] for n, s in shapes.items()}
    out = {"step": [], "sparsity": [], "groups": {g: [] for g in groups}, "flops_per_token": [], "updates": []}
    cache: dict[float, dict[str, int]] = {}
    for step in range(1, max_steps + 1):
        s = schedule.sparsity_during(step)
        if s not in cache:
            cache[s] = nonzero_counts(shapes, s, schedule.distribution)
        nnz = cache[s]
        out["step"].append(step)
        out["sparsity"].append(1.0 - sum(nnz.values()) / sum(numel.values()))
        for g, names in groups.items():
            out["groups"][g].append(1.0 - sum(nnz[n] for n in names) / max(1, sum(numel[n] for n in names)))
        if flops_model is not None:
            out["flops_per_token"].append(step_flops_per_token(
                flops_model, sum(nnz.values()), schedule.method == "rigl" and schedule.is_update(step)))
        if schedule.is_update(step):
            out["updates"].append(step)
    return out


def _exact(x: float):
    return int(x) if x.is_integer() else x  # the FLOP model's values are whole numbers: sum them exactly


def planned_flops_per_token(schedule: Schedule, shapes: dict[str, tuple[int, int]], max_steps: int, flops_model) -> float:
    """``sum(planned(schedule, shapes, max_steps, flops_model)["flops_per_token"])`` without going step by
    step: one term per stretch at one sparsity (``Schedule.phases``: one for static, SET and RigL, one per
    mask update for GMP), plus RigL's update steps counted in closed form. The per-step values are whole
    numbers, so the sum is exact and equals the step-by-step one (tests/test_sweeps.py checks it)."""
    if max_steps < 1:
        return 0.0
    f0 = _exact(step_flops_per_token(flops_model, 0, False))
    slope = _exact(step_flops_per_token(flops_model, 1, False)) - f0  # F is affine in the nonzeros (flops.py)
    kinds = [(s0, s1, k) for (s0, s1), k in Counter(shapes.values()).items()]
    uniform, nnz, weighted = schedule.distribution == "uniform", 0, 0
    for s, steps in schedule.phases(max_steps):
        if uniform or s == 0.0:  # nonzero_counts' arithmetic per distinct shape (GMP: a phase per update)
            dens = 1.0 - s
            nnz = sum(k * (s0 * s1 - int(round((1.0 - dens) * s0 * s1))) for s0, s1, k in kinds)
        else:
            nnz = sum(nonzero_counts(shapes, s, schedule.distribution).values())
        weighted += steps * nnz
    if _exact(step_flops_per_token(flops_model, nnz, False)) != f0 + slope * nnz:
        raise AssertionError("the FLOP model is not affine in the nonzeros")  # pragma: no cover - a guard
    total = max_steps * f0 + slope * weighted
    if schedule.method == "rigl":  # level throughout: a single phase, holding every update step
        total += schedule.update_count(max_steps) * (_exact(step_flops_per_token(flops_model, nnz, True))
                                                     - _exact(step_flops_per_token(flops_model, nnz, False)))
    return float(total)
