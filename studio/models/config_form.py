"""The new-run form's configuration without widgets: dotted field keys to the nested config and back, and
validation by the engine's own code, every section at once (the engine stops at the first error)."""
from __future__ import annotations

from typing import Any

from engine.core.config import SECTIONS, RunConfig, from_dict
from engine.core.errors import InputError
from studio.models.labels import is_sparse_stage, is_task_stage, stage_text

PARENT_STATUSES = ("completed", "stopped")  # a finished model (stopped runs end on a checkpoint)


def nested(flat: dict[str, Any]) -> dict:
    out: dict = {}
    for key, value in flat.items():
        if "." in key:
            sec, sub = key.split(".", 1)
            out.setdefault(sec, {})[sub] = value
        else:
            out[key] = value
    return out


def flatten(d: dict) -> dict[str, Any]:
    out = {}
    for key, value in d.items():
        if key in SECTIONS and isinstance(value, dict):
            for sub, v in value.items():
                out[f"{key}.{sub}"] = v
        else:
            out[key] = value
    return out


def validate(flat: dict[str, Any]) -> tuple[RunConfig | None, dict[str, str]]:
    """All errors the engine would raise, one per section (it stops at the first), keyed by dotted field."""
    d = nested(flat)
    errors: dict[str, str] = {}
    for sec, cls in SECTIONS.items():
        try:
            cls(**d.get(sec, {}))
        except InputError as e:
            errors[e.key] = str(e)
        except TypeError as e:  # an unknown key in a section
            errors[sec] = str(e)
    top = {k: v for k, v in d.items() if k not in SECTIONS}
    try:
        RunConfig(**top)
    except InputError as e:
        errors[e.key] = str(e)
    if errors:
        return None, errors
    try:
        return from_dict(d), {}
    except InputError as e:
        return None, {e.key: str(e)}


def parent_label(run: dict) -> str:
    """'ab12cd34 — hpo-sparse75 (Sparse pre-training, 75 % sparse, completed)'."""
    cfg = run.get("config") or {}
    extra = ""
    if is_sparse_stage(run["stage"]) and (cfg.get("sparsity") or {}).get("level") is not None:
        extra = f", {100 * cfg['sparsity']['level']:.0f} % sparse"
    elif is_task_stage(run["stage"]) and (cfg.get("task") or {}).get("name"):
        extra = f", {cfg['task']['name']}"
    return f"{run['id']} — {run['name']} ({stage_text(run['stage'])}{extra}, {run['status']})"
