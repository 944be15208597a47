"""Run configuration: one dataclass per section, validated at construction.

Ground floor: imports neither torch nor Qt, so the studio can build its forms from these
dataclasses (field docs become tooltips, ``choices`` become combo boxes, ``min``/``max`` ranges).
Errors name the field (``sparsity.level must be in [0, 1), got 1.5``) so the CLI and the form can
show them next to the value that is wrong.
"""
from __future__ import annotations

import copy
import dataclasses
import difflib
import functools
import json
import math
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union, get_args, get_origin, get_type_hints

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

import tomli_w

from engine.core import registry
from engine.core.errors import InputError

STAGES = registry.STARTABLE_STAGES  # what `stage` may say (an import run is made by import-hf, not configured)
DEVICES = ("auto", "cpu", "cuda")
DISTRIBUTIONS = ("uniform", "erk")
KERNELS = ("auto", "dense", "sparse")
METHODS = ("static", "gmp", "set", "rigl")
STRATEGIES = ("ddp", "fsdp")
REPORTERS = ("tensorboard",)  # experiment trackers a run can also write to (engine.train.metrics sinks)
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
TASKS = registry.TASK_NAMES
HEADS = ("lm", "classifier")  # task.head: labels as text from the language-model head, or a classifier
POOLINGS = ("mean", "attention")  # task.pooling: how a classifier head reduces a window's hidden states
PROMPT_INITS = ("vocab", "text")  # prompt.init: sampled vocabulary embeddings, or init_text's
INITS = ("parent", "random")  # train.init: a child run starts from its parent's weights, or from fresh ones
FAMILIES = ("gpt2", "llama", "qwen2", "biogpt")  # model.family: the variations of engine.model.gpt (engine.model.family)
ROPE_SCALINGS = ("none", "linear", "llama3")  # model.rope_scaling: how the rotary frequencies are stretched (engine.model.rotary)
INT64_MAX = 2**63 - 1  # every integer key stays a signed 64-bit value (SQLite, torch and numpy take it)
MAX_NAME = 200  # characters in a run (or sweep) name


def _f(default: Any, doc: str, **meta: Any) -> Any:
    """A dataclass field carrying its documentation and UI hints in metadata."""
    meta["doc"] = doc
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata=meta)
    return field(default=default, metadata=meta)


@functools.lru_cache(maxsize=None)
def _hints(cls: type) -> dict[str, Any]:
    """A class's resolved annotations, once: ``get_type_hints`` compiles every string annotation on each
    call, which made building a config cost milliseconds (and a 10,000-point sweep minutes)."""
    return get_type_hints(cls)


class _Section:
    """Shared validation: type checks from annotations, then ranges and choices from metadata."""

    SECTION = ""

    def __post_init__(self) -> None:
        hints = _hints(type(self))
        for f in dataclasses.fields(self):
            key = f"{self.SECTION}.{f.name}" if self.SECTION else f.name
            value = _coerce(key, getattr(self, f.name), hints[f.name])
            object.__setattr__(self, f.name, value)
            meta = f.metadata
            if "choices" in meta and value not in meta["choices"]:
                raise InputError(f"{key} must be one of {', '.join(map(repr, meta['choices']))}, got {value!r}", key=key)
            if isinstance(value, float) and not math.isfinite(value):
                # NaN compares false with every bound, so it would slip through the range check
                raise InputError(f"{key} must be a finite number, got {value!r}", key=key)
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                lo, hi = meta.get("min"), meta.get("max")
                lo_open, hi_open = meta.get("min_open", False), meta.get("max_open", False)
                bad = (lo is not None and (value < lo or (lo_open and value == lo))) or (
                    hi is not None and (value > hi or (hi_open and value == hi))
                )
                if bad:
                    raise InputError(f"{key} must be {range_text(meta)}, got {value!r}", key=key)
            if isinstance(value, int) and not isinstance(value, bool) and not -INT64_MAX - 1 <= value <= INT64_MAX:
                # a key without its own bounds still has to fit the 64 bits everything downstream stores
                raise InputError(f"{key} must fit a signed 64-bit integer (at most {INT64_MAX}), got {value}", key=key)
        self.check()

    def check(self) -> None:
        """Cross-field checks of one section."""


def _bound(x: int | float) -> str:
    """A bound as typed: integers exactly (2**63 - 1 is not 9.22337e+18), floats short."""
    if isinstance(x, int) and not isinstance(x, bool):
        return "2^63-1" if x == INT64_MAX else f"{x:,}" if x >= 100_000 else str(x)
    return f"{x:g}"


