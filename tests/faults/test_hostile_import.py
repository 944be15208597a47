"""import-hf against hostile model folders: each one is a small valid GPT-2 folder (transformers'
save_pretrained plus a byte-level BPE tokenizer) with one thing broken. Every case must end with exit 2
and one line naming the file and the problem, no traceback, no run row and no run folder, and nothing
allocated for what the folder merely claims. Most cases go through the CLI's own entry point in this
process (engine.cli.main: the same code path, without a process start per case); a handful run the real
CLI in subprocesses, started together, the n_embd 65536 one among them. Each case is recorded in the
fault tally (tests/faults/conftest.py). Valid variants (sharded, .bin, fp16, vocab.json + merges.txt,
no <|pad|>, a hub cache snapshot, the hub's old layout with mask buffers) still import."""
from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import REPO, engine_env

from engine.store.rundb import RunDB

CATEGORY = "import-hf hostile folders"
VALID = "import-hf valid folders still import"
TEXT = ("Abnormality of the cardiovascular system. A patient, 3.5 mg/kg daily; the heart's left ventricle was "
        "enlarged, with mitral regurgitation and atrial fibrillation noted on the electrocardiogram. ") * 40


# -- the valid folder ----------------------------------------------------------------------------------


VARIANTS: dict[str, Path] = {}  # the sharded save and the vocab.json + merges.txt pair, beside the base folder


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    """A 1-layer GPT-2 of width 32 saved by transformers, with a byte-level BPE tokenizer.json whose
    <|pad|> is its last token (as a GPT-2 tokenizer gets it); the sharded save and vocab.json + merges.txt
    beside it (VARIANTS)."""
    os.environ["HF_HUB_OFFLINE"] = "1"
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import GPT2Config, GPT2LMHeadModel
    from transformers.utils import logging as hf_logging

    from engine.data.vocab import EOT, PAD

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    root = tmp_path_factory.mktemp("hostile")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator([TEXT], trainer=trainers.BpeTrainer(
        vocab_size=300, min_frequency=1, special_tokens=[EOT], initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False))
    (root / "bpe").mkdir()
    tok.model.save(str(root / "bpe"))  # vocab.json, merges.txt: GPT-2's pair, without <|pad|>
    tok.add_special_tokens([PAD])
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, n_positions=64,
                                       vocab_size=tok.get_vocab_size(), bos_token_id=0, eos_token_id=0))
    folder = root / "base"
    model.save_pretrained(folder)
    tok.save(str(folder / "tokenizer.json"))
    model.save_pretrained(root / "sharded", max_shard_size="30KB")
    tok.save(str(root / "sharded" / "tokenizer.json"))
    VARIANTS.update(sharded=root / "sharded", bpe=root / "bpe")
    return folder


def _header(path: Path) -> tuple[dict, bytes]:
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8:8 + n]), raw[8 + n:]


def _write_st(path: Path, header: dict, data: bytes, raw_header: bytes | None = None) -> None:
    h = raw_header if raw_header is not None else json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(h)) + h + data)


# -- what breaks each folder ---------------------------------------------------------------------------
# each mutation gets the folder (a copy of the valid one) and returns nothing; `outside` is a folder
# beside it for symlink targets


def config(**changes):
    def mutate(f: Path, outside: Path) -> None:
        cfg = json.loads((f / "config.json").read_text())
        for k, v in changes.items():
            if v is _DROP:
                cfg.pop(k, None)
            else:
                cfg[k] = v
        (f / "config.json").write_text(json.dumps(cfg))
    return mutate


def config_text(text: str | bytes):
    def mutate(f: Path, outside: Path) -> None:
        (f / "config.json").write_bytes(text if isinstance(text, bytes) else text.encode())
    return mutate


