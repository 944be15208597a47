"""Hand a trained model to the Hugging Face ecosystem: a folder that ``GPT2LMHeadModel.from_pretrained``
and ``AutoTokenizer.from_pretrained`` load offline, plus a model card.

Our GPT is GPT-2 up to layout: GPT-2 keeps its projections in ``Conv1D`` (weight stored [in, out], the
transpose of nn.Linear) and fuses q, k, v into one ``c_attn``. Our MLP uses the exact (erf) GELU, which
is transformers' ``"gelu"``; ``"gelu_new"`` (tanh) would drift by ~1e-3 in the logits. Sparse weights are
written as dense tensors holding their zeros: transformers has no sparse format, and the card says so.

The llama family (llama, qwen2) goes to ``LlamaForCausalLM`` / ``Qwen2ForCausalLM``, whose layout is ours
up to names (engine.publish.hf_llama); biogpt to ``BioGptForCausalLM``, likewise (engine.publish.hf_biogpt),
with an imported BioGPT's own tokenizer files (vocab.json, merges.txt) as it shipped them.

transformers itself is not needed to export (config.json is written by hand); ``verify_export`` uses it
when installed.
"""
from __future__ import annotations

import json
import math
import os
import shutil
import stat
from pathlib import Path
from typing import Any

import torch

from engine import __version__
from engine.core import registry
from engine.core.config import RunConfig, from_dict
from engine.core.errors import InputError
from engine.store.queries import lineage, summary_row
from engine.publish import hf_biogpt, hf_llama
from engine.publish.run_export import check_target, file_kind, write_atomic
from engine.store.rundb import PROMPT_ARTIFACT, RunDB
from engine.data.biogpt_tokenizer import BioGptTokens
from engine.data.role_tokenizer import RoleTokens
from engine.data.vocab import EOT, PAD, TOKENIZER_FILE, load_tokenizer, special_ids
from engine.model.checkpoint import load_checkpoint
from engine.model.classifier import LAST, MEAN, head_from_state
from engine.model.runs import model_source, resolve_run, tokenizer_path
from engine.model.soft_prompt import TENSOR
from engine.tasks import get_task
from engine.tasks.base import WINDOW_STRIDE

SPARSE_SUFFIXES = ("attn.q.weight", "attn.k.weight", "attn.v.weight", "attn.out.weight", "mlp.fc.weight", "mlp.proj.weight")
PROMPT_FILE = "soft_prompt.safetensors"
ADAPTER_DIR = "prompt_adapter"  # a PEFT prompt-tuning adapter for the model in the folder above it
PROMPT_KEYS = (TENSOR, "soft_prompt", "prompt_embeddings", "embeddings", "weight")  # where a file may hold a prompt
REPORT_PROMPT = "prompt"  # the report's field describing the exported soft prompt (None without one)
REPORT_HEAD = "head"  # the report's field describing the run's classification head, not exported (None without one)


# -- weights --------------------------------------------------------------------------------------