def range_text(meta: dict) -> str:
    lo, hi = meta.get("min"), meta.get("max")
    if lo is not None and hi is not None:
        left = "(" if meta.get("min_open") else "["
        right = ")" if meta.get("max_open") else "]"
        return f"in {left}{_bound(lo)}, {_bound(hi)}{right}"
    if lo is not None:
        return f"> {_bound(lo)}" if meta.get("min_open") else f">= {_bound(lo)}"
    return f"< {_bound(hi)}" if meta.get("max_open") else f"<= {_bound(hi)}"


def name_problem(name: str) -> str | None:
    """Why ``name`` cannot be a run or sweep name (None when it can): names go into TOML files, file
    names, table cells and one-line messages, so no control characters (newlines, tabs, NUL, escape
    sequences, line or paragraph separators) and at most MAX_NAME characters."""
    if len(name) > MAX_NAME:
        return f"is {len(name):,} characters long; at most {MAX_NAME}"
    bad = _NAME_BAD.search(name)
    return f"holds the control character {ascii(bad.group())[1:-1]}" if bad else None


# Unicode's control characters (Cc), line and paragraph separators (Zl, Zp), lone surrogates (Cs) and the
# bidirectional marks and overrides that reorder a line as it is shown
_NAME_BAD = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029\ud800-\udfff\u200e\u200f\u202a-\u202e\u2066-\u2069]")


def safe_name(name: str) -> str:
    """``name`` with every character ``name_problem`` refuses replaced by a space, cut to MAX_NAME: what
    export-config writes for a run stored before names were checked."""
    return " ".join(_NAME_BAD.sub(" ", str(name)).split())[:MAX_NAME]


def _coerce(key: str, value: Any, hint: Any) -> Any:
    """Check ``value`` against the annotation; allow int -> float and str -> [str] (corpus lists)."""
    origin = get_origin(hint)
    if origin is Union:
        args = [a for a in get_args(hint) if a is not type(None)]
        if value is None and type(None) in get_args(hint):
            return None
        errors = []
        for a in args:
            try:
                return _coerce(key, value, a)
            except InputError as e:
                errors.append(e)
        names = " or ".join(_type_name(a) for a in args)
        raise InputError(f"{key} must be {names}, got {value!r}", key=key)
    if origin is list:
        (item,) = get_args(hint)
        if not isinstance(value, (list, tuple)):
            raise InputError(f"{key} must be a list, got {value!r}", key=key)
        return [_coerce(key, v, item) for v in value]
    if hint is bool:
        if isinstance(value, bool):
            return value
        raise InputError(f"{key} must be true or false, got {value!r}", key=key)
    if hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise InputError(f"{key} must be an integer, got {value!r}", key=key)
    if hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise InputError(f"{key} must be a number, got {value!r}", key=key)
    if hint is str:
        if isinstance(value, str):
            return value
        raise InputError(f"{key} must be a string, got {value!r}", key=key)
    return value


def _type_name(t: Any) -> str:
    if get_origin(t) is list:
        return f"a list of {_type_name(get_args(t)[0])}s"
    return {int: "an integer", float: "a number", str: "a string", bool: "true or false"}.get(t, str(t))


