"""``model.family`` as the studio shows it: a run's family and shape on one line, and the model.* keys a
family reads (the form hides the others). No widgets.

Nothing here lists families: the choices come from engine.core.config, and whether a family reads a key
is asked of the engine, so a family (or a switch of one family, a boolean or choice key) added there
shows right without an edit here. Two questions decide it:

* does the engine's validation take a value other than the default for that family? gpt2 refuses any
  n_kv_head, d_ff, norm_eps or untied head but its own; every family but the one it belongs to refuses a
  family's own switch (biogpt's scale_embedding);
* does the family build the part the key tunes? rope_theta turns rotary positions, activation picks the
  GELU MLP's variant, and model.bias counts only where flipping it changes what engine.model.family builds.
"""
from __future__ import annotations

import dataclasses
import functools

from engine.core.config import FAMILIES, ModelConfig, field_docs
from engine.core.errors import InputError
from engine.core.registry import STAGES
from engine.model.family import variations  # plain dataclasses: no torch (import-linter holds it)

FAMILY_KEY = "model.family"
DEFAULT_FAMILY = ModelConfig().family  # what a config stored before families were added describes
BUILDS_DIFFERENTLY = "builds differently"

# a value other than the default to try, for the numeric keys some family fixes (boolean and choice keys
# need none: the other value, the next choice); the other numeric keys (the shape, context, dropout) are
# every family's
PROBES: dict[str, object] = {"model.n_kv_head": 2, "model.d_ff": 256, "model.norm_eps": 1e-6,
                             "model.rope_theta": 500000.0, "model.rope_factor": 8.0, "model.rope_low_freq_factor": 2.0,
                             "model.rope_high_freq_factor": 8.0, "model.rope_original_max_positions": 8192}
# keys a family takes without complaint yet reads only if it builds this: a (Variations attribute, value)
# pair, or BUILDS_DIFFERENTLY (what is built changes with the key)
PARTS: dict[str, object] = {"model.rope_theta": ("positions", "rotary"), "model.activation": ("mlp", "gelu"),
                            "model.bias": BUILDS_DIFFERENTLY}


@functools.lru_cache(maxsize=None)
def _probes() -> dict[str, object]:
    """Each model key some family may not read, with the value that asks (family itself excepted)."""
    out: dict[str, object] = {}
    for key, info in field_docs().items():
        if not key.startswith("model.") or key == FAMILY_KEY:
            continue
        if key in PROBES:
            out[key] = PROBES[key]
        elif info["type"] == "bool":
            out[key] = not info["default"]
        elif "choices" in info and len(info["choices"]) > 1:
            out[key] = next(c for c in info["choices"] if c != info["default"])
    return out


def _variations(m: ModelConfig):
    """What the engine builds for ``m``; None where it does not know the family yet (every key shows)."""
    try:
        return variations(m)
    except Exception:  # noqa: BLE001 - a family the model code does not have yet must not break the form
        return None


@functools.lru_cache(maxsize=None)
def _read_by(family: str) -> frozenset[str]:
    """The keys of ``_probes()`` that ``family`` reads; all of them for a family the engine refuses (the
    form then shows every field while validation names the problem)."""
    try:
        base = ModelConfig(family=family)
    except InputError:
        return frozenset(_probes())
    built = _variations(base)
    out = set()
    for key, probe in _probes().items():
        try:
            other = dataclasses.replace(base, **{key.split(".", 1)[1]: probe})
        except InputError:
            continue  # the family fixes this key
        part = PARTS.get(key)
        if part is None or built is None:
            out.add(key)
        elif part == BUILDS_DIFFERENTLY:
            if _variations(other) != built:
                out.add(key)
        elif getattr(built, part[0], None) == part[1]:
            out.add(key)
    return frozenset(out)


@functools.lru_cache(maxsize=None)
def _unjudged(key: str) -> bool:
    """No family reads ``key`` by these questions: the probe cannot judge it (the engine refuses its value
    for another reason), so it is shown rather than hidden everywhere."""
    return not any(key in _read_by(f) for f in FAMILIES)


def reads(family: str | None, key: str) -> bool:
    """Whether a run of ``family`` reads ``key`` (the shape keys and every non-model key: yes)."""
    if key not in _probes() or _unjudged(key):
        return True
    return key in _read_by(family or DEFAULT_FAMILY)


def heads_text(model: dict) -> str:
    """'9 heads / 3 kv' with grouped-query attention, '4 heads' without."""
    n_head, kv = model.get("n_head"), model.get("n_kv_head")
    return f"{n_head} heads" + (f" / {kv} kv" if kv and kv != n_head else "")


def model_line(model: dict) -> str:
    """'llama · 30 layers · d 576 · 9 heads / 3 kv': a run's family and shape, short enough for a column."""
    return " · ".join([model.get("family") or DEFAULT_FAMILY, f"{model.get('n_layer')} layers",
                       f"d {model.get('d_model')}", heads_text(model)])


def run_model(run: dict) -> dict | None:
    """The model section of a run's stored config; None for a stage without a model (a vocabulary run's
    config carries the defaults of a model it never builds)."""
    spec = STAGES.get(run.get("stage") or "")
    if spec is not None and not (spec.holds_model or "model" in spec.sections):
        return None
    model = (run.get("config") or {}).get("model")
    return model if isinstance(model, dict) and model.get("n_layer") else None