def _strip_prefix(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A fine-tuned model may sit inside a wrapper (``model.wte.weight``): find the GPT by its embedding."""
    hits = [k for k in state if k.endswith("wte.weight")]
    if not hits:
        raise InputError("checkpoint has no token embedding (wte.weight); is it a GPT checkpoint?")
    prefix = min(hits, key=len)[: -len("wte.weight")]
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)} if prefix else dict(state)


def _masked_cpu(state: dict[str, torch.Tensor], masks: dict | None) -> dict[str, torch.Tensor]:
    """The GPT's tensors on the CPU, masked weights multiplied by their masks (zero already; enforced for the export)."""
    src = {k: v.detach().to("cpu") for k, v in _strip_prefix(state).items()}
    for name, mask in (masks or {}).items():
        key = f"{name}.weight"
        if key in src:
            src[key] = src[key] * mask.to(src[key].dtype)
    return src


def gpt2_state_dict(state: dict[str, torch.Tensor], cfg: RunConfig, masks: dict | None = None
                    ) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Our state dict -> GPT-2's tensor names and layout; also the names we could not place."""
    src = _masked_cpu(state, masks)
    d = cfg.model.d_model
    used: set[str] = set()

    def take(key: str) -> torch.Tensor:
        used.add(key)
        return src[key]

    def bias(key: str, n: int) -> torch.Tensor:
        # bias=False models: GPT-2 always has biases, zeros are the exact equivalent
        return take(key) if key in src else torch.zeros(n, dtype=src["wte.weight"].dtype)

    out: dict[str, torch.Tensor] = {
        "transformer.wte.weight": take("wte.weight"),
        "transformer.wpe.weight": take("wpe.weight"),
        "transformer.ln_f.weight": take("ln_f.weight"),
        "transformer.ln_f.bias": bias("ln_f.bias", d),
    }
    for i in range(cfg.model.n_layer):
        b, h = f"blocks.{i}.", f"transformer.h.{i}."
        out[h + "ln_1.weight"] = take(b + "ln1.weight")
        out[h + "ln_1.bias"] = bias(b + "ln1.bias", d)
        out[h + "ln_2.weight"] = take(b + "ln2.weight")
        out[h + "ln_2.bias"] = bias(b + "ln2.bias", d)
        qkv = torch.cat([take(b + f"attn.{p}.weight") for p in "qkv"], dim=0)        # [3d, d] (out, in)
        out[h + "attn.c_attn.weight"] = qkv.t()                                       # Conv1D: [d, 3d]
        out[h + "attn.c_attn.bias"] = torch.cat([bias(b + f"attn.{p}.bias", d) for p in "qkv"])
        out[h + "attn.c_proj.weight"] = take(b + "attn.out.weight").t()              # [d, d]
        out[h + "attn.c_proj.bias"] = bias(b + "attn.out.bias", d)
        out[h + "mlp.c_fc.weight"] = take(b + "mlp.fc.weight").t()                   # [d, 4d]
        out[h + "mlp.c_fc.bias"] = bias(b + "mlp.fc.bias", 4 * d)
        out[h + "mlp.c_proj.weight"] = take(b + "mlp.proj.weight").t()               # [4d, d]
        out[h + "mlp.c_proj.bias"] = bias(b + "mlp.proj.bias", d)
    if "lm_head.weight" in src:
        if not torch.equal(src["lm_head.weight"], src["wte.weight"]):
            raise InputError("the LM head is not tied to the token embedding; GPT-2 export needs tied weights")
        used.add("lm_head.weight")  # tied: GPT-2 re-ties it on load, so it is not stored twice
    out = {k: v.contiguous() for k, v in out.items()}
    return out, sorted(set(src) - used)


def llama_state_dict(state: dict[str, torch.Tensor], cfg: RunConfig, masks: dict | None = None
                     ) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Our state dict -> transformers' llama/qwen2 names; also the names we could not place."""
    src = _masked_cpu(state, masks)
    m = cfg.model
    out = hf_llama.to_theirs(src, m.n_layer, m.family, m.tie_embeddings)
    used = hf_llama.our_names(m.n_layer, m.family, m.tie_embeddings) | {"lm_head.weight"}  # a tied head: the same tensor
    return out, sorted(set(src) - used)


def biogpt_state_dict(state: dict[str, torch.Tensor], cfg: RunConfig, masks: dict | None = None
                      ) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Our state dict -> transformers' BioGPT names; also the names we could not place."""
    src = _masked_cpu(state, masks)
    m = cfg.model
    out = hf_biogpt.to_theirs(src, m.n_layer, m.tie_embeddings)
    used = hf_biogpt.our_names(m.n_layer, m.tie_embeddings) | {"lm_head.weight"}  # a tied head: the same tensor
    return out, sorted(set(src) - used)


def hf_class(cfg: RunConfig) -> str:
    """The transformers class an export of this config loads in."""
    if cfg.model.family == hf_biogpt.MODEL_TYPE:
        return hf_biogpt.ARCHITECTURE
    return hf_llama.ARCHITECTURES.get(cfg.model.family, "GPT2LMHeadModel")


def gpt2_config(cfg: RunConfig, vocab_size: int, bos: int, eot: int, pad: int) -> dict:
    m = cfg.model
    return {
        "architectures": ["GPT2LMHeadModel"],
        "model_type": "gpt2",
        "vocab_size": vocab_size,
        "n_positions": m.max_positions,
        "n_embd": m.d_model,
        "n_layer": m.n_layer,
        "n_head": m.n_head,
        "n_inner": 4 * m.d_model,
        # exact erf GELU (torch.nn.functional.gelu), or the tanh form original GPT-2 uses
        "activation_function": "gelu_new" if m.activation == "gelu_tanh" else "gelu",
        "resid_pdrop": m.dropout,
        "embd_pdrop": m.dropout,
        "attn_pdrop": m.dropout,
        "layer_norm_epsilon": 1e-5,  # nn.LayerNorm's default
        "initializer_range": 0.02,
        "scale_attn_weights": True,
        "scale_attn_by_inverse_layer_idx": False,
        "reorder_and_upcast_attn": False,
        "tie_word_embeddings": True,
        "use_cache": True,
        "bos_token_id": bos,
        "eos_token_id": eot,
        "pad_token_id": pad,
        "dtype": "float32",
        "torch_dtype": "float32",
    }


# -- finding what to export -----------------------------------------------------------------------


def _source(db: RunDB, run_id: str) -> tuple[dict, dict, Path, Path]:
    """(run, the run whose weights are exported, their checkpoint, the tokenizer) — engine.model.runs."""
    ref = resolve_run(db, run_id, need_checkpoint=False)  # a prompt run may hold only its prompt artifact
    model_run, ck_path = model_source(db, ref)
    return ref.run, model_run, ck_path, tokenizer_path(db, model_run)


def _run_head(db: RunDB, run: dict, cfg: RunConfig, ck: dict) -> tuple[RunConfig, dict, int] | None:
    """The classification head the run trained, as (the config it trained under, its state, the step of
    the checkpoint holding it): a fine-tuning run's from ``ck``; a prompt run's from its own checkpoint
    (the one its model is taken from: the best evaluation's, else the newest; engine.model.runs),
    never from the parent's, which the prompt run did not use. None without one."""
    if run["stage"] != registry.PROMPT:
        return (cfg, ck["head"], int(ck.get("step") or 0)) if ck.get("head") else None
    own = resolve_run(db, run["id"], need_checkpoint=False).checkpoint
    if own is None:
        return None
    state = load_checkpoint(own)
    return (from_dict(state["config"]), state["head"], int(state.get("step") or 0)) if state.get("head") else None


def _prompt_tensor(db: RunDB, run: dict, d_model: int) -> tuple[torch.Tensor, str] | None:
    """The learned soft prompt [P, d] of a prompt run: its 'prompt' artifact, else its checkpoint."""
    candidates = [Path(a["path"]) for a in reversed(db.artifacts(run["id"], PROMPT_ARTIFACT))]
    ck = db.latest_checkpoint(run["id"])
    if ck:
        candidates.append(Path(ck["path"]))
    for path in candidates:
        if not path.is_file():
            continue
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            obj: Any = load_file(str(path))
        else:
            obj = torch.load(path, map_location="cpu", weights_only=True)  # data only: no code from a file
        t = _find_prompt(obj, d_model)
        if t is not None:
            return t, str(path)
    return None


def _find_prompt(obj: Any, d_model: int) -> torch.Tensor | None:
    if isinstance(obj, torch.Tensor):
        t = obj.detach().to("cpu")
        t = t.squeeze(0) if t.dim() == 3 and t.shape[0] == 1 else t
        return t if t.dim() == 2 and t.shape[1] == d_model else None
    if isinstance(obj, dict):
        for key in PROMPT_KEYS:
            if key in obj:
                t = _find_prompt(obj[key], d_model)
                if t is not None:
                    return t
        tensors = [v for v in obj.values() if isinstance(v, (torch.Tensor, dict))]
        if len(tensors) == 1:
            return _find_prompt(tensors[0], d_model)
    return None


# -- the export -------------------------------------------------------------------------------------


def export_hf(db: RunDB, run_id: str, out_dir: str | Path, overwrite: bool = False, license: str = "other",
              language: str = "en") -> dict:
    """Write config.json, model.safetensors, tokenizer files, generation_config.json and README.md.

    Returns a report (paths, exported tensors, skipped tensors, sparsity of the exported matrices).
    """
    from safetensors.torch import save_file

    run, model_run, ck_path, tok_path = _source(db, run_id)
    out = Path(out_dir)
    check_out_folder(out, overwrite)
    ck = load_checkpoint(ck_path)
    cfg = from_dict(ck["config"])
    tok = load_tokenizer(tok_path)
    vocab_size = int(ck.get("vocab_size") or tok.get_vocab_size())
    if tok.get_vocab_size() != vocab_size:
        raise InputError(f"tokenizer {tok_path} has {tok.get_vocab_size()} tokens, the checkpoint {vocab_size}")
    eot, pad = special_ids(tok)
    # an imported BioGPT's tokenizer (or a llama's with its own eos) has a bos token of its own; our
    # byte-level BPE starts nothing
    own = tok.specials if isinstance(tok, (BioGptTokens, RoleTokens)) else {}
    bos = tok.token_to_id(own["bos_token"]) if own.get("bos_token") else eot

    if cfg.model.family == "gpt2":
        tensors, skipped = gpt2_state_dict(ck["model"], cfg, ck.get("masks"))
        hf_cfg = gpt2_config(cfg, vocab_size, bos, eot, pad)
    elif cfg.model.family == hf_biogpt.MODEL_TYPE:
        tensors, skipped = biogpt_state_dict(ck["model"], cfg, ck.get("masks"))
        hf_cfg = hf_biogpt.hf_config(cfg.model, vocab_size, bos, eot, pad)
    else:
        tensors, skipped = llama_state_dict(ck["model"], cfg, ck.get("masks"))
        hf_cfg = hf_llama.hf_config(cfg.model, vocab_size, bos, eot, pad)
    out.mkdir(parents=True, exist_ok=True)
    _place(out, "model.safetensors", lambda tmp: save_file(tensors, str(tmp), metadata={"format": "pt"}))
    _write_json(out / "config.json", hf_cfg)
    _write_json(out / "generation_config.json", {"bos_token_id": bos, "eos_token_id": eot, "pad_token_id": pad})
    write_tokenizer(out, tok, tok_path, cfg.model.max_positions)

    prompt_info = None
    if run["stage"] == registry.PROMPT:
        found = _prompt_tensor(db, run, cfg.model.d_model)
        if found is None:
            raise InputError(f"prompt run {run['id']} has no soft prompt (no 'prompt' artifact with a [P, {cfg.model.d_model}] tensor)")
        prompt, src = found
        _place(out, PROMPT_FILE, lambda tmp: save_file({"prompt_embeddings": prompt.contiguous()}, str(tmp),
                  metadata={"format": "pt", "run_id": run["id"], "n_tokens": str(prompt.shape[0])}))
        prompt_info = {"file": PROMPT_FILE, "n_tokens": int(prompt.shape[0]), "source": src,
                       "adapter": write_prompt_adapter(out / ADAPTER_DIR, prompt, cfg)}

    sparsity = _exported_sparsity(tensors)
    head = _run_head(db, run, cfg, ck)
    card = model_card(db, run, model_run, cfg, ck, tensors, skipped, sparsity, prompt_info,
                      {"license": license, "language": [x.strip() for x in language.split(",") if x.strip()]}, head=head,
                      biogpt_tokens=isinstance(tok, BioGptTokens),
                      own_eos=tok.specials["eos_token"] if isinstance(tok, RoleTokens) else None)
    _place(out, "README.md", lambda tmp: tmp.write_text(card, encoding="utf-8"))
    head_info = None
    if head is not None:  # described in the card, not exported (head_section says why)
        h = head_from_state(head[1])
        head_info = {"exported": False, "pooling": h.pooling, "classes": h.proj.out_features, "step": head[2]}
    return {"run_id": run["id"], "model_run": model_run["id"], "checkpoint": str(ck_path), "out": str(out),
            "tensors": len(tensors), "skipped": skipped, "sparsity": sparsity, REPORT_PROMPT: prompt_info,
            REPORT_HEAD: head_info, "files": sorted(p.name for p in out.iterdir())}


def write_tokenizer(out: Path, tok, tok_path: Path, max_positions: int) -> None:
    """The run's tokenizer files: our byte-level BPE (or an imported model's own tokenizer.json, with its
    own special tokens) for the generic fast tokenizer, or an imported BioGPT's vocab.json and merges.txt,
    as it shipped them, for BioGptTokenizer."""
    if isinstance(tok, BioGptTokens):
        for name, text in tok.files().items():
            _place(out, name, lambda tmp, text=text: tmp.write_text(text, encoding="utf-8"))
        specials = dict(tok.specials)
        _write_json(out / "tokenizer_config.json", {"tokenizer_class": "BioGptTokenizer", **specials,
                                                    "model_max_length": max_positions})
        _write_json(out / "special_tokens_map.json", specials)
        return
    if isinstance(tok, RoleTokens):  # the model's own tokenizer.json, not the run's file that wraps it
        specials = dict(tok.specials)
        _place(out, TOKENIZER_FILE, lambda tmp: tmp.write_text(tok.shipped(), encoding="utf-8"))
    else:
        specials = {"bos_token": EOT, "eos_token": EOT, "unk_token": EOT}
        _place(out, TOKENIZER_FILE, lambda tmp: shutil.copyfile(tok_path, tmp))
    specials["pad_token"] = PAD
    _write_json(out / "tokenizer_config.json", {
        # the generic fast tokenizer reads tokenizer.json as is: same pre-tokenizer, merges and specials
        "tokenizer_class": "PreTrainedTokenizerFast", **specials,
        "model_max_length": max_positions,
        "clean_up_tokenization_spaces": False,
    })
    _write_json(out / "special_tokens_map.json", specials)


def write_prompt_adapter(folder: Path, prompt: torch.Tensor, cfg: RunConfig) -> str:
    """The soft prompt as a PEFT prompt-tuning adapter: ``PeftModel.from_pretrained(base, folder)``
    puts the same vectors in front of the token embeddings, at positions 0..P-1, as training did.
    Its own folder, so transformers does not take the base folder for an adapter."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    config = {
        "peft_type": "PROMPT_TUNING", "task_type": "CAUSAL_LM", "num_virtual_tokens": int(prompt.shape[0]),
        "token_dim": cfg.model.d_model, "num_transformer_submodules": 1, "num_attention_heads": cfg.model.n_head,
        "num_layers": cfg.model.n_layer, "prompt_tuning_init": "RANDOM", "prompt_tuning_init_text": None,
        "tokenizer_name_or_path": None, "base_model_name_or_path": "..", "inference_mode": True,
        "revision": None, "modules_to_save": None,
    }
    _write_json(folder / "adapter_config.json", config)
    _place(folder, "adapter_model.safetensors",
           lambda tmp: save_file({"prompt_embeddings": prompt.contiguous().float()}, str(tmp), metadata={"format": "pt"}))
    return ADAPTER_DIR


EXPORT_FILES = ("model.safetensors", "config.json", "generation_config.json", TOKENIZER_FILE, "tokenizer_config.json",
                "special_tokens_map.json", "README.md", PROMPT_FILE, "vocab.json", "merges.txt")
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")


def check_out_folder(out: Path, overwrite: bool) -> None:
    """``--out`` may receive an export, checked before anything is read or written: absent, or a folder
    (empty, or any with ``overwrite``) where each file the export writes is absent or a regular file (a
    symlink to one is replaced, never written through) and the adapter folder is a real folder. A file,
    device, FIFO or socket as ``--out``, or a special file or folder in an export file's place (or a
    symlink to one), is InputError whatever ``overwrite`` says."""
    try:
        mode = os.stat(out).st_mode
    except FileNotFoundError:
        if os.path.lexists(out):
            raise InputError(f"{out} is a symlink to nothing: give a folder to write", key="out", path=str(out)) from None
        return
    except OSError as e:
        raise InputError(f"{out}: cannot use it as the export folder ({e.strerror})", key="out", path=str(out)) from None
    if not stat.S_ISDIR(mode):
        what = "regular file" if stat.S_ISREG(mode) else file_kind(mode)
        raise InputError(f"{out} is a {what}, not a folder: export-hf writes a folder of files there", key="out",
                         path=str(out))
    try:
        empty = not any(out.iterdir())
    except OSError as e:
        raise InputError(f"{out}: cannot read the export folder ({e.strerror})", key="out", path=str(out)) from None
    if not empty and not overwrite:
        raise InputError(f"{out} exists and is not empty (use --overwrite to replace its files)", key="out", path=str(out))
    for name in EXPORT_FILES:
        check_target(out / name, True)
    adapter = out / ADAPTER_DIR
    if os.path.lexists(adapter):
        if adapter.is_symlink() or not adapter.is_dir():
            raise InputError(f"{adapter} is not a folder of its own (a file or a symlink): an export never writes "
                             f"through it", key="out", path=str(adapter))
        for name in ADAPTER_FILES:
            check_target(adapter / name, True)


def _place(out: Path, name: str, write) -> None:
    """Write one export file: to a fresh temporary file inside ``out``, then renamed over ``out/name``.
    A rename replaces a symlink itself, so an export never writes through a link to somewhere else; a
    special file or folder in its place is refused (run_export.write_atomic)."""
    write_atomic(out / name, write, overwrite=True)


def _write_json(path: Path, obj: dict) -> None:
    _place(path.parent, path.name, lambda tmp: tmp.write_text(json.dumps(obj, indent=2) + "\n", encoding="utf-8"))


def _exported_sparsity(tensors: dict[str, torch.Tensor]) -> dict:
    """Zeros in the exported attention and MLP matrices, counted from the tensors written."""
    zeros = total = 0
    for k, t in tensors.items():
        if k.endswith(("c_attn.weight", "attn.c_proj.weight", "c_fc.weight", "mlp.c_proj.weight", ".fc1.weight",
                       ".fc2.weight")) or (k.endswith("_proj.weight") and (".self_attn." in k or ".mlp." in k)):
            zeros += int((t == 0).sum())
            total += t.numel()
    all_params = sum(t.numel() for t in tensors.values())
    nonzero = sum(int(torch.count_nonzero(t)) for t in tensors.values())
    return {"matrices": zeros / total if total else 0.0, "params_total": all_params, "params_nonzero": nonzero}


# -- model card -------------------------------------------------------------------------------------


def _fmt(v: Any) -> str:
    if v is None:
        return "–"
    if isinstance(v, float):
        if not math.isfinite(v):
            return str(v)
        return f"{v:.4g}" if abs(v) < 1e5 else f"{v:.3e}"
    if isinstance(v, int):
        return f"{v:,}"
    return str(v)


# Hub dataset ids of the tasks the studio trains on (for the card's ``datasets`` and ``model-index``)
TASK_DATASETS = {registry.PUBMEDQA: ("qiaojin/PubMedQA", "PubMedQA (PQA-L)"),
                 registry.HOC: ("bigbio/hallmarks_of_cancer", "HoC")}
# the card's metrics per task: (our metric, the Hub's metric type)
HEADLINE = {registry.PUBMEDQA: (("accuracy", "accuracy"), ("macro_f1", "f1")), registry.HOC: (("micro_f1", "f1"),),
            registry.LM: (("loss", "loss"), ("perplexity", "perplexity"))}


def _on_corpus(stage: str, task: str | None) -> bool:
    """Whether a run trained on corpus text (a vocabulary, a pre-training, a fine-tune on the LM task)
    rather than on a labelled task's files."""
    spec = registry.TASKS.get(task or "")
    return stage in registry.CORPUS_STAGES or (spec is not None and not spec.labelled)