def replace_with(name: str, kind: str, content: bytes | str = b""):
    """``name`` becomes: a directory, a FIFO, a symlink out of the folder, a dangling or looping symlink,
    or a file with ``content``."""
    def mutate(f: Path, outside: Path) -> None:
        p = f / name
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p)
        elif os.path.lexists(p):
            p.unlink()
        if kind == "dir":
            p.mkdir()
        elif kind == "fifo":
            os.mkfifo(p)
        elif kind == "outside":
            target = outside / name
            target.write_bytes(content if isinstance(content, bytes) else content.encode())
            p.symlink_to(target)
        elif kind == "dangling":
            p.symlink_to(f / "no-such-file")
        elif kind == "loop":
            p.symlink_to(p)
        elif kind == "devzero":
            p.symlink_to("/dev/zero")
        else:
            p.write_bytes(content if isinstance(content, bytes) else content.encode())
    return mutate


def st(edit):
    """Edit model.safetensors' header (a dict) and data: ``edit(header, data) -> (header, data)``."""
    def mutate(f: Path, outside: Path) -> None:
        header, data = _header(f / "model.safetensors")
        header, data = edit(header, data)
        _write_st(f / "model.safetensors", header, data)
    return mutate


def st_bytes(edit):
    def mutate(f: Path, outside: Path) -> None:
        p = f / "model.safetensors"
        p.write_bytes(edit(p.read_bytes()))
    return mutate


def _tensor(h: dict, suffix: str) -> str:
    return next(k for k in h if k.endswith(suffix))


def _reshape(suffix, shape):
    def edit(h, d):
        h[_tensor(h, suffix)]["shape"] = shape
        return h, d
    return edit


def _set(suffix, key, value):
    def edit(h, d):
        h[_tensor(h, suffix)][key] = value
        return h, d
    return edit


def _overlap(h, d):
    a, b = _tensor(h, "ln_1.bias"), _tensor(h, "ln_1.weight")  # both [32] F32
    h[b]["data_offsets"] = list(h[a]["data_offsets"])
    return h, d


def _gap(h, d):
    for v in h.values():
        if isinstance(v, dict) and "data_offsets" in v:
            v["data_offsets"] = [v["data_offsets"][0] + 16, v["data_offsets"][1] + 16]
    return h, b"\0" * 16 + d


def _add(name, dtype="F32", shape=(32,)):
    def edit(h, d):
        n = 1
        for s in shape:
            n *= s
        h[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [len(d), len(d) + 4 * n]}
        return h, d + b"\0" * (4 * n)
    return edit


def _drop(suffix):
    def edit(h, d):
        info = h.pop(_tensor(h, suffix))
        b, e = info["data_offsets"]
        for v in h.values():  # keep the data contiguous
            if isinstance(v, dict) and "data_offsets" in v and v["data_offsets"][0] >= e:
                v["data_offsets"] = [v["data_offsets"][0] - (e - b), v["data_offsets"][1] - (e - b)]
        return h, d[:b] + d[e:]
    return edit


def _nan_weights(h, d):
    b, _e = h[_tensor(h, "ln_f.weight")]["data_offsets"]
    return h, d[:b] + struct.pack("<f", float("nan")) + d[b + 4:]


def bin_of(obj_fn):
    """pytorch_model.bin holding ``obj_fn(state)`` in place of model.safetensors."""
    def mutate(f: Path, outside: Path) -> None:
        from safetensors.torch import load_file

        state = load_file(str(f / "model.safetensors"))
        (f / "model.safetensors").unlink()
        obj = obj_fn(state)
        if isinstance(obj, bytes):
            (f / "pytorch_model.bin").write_bytes(obj)
        else:
            torch.save(obj, f / "pytorch_model.bin")
    return mutate


class _Evil:
    def __reduce__(self):
        return (os.system, ("touch /tmp/mediswift-hostile-import-ran",))


def sharded(edit=None):
    """The sharded save in place of the single file, then ``edit(folder, index dict) -> index dict``."""
    def mutate(f: Path, outside: Path) -> None:
        for p in list(f.iterdir()):
            if p.name not in ("tokenizer.json",):
                p.unlink() if not p.is_dir() else shutil.rmtree(p)
        for p in VARIANTS["sharded"].iterdir():
            shutil.copy(p, f / p.name)
        if edit is not None:
            index = json.loads((f / "model.safetensors.index.json").read_text())
            out = edit(f, outside, index)
            if out is not None:
                (f / "model.safetensors.index.json").write_text(out if isinstance(out, str) else json.dumps(out))
    return mutate


