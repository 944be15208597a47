"""The new-run form's configuration without widgets: dotted field keys to the nested config and back,
validation by the engine's own code, every section at once (the engine stops at the first error), which
keys the form asks first (Basic) and which ones a choice turns off, and the model shape a child run takes
from its parent."""
from __future__ import annotations

from typing import Any

from engine.core.config import METHODS, SECTIONS, ModelConfig, RunConfig, from_dict
from engine.core.errors import InputError
from engine.core.registry import FINETUNE, STAGES, TASK_STAGES, TASKS, shape_from_parent, task_fields
from studio.models.families import DEFAULT_FAMILY, heads_text
from studio.models.labels import is_sparse_stage, is_task_stage, parent_stages, stage_text

PARENT_STATUSES = ("completed", "stopped")  # a finished model (stopped runs end on a checkpoint)

# what a user sets on most runs, asked first; every other key sits in the folded Advanced part (a key of a
# section the stage does not read is hidden in both)
RUN_KEYS = ("name", "stage", "parent")
BASIC_KEYS = (
    "data.corpus", "task.name", "task.train", "task.dev", "sparsity.level", "sparsity.method", "prompt.n_tokens",
    "train.max_steps", "train.epochs", "train.batch_size", "train.lr", "prompt.lr", "train.seed", "train.threads",
    "train.precision",
)
DYNAMIC = tuple(m for m in METHODS if m != "static")
# sparsity.* key -> the methods that read it (the others leave it greyed out)
METHOD_FIELDS = {"sparsity.start_step": DYNAMIC, "sparsity.end_step": DYNAMIC, "sparsity.update_every": DYNAMIC,
                 "sparsity.drop_fraction": ("set", "rigl"), "sparsity.initial": ("gmp",)}
# a child's model.* keys come from its parent; only the context length may be set (up to the parent's positions)
CHILD_MODEL_KEYS = ("model.n_ctx",)
# train.* keys only some stages may set (the engine refuses them elsewhere: RunConfig._check_recipe)
STAGE_KEYS = {"train.epochs": TASK_STAGES, "train.early_stopping_patience": TASK_STAGES,
              "train.layer_decay": (FINETUNE,),
              "train.init": tuple(n for n, s in STAGES.items() if s.takes_parent_shape)}


def applies(key: str, flat: dict[str, Any]) -> bool:
    """Whether ``key`` means something for the run the other values describe (a greyed-out field does not)."""
    if key == "parent":
        return bool(parent_stages(flat.get("stage") or ""))
    if key == "data.corpus":  # a labelled task reads its own files instead
        spec, task = STAGES.get(flat.get("stage") or ""), TASKS.get(flat.get("task.name") or "")
        return not (spec and "task" in spec.sections and not spec.reads_corpus and task and task.labelled)
    if key in METHOD_FIELDS:
        return flat.get("sparsity.method") in METHOD_FIELDS[key]
    tasks = task_fields().get(key)
    if tasks is not None:
        return flat.get("task.name") in tasks
    return True


def takes_parent_shape(stage_name: str, parent: dict | None = None) -> bool:
    """Whether the run takes its model from ``parent`` (a run row): fine-tuning and prompting always, a
    pre-training when the parent is an imported model it continues (the engine's rule)."""
    return shape_from_parent(stage_name, (parent or {}).get("stage"))


def shown_for_stage(key: str, stage_name: str, parent: dict | None = None) -> bool:
    """A key of a section the stage reads that the stage may set (a child run's model keys are its parent's
    but the context length; fine-tuning keys belong to fine-tuning)."""
    if key.startswith("model.") and takes_parent_shape(stage_name, parent):
        return key in CHILD_MODEL_KEYS
    return stage_name in STAGE_KEYS.get(key, (stage_name,))


def parent_shape(run: dict | None) -> dict | None:
    """The model shape a child of ``run`` trains with: its stored config's model section and vocabulary."""
    if not run:
        return None
    cfg = run.get("config") or {}
    model = dict(cfg.get("model") or {})
    if not model:
        return None
    vocab = (run.get("meta") or {}).get("vocab_size") or (cfg.get("tokenizer") or {}).get("vocab_size")
    return {**model, "vocab_size": vocab}


def with_parent_shape(cfg: RunConfig, parent: dict | None) -> RunConfig:
    """``cfg`` as the engine will train it where it takes ``parent``'s model: the parent's shape and family,
    the context length the form sets if not the default (as the engine reads a model.n_ctx given), and the
    parent's vocabulary. What the schedule preview and other FLOP counts must use; ``cfg`` unchanged
    otherwise (or when the parent's stored config no longer validates)."""
    shape = parent_shape(parent) if takes_parent_shape(cfg.stage, parent) else None
    if not shape:
        return cfg
    d = cfg.to_dict()
    vocab = shape.pop("vocab_size", None)
    n_ctx = d["model"]["n_ctx"] if d["model"]["n_ctx"] != ModelConfig().n_ctx else shape.get("n_ctx")
    d["model"] = {**shape, "n_ctx": n_ctx, "n_positions": shape.get("n_positions") or shape.get("n_ctx")}
    if vocab and "tokenizer" in d:
        d["tokenizer"]["vocab_size"] = int(vocab)
    try:
        return from_dict(d)
    except InputError:
        return cfg


def shape_text(shape: dict) -> str:
    """'llama · 4 layers · d_model 128 · 4 heads / 2 kv · d_ff 344 · context 128 (up to 256) · vocabulary 8,192'
    (grouped-query heads and the MLP width only where the model has them)."""
    n_ctx, n_pos = shape.get("n_ctx"), shape.get("n_positions") or shape.get("n_ctx")
    parts = [shape.get("family") or DEFAULT_FAMILY, f"{shape.get('n_layer')} layers", f"d_model {shape.get('d_model')}",
             heads_text(shape)]
    if shape.get("d_ff"):
        parts.append(f"d_ff {shape['d_ff']}")
    parts.append(f"context {n_ctx}" + (f" (up to {n_pos})" if n_pos and n_pos != n_ctx else ""))
    if shape.get("vocab_size"):
        parts.append(f"vocabulary {int(shape['vocab_size']):,}")
    return " · ".join(parts)


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