def card_metadata(db: RunDB, run: dict, chain: list[dict], title: str, options: dict) -> dict:
    """The Hub's model-card metadata: license, language, datasets, and a ``model-index`` with the run's
    latest evaluation of each task (its split named as stored)."""
    datasets: list[str] = []
    for r in chain:
        c = r.get("config") or {}
        task = (c.get("task") or {}).get("name")
        if task in TASK_DATASETS:
            datasets.append(TASK_DATASETS[task][0])
        elif _on_corpus(r["stage"], task):
            # local files: named as the user has them (the Hub has no id for them)
            datasets += [s if s.startswith("builtin:") else Path(s).name for s in (c.get("data") or {}).get("corpus", [])]
    latest: dict[tuple[str, str], dict] = {}
    for e in db.evaluations(run["id"]):
        latest[(e["task"], e["split"])] = e
    results = []
    for (task, split), e in latest.items():
        hub, name = TASK_DATASETS.get(task, ("text", "validation text"))
        metrics = [{"type": kind, "name": f"{split} {key}", "value": round(float(e["metrics"][key]), 6)}
                   for key, kind in HEADLINE.get(task, ()) if isinstance(e["metrics"].get(key), (int, float))]
        if metrics:
            results.append({"task": {"type": "text-generation" if task == registry.LM else "text-classification"},
                            "dataset": {"type": hub, "name": name, "split": split}, "metrics": metrics})
    return {"license": options.get("license") or "other", "language": options.get("language") or ["en"],
            "datasets": list(dict.fromkeys(datasets)),
            "model-index": [{"name": title, "results": results}]}