def _first_shard(index):
    return sorted(set(index["weight_map"].values()))[0]


def _index_names(name):
    def edit(f, outside, index):
        first = _first_shard(index)
        index["weight_map"] = {k: (name if v == first else v) for k, v in index["weight_map"].items()}
        return index
    return edit


def _shard_outside(f, outside, index):
    first = _first_shard(index)
    shutil.move(f / first, outside / first)
    (f / first).symlink_to(outside / first)


def _index_misplaces(f, outside, index):
    shards = sorted(set(index["weight_map"].values()))
    name = next(k for k, v in index["weight_map"].items() if v == shards[0])
    index["weight_map"][name] = shards[1]
    return index


def _index_lists_absent(f, outside, index):
    index["weight_map"]["transformer.h.0.extra.weight"] = _first_shard(index)
    return index


def tokenizer_edit(edit):
    def mutate(f: Path, outside: Path) -> None:
        tok = json.loads((f / "tokenizer.json").read_text())
        (f / "tokenizer.json").write_text(json.dumps(edit(tok)))
    return mutate


def _pad(tok) -> dict:
    return next(t for t in tok["added_tokens"] if t["content"] == "<|pad|>")


def _no_eot(tok):
    # <|endoftext|> renamed: the ids stay as they are, the token is gone
    vocab = tok["model"]["vocab"]
    vocab["<|end|>"] = vocab.pop("<|endoftext|>")
    for t in tok["added_tokens"]:
        if t["content"] == "<|endoftext|>":
            t["content"] = "<|end|>"
    return tok


def _id_beyond(tok):
    k = next(k for k, v in tok["model"]["vocab"].items() if v == 100)
    tok["model"]["vocab"][k] = 10**6
    return tok


def _fewer_tokens(tok):
    # the last 5 merges and the tokens they made gone, <|pad|> right after: 5 tokens fewer than embedding rows
    vocab = tok["model"]["vocab"]
    top = sorted(vocab.values())[-5]
    tok["model"]["vocab"] = {k: v for k, v in vocab.items() if v < top}
    tok["model"]["merges"] = tok["model"]["merges"][:-5]
    _pad(tok)["id"] = top
    return tok


def _without_pad(tok):
    tok["added_tokens"] = [t for t in tok["added_tokens"] if t["content"] != "<|pad|>"]
    return tok


def bpe_pair(vocab: bytes | None = None, merges: bytes | None = None):
    """vocab.json + merges.txt in place of tokenizer.json, one of them replaced."""
    def mutate(f: Path, outside: Path) -> None:
        (f / "tokenizer.json").unlink()
        for name, content in (("vocab.json", vocab), ("merges.txt", merges)):
            src = VARIANTS["bpe"] / name
            (f / name).write_bytes(content if content is not None else src.read_bytes())
    return mutate