# --------------------------------------------------------------------------------------------------
# Sections
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelConfig(_Section):
    SECTION = "model"
    n_layer: int = _f(4, "Number of transformer blocks.", min=1, max=256)
    n_head: int = _f(4, "Attention heads per block; d_model must be divisible by it.", min=1, max=256)
    d_model: int = _f(128, "Width of the residual stream (embedding size).", min=8, max=65536)
    n_ctx: int = _f(128, "Training context length in tokens.", min=8, max=65536)
    n_positions: int = _f(
        0, "Size of the learned position table (the model's maximum context; rotary families have no table, only this "
        "limit); 0 means equal to n_ctx.", min=0, max=1 << 20
    )
    dropout: float = _f(0.0, "Dropout on attention and residual paths (0 disables it).", min=0.0, max=1.0, max_open=True)
    bias: bool = _f(True, "Use biases in linear layers and layer norms (GPT-2 style).")
    activation: str = _f("gelu", "MLP activation: exact (erf) GELU, or the tanh approximation original GPT-2 checkpoints "
                         "use (gelu_tanh; transformers' gelu_new). gpt2 and biogpt: the llama family's MLP is SwiGLU.",
                         choices=("gelu", "gelu_tanh"))
    family: str = _f("gpt2", "Architecture: gpt2 (LayerNorm, learned positions, GELU MLP, tied head), llama (RMSNorm, "
                     "rotary positions, SwiGLU MLP, grouped-query attention, no biases), qwen2 (llama with q/k/v "
                     "biases) or biogpt (gpt2 with BioGPT's position offset, model.d_ff and model.scale_embedding). "
                     "model.bias applies to gpt2 only, model.activation to gpt2 and biogpt.", choices=FAMILIES)
    n_kv_head: int = _f(0, "Key/value heads of grouped-query attention (llama, qwen2): n_head must be a multiple of it; "
                        "0 means n_head (multi-head attention).", min=0, max=256)
    d_ff: int = _f(0, "Inner width of the MLP (SwiGLU's gate and up projections in llama, qwen2; fc in biogpt); 0 means 4 x d_model.",
                   min=0, max=1 << 20)
    rope_theta: float = _f(10000.0, "Base of the rotary position angles (llama, qwen2).", min=0.0, min_open=True)
    rope_scaling: str = _f("none", "Rotary position scaling (llama, qwen2), as transformers' rope_type: none; linear (every "
                           "frequency divided by model.rope_factor); llama3 (Llama 3.1's: frequencies whose wavelength "
                           "exceeds rope_original_max_positions / rope_low_freq_factor divided by rope_factor, those "
                           "shorter than rope_original_max_positions / rope_high_freq_factor kept, a smooth blend between).",
                           choices=ROPE_SCALINGS)
    rope_factor: float = _f(1.0, "Factor of model.rope_scaling linear or llama3 (Llama 3.1: 8, Llama 3.2: 32).",
                            min=0.0, min_open=True)
    rope_low_freq_factor: float = _f(1.0, "low_freq_factor of model.rope_scaling llama3.", min=0.0, min_open=True)
    rope_high_freq_factor: float = _f(4.0, "high_freq_factor of model.rope_scaling llama3; above rope_low_freq_factor.",
                                      min=0.0, min_open=True)
    rope_original_max_positions: int = _f(0, "The context the model was pre-trained with, before model.rope_scaling llama3 "
                                          "stretched it (original_max_position_embeddings, Llama 3.x: 8192); 0 means "
                                          "model.n_positions.", min=0, max=1 << 20)
    norm_eps: float = _f(1e-5, "Epsilon of the normalisation layers (gpt2 and biogpt keep 1e-5).", min=0.0, max=1.0, min_open=True)
    tie_embeddings: bool = _f(True, "The LM head shares the token embedding's matrix (gpt2 always does).")
    scale_embedding: bool = _f(False, "Multiply the token embeddings by sqrt(d_model) before the positions are added "
                               "(BioGPT's scale_embedding; biogpt only).")

    def check(self) -> None:
        if self.d_model % self.n_head:
            raise InputError(f"model.d_model ({self.d_model}) must be divisible by model.n_head ({self.n_head})", key="model.n_head")
        if self.n_kv_head and self.n_head % self.n_kv_head:
            raise InputError(f"model.n_head ({self.n_head}) must be a multiple of model.n_kv_head ({self.n_kv_head})",
                             key="model.n_kv_head")
        if self.scale_embedding and self.family != "biogpt":
            # only BioGPT's transformers class scales its token embeddings: another family could not be exported
            raise InputError(f"model.scale_embedding must be false for model.family {self.family!r} (it is BioGPT's: "
                             "model.family 'biogpt')", key="model.scale_embedding")
        if self.family in ("gpt2", "biogpt"):
            # GPT-2 has one shape of each variation; these keys only describe the llama family. BioGPT frees
            # the MLP width and the head, and always has biases; transformers builds its LayerNorms with eps 1e-5
            gpt2 = self.family == "gpt2"
            fixed = (("n_kv_head", self.n_kv_head in (0, self.n_head), "0 (every head has its keys and values)"),
                     ("d_ff", not gpt2 or self.d_ff in (0, 4 * self.d_model), "0 (4 x d_model)"),
                     ("norm_eps", self.norm_eps == 1e-5, "1e-5"), ("tie_embeddings", not gpt2 or self.tie_embeddings, "true"),
                     ("bias", gpt2 or self.bias, "true"),
                     # rotary scaling: these families have learned positions
                     ("rope_scaling", self.rope_scaling == "none", "'none' (learned positions have no rotary scaling)"),
                     ("rope_factor", self.rope_factor == 1.0, "1.0"),
                     ("rope_low_freq_factor", self.rope_low_freq_factor == 1.0, "1.0"),
                     ("rope_high_freq_factor", self.rope_high_freq_factor == 4.0, "4.0"),
                     ("rope_original_max_positions", self.rope_original_max_positions == 0, "0"))
            for key, ok, want in fixed:
                if not ok:
                    raise InputError(f"model.{key} must be {want} for model.family {self.family!r}, got "
                                     f"{getattr(self, key)!r}", key=f"model.{key}")
        elif (self.d_model // self.n_head) % 2:
            raise InputError(f"rotary positions need an even head width: model.d_model / model.n_head is "
                             f"{self.d_model // self.n_head}", key="model.n_head")
        elif self.rope_scaling == "llama3" and self.rope_high_freq_factor <= self.rope_low_freq_factor:
            # the blend between the two wavelengths divides by their difference
            raise InputError(f"model.rope_high_freq_factor ({self.rope_high_freq_factor:g}) must exceed "
                             f"model.rope_low_freq_factor ({self.rope_low_freq_factor:g}) for model.rope_scaling 'llama3'",
                             key="model.rope_high_freq_factor")
        if self.n_positions and self.n_ctx > self.n_positions:
            raise InputError(f"model.n_ctx ({self.n_ctx}) exceeds the model's maximum context model.n_positions ({self.n_positions})", key="model.n_ctx")

    @property
    def max_positions(self) -> int:
        return self.n_positions or self.n_ctx

    @property
    def kv_heads(self) -> int:
        return self.n_kv_head or self.n_head

    @property
    def inner(self) -> int:
        """The MLP's inner width."""
        return self.d_ff or 4 * self.d_model


@dataclass(frozen=True)
class TokenizerConfig(_Section):
    SECTION = "tokenizer"
    vocab_size: int = _f(8192, "Byte-level BPE vocabulary size, special tokens included (the paper: 42,384).", min=1, max=1_000_000)
    min_frequency: int = _f(2, "Minimum count of a pair to be merged.", min=1, max=1_000_000)
    lowercase: bool = _f(False, "Lowercase text before tokenizing.")

    # 256 byte symbols + <|endoftext|> + <|pad|>
    MIN_VOCAB = 258

    def check(self) -> None:
        if self.vocab_size < self.MIN_VOCAB:
            raise InputError(f"tokenizer.vocab_size must be at least {self.MIN_VOCAB} (256 bytes + 2 special tokens), got {self.vocab_size}", key="tokenizer.vocab_size")


@dataclass(frozen=True)
class DataConfig(_Section):
    SECTION = "data"
    corpus: list[str] = _f(
        ["builtin:hpo"],
        "Training text: 'builtin:hpo' (HPO term definitions, works offline) or local .txt/.jsonl/.json/.csv/.parquet files or folders.",
        kind="corpus",
    )
    text_field: str = _f("text", "Column holding the text in .jsonl/.json/.csv/.parquet files.")
    val_fraction: float = _f(0.05, "Fraction of documents held out for validation.", min=0.0, max=0.5, min_open=True)
    max_documents: int = _f(0, "Use at most this many documents (0 = all); handy for quick trials.", min=0, max=10**12)

    def __post_init__(self) -> None:
        if isinstance(self.corpus, str):  # a single path is the common case in TOML and --set
            object.__setattr__(self, "corpus", [self.corpus])
        super().__post_init__()

    def check(self) -> None:
        if not self.corpus or not all(s.strip() for s in self.corpus):
            raise InputError("data.corpus is empty: give 'builtin:hpo' or at least one file or folder", key="data.corpus")
        if not self.text_field:
            raise InputError("data.text_field must not be empty", key="data.text_field")


@dataclass(frozen=True)
class SparsityConfig(_Section):
    SECTION = "sparsity"
    level: float = _f(0.75, "Fraction of zero weights in the sparse matrices (attention q/k/v/out and MLP).", min=0.0, max=1.0, max_open=True)
    distribution: str = _f("uniform", "How sparsity is spread over layers: same level everywhere, or Erdős–Rényi-Kernel.", choices=DISTRIBUTIONS)
    kernel: str = _f("auto", "Matmul path for sparse layers: time both and keep the faster (auto), masked dense, or the sparse CPU core.", choices=KERNELS)
    method: str = _f("static", "How masks change during pre-training: static (the initial random mask throughout, as "
                     "MediSwift), gmp (gradual magnitude pruning from sparsity.initial to sparsity.level, Zhu & Gupta "
                     "2017), set (drop the smallest weights, regrow at random, Mocanu et al. 2018) or rigl (drop the "
                     "smallest, regrow where the dense gradient is largest, Evci et al. 2020). docs/dynamic_sparsity.md.",
                     choices=METHODS)
    start_step: int = _f(0, "First step at which a dynamic method updates the masks.", min=0, max=10_000_000)
    end_step: int = _f(0, "Step after which the masks stay fixed (0: 75 % of train.max_steps, RigL's default).", min=0, max=10_000_000)
    update_every: int = _f(100, "Steps between mask updates (RigL's and GMP's default: 100).", min=1, max=10_000_000)
    drop_fraction: float = _f(0.3, "SET/RigL: fraction of each layer's nonzeros dropped and regrown at the first update, "
                              "decaying to 0 by end_step on a cosine (0.3: RigL and SET's default).",
                              min=0.0, max=1.0, min_open=True, max_open=True)
    initial: float = _f(0.0, "GMP: sparsity at start_step (0: dense), pruned to sparsity.level by end_step on a cubic "
                        "schedule.", min=0.0, max=1.0, max_open=True)

    def check(self) -> None:
        if self.initial > self.level:
            raise InputError(f"sparsity.initial ({self.initial}) is above the final sparsity.level ({self.level}): gradual "
                             "magnitude pruning only prunes", key="sparsity.initial")
        if self.end_step and self.end_step <= self.start_step:
            raise InputError(f"sparsity.end_step ({self.end_step}) must come after sparsity.start_step ({self.start_step})",
                             key="sparsity.end_step")


@dataclass(frozen=True)
class TrainConfig(_Section):
    SECTION = "train"
    lr: float = _f(3e-3, "Peak learning rate (AdamW).", min=0.0, max=10.0, min_open=True)
    max_steps: int = _f(300, "Optimizer steps to run.", min=1, max=10_000_000)
    batch_size: int = _f(8, "Sequences per micro-batch.", min=1, max=65536)
    grad_accum: int = _f(1, "Micro-batches accumulated per optimizer step.", min=1, max=4096)
    min_lr_ratio: float = _f(0.1, "Final learning rate as a fraction of the peak (cosine decay).", min=0.0, max=1.0)
    warmup_steps: int = _f(30, "Linear warm-up steps (a run shorter than this warms up throughout).", min=0, max=10_000_000)
    weight_decay: float = _f(0.1, "AdamW weight decay, applied to weight matrices only.", min=0.0, max=10.0)
    beta1: float = _f(0.9, "AdamW beta1.", min=0.0, max=1.0, max_open=True)
    beta2: float = _f(0.95, "AdamW beta2.", min=0.0, max=1.0, max_open=True)
    grad_clip: float = _f(1.0, "Clip the global gradient norm to this value (0 disables clipping).", min=0.0)
    skip_nonfinite: bool = _f(False, "Skip optimizer steps whose loss or gradient norm is NaN/inf (with a warning) instead of failing the run.")
    eval_every: int = _f(50, "Validation every this many steps (and at the end).", min=1, max=10_000_000)
    eval_batches: int = _f(8, "Validation micro-batches per evaluation.", min=1, max=1_000_000)
    checkpoint_every: int = _f(100, "Checkpoint every this many steps (and at the end).", min=1, max=10_000_000)
    keep_checkpoints: int = _f(0, "Keep the N newest checkpoints (the final one is the newest) and the one with the best "
                               "validation loss when it is not among them: at most N + 1 on disk. 0 keeps all.", min=0, max=1_000_000)
    log_every: int = _f(1, "Emit training metrics every this many steps.", min=1, max=10_000_000)
    seed: int = _f(1337, "Random seed for init, masks and data order.", min=0, max=INT64_MAX)
    device: str = _f("auto", "Where to train: auto picks CUDA when available.", choices=DEVICES)
    threads: int = _f(0, "CPU threads for torch (0 = all cores).", min=0, max=1024)
    precision: str = _f("auto", "Precision of the products: auto picks bf16 where the device computes it natively "
                        "(CUDA; CPUs with AMX or AVX512-BF16) and fp32 elsewhere (fp16 with a gradient scaler on "
                        "CUDA devices without bf16). Weights, optimizer state, loss and checkpoints stay fp32.",
                        choices=PRECISIONS)
    nproc: int = _f(1, "Training processes on this machine (started through torchrun): one per GPU, or each with a "
                    "share of the CPU cores. With more than one, the global batch is processes x batch_size x "
                    "grad_accum.", min=1, max=1024)
    nnodes: int = _f(1, "Machines in the run; each runs the same command, and they meet at train.rdzv_endpoint.",
                     min=1, max=4096)
    rdzv_endpoint: str = _f("", "host:port where the machines of a multi-node run meet (torchrun's c10d rendezvous, "
                            "hosted by the machine at that address); empty on one machine: a free local port.")
    rdzv_timeout: int = _f(300, "Seconds the machines of a multi-node run wait for each other at train.rdzv_endpoint "
                           "(the wait says every 10 s how many have joined); after it the run gives up with one line "
                           "naming the nodes that came (exit 3).", min=1, max=86_400)
    strategy: str = _f("ddp", "How several processes share the model: ddp keeps a full copy on each and averages the "
                       "gradients (of the packed nonzeros, for masked layers); fsdp shards weights, gradients and "
                       "optimizer state across them (FSDP2).", choices=STRATEGIES)
    report_to: list[str] = _f([], "Experiment trackers the metrics also go to, besides the run database: "
                              "'tensorboard' writes event files to the run folder's tensorboard/ (needs the "
                              "tensorboard package: pip install 'mediswift-studio[tensorboard]').")
    epochs: int = _f(0, "Fine-tuning and prompting on a labelled task (pubmedqa, hoc): passes over the training "
                     "examples (0 = off: train.max_steps decides). Above 0 it wins over train.max_steps: the run "
                     "trains epochs x ceil(N / (processes x batch_size x grad_accum)) steps, N the training examples "
                     "(after task.max_examples), evaluates on dev once per epoch (train.eval_every is replaced), and "
                     "records the steps it derived as train.max_steps and train.eval_every in its config. Only a "
                     "train.max_steps given with --set (or changed in the studio's form) counts steps instead: it "
                     "turns epochs off for that run; giving both that way is an error.",
                     min=0, max=100_000)
    early_stopping_patience: int = _f(0, "Fine-tuning and prompting: stop after this many development evaluations "
                                      "in a row without a better headline dev metric (accuracy, micro-F1; loss for "
                                      "lm) than the best so far (0 = never stop early). With it or train.epochs, the "
                                      "run keeps the checkpoint of its best evaluation (whatever "
                                      "train.keep_checkpoints says) and eval, export-hf and child runs use it.",
                                      min=0, max=100_000)
    layer_decay: float = _f(1.0, "Fine-tuning: layer-wise learning-rate decay. The top (final norm, LM and "
                            "classification heads) trains at train.lr, block i of L at lr x decay^(L - i), the "
                            "embeddings at lr x decay^(L + 1). 1.0 = off.", min=0.0, max=1.0, min_open=True)
    init: str = _f(INITS[0], "Fine-tuning and prompting: start from the parent's weights (parent), or from fresh "
                   "weights of the parent's shape and tokenizer, drawn with train.seed (random): the control that "
                   "shows what pre-training buys.", choices=INITS)

    def __post_init__(self) -> None:
        if isinstance(self.report_to, str):  # the form's text field and a bare --set value
            object.__setattr__(self, "report_to", [x for x in self.report_to.replace(",", " ").split() if x])
        super().__post_init__()

    def check(self) -> None:
        unknown = [x for x in self.report_to if x not in REPORTERS]
        if unknown:
            raise InputError(f"train.report_to has {', '.join(map(repr, unknown))}; available: "
                             f"{', '.join(map(repr, REPORTERS))}", key="train.report_to")


@dataclass(frozen=True)
class TaskConfig(_Section):
    SECTION = "task"
    name: str = _f(registry.LM, "Fine-tuning task: causal LM on a corpus, PubMedQA (yes/no/maybe) or HoC (10 hallmarks).", choices=TASKS)
    train: str = _f("", "Training file (PubMedQA: PQA-L JSON; HoC: JSONL; lm: uses data.corpus).", kind="path")
    dev: str = _f("", "Development file; empty: the fold's dev split (PubMedQA) or a held-out part of train.", kind="path")
    splits: str = _f("", "PubMedQA 10-fold split file (pqal_splits.json); empty: looked up next to the train file.", kind="path")
    fold: int = _f(0, "Cross-validation fold (0-9) when a split file is used.", min=0, max=9)
    head: str = _f(HEADS[0], "Predict labels as text (lm) or with a classification head over the whole input "
                   "(classifier: pooled hidden states, long documents in overlapping windows; multi-label "
                   "thresholds tuned on dev and kept with the run). Fine-tuning, and soft prompting (the head "
                   "trains with the prompt at train.lr, the parent frozen; it pools the text tokens, not the prompt's).",
                   choices=HEADS)
    pooling: str = _f(POOLINGS[0], "Classifier head: pool each window's hidden states by their mean, or by learned "
                      "attention weights (a score per token, softmax over the window).", choices=POOLINGS)
    predict: str = _f("likelihood", "PubMedQA prediction: compare answer likelihoods, or greedy generation + parsing.", choices=("likelihood", "generate"))
    scoring: str = _f("raw", "Answer-likelihood prediction (PubMedQA with predict = 'likelihood'): 'raw' picks the answer "
                      "with the highest log-probability; 'calibrated' first subtracts each answer's log-probability after "
                      "content-free inputs (the same prompt with question and context replaced by 'N/A' and by nothing), "
                      "so the answers' own prior likelihood does not decide. Generation and classifier heads ignore it. "
                      "Default raw: measured in docs/pipeline.md (Scoring).",
                      choices=("raw", "calibrated"))
    max_new_tokens: int = _f(32, "Longest generated answer (HoC label lists, PubMedQA with predict = 'generate').", min=1, max=4096)
    max_examples: int = _f(0, "Use at most this many training and this many development examples (0 = all); handy for quick trials.", min=0, max=10**12)


@dataclass(frozen=True)
class PromptConfig(_Section):
    SECTION = "prompt"
    n_tokens: int = _f(20, "Number of learned virtual-token embeddings.", min=1, max=1024)
    init: str = _f(PROMPT_INITS[0], "Initialise from sampled vocabulary embeddings, or from the embedding of init_text.", choices=PROMPT_INITS)
    init_text: str = _f("", "Text whose token embeddings initialise the prompt when init = 'text'.")
    lr: float = _f(0.3, "Learning rate of the prompt vectors (Lester et al. use ~0.3).", min=0.0, max=100.0, min_open=True)


# section name -> its dataclass, in the order of a config file; each class names its own section
SECTIONS: dict[str, type] = {cls.SECTION: cls for cls in (
    ModelConfig, TokenizerConfig, DataConfig, SparsityConfig, TrainConfig, TaskConfig, PromptConfig)}


@dataclass(frozen=True)
class RunConfig(_Section):
    """A whole run: top-level keys plus one object per section."""

    SECTION = ""
    name: str = _f("", f"Run name shown in the studio (default: preset name + stage): one line of printable text, "
                   f"at most {MAX_NAME} characters.")
    stage: str = _f(registry.PRETRAIN, "Pipeline stage this run performs.", choices=STAGES)
    parent: str = _f("", "Parent run id (fine-tuning and prompting start from it; a pre-training may reuse its tokenizer).")
    model: ModelConfig = field(default_factory=ModelConfig)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    data: DataConfig = field(default_factory=DataConfig)
    sparsity: SparsityConfig = field(default_factory=SparsityConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    task: TaskConfig = field(default_factory=TaskConfig)
    prompt: PromptConfig = field(default_factory=PromptConfig)

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            if f.name in SECTIONS and not isinstance(getattr(self, f.name), SECTIONS[f.name]):
                raise InputError(f"{f.name} must be a table of settings", key=f.name)
        for f in dataclasses.fields(self):
            if f.name in SECTIONS:
                continue
            value = _coerce(f.name, getattr(self, f.name), str)
            object.__setattr__(self, f.name, value)
            if "choices" in f.metadata and value not in f.metadata["choices"]:
                raise InputError(f"{f.name} must be one of {', '.join(map(repr, f.metadata['choices']))}, got {value!r}", key=f.name)
        problem = name_problem(self.name)
        if problem:
            raise InputError(f"name {problem}: a run name must be one line of printable text", key="name")
        sc, steps = self.sparsity, self.train.max_steps
        if sc.method != "static" and not sc.end_step and sc.start_step >= max(1, int(0.75 * steps)):
            raise InputError(f"sparsity.start_step ({sc.start_step}) is not before the last mask update, at 75 % of "
                             f"train.max_steps ({int(0.75 * steps)}); lower it, or set sparsity.end_step",
                             key="sparsity.start_step")
        if registry.stage(self.stage).needs_parent and not self.parent:
            raise InputError(f"parent is required for stage {self.stage!r}: give the id of the run to start from", key="parent")
        self._check_recipe()

    def _check_recipe(self) -> None:
        """The fine-tuning keys of train.* only where they mean something."""
        tc, spec = self.train, registry.stage(self.stage)
        task_stage = self.stage in registry.TASK_STAGES
        # (a fine-tuning run on the lm task is refused when the run is planned: a --set train.max_steps
        # may still turn a preset's epochs off)
        if tc.epochs and not task_stage:
            raise InputError(f"train.epochs counts passes over a labelled task's training examples (fine-tuning or "
                             f"prompting); a {self.stage} run counts train.max_steps", key="train.epochs")
        if tc.early_stopping_patience and not task_stage:
            raise InputError(f"train.early_stopping_patience watches the development metric of fine-tuning and "
                             f"prompting runs; a {self.stage} run has none", key="train.early_stopping_patience")
        if tc.layer_decay != 1.0 and self.stage != registry.FINETUNE:
            raise InputError(f"train.layer_decay applies to dense fine-tuning, where every layer trains; a "
                             f"{self.stage} run must leave it at 1.0", key="train.layer_decay")
        if tc.init != INITS[0] and not spec.takes_parent_shape:
            raise InputError(f"train.init = {tc.init!r} applies to runs that take their parent's shape (fine-tuning, "
                             f"prompting); a {self.stage} run starts as its own config says", key="train.init")

    # -- conversions -------------------------------------------------------------------------------
    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    def to_toml(self) -> str:
        return tomli_w.dumps(self.to_dict())

    def replace(self, overrides: dict[str, Any]) -> "RunConfig":
        """Copy with dotted-key overrides (``{"train.lr": 1e-3}``), validated."""
        d = self.to_dict()
        for key, value in overrides.items():
            _set_dotted(d, key, value)
        return from_dict(d)

    def with_values(self, overrides: dict[str, Any]) -> "RunConfig":
        """What ``replace`` gives, built section by section: each section an override touches is built
        (and validated) again, the others are kept as they are (already valid), then the whole config's
        checks run. A sweep builds thousands of points from one base this way in milliseconds each."""
        sections: dict[str, dict[str, Any]] = {}
        top: dict[str, Any] = {}
        for key, value in overrides.items():
            _set_dotted(sections if "." in key else top, key, value)  # unknown keys refused as everywhere
        if not sections and not top:
            return self
        changed = {name: dataclasses.replace(getattr(self, name), **values) for name, values in sections.items()}
        return dataclasses.replace(self, **changed, **top)


def field_docs() -> dict[str, dict]:
    """Every dotted key with its default, type name, doc and UI hints (for forms and docs): a copy the
    caller may change."""
    return copy.deepcopy(_field_docs())


@functools.lru_cache(maxsize=None)
def _field_docs() -> dict[str, dict]:
    """field_docs, built once (the classes do not change); never handed out, only read here."""
    out: dict[str, dict] = {}
    for f in dataclasses.fields(RunConfig):
        if f.name in SECTIONS:
            cls = SECTIONS[f.name]
            hints = _hints(cls)
            for sf in dataclasses.fields(cls):
                out[f"{f.name}.{sf.name}"] = _field_info(sf, hints[sf.name])
        else:
            out[f.name] = _field_info(f, str)
    return out


def _field_info(f: dataclasses.Field, hint: Any) -> dict:
    default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
    info = {"default": default, "type": getattr(hint, "__name__", str(hint))}
    info.update(f.metadata)
    return info


def all_keys() -> list[str]:
    return list(_field_docs())


def _set_dotted(d: dict, key: str, value: Any) -> None:
    parts = key.split(".")
    known = all_keys()
    if key not in known:
        if len(parts) == 1 and key in SECTIONS:
            raise InputError(f"{key} is a section; set one of its keys, e.g. {key}.{next(k for k in known if k.startswith(key + '.')).split('.', 1)[1]}", key=key)
        raise InputError(_unknown_key_message(key, known), key=key)
    if len(parts) == 1:
        d[key] = value
    else:
        d.setdefault(parts[0], {})[parts[1]] = value


def _unknown_key_message(key: str, known: list[str]) -> str:
    tail = key.split(".")[-1]
    if tail in SECTIONS:  # 'train.sparsity' -> the section's main key
        close = [k for k in known if k.startswith(tail + ".")][:1]
    else:
        close = [k for k in known if k.split(".")[-1] == tail][:1] or difflib.get_close_matches(key, known, n=1, cutoff=0.6)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    return f"unknown config key {key!r}{hint}"


def from_dict(d: dict) -> RunConfig:
    """Build and validate a RunConfig from nested dicts (TOML/JSON), rejecting unknown keys."""
    if not isinstance(d, dict):
        raise InputError("configuration must be a table of settings", key="")
    known = all_keys()
    kwargs: dict[str, Any] = {}
    for key, value in d.items():
        if key in SECTIONS:
            if not isinstance(value, dict):
                raise InputError(f"{key} must be a table of settings ([{key}]), got {value!r}", key=key)
            for sub in value:
                if f"{key}.{sub}" not in known:
                    raise InputError(_unknown_key_message(f"{key}.{sub}", known), key=f"{key}.{sub}")
            kwargs[key] = SECTIONS[key](**value)
        elif key in known:
            kwargs[key] = value
        else:
            raise InputError(_unknown_key_message(key, known), key=key)
    return RunConfig(**kwargs)


def parse_value(text: str) -> Any:
    """Parse a ``--set`` value as a TOML value (numbers, booleans, lists, quoted strings); bare text stays a string."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def parse_overrides(items: list[str]) -> dict[str, Any]:
    types = {k: v["type"] for k, v in _field_docs().items()}
    out: dict[str, Any] = {}
    for item in items:
        if "=" not in item:
            raise InputError(f"--set expects key=value, got {item!r}", key=item)
        key, _, value = item.partition("=")
        key, text = key.strip(), value.strip()
        parsed = parse_value(text)
        # a text setting takes bare text as typed: run ids are hex, and one such as 50258167 or
        # 12e45678 would otherwise parse as a number and be refused (parent=ID)
        if types.get(key) == "str" and not isinstance(parsed, str):
            parsed = text
        out[key] = parsed
    return out


def load_toml(path: str | Path) -> dict:
    p = Path(path)
    if not p.is_file():
        raise InputError(f"config file not found: {p}", key="config")
    try:
        return tomllib.loads(p.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise InputError(f"{p}: not a valid TOML file ({e})", key="config") from None


def load_config(path: str | Path | None, overrides: dict[str, Any] | None = None) -> RunConfig:
    """Read a TOML file (or start from defaults), apply dotted overrides, validate once at the end."""
    return config_from(load_toml(path) if path else {}, overrides)


def config_from(d: dict, overrides: dict[str, Any] | None = None) -> RunConfig:
    """``d`` (a config file's settings, left as it is) with dotted overrides applied, validated."""
    d = {k: dict(v) if isinstance(v, dict) else v for k, v in d.items()}  # its tables copied before changes
    for key, value in (overrides or {}).items():
        _set_dotted(d, key, value)
    return from_dict(d)