def model_card(db: RunDB, run: dict, model_run: dict, cfg: RunConfig, ck: dict, tensors: dict,
               skipped: list[str], sparsity: dict, prompt_info: dict | None, options: dict | None = None,
               head: tuple[RunConfig, dict, int] | None = None, biogpt_tokens: bool = False,
               own_eos: str | None = None) -> str:
    """The README.md of an export. ``head``: the run's classification head (``_run_head``), described
    and not exported; without it, the head in ``ck`` if any. ``biogpt_tokens``: the run's tokenizer is
    an imported BioGPT's Moses + BPE (engine.data.biogpt_tokenizer), not our byte-level BPE.
    ``own_eos``: the run's tokenizer is an imported model's own, this token ending documents
    (engine.data.role_tokenizer)."""
    chain = lineage(db, model_run["id"]) + ([run] if run is not model_run else [])
    m = cfg.model
    cls = hf_class(cfg)
    title = run.get("name") or run["id"]
    meta = card_metadata(db, run, chain, title, options or {})
    if biogpt_tokens:
        vocab = "(BioGPT's Moses + BPE, `</s>` ending each document, `<pad>`)"
    elif own_eos:
        vocab = f"(the imported model's own tokenizer, `{own_eos}` ending each document, `{PAD}`)"
    else:
        vocab = f"(byte-level BPE with `{EOT}` and `{PAD}`)"
    if m.family == "gpt2":
        style = "A GPT-2-style"
        shape = "- pre-LayerNorm blocks, learned positions, exact (erf) GELU (`activation_function: gelu`), tied input/output embeddings"
    elif m.family == hf_biogpt.MODEL_TYPE:
        style = "A BioGPT-style"
        act = "tanh GELU (`hidden_act: gelu_pytorch_tanh`)" if m.activation == "gelu_tanh" else "exact (erf) GELU"
        shape = (f"- pre-LayerNorm blocks with biases, learned positions (table offset by 2 rows, as BioGPT's), {act} "
                 f"MLP of width {m.inner}, token embeddings {'scaled by sqrt(d_model)' if m.scale_embedding else 'unscaled'}, "
                 f"{'tied' if m.tie_embeddings else 'untied'} input/output embeddings")
    else:
        style = f"A {m.family}-family"
        scaled = "" if m.rope_scaling == "none" else f", {m.rope_scaling} scaling by {m.rope_factor:g}"
        shape = (f"- pre-RMSNorm blocks, rotary positions (theta {m.rope_theta:g}{scaled}), SwiGLU MLP of width {m.inner}, "
                 f"{m.kv_heads} key-value heads, {'q/k/v biases, ' if m.family == 'qwen2' else ''}"
                 f"{'tied' if m.tie_embeddings else 'untied'} input/output embeddings")
    lines = [
        "---",
        "library_name: transformers",
        "pipeline_tag: text-generation",
        f"tags: [{m.family}, mediswift, sparse-pretraining, biomedical]",
        # JSON is YAML's flow style: each value quoted exactly, whatever its characters
        *(f"{k}: {json.dumps(v)}" for k, v in meta.items()),
        "---",
        "",
        f"# {title} ({run['id']})",
        "",
        f"{style} causal language model trained with MediSwift Studio {__version__} "
        f"(stage **{run['stage']}**, status {run['status']}). Exported from checkpoint step {ck.get('step')} "
        f"of run `{model_run['id']}`.",
        "",
        "## Architecture",
        "",
        f"- {m.n_layer} layer{'s' if m.n_layer != 1 else ''}, width {m.d_model}, {m.n_head} heads, context {m.max_positions} tokens, "
        f"vocabulary {ck.get('vocab_size')} {vocab}",
        f"- {sparsity['params_total']:,} parameters, {sparsity['params_nonzero']:,} nonzero",
        shape,
        "",
        "## Sparsity",
        "",
    ]
    if sparsity["matrices"] > 0:
        lines += [
            f"{sparsity['matrices']:.1%} of the attention (q, k, v, output) and MLP weights are exactly zero "
            f"(configured: {cfg.sparsity.level:.0%}, {cfg.sparsity.distribution}).",
            "",
            "**The weights are stored as dense tensors that contain these zeros.** transformers has no sparse "
            "format, so this model runs at dense speed and size; the masks are not part of the export. "
            "Fine-tuning it with transformers trains the zero weights too (as MediSwift's dense fine-tuning does).",
        ]
    else:
        lines.append("The exported weights are dense (no zero-masked matrices).")
    lines += ["", "## Training data", ""]
    for r in chain:
        c = r.get("config") or {}
        data, task = c.get("data") or {}, c.get("task") or {}
        meta = r.get("meta") or {}
        if _on_corpus(r["stage"], task.get("name")):
            corpus = ", ".join(f"`{s}`" for s in data.get("corpus", []))
            extra = f", at most {data['max_documents']:,} documents" if data.get("max_documents") else ""
            toks = f"; {meta['train_tokens']:,} training / {meta.get('val_tokens', 0):,} validation tokens" if meta.get("train_tokens") else ""
            lines.append(f"- `{r['id']}` ({r['stage']}): {corpus}{extra}{toks}")
        else:
            lines.append(f"- `{r['id']}` ({r['stage']}): task {task.get('name')}, train `{task.get('train') or '-'}`, "
                         f"dev `{task.get('dev') or '-'}`")
    lines += ["", "## Stages and lineage (root first)", "",
              "| run | name | stage | status | steps | tokens | FLOPs spent | dense-equivalent FLOPs | wall time (s) | sparsity |",
              "|---|---|---|---|---|---|---|---|---|---|"]
    spent = dense = 0.0
    for r in chain:
        s = summary_row(db, r)
        spent += s["flops"] or 0.0
        dense += s["flops_dense"] or 0.0
        steps = (r.get("summary") or {}).get("step")
        lines.append(f"| `{r['id']}` | {r.get('name') or ''} | {r['stage']} | {r['status']} | {_fmt(steps)} | {_fmt(s['tokens'])} | "
                     f"{_fmt(s['flops'])} | {_fmt(s['flops_dense'])} | {_fmt(s['wall_time'])} | {_fmt(s['sparsity'])} |")
    lines += ["", "## Training FLOPs", ""]
    if spent:
        lines.append(f"All stages together: {spent:.3e} FLOPs spent on nonzero weights vs {dense:.3e} for the same model "
                     f"dense ({dense / spent:.2f}x). Counted as 3 × forward FLOPs per token (MediSwift's formula); "
                     "wall time is measured separately.")
    else:
        lines.append("No FLOP counters recorded.")
    lines += ["", "## Evaluation", ""]
    evals = [(r["id"], e) for r in chain for e in db.evaluations(r["id"])]
    if evals:
        lines += ["| run | step | task | split | scores |", "|---|---|---|---|---|"]
        for rid, e in evals[-30:]:  # the card stays readable for long runs: latest evaluations only
            # numbers only: per-class and per-answer tables (f1_per_class, predicted, content_free) stay in the database
            scores = ", ".join(f"{k} {_fmt(v)}" for k, v in e["metrics"].items() if not isinstance(v, (dict, list)))
            lines.append(f"| `{rid}` | {e['step']} | {e['task']} | {e['split']} | {scores} |")
        lines += baselines_section(evals)
    else:
        lines.append("No evaluations recorded.")
    lines += [
        "", "## Use", "", "```python",
        f"from transformers import AutoTokenizer, {cls}",
        "tok = AutoTokenizer.from_pretrained(\"PATH\")",
        f"model = {cls}.from_pretrained(\"PATH\")",
        "ids = tok(\"Abnormality of the\", return_tensors=\"pt\").input_ids",
        "print(tok.decode(model.generate(ids, max_new_tokens=20)[0]))",
        "```",
    ]
    if biogpt_tokens:
        lines += ["", "BioGptTokenizer (Moses + BPE; it needs the `sacremoses` package) puts `</s>` in front of a "
                  "text, as BioGPT was trained: documents were separated by `</s>`, batches padded with `<pad>`."]
    elif own_eos:
        lines += ["", "The tokenizer is the imported model's own, as it shipped. MediSwift's stages add no BOS token: "
                  f"documents are separated by its end-of-text token `{own_eos}`, batches padded with `{PAD}`."]
    else:
        lines += ["", "The tokenizer adds no BOS token (as in training): documents are separated by "
                  f"`{EOT}`, batches padded with `{PAD}`."]
    if prompt_info:
        lines += [
            "", "## Soft prompt", "",
            f"This run learned {prompt_info['n_tokens']} virtual-token embeddings on a frozen model; they are in "
            f"`{prompt_info['file']}` (tensor `prompt_embeddings`, shape [{prompt_info['n_tokens']}, {m.d_model}]). "
            "The model weights above are those of the parent run. Put the prompt in front of the token embeddings:",
            "", "```python", "from safetensors.torch import load_file",
            f"prompt = load_file(\"PATH/{prompt_info['file']}\")[\"prompt_embeddings\"]",
            "emb = model.get_input_embeddings()(ids)                # [1, T, d]",
            "x = torch.cat([prompt[None].to(emb.dtype), emb], 1)    # [1, P+T, d]",
            "logits = model(inputs_embeds=x).logits[:, prompt.shape[0]:]",
            "```",
            "", "Positions count the prompt tokens too (prompt at positions 0..P-1), as in training.",
            "", f"The same prompt as a PEFT prompt-tuning adapter is in `{ADAPTER_DIR}/`:",
            "", "```python", "from peft import PeftModel",
            f"model = PeftModel.from_pretrained({cls}.from_pretrained(\"PATH\"), \"PATH/{ADAPTER_DIR}\")",
            "logits = model(input_ids=ids).logits[:, model.peft_config['default'].num_virtual_tokens:]",
            "```",
        ]
    if skipped:
        lines += ["", "## Not exported", "",
                  f"These checkpoint tensors have no place in {cls} (e.g. a classification head): "
                  + ", ".join(f"`{k}`" for k in skipped)]
    if head is None and ck.get("head") and run["stage"] != registry.PROMPT:
        head = (cfg, ck["head"], int(ck.get("step") or 0))
    if head is not None:
        lines += head_section(head[0], head[1], prompt_run=run["stage"] == registry.PROMPT, step=head[2])
    lines += ["", "## Training configuration", "", "```toml", cfg.to_toml().rstrip(), "```", ""]
    return "\n".join(lines)