_DROP = object()
DEEP = "[" * 100_000 + "]" * 100_000
CASES = [
    # (id, mutation, the file the line must name, what it must say)
    # config.json: the file itself
    ("config-garbage", config_text("\x00\x01 not json {"), "config.json", "not valid JSON"),
    ("config-empty", config_text(""), "config.json", "is empty"),
    ("config-list", config_text("[1, 2]"), "config.json", "JSON object"),
    ("config-deep", config_text('{"model_type": "gpt2", "x": ' + DEEP + "}"), "config.json", "levels deep"),
    ("config-huge", config_text('{"model_type": "gpt2"}' + " " * (2 << 20)), "config.json", "more than"),
    ("config-latin1", config_text(b'{"model_type": "gpt2", "x": "\xe9"}'), "config.json", "not UTF-8"),
    ("config-dir", replace_with("config.json", "dir"), "config.json", "not a regular file"),
    ("config-fifo", replace_with("config.json", "fifo"), "config.json", "not a regular file"),
    ("config-outside", replace_with("config.json", "outside", '{"model_type": "gpt2"}'), "config.json", "outside"),
    ("config-dangling", replace_with("config.json", "dangling"), "config.json", "broken or looping symlink"),
    ("config-loop", replace_with("config.json", "loop"), "config.json", "broken or looping symlink"),
    ("config-int-digits", config_text('{"model_type": "gpt2", "n_layer": ' + "9" * 5000 + "}"), "config.json",
     "not valid JSON"),
    # config.json: the fields
    ("model-type-missing", config(model_type=_DROP), "config.json", "unsupported architecture"),
    ("model-type-list", config(model_type=["gpt2"]), "config.json", "unsupported architecture"),
    ("n_layer-null", config(n_layer=None), "config.json", "n_layer must be an integer"),
    ("n_layer-abc", config(n_layer="abc"), "config.json", "n_layer must be an integer"),
    ("n_layer-true", config(n_layer=True), "config.json", "n_layer must be an integer"),
    ("n_layer-2.5", config(n_layer=2.5), "config.json", "n_layer must be an integer"),
    ("n_layer-1.0", config(n_layer=1.0), "config.json", "n_layer must be an integer"),
    ("n_layer-0", config(n_layer=0), "config.json", "n_layer must be between"),
    ("n_layer-negative", config(n_layer=-1), "config.json", "n_layer must be between"),
    ("n_layer-huge", config(n_layer=10**9), "config.json", "n_layer must be between"),
    ("n_layer-missing", config(n_layer=_DROP), "config.json", "lacks n_layer"),
    ("n_layer-more-than-weights", config(n_layer=2), "model.safetensors", "lack h.1."),
    ("n_embd-0", config(n_embd=0), "config.json", "n_embd must be between"),
    ("n_embd-string", config(n_embd="32"), "config.json", "n_embd must be an integer"),
    ("n_embd-other-than-weights", config(n_embd=64, n_head=2), "model.safetensors", "has shape"),
    ("n_head-not-dividing", config(n_head=3), "config.json", "divisible by n_head"),
    ("n_head-0", config(n_head=0), "config.json", "n_head must be between"),
    ("n_positions-0", config(n_positions=0), "config.json", "n_positions must be between"),
    ("n_positions-huge", config(n_positions=10**9), "config.json", "n_positions must be between"),
    ("n_positions-other-than-weights", config(n_positions=128), "model.safetensors", "wpe.weight"),
    ("vocab_size-other-than-weights", config(vocab_size=400), "model.safetensors", "wte.weight"),
    ("vocab_size-negative", config(vocab_size=-5), "config.json", "vocab_size must be between"),
    ("epsilon-nan", config(layer_norm_epsilon=float("nan")), "config.json",
     "layer_norm_epsilon must be a finite number"),
    ("epsilon-inf", config(layer_norm_epsilon=float("inf")), "config.json", "layer_norm_epsilon must be a finite"),
    ("epsilon-string", config(layer_norm_epsilon="1e-5"), "config.json", "layer_norm_epsilon must be a finite"),
    ("epsilon-bool", config(layer_norm_epsilon=True), "config.json", "layer_norm_epsilon must be a finite"),
    ("epsilon-other", config(layer_norm_epsilon=1e-6), "config.json", "unsupported layer_norm_epsilon"),
    ("activation-relu", config(activation_function="relu"), "config.json", "unsupported activation_function"),
    ("activation-list", config(activation_function=["gelu"]), "config.json", "unsupported activation_function"),
    ("n_inner-other", config(n_inner=100), "config.json", "n_inner"),
    ("n_inner-string", config(n_inner="128"), "config.json", "n_inner must be an integer"),
    ("untied", config(tie_word_embeddings=False), "config.json", "not tied"),
    ("tie-string", config(tie_word_embeddings="yes"), "config.json", "tie_word_embeddings must be true or false"),
    ("inverse-layer-scaling", config(scale_attn_by_inverse_layer_idx=True), "config.json", "unsupported GPT-2 variant"),
    ("cross-attention-string", config(add_cross_attention="false"), "config.json", "must be true or false"),
    ("unscaled-attention", config(scale_attn_weights=False), "config.json", "scale_attn_weights"),
    # model.safetensors
    ("st-truncated", st_bytes(lambda b: b[:len(b) // 2]), "model.safetensors", "outside the file"),
    ("st-truncated-in-header", st_bytes(lambda b: b[:200]), "model.safetensors", "header claims"),
    ("st-4-bytes", st_bytes(lambda b: b[:4]), "model.safetensors", "too short"),
    ("st-garbage", st_bytes(lambda b: bytes(range(256)) * 40), "model.safetensors", "not a safetensors file"),
    ("st-header-length-huge", st_bytes(lambda b: struct.pack("<Q", 1 << 60) + b[8:]), "model.safetensors",
     "header claims"),
    ("st-header-too-large", st_bytes(lambda b: struct.pack("<Q", 4 << 20) + b" " * (4 << 20) + b[8:]),
     "model.safetensors", "more than a GPT-2"),
    ("st-header-not-json", st_bytes(lambda b: b[:8] + b"#" * struct.unpack("<Q", b[:8])[0] + b[8 + struct.unpack(
        "<Q", b[:8])[0]:]), "model.safetensors", "not valid JSON"),
    ("st-header-deep", lambda f, o: _write_st(f / "model.safetensors", {}, b"", ("[" * 5000 + "]" * 5000).encode()),
     "model.safetensors", "levels deep"),
    ("st-header-list", lambda f, o: _write_st(f / "model.safetensors", {}, b"", b"[1, 2, 3]"), "model.safetensors",
     "not a JSON object"),
    ("st-overlap", st(_overlap), "model.safetensors", "overlap"),
    ("st-gap", st(_gap), "model.safetensors", "no tensor holds"),
    ("st-offsets-beyond", st(_set("ln_f.bias", "data_offsets", [10**12, 10**12 + 128])), "model.safetensors",
     "outside the file"),
    ("st-offsets-reversed", st(_set("ln_f.bias", "data_offsets", [128, 0])), "model.safetensors", "outside the file"),
    ("st-offsets-strings", st(_set("ln_f.bias", "data_offsets", ["0", "128"])), "model.safetensors",
     "invalid data_offsets"),
    ("st-trailing-bytes", st(lambda h, d: (h, d + b"\0" * 64)), "model.safetensors", "bytes of data where"),
    ("st-shape-transposed", st(_reshape("mlp.c_fc.weight", [128, 32])), "model.safetensors", "has shape [128, 32]"),
    ("st-shape-bytes-mismatch", st(_reshape("ln_f.bias", [33])), "model.safetensors", "bytes where its shape"),
    ("st-shape-negative", st(_reshape("ln_f.bias", [-32])), "model.safetensors", "invalid shape"),
    ("st-shape-bool", st(_reshape("ln_f.bias", [True, 32])), "model.safetensors", "invalid shape"),
    ("st-dtype-int", st(_set("ln_f.bias", "dtype", "I32")), "model.safetensors", "floating point"),
    ("st-dtype-unknown", st(_set("ln_f.bias", "dtype", "F99")), "model.safetensors", "unknown dtype"),
    ("st-entry-extra-key", st(_set("ln_f.bias", "code", "os.system")), "model.safetensors", "is not {dtype"),
    ("st-metadata-not-strings", st(lambda h, d: ({**h, "__metadata__": {"format": 1}}, d)), "model.safetensors",
     "__metadata__"),
    ("st-missing-tensor", st(_drop("ln_f.bias")), "model.safetensors", "lack ln_f.bias"),
    ("st-unknown-tensor", st(_add("evil.weight")), "model.safetensors", "no place for"),
    ("st-layer-beyond-config", st(_add("transformer.h.5.ln_1.weight")), "model.safetensors", "no place for"),
    ("st-duplicate-name", st(_add("wte.weight", shape=(300, 32))), "model.safetensors", "twice"),
    ("st-nan-weights", st(_nan_weights), "model.safetensors", "NaN or infinite"),
    ("st-empty", replace_with("model.safetensors", "file", b""), "model.safetensors", "is empty"),
    ("st-dir", replace_with("model.safetensors", "dir"), "model.safetensors", "not a regular file"),
    ("st-outside", replace_with("model.safetensors", "outside", b"x" * 64), "model.safetensors", "outside"),
    ("st-dev-zero", replace_with("model.safetensors", "devzero"), "model.safetensors", "outside"),
    # sharded safetensors
    ("index-garbage", sharded(lambda f, o, i: "not json"), "model.safetensors.index.json", "not valid JSON"),
    ("index-no-weight-map", sharded(lambda f, o, i: {"metadata": {}}), "model.safetensors.index.json",
     "no weight_map"),
    ("index-deep", sharded(lambda f, o, i: '{"weight_map": ' + DEEP + "}"), "model.safetensors.index.json",
     "levels deep"),
    ("index-dotdot", sharded(_index_names("../outside.safetensors")), "model.safetensors.index.json",
     "not a plain name"),
    ("index-absolute", sharded(_index_names("/etc/passwd")), "model.safetensors.index.json", "not a plain name"),
    ("index-missing-shard", sharded(_index_names("model-09-of-09.safetensors")), "model-09-of-09.safetensors",
     "lacks the weight shard"),
    ("shard-outside", sharded(_shard_outside), "model-00001-of", "outside the model folder"),
    ("index-misplaces", sharded(_index_misplaces), "model.safetensors.index.json", "does not hold it"),
    ("index-lists-absent", sharded(_index_lists_absent), "model.safetensors.index.json", "does not hold it"),
    # pytorch_model.bin
    ("bin-list", bin_of(lambda s: list(s.values())), "pytorch_model.bin", "not a mapping"),
    ("bin-tensor", bin_of(lambda s: next(iter(s.values()))), "pytorch_model.bin", "not a mapping"),
    ("bin-non-tensor-values", bin_of(lambda s: {**s, "transformer.ln_f.bias": 1.0}), "pytorch_model.bin",
     "maps names to tensors"),
    ("bin-garbage", bin_of(lambda s: b"\x80\x04 garbage" * 100), "pytorch_model.bin", "weights_only=True refused"),
    ("bin-pickle-with-code", bin_of(lambda s: {**s, "x": _Evil()}), "pytorch_model.bin", "weights_only=True refused"),
    ("bin-wrong-shape", bin_of(lambda s: {**s, "transformer.h.0.mlp.c_fc.weight": torch.zeros(128, 32)}),
     "pytorch_model.bin", "has shape [128, 32]"),
    ("bin-int-tensor", bin_of(lambda s: {**s, "transformer.ln_f.bias": torch.zeros(32, dtype=torch.int64)}),
     "pytorch_model.bin", "floating point"),
    ("bin-missing-tensor", bin_of(lambda s: {k: v for k, v in s.items() if not k.endswith("ln_f.bias")}),
     "pytorch_model.bin", "lack ln_f.bias"),
    # the tokenizer
    ("tokenizer-missing", lambda f, o: (f / "tokenizer.json").unlink(), "has no tokenizer", "tokenizer.json"),
    ("tokenizer-empty", replace_with("tokenizer.json", "file", b""), "tokenizer.json", "is empty"),
    ("tokenizer-garbage", replace_with("tokenizer.json", "file", b"\x00garbage{"), "tokenizer.json",
     "not a tokenizer that loads"),
    ("tokenizer-json-list", replace_with("tokenizer.json", "file", b"[1, 2]"), "tokenizer.json",
     "not a tokenizer that loads"),
    ("tokenizer-deep", replace_with("tokenizer.json", "file", ('{"model": ' + DEEP + "}").encode()),
     "tokenizer.json", "not a tokenizer that loads"),
    ("tokenizer-outside", replace_with("tokenizer.json", "outside", b"{}"), "tokenizer.json", "outside"),
    ("tokenizer-dangling", replace_with("tokenizer.json", "dangling"), "tokenizer.json", "broken or looping"),
    ("tokenizer-dir", replace_with("tokenizer.json", "dir"), "tokenizer.json", "not a regular file"),
    ("tokenizer-fifo", replace_with("tokenizer.json", "fifo"), "tokenizer.json", "not a regular file"),
    ("tokenizer-without-eot", tokenizer_edit(_no_eot), "tokenizer.json", "lacks <|endoftext|>"),
    ("tokenizer-id-beyond-vocabulary", tokenizer_edit(_id_beyond), "tokenizer.json", "token ids up to"),
    ("tokenizer-smaller-than-embedding", tokenizer_edit(_fewer_tokens), "tokenizer.json", "but the embedding"),
    ("bpe-merges-empty", bpe_pair(merges=b""), "merges.txt", "is empty"),
    ("bpe-vocab-garbage", bpe_pair(vocab=b"\x00 not json"), "vocab.json", "not a BPE tokenizer that loads"),
    ("bpe-merges-garbage", bpe_pair(merges=b"#version\nonly-one-token-per-line\n"), "vocab.json",
     "not a BPE tokenizer that loads"),
    # the folder
    ("folder-is-a-file", "FILE", "model", "is not a folder"),
    ("no-weights", lambda f, o: (f / "model.safetensors").unlink(), "model", "has no weights"),
]
# these run as real CLI processes; the first is not in CASES: a config that claims a model of 51 billion
# parameters (n_embd 65536), which import-hf must refuse before it allocates any of it
MEMORY_CASE = ("n_embd-65536", config(n_embd=65536, n_head=2), "config.json", "GiB of memory")
CLI_IDS = ("st-truncated", "bin-list", "n_layer-true", "tokenizer-outside")
IN_PROCESS = [c for c in CASES if c[0] not in CLI_IDS]


def _hostile(base: Path, tmp: Path, case_id: str, mutate) -> tuple[Path, Path]:
    """A copy of the valid folder broken by ``mutate``: (the folder, the runs folder that must stay absent)."""
    outside = tmp / "outside"
    outside.mkdir(parents=True, exist_ok=True)
    folder = tmp / "models" / case_id / "model"
    shutil.copytree(base, folder)
    if mutate == "FILE":
        shutil.rmtree(folder)
        folder.write_text("not a folder")
    else:
        mutate(folder, outside)
    return folder, tmp / "runs"


def _held(rc: int, err: str, db: Path, runs: Path, names: str, expect: str) -> tuple[bool, str]:
    lines = [ln for ln in err.splitlines() if ln.strip()]
    line = lines[0] if lines else ""
    rows = RunDB(db).list_runs() if db.exists() else []
    ok = (rc == 2 and len(lines) == 1 and line.startswith("mediswift: error: ") and "Traceback" not in err
          and names in line and expect in line and not rows and not (runs.exists() and any(runs.iterdir())))
    return ok, f"rc {rc}, rows {len(rows)}, stderr: {err[-600:]}"


def _import_in_process(folder: Path, db: Path, runs: Path, capsys) -> tuple[int, str]:
    from engine.cli import main

    capsys.readouterr()
    rc = main(["import-hf", str(folder), "--db", str(db), "--runs-dir", str(runs)])
    return rc, capsys.readouterr().err


@pytest.mark.quick
@pytest.mark.parametrize("case_id,mutate,names,expect", IN_PROCESS, ids=[c[0] for c in IN_PROCESS])
def test_a_hostile_folder_is_one_line_and_exit_2_with_nothing_left_behind(base, tmp_path, capsys, record, case_id,
                                                                         mutate, names, expect):
    folder, runs = _hostile(base, tmp_path, case_id, mutate)
    rc, err = _import_in_process(folder, tmp_path / "runs.db", runs, capsys)
    held, why = _held(rc, err, tmp_path / "runs.db", runs, names, expect)
    assert record(CATEGORY, held), why


def test_the_real_cli_on_hostile_folders_including_a_model_too_large_for_memory(base, tmp_path, record):
    """The real CLI on a handful of hostile folders, the processes started together: the n_embd 65536 folder
    among them, whose model alone would need 200 GB."""
    procs = {}
    for case_id, mutate, names, expect in [MEMORY_CASE, *(c for c in CASES if c[0] in CLI_IDS)]:
        folder, runs = _hostile(base, tmp_path / case_id, case_id, mutate)
        db = tmp_path / case_id / "runs.db"
        cmd = [sys.executable, "-m", "engine", "import-hf", str(folder), "--db", str(db), "--runs-dir", str(runs)]
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, cwd=REPO,
                                env=engine_env(tmp_path / case_id))
        procs[case_id] = (proc, db, runs, names, expect)
    try:
        for case_id, (proc, db, runs, names, expect) in procs.items():
            _out, err = proc.communicate(timeout=120)
            held, why = _held(proc.returncode, err, db, runs, names, expect)
            assert record(CATEGORY, held), (case_id, why)
    finally:
        for proc, *_ in procs.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait()


def test_no_pickle_code_ran():
    assert not Path("/tmp/mediswift-hostile-import-ran").exists()


# -- valid folders keep importing ----------------------------------------------------------------------


def _snapshot(f: Path, outside: Path) -> None:
    """The hub cache's layout: models--x/snapshots/REV/FILE -> ../../blobs/HASH."""
    repo = f.parent / "models--x--y"
    (repo / "blobs").mkdir(parents=True)
    snap = repo / "snapshots" / "abc123"
    snap.mkdir(parents=True)
    for i, p in enumerate(sorted(f.iterdir())):
        blob = repo / "blobs" / f"blob{i}"
        shutil.move(p, blob)
        (snap / p.name).symlink_to(os.path.relpath(blob, snap))


def _old_layout(f: Path, outside: Path) -> None:
    """As the hub's gpt2 files are: no "transformer." prefix, the attention-mask buffers of older transformers."""
    from safetensors.torch import load_file, save_file

    state = {k.removeprefix("transformer."): v for k, v in load_file(str(f / "model.safetensors")).items()}
    state["h.0.attn.bias"] = torch.tril(torch.ones(64, 64)).view(1, 1, 64, 64)
    state["h.0.attn.masked_bias"] = torch.tensor(-1e4)
    save_file(state, str(f / "model.safetensors"), metadata={"format": "pt"})


def _fp16(f: Path, outside: Path) -> None:
    from safetensors.torch import load_file, save_file

    state = {k: v.half() for k, v in load_file(str(f / "model.safetensors")).items()}
    save_file(state, str(f / "model.safetensors"), metadata={"format": "pt"})


VALID_CASES = [
    ("old-layout-with-mask-buffers", _old_layout),
    ("fp16", _fp16),
    ("safetensors", None),
    ("sharded", sharded()),
    ("bin", bin_of(lambda s: s)),
    ("vocab-and-merges", bpe_pair()),
    ("tokenizer-without-pad", tokenizer_edit(_without_pad)),
    ("hub-cache-snapshot", _snapshot),
]


@pytest.mark.parametrize("case_id,mutate", VALID_CASES, ids=[c[0] for c in VALID_CASES])
def test_valid_folders_import_as_before(base, tmp_path, capsys, record, case_id, mutate):
    folder, runs = _hostile(base, tmp_path, case_id, mutate or (lambda f, o: None))
    if case_id == "hub-cache-snapshot":
        folder = folder.parent / "models--x--y" / "snapshots" / "abc123"
    rc, err = _import_in_process(folder, tmp_path / "runs.db", runs, capsys)
    rows = RunDB(tmp_path / "runs.db").list_runs()
    ok = rc == 0 and len(rows) == 1 and rows[0]["status"] == "completed" and rows[0]["stage"] == "import"
    assert record(VALID, ok), err