def baselines_section(evals: list[tuple[str, dict]]) -> list[str]:
    """The model's headline figure beside each baseline of the same evaluation (the latest one per run,
    task and split): what a trivial or bag-of-words model scores on the same data."""
    latest: dict[tuple, tuple[str, dict]] = {}
    for rid, e in evals:
        if e.get("baselines"):
            latest[(rid, e["task"], e["split"])] = (rid, e)
    if not latest:
        return []
    names = list(dict.fromkeys(b for _, e in latest.values() for b in e["baselines"]))
    lines = ["", "### Baselines", "",
             "Each evaluation is stored with its baselines, scored on the same examples: `majority` (the most "
             "frequent training label), `tfidf_lr` (TF-IDF over word 1-2-grams + logistic regression, fitted on "
             "the run's training split), `zero_shot` (the parent model before this run). A model below the TF-IDF "
             "baseline has not learned what a bag of words finds.", "",
             "| run | step | task | split | metric | model | " + " | ".join(names) + " |",
             "|---|---|---|---|---|---|" + "---|" * len(names)]
    for rid, e in latest.values():
        key = registry.task(e["task"]).headline[0] if e["task"] in registry.TASKS else "loss"
        cells = []
        for b in names:
            bm = e["baselines"].get(b) or {}
            cells.append(_fmt(bm.get(key)) if key in bm else ("skipped" if "skipped" in bm else "–"))
        lines.append(f"| `{rid}` | {e['step']} | {e['task']} | {e['split']} | {key} | {_fmt(e['metrics'].get(key))} | "
                     + " | ".join(cells) + " |")
    return lines


def head_section(cfg: RunConfig, state: dict, prompt_run: bool = False, step: int | None = None) -> list[str]:
    """What the run's classification head reads and how it decides (its decision thresholds per label),
    and why it is not exported. ``prompt_run``: the head trained with a soft prompt on the frozen parent,
    in the prompt run's checkpoint of ``step``."""
    head = head_from_state(state)
    classes = None
    if cfg.task.name in registry.TASKS and registry.task(cfg.task.name).labelled:
        task = get_task(cfg.task.name)
        classes = task.CLASSES if len(task.CLASSES) == head.proj.out_features else None
        multi = task.MULTI_LABEL
    else:
        multi = False
    lines = ["", "## Classification head: not exported, and why", ""]
    if head.pooling == LAST:
        lines.append("This run trained a classification head (`task.head = \"classifier\"`) of an earlier version: a "
                     "linear layer with a bias over the hidden state of the last prompt token, predicting a label "
                     "where its probability exceeds 0.5.")
    elif prompt_run:
        lines.append(f"This prompt run trained a classification head together with its soft prompt, the parent model "
                     f"frozen (`task.head = \"classifier\"`, `task.pooling = \"{head.pooling}\"`): the model reads the "
                     "soft prompt followed by the text, and the final hidden states of the text's tokens are pooled "
                     f"({'by their mean' if head.pooling == MEAN else 'by learned attention weights'}; the soft prompt's "
                     "own positions are not pooled: under causal attention they see only the prompt, the same for "
                     "every input); a document "
                     f"longer than the context window (less the prompt) is read in overlapping windows (each starting "
                     f"{WINDOW_STRIDE:g} of a window's text after the one before), each behind the prompt, whose pooled "
                     "vectors are averaged; a linear layer with a bias gives one logit per class.")
    else:
        lines.append(f"This run trained a classification head (`task.head = \"classifier\"`, `task.pooling = "
                     f"\"{head.pooling}\"`): the final hidden states of every input token are pooled "
                     f"({'by their mean' if head.pooling == MEAN else 'by learned attention weights'}); a document "
                     f"longer than the context window is read in overlapping windows (each starting {WINDOW_STRIDE:g} of a "
                     "window's text after the one before) whose pooled vectors are averaged; a linear layer with a bias gives "
                     "one logit per class.")
    if multi and classes:
        probs = torch.sigmoid(head.thresholds.float()).tolist()
        lines += ["", "A label is predicted where its probability exceeds its own threshold, tuned on the "
                  "development data (the cut that maximizes that label's F1):", "",
                  "| label | threshold (probability) | threshold (logit) |", "|---|---|---|"]
        lines += [f"| {c} | {p:.4f} | {float(t):.4f} |" for c, p, t in zip(classes, probs, head.thresholds.tolist())]
    elif classes:
        lines.append("")
        lines.append("The class with the highest logit is predicted (" + ", ".join(classes) + ").")
    lines += ["", "transformers' GPT2ForSequenceClassification scores the last non-padding token through a `score` "
              "layer without a bias, so no exact equivalent exists there; the head stays in the run's checkpoint "
              f"(`head`{f', step {step}' if step is not None else ''}) and `mediswift eval` scores with it, "
              "thresholds included."]
    if prompt_run:
        lines += ["", f"The soft prompt above (`{PROMPT_FILE}`, `{ADAPTER_DIR}/`) is exported as a PEFT prompt-tuning "
                  "adapter for a causal LM: with GPT2LMHeadModel it gives the language model's next-token logits with "
                  "the prompt in front, not this head's predictions. PEFT's prompt tuning has no place for a pooled "
                  "head with a bias and per-label thresholds, and the prompt was trained for the head, not for the "
                  "LM head's logits. `mediswift eval` on this run scores the parent model + the prompt + the head."]
    return lines


# -- verification (needs transformers) ---------------------------------------------------------------


@torch.no_grad()
def verify_export(db: RunDB, run_id: str, out_dir: str | Path, text: str = "Abnormality of the heart.") -> dict:
    """Load the export with transformers (offline) and compare logits and tokenization with the engine."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from engine.model.gpt import GPT
    from engine.model.sparsity import load_masks

    _, model_run, ck_path, tok_path = _source(db, run_id)
    ck = load_checkpoint(ck_path)
    cfg = from_dict(ck["config"])
    ours = GPT(cfg.model, ck["vocab_size"])
    load_masks(ours, ck.get("masks") or {})
    ours.load_state_dict(_strip_prefix(ck["model"]), strict=False)
    ours.eval()
    tok = load_tokenizer(tok_path)
    hf_tok = AutoTokenizer.from_pretrained(str(out_dir))
    hf = AutoModelForCausalLM.from_pretrained(str(out_dir)).eval()  # the class config.json names
    ids = tok.encode(text).ids[: cfg.model.max_positions]
    hf_ids = hf_tok(text)["input_ids"][: cfg.model.max_positions]
    x = torch.tensor([ids])
    a = ours(x)[0]
    b = hf(x).logits
    return {"same_tokens": ids == hf_ids, "max_abs_diff": float((a - b).abs().max()), "n_tokens": len(ids)}
