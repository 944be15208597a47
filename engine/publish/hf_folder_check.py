"""What ``import-hf`` checks in a Hugging Face model folder (gpt2, llama, qwen2, biogpt) before it allocates anything.

``check_folder`` reads only small things: ``config.json`` (size- and depth-limited JSON, the type and
range of every field the import uses), the safetensors headers (every tensor's name, dtype and shape
against the config, the data offsets in range, contiguous and non-overlapping, the file's length equal
to what the header describes), the shard index (file names inside the folder only), a ``.bin`` through
``torch.load(weights_only=True, mmap=True)`` (a mapping of tensors, nothing else), and the tokenizer
files (inside the folder, regular, non-empty, loadable; for a tokenizer without ``<|endoftext|>``, the
eos token tokenizer_config.json or an eos_token_id names). The memory the import needs is compared with
what the machine has before a tensor is read. Any problem is an ``InputError`` whose one-line message
names the file and the problem; ``engine.publish.hf_import`` reads the weights only after all of it held.

Files are read only inside the folder: a name in the index with ``..`` or an absolute path, or a
symlink whose target lies outside the folder, is refused. The one exception is a snapshot of the
Hugging Face hub cache (``.../snapshots/REV/``), whose files are links into the repository's
``blobs`` folder: there the repository's cache folder is the boundary.
"""
from __future__ import annotations

import functools
import json
import math
import os
import re
import stat
import struct
import warnings
from array import array
from dataclasses import dataclass, field
from itertools import accumulate
from pathlib import Path

from engine.core.config import from_dict
from engine.core.errors import InputError
from engine.core.machine_checks import available_memory
from engine.core.registry import PRETRAIN
from engine.data.role_tokenizer import RoleTokens
from engine.data.vocab import EOT, PAD, TOKENIZER_FILE
from engine.publish import hf_biogpt, hf_llama

SUPPORTED = ("the model families gpt2 (GPT2LMHeadModel), llama (LlamaForCausalLM), qwen2 (Qwen2ForCausalLM) and "
             "biogpt (BioGptForCausalLM) (config.json model_type 'gpt2', 'llama', 'qwen2' or 'biogpt')")

CONFIG_LIMIT = 1 << 20            # config.json: GPT-2's is 1 KB
INDEX_LIMIT = 16 << 20            # model.safetensors.index.json
TOKENIZER_LIMIT = 100 << 20       # tokenizer.json, vocab.json, merges.txt: GPT-2's are 1.4 MB at most
JSON_DEPTH = 32                   # GPT-2's config nests 3 deep, a safetensors header 3
MAX_SHARDS = 4096
# the ranges our model config accepts (engine.core.config.ModelConfig, TokenizerConfig)
N_LAYER, N_HEAD, N_EMBD, N_POSITIONS, VOCAB = (1, 256), (1, 256), (8, 65536), (8, 65536), (1, 1_000_000)
MIN_VOCAB = 258                   # 256 bytes + <|endoftext|> + <|pad|>

# safetensors' dtypes and their widths in bytes; GPT-2's weights are the floating ones
ST_DTYPES = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1, "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
             "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8}
FLOAT_DTYPES = {"F16", "BF16", "F32", "F64"}
# tensors some GPT-2 files carry and the import does not use: the causal-mask buffers of older
# transformers and the LM head (tied to wte)
# (and the rotary tables older llama files hold)
_BUFFER = re.compile(r"h\.(\d+)\.attn\.(?:bias|masked_bias)|model\.layers\.(\d+)\.self_attn\.rotary_emb\.inv_freq")
_MISSING = object()


def is_buffer(name: str) -> bool:
    """An attention-mask buffer older transformers saved (``h.N.attn.bias``, ``h.N.attn.masked_bias``): not read."""
    return _BUFFER.fullmatch(name) is not None


@dataclass
class CheckedFolder:
    """A folder that passed every check: what the import then reads, and how."""
    folder: Path
    hf_config: dict
    config: object                       # the RunConfig the imported run gets
    n_layer: int
    n_embd: int
    n_head: int
    n_positions: int
    activation: str
    rows: int                            # wte rows in the weights
    vocab: int                           # the tokenizer's size (rows, or rows + 1 with <|pad|> added)
    tokenizer: object
    weight_files: list[Path]             # safetensors files, read in this order (or the one .bin)
    tensor_file: dict[str, Path]         # tensor name (GPT-2's, no "transformer.") -> the file holding it
    bin_state: dict | None = None        # a .bin's tensors, memory-mapped where the file allows
    notes: list[str] = field(default_factory=list)
    memory_bytes: int = 0


def show_path(path: Path | str) -> str:
    """A path for a one-line message (control characters escaped)."""
    s = str(path)
    return s if s.isprintable() else ascii(s)


def _val(v) -> str:
    try:
        s = json.dumps(v, allow_nan=True)
    except (TypeError, ValueError):
        s = repr(v)
    return s if len(s) <= 60 else s[:57] + "..."


def _fail(path: Path | str, problem: str) -> InputError:
    return InputError(f"{show_path(path)}: {problem}", key="dir", path=str(path))


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return (text.splitlines()[0][:200] if text else "") or type(e).__name__


# -- files ------------------------------------------------------------------------------------------


def _boundary(folder: Path) -> Path:
    """Where the folder's files may lie: the folder, or a hub cache repository for one of its snapshots."""
    if folder.parent.name == "snapshots" and (folder.parent.parent / "blobs").is_dir():
        return folder.parent.parent
    return folder


def _member(folder: Path, name: str, limit: int, named_in: Path | None = None) -> tuple[Path, int] | None:
    """``folder / name`` as a regular, non-empty file of at most ``limit`` bytes inside the folder:
    (its real path, its size), or None if there is no such entry. ``named_in``: the file that named it."""
    shown = folder / name
    where = f" (named in {named_in.name})" if named_in is not None else ""
    rel = Path(name)
    if not name or "\x00" in name or rel.is_absolute() or ".." in rel.parts or "\\" in name:
        raise _fail(named_in or shown, f"names the file {_val(name)}, which is not a plain name inside the folder")
    if not os.path.lexists(shown):
        return None
    try:
        real = shown.resolve(strict=True)
    except (OSError, RuntimeError) as e:
        raise _fail(shown, f"is a broken or looping symlink{where} ({_first_line(e)})") from None
    root = _boundary(folder)
    if real != root and root not in real.parents:
        raise _fail(shown, f"is a symlink to {show_path(real)}, outside the model folder{where}; import-hf reads files "
                           "inside the folder only")
    try:
        st = real.stat()
    except OSError as e:
        raise _fail(shown, f"cannot be read ({_first_line(e)})") from None
    if not stat.S_ISREG(st.st_mode):
        raise _fail(shown, f"is not a regular file{where}")
    if st.st_size == 0:
        raise _fail(shown, f"is empty{where}")
    if st.st_size > limit:
        raise _fail(shown, f"is {st.st_size:,} bytes, more than the {limit:,} import-hf reads from such a file")
    return real, st.st_size


def _read(real: Path, shown: Path, size: int) -> bytes:
    try:
        with open(real, "rb") as fh:
            data = fh.read(size + 1)
    except OSError as e:
        raise _fail(shown, f"cannot be read ({_first_line(e)})") from None
    if len(data) != size:
        raise _fail(shown, "changed while it was read")
    return data


_STRING = re.compile(r'"(?:[^"\\]|\\.)*"', re.DOTALL)
_DEPTH = str.maketrans({"[": "\x01", "{": "\x01", "]": "\xff", "}": "\xff"})
_NOT_BRACKET = re.compile(r"[^\[\]{}]+")


def _json(data: bytes, shown: Path, what: str):
    """JSON of at most JSON_DEPTH levels (the depth is counted before parsing, without recursion)."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise _fail(shown, f"{what} is not UTF-8 text ({_first_line(e)})") from None
    brackets = _NOT_BRACKET.sub("", _STRING.sub("", text)).translate(_DEPTH)
    depth = max(accumulate(array("b", brackets.encode("latin-1"))), default=0)
    if depth > JSON_DEPTH:
        raise _fail(shown, f"{what} nests {depth} levels deep (at most {JSON_DEPTH} are read)")
    try:
        return json.loads(text)
    except (ValueError, RecursionError) as e:  # JSONDecodeError, and ints of more digits than Python converts
        raise _fail(shown, f"{what} is not valid JSON ({_first_line(e)})") from None


# -- config.json ------------------------------------------------------------------------------------


def _int(cfg: dict, key: str, bounds: tuple[int, int], f: Path, default=_MISSING) -> int:
    v = cfg.get(key, default)
    if v is _MISSING:
        raise _fail(f, f"lacks {key}, which the model's config must give")
    if isinstance(v, bool) or not isinstance(v, int):
        raise _fail(f, f"{key} must be an integer, got {_val(v)}")
    lo, hi = bounds
    if not lo <= v <= hi:
        raise _fail(f, f"{key} must be between {lo} and {hi:,}, got {_val(v)}")
    return v


def _flag(cfg: dict, key: str, want: bool, f: Path) -> None:
    v = cfg.get(key)
    if v is None and not want:
        return  # absent, or null: off, as transformers reads it
    if v is None and key not in cfg:
        return  # absent: transformers' default, which is ``want``
    if not isinstance(v, bool):
        raise _fail(f, f"{key} must be true or false, got {_val(v)}")
    if v != want:
        raise _fail(f, f"unsupported GPT-2 variant: {key} = {_val(v)}")


def check_config(folder: Path) -> tuple[dict, Path]:
    """config.json, parsed safely, with every field the import uses of the right type and range."""
    member = _member(folder, "config.json", CONFIG_LIMIT)
    f = folder / "config.json"
    if member is None:
        raise InputError(f"{show_path(folder)} has no config.json: import-hf reads {SUPPORTED}", key="dir", path=str(f))
    cfg = _json(_read(member[0], f, member[1]), f, "the config")
    if not isinstance(cfg, dict):
        raise _fail(f, f"must hold a JSON object, not {type(cfg).__name__}")
    arch = cfg.get("model_type")
    if isinstance(arch, str) and (arch in hf_llama.ARCHITECTURES or arch == hf_biogpt.MODEL_TYPE):
        return cfg, f  # its fields are read by hf_llama.model_fields or hf_biogpt.model_fields
    if arch != "gpt2":
        archs = cfg.get("architectures")
        names = ", ".join(a for a in archs if isinstance(a, str))[:80] if isinstance(archs, list) else ""
        shown = arch if isinstance(arch, str) and arch.isprintable() and len(arch) <= 40 else _val(arch) if arch else "?"
        raise _fail(f, f"unsupported architecture: the folder holds a {shown} model ({names or 'unknown'}); "
                       f"import-hf reads {SUPPORTED}")
    _int(cfg, "n_layer", N_LAYER, f)
    n_embd = _int(cfg, "n_embd", N_EMBD, f)
    n_head = _int(cfg, "n_head", N_HEAD, f)
    if n_embd % n_head:
        raise _fail(f, f"n_embd ({n_embd}) must be divisible by n_head ({n_head})")
    _int(cfg, "n_positions", N_POSITIONS, f, default=1024)
    if cfg.get("vocab_size") is not None:
        _int(cfg, "vocab_size", VOCAB, f)
    for key, want in (("scale_attn_by_inverse_layer_idx", False), ("reorder_and_upcast_attn", False),
                      ("add_cross_attention", False), ("scale_attn_weights", True)):
        _flag(cfg, key, want, f)
    tie = cfg.get("tie_word_embeddings", True)
    if tie is not None and not isinstance(tie, bool):
        raise _fail(f, f"tie_word_embeddings must be true or false, got {_val(tie)}")
    if tie is False:
        raise _fail(f, "unsupported GPT-2 variant: the LM head is not tied to the token embedding "
                       "(tie_word_embeddings = false)")
    inner = cfg.get("n_inner")
    if inner is not None and (isinstance(inner, bool) or not isinstance(inner, int)):
        raise _fail(f, f"n_inner must be an integer or null, got {_val(inner)}")
    if inner not in (None, 4 * n_embd):
        raise _fail(f, f"unsupported GPT-2 variant: n_inner {inner} (ours is 4 x n_embd = {4 * n_embd})")
    act = cfg.get("activation_function", "gelu_new")
    if not isinstance(act, str) or act not in ("gelu", "gelu_new", "gelu_pytorch_tanh"):
        raise _fail(f, f"unsupported activation_function {_val(act)} (gelu, gelu_new)")
    eps = cfg.get("layer_norm_epsilon", 1e-5)
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not math.isfinite(eps):
        raise _fail(f, f"layer_norm_epsilon must be a finite number, got {_val(eps)}")
    if abs(eps - 1e-5) > 1e-12:
        raise _fail(f, f"unsupported layer_norm_epsilon {_val(eps)} (ours is 1e-5)")
    return cfg, f


# -- memory -----------------------------------------------------------------------------------------


def gpt2_params(n_layer: int, d: int, positions: int, vocab: int) -> int:
    return (vocab + positions) * d + 2 * d + n_layer * (12 * d * d + 13 * d)


def _llama_params(expected: dict[str, tuple], vocab: int) -> int:
    """Parameters of a llama-family (or biogpt) model: its tensors, the embedding (and an untied head) at
    ``vocab`` rows."""
    return sum(math.prod(vocab if s is None else s for s in shape) for shape in expected.values())


def import_memory(params: int, weight_bytes: int, all_fp32: bool) -> int:
    """Bytes the import holds at its peak: the weights as read, their copies in our layout (and in fp32
    where the file's are not), the model."""
    return weight_bytes + 8 * params + (0 if all_fp32 else 4 * params)


def check_memory(need: int, f: Path, what: str, available: int | None) -> None:
    have = available_memory() if available is None else available
    if need > 0.9 * have:
        raise _fail(f, f"{what}: importing it needs about {need / 2**30:.1f} GiB of memory and this machine has "
                       f"{have / 2**30:.1f} GiB available")


# -- weights ----------------------------------------------------------------------------------------


def expected_shapes(n_layer: int, d: int, positions: int) -> dict[str, tuple]:
    """GPT-2's tensors (Conv1D layout) and their shapes; wte's rows (None) come from the file."""
    out: dict[str, tuple] = {"wte.weight": (None, d), "wpe.weight": (positions, d), "ln_f.weight": (d,),
                             "ln_f.bias": (d,)}
    for i in range(n_layer):
        h = f"h.{i}."
        out.update({h + "ln_1.weight": (d,), h + "ln_1.bias": (d,), h + "ln_2.weight": (d,), h + "ln_2.bias": (d,),
                    h + "attn.c_attn.weight": (d, 3 * d), h + "attn.c_attn.bias": (3 * d,),
                    h + "attn.c_proj.weight": (d, d), h + "attn.c_proj.bias": (d,),
                    h + "mlp.c_fc.weight": (d, 4 * d), h + "mlp.c_fc.bias": (4 * d,),
                    h + "mlp.c_proj.weight": (4 * d, d), h + "mlp.c_proj.bias": (d,)})
    return out


class _Tensors:
    """Collects tensors (name, dtype, shape) from the weight files and checks them against the config."""

    def __init__(self, n_layer: int, d: int, positions: int, vocab: int | None, expected: dict | None = None,
                 embed: str = "wte.weight", what: str = "GPT-2", head: str = "lm_head.weight"):
        self.n_layer, self.d, self.vocab = n_layer, d, vocab
        self.expected = expected if expected is not None else expected_shapes(n_layer, d, positions)
        self.embed, self.what = embed, what  # the token embedding's name; the family, for messages
        self.head = head  # the LM head's name: stored for an untied head, and may be for a tied one
        self.where: dict[str, Path] = {}       # tensor (without "transformer.") -> file
        self.rows: dict[str, int] = {}          # wte's and lm_head's rows
        self.numel = 0                          # of every tensor read (buffers included)
        self.nbytes = 0
        self.all_fp32 = True

    def add(self, raw: str, dtype: str, shape: tuple, width: int, f: Path) -> None:
        name = raw.removeprefix("transformer.")
        if name in self.where:
            raise _fail(f, f"holds the tensor {_val(raw)} twice (with and without 'transformer.', or in two files)")
        numel = math.prod(shape)
        self.numel += numel
        self.nbytes += numel * width
        buffer = _BUFFER.fullmatch(name)
        if buffer and int(buffer.group(1) or buffer.group(2)) < self.n_layer:
            self.where[name] = f
            return  # an attention-mask buffer of older transformers: not read
        if name not in self.expected and name != self.head:
            raise _fail(f, f"holds the tensor {_val(raw)}, which a {self.n_layer}-layer {self.what} has no place for")
        if dtype not in FLOAT_DTYPES:
            raise _fail(f, f"the tensor {_val(raw)} has dtype {dtype}; {self.what}'s weights are floating point")
        self.all_fp32 &= dtype == "F32"
        want = self.expected.get(name, (None, self.d))
        if want[0] is None:  # the token embedding (and the LM head tied to it): [vocab, d]
            want = (self.vocab if self.vocab is not None else shape[0] if len(shape) == 2 else "rows", self.d)
        if tuple(shape) != want:
            raise _fail(f, f"the tensor {_val(raw)} has shape {list(shape)}, where the config ({self.n_layer} layers of "
                           f"width {self.d}) gives {list(want)}")
        if len(want) == 2 and name in (self.embed, self.head):
            if not VOCAB[0] <= shape[0] <= VOCAB[1]:
                raise _fail(f, f"the tensor {_val(raw)} has {shape[0]:,} rows (1 to {VOCAB[1]:,} are read)")
            self.rows[name] = shape[0]
        self.where[name] = f

    def finish(self, index_or_file: Path) -> int:
        """All of GPT-2's tensors are there: wte's rows."""
        missing = [k for k in self.expected if k not in self.where]
        if missing:
            more = f" and {len(missing) - 1} more" if len(missing) > 1 else ""
            raise _fail(index_or_file, f"the weights lack {missing[0]}{more}, which the config's {self.n_layer}-layer "
                                       f"{self.what} has")
        rows = self.rows[self.embed]
        if self.rows.get(self.head, rows) != rows:
            raise _fail(self.where[self.head], f"{self.head} has {self.rows[self.head]:,} rows and "
                                               f"the token embedding {rows:,}; they must match")
        return rows


def safetensors_header(real: Path, shown: Path, size: int, header_limit: int) -> list[tuple[str, str, tuple, int]]:
    """(name, dtype, shape, width) of every tensor, from the header alone: offsets in range, contiguous and
    non-overlapping, each tensor's byte count equal to its shape's, the data ending where the file ends."""
    if size < 8:
        raise _fail(shown, f"is {size} bytes, too short for a safetensors file")
    try:
        with open(real, "rb") as fh:
            (n,) = struct.unpack("<Q", fh.read(8))
            if n < 2 or n > size - 8:
                raise _fail(shown, f"is not a safetensors file: its header claims {n:,} bytes and the file has "
                                   f"{size - 8:,} after the length")
            if n > header_limit:
                raise _fail(shown, f"has a safetensors header of {n:,} bytes, more than a GPT-2 of this config needs "
                                   f"({header_limit:,} at most)")
            raw = fh.read(n)
    except OSError as e:
        raise _fail(shown, f"cannot be read ({_first_line(e)})") from None
    if len(raw) != n:
        raise _fail(shown, "is truncated inside its safetensors header")
    header = _json(raw, shown, "the safetensors header")
    if not isinstance(header, dict):
        raise _fail(shown, "has a safetensors header that is not a JSON object")
    meta = header.pop("__metadata__", None)
    if meta is not None and not (isinstance(meta, dict) and all(isinstance(v, str) for v in meta.values())):
        raise _fail(shown, "has __metadata__ that is not a map of strings")
    data_len = size - 8 - n
    spans, out = [], []
    for name, info in header.items():
        tn = _val(name)
        if not isinstance(info, dict) or set(info) != {"dtype", "shape", "data_offsets"}:
            raise _fail(shown, f"the header entry of {tn} is not {{dtype, shape, data_offsets}}")
        dtype, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
        if not isinstance(dtype, str) or dtype not in ST_DTYPES:
            raise _fail(shown, f"the tensor {tn} has an unknown dtype {_val(dtype)}")
        if (not isinstance(shape, list) or len(shape) > 8
                or any(isinstance(s, bool) or not isinstance(s, int) or s < 0 for s in shape)):
            raise _fail(shown, f"the tensor {tn} has an invalid shape {_val(shape)}")
        if (not isinstance(offsets, list) or len(offsets) != 2
                or any(isinstance(o, bool) or not isinstance(o, int) for o in offsets)):
            raise _fail(shown, f"the tensor {tn} has invalid data_offsets {_val(offsets)}")
        begin, end = offsets
        if not 0 <= begin <= end <= data_len:
            raise _fail(shown, f"the tensor {tn} lies at bytes {begin:,}..{end:,}, outside the file's {data_len:,} "
                               "bytes of data (truncated?)")
        width = ST_DTYPES[dtype]
        if end - begin != math.prod(shape) * width:
            raise _fail(shown, f"the tensor {tn} has {end - begin:,} bytes where its shape {shape} of {dtype} needs "
                               f"{math.prod(shape) * width:,}")
        spans.append((begin, end, name))
        out.append((name, dtype, tuple(shape), width))
    at, prev = 0, None
    for begin, end, name in sorted(spans):
        if begin < at:
            raise _fail(shown, f"the tensors {_val(prev)} and {_val(name)} overlap in the file")
        if begin > at:
            raise _fail(shown, f"has {begin - at:,} bytes before the tensor {_val(name)} that no tensor holds")
        at, prev = end, name
    if at != data_len:
        raise _fail(shown, f"holds {data_len:,} bytes of data where its tensors take {at:,}")
    return out


def _header_limit(n_layer: int) -> int:
    return (64 << 10) + 512 * (16 * n_layer + 8)


def check_safetensors(folder: Path, tensors: _Tensors, n_layer: int) -> list[Path]:
    single = _member(folder, "model.safetensors", 1 << 62)
    if single is not None:
        real, size = single
        for name, dtype, shape, width in safetensors_header(real, folder / "model.safetensors", size,
                                                           _header_limit(n_layer)):
            tensors.add(name, dtype, shape, width, folder / "model.safetensors")
        tensors.finish(folder / "model.safetensors")
        return [real]
    index = _member(folder, "model.safetensors.index.json", INDEX_LIMIT)
    if index is None:
        return []
    f = folder / "model.safetensors.index.json"
    obj = _json(_read(index[0], f, index[1]), f, "the index")
    wmap = obj.get("weight_map") if isinstance(obj, dict) else None
    if not isinstance(wmap, dict) or not wmap or not all(isinstance(v, str) for v in wmap.values()):
        raise _fail(f, "has no weight_map of tensor names to shard files")
    shards = sorted(set(wmap.values()))
    if len(shards) > MAX_SHARDS:
        raise _fail(f, f"names {len(shards):,} shard files (at most {MAX_SHARDS:,} are read)")
    files = []
    for shard in shards:
        member = _member(folder, shard, 1 << 62, named_in=f)
        if member is None:
            raise InputError(f"{show_path(folder)} lacks the weight shard {_val(shard)} named in its index", key="dir",
                             path=str(folder / shard))
        held = safetensors_header(member[0], folder / shard, member[1], _header_limit(n_layer))
        for name, dtype, shape, width in held:
            if wmap.get(name) != shard:
                raise _fail(folder / shard, f"holds the tensor {_val(name)}, which its index places "
                                            f"{'in ' + _val(wmap[name]) if name in wmap else 'nowhere'}")
            tensors.add(name, dtype, shape, width, folder / shard)
        names = {h[0] for h in held}
        absent = [k for k, v in wmap.items() if v == shard and k not in names]
        if absent:
            raise _fail(f, f"places the tensor {_val(absent[0])} in {_val(shard)}, which does not hold it")
        files.append(member[0])
    tensors.finish(f)
    return files


def check_bin(folder: Path, tensors: _Tensors, params: int, available: int | None) -> tuple[Path, dict] | None:
    """pytorch_model.bin: tensors only (weights_only=True), memory-mapped where the file is a zip archive;
    the file's size (what its tensors can hold) is checked against the memory first."""
    import torch

    member = _member(folder, "pytorch_model.bin", 1 << 62)
    if member is None:
        return None
    real, size = member
    shown = folder / "pytorch_model.bin"
    check_memory(import_memory(params, size, False), shown, f"a weights file of {size:,} bytes", available)
    try:
        with open(real, "rb") as fh:
            zipped = fh.read(4) == b"PK\x03\x04"
        with warnings.catch_warnings():  # torch's notes on odd pickles would be lines beyond the one error line
            warnings.simplefilter("ignore")
            # data only: no code from a file; a zip archive is mapped, not read into memory
            state = torch.load(real, map_location="cpu", weights_only=True, mmap=zipped)
    except Exception as e:  # noqa: BLE001 - a pickle that is not plain tensors is refused, whatever it holds
        raise InputError(f"{show_path(shown)} cannot be read as plain tensors (weights_only=True refused it: "
                         f"{type(e).__name__}); convert it to safetensors", key="dir", path=str(shown)) from None
    if not isinstance(state, dict):
        raise _fail(shown, f"holds a {type(state).__name__}, not a mapping of tensor names to tensors")
    for name, t in state.items():
        if not isinstance(name, str) or not isinstance(t, torch.Tensor):
            raise _fail(shown, f"holds {_val(str(name))} -> {type(t).__name__}; a state dict maps names to tensors")
        if t.layout != torch.strided or t.is_quantized:
            raise _fail(shown, f"the tensor {_val(name)} is not a plain dense tensor ({t.layout})")
        dtype = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.float64: "F64"}.get(
            t.dtype, str(t.dtype).removeprefix("torch."))
        tensors.add(name, dtype, tuple(t.shape), t.element_size(), shown)
    tensors.finish(shown)
    return real, state


# -- tokenizer --------------------------------------------------------------------------------------


def _small_json(folder: Path, name: str, what: str) -> dict | None:
    """A small JSON object file of the folder (a config), or None without one."""
    member = _member(folder, name, CONFIG_LIMIT)
    if member is None:
        return None
    f = folder / name
    cfg = _json(_read(member[0], f, member[1]), f, what)
    if not isinstance(cfg, dict):
        raise _fail(f, f"must hold a JSON object, not {type(cfg).__name__}")
    return cfg


def _specials(folder: Path) -> dict[str, str]:
    """The special tokens tokenizer_config.json names (strings, or transformers' AddedToken objects)."""
    cfg = _small_json(folder, "tokenizer_config.json", "the tokenizer config")
    if cfg is None:
        return {}
    f = folder / "tokenizer_config.json"
    out = {}
    for key in ("bos_token", "eos_token", "sep_token", "unk_token", "pad_token"):
        v = cfg.get(key)
        v = v.get("content") if isinstance(v, dict) else v
        if v is not None and not isinstance(v, str):
            raise _fail(f, f"{key} must be a token (a string), got {_val(v)}")
        if v:
            out[key] = v
    return out


def check_biogpt_tokenizer(folder: Path):
    """BioGPT's Moses + BPE (vocab.json, merges.txt, tokenizer_config.json), as transformers'
    BioGptTokenizer reads it (engine.data.biogpt_tokenizer); needs transformers and sacremoses."""
    from engine.data.biogpt_tokenizer import BioGptTokens

    vocab = _member(folder, "vocab.json", TOKENIZER_LIMIT)
    merges = _member(folder, "merges.txt", TOKENIZER_LIMIT)
    if vocab is None or merges is None:
        raise InputError(f"{show_path(folder)} has no tokenizer: BioGPT's vocab.json with merges.txt (or a "
                         "tokenizer.json)", key="dir", path=str(folder))
    texts = []
    for (real, size), name in ((vocab, "vocab.json"), (merges, "merges.txt")):
        try:
            texts.append(_read(real, folder / name, size).decode("utf-8"))
        except UnicodeDecodeError as e:
            raise _fail(folder / name, f"is not UTF-8 text ({_first_line(e)})") from None
    shown = folder / "vocab.json"
    try:
        return BioGptTokens(texts[0], texts[1], _specials(folder)), shown
    except InputError:
        raise  # transformers or sacremoses missing: what to install
    except Exception as e:  # noqa: BLE001 - whatever transformers makes of odd files is one line too
        raise _fail(shown, f"with merges.txt is not a BioGPT tokenizer that loads ({_first_line(e)})") from None


def check_tokenizer(folder: Path, family: str = "gpt2"):
    from tokenizers import Tokenizer

    member = _member(folder, TOKENIZER_FILE, TOKENIZER_LIMIT)
    if member is None and family == hf_biogpt.MODEL_TYPE:
        return check_biogpt_tokenizer(folder)  # vocab.json + merges.txt of a BioGPT: Moses + BPE, not byte-level
    if member is not None:
        shown = folder / TOKENIZER_FILE
        try:
            tok = Tokenizer.from_file(str(member[0]))
        except Exception as e:  # noqa: BLE001 - tokenizers raises its own exception type for any unreadable file
            raise _fail(shown, f"is not a tokenizer that loads ({_first_line(e)})") from None
    else:
        vocab = _member(folder, "vocab.json", TOKENIZER_LIMIT)
        merges = _member(folder, "merges.txt", TOKENIZER_LIMIT)
        if vocab is None or merges is None:
            raise InputError(f"{show_path(folder)} has no tokenizer: tokenizer.json, or vocab.json with merges.txt",
                             key="dir", path=str(folder))
        from tokenizers import decoders, models, pre_tokenizers

        shown = folder / "vocab.json"
        try:
            tok = Tokenizer(models.BPE.from_file(str(vocab[0]), str(merges[0])))
        except Exception as e:  # noqa: BLE001
            raise _fail(shown, f"with merges.txt is not a BPE tokenizer that loads ({_first_line(e)})") from None
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
    ids = tok.get_vocab(with_added_tokens=True).values()
    size = tok.get_vocab_size()
    if not ids or size < 1:
        raise _fail(shown, "has an empty vocabulary")
    if min(ids) < 0 or max(ids) >= size:
        raise _fail(shown, f"gives token ids up to {max(ids):,} with a vocabulary of {size:,}")
    return tok, shown


def _eos_by_id(folder: Path, hf: dict, cfg_file: Path, tok) -> str | None:
    """The token config.json's, else generation_config.json's ``eos_token_id`` names (an id, or a list: the first)."""
    gen = folder / "generation_config.json"
    for cfg, f in ((hf, cfg_file), (_small_json(folder, gen.name, "the generation config") or {}, gen)):
        v = cfg.get("eos_token_id")
        v = (v or [None])[0] if isinstance(v, list) else v
        if v is None:
            continue
        token = tok.id_to_token(v) if isinstance(v, int) and 0 <= v < tok.get_vocab_size() else None
        if isinstance(v, bool) or token is None:
            raise _fail(f, f"eos_token_id must be the id of a token of the tokenizer, got {_val(v)}")
        return token
    return None


def _own_eos(folder: Path, family: str, hf: dict, cfg_file: Path, tok, tok_file: Path) -> RoleTokens:
    """A tokenizer without EOT: the model's own end-of-text token plays its role (Llama 2's ``</s>``, Llama 3's
    ``<|end_of_text|>``), named by tokenizer_config.json's eos_token, else by an eos_token_id. A gpt2 config's
    ids are not asked: transformers writes GPT-2's 50256 there whatever the tokenizer holds."""
    specials = _specials(folder)
    eos = specials.get("eos_token")
    if eos is not None and tok.token_to_id(eos) is None:
        raise _fail(folder / "tokenizer_config.json", f"its eos_token {_val(eos)} is not a token of the tokenizer")
    if eos is None and family != "gpt2":
        eos = _eos_by_id(folder, hf, cfg_file, tok)
    if eos is None:
        where = "tokenizer_config.json" + ("" if family == "gpt2" else ", nor an eos_token_id in config.json or "
                                                                          "generation_config.json")
        raise _fail(tok_file, f"the tokenizer lacks {EOT}, which every document ends with here, and the folder names "
                              f"no end-of-text token of its own (no eos_token in {where})")
    # bos/unk only where the tokenizer has them: export-hf writes them back beside the eos token
    return RoleTokens(tok, {**{k: v for k, v in specials.items() if tok.token_to_id(v) is not None}, "eos_token": eos})


# -- the whole folder -------------------------------------------------------------------------------


def check_folder(folder: str | Path, name: str | None = None, available: int | None = None) -> CheckedFolder:
    """Every check of import-hf, before any tensor is read; raises InputError naming the file and the problem."""
    try:
        folder = Path(folder).expanduser().resolve()
    except (OSError, RuntimeError) as e:
        raise InputError(f"{show_path(folder)} cannot be opened ({_first_line(e)})", key="dir", path=str(folder)) from None
    if not folder.is_dir():
        raise InputError(f"{show_path(folder)} is not a folder", key="dir", path=str(folder))
    hf, cfg_file = check_config(folder)
    family = hf["model_type"]
    head = "lm_head.weight"
    if family == "gpt2":
        n_layer, d, n_head = hf["n_layer"], hf["n_embd"], hf["n_head"]
        positions = hf.get("n_positions", 1024)
        act = "gelu" if hf.get("activation_function", "gelu_new") == "gelu" else "gelu_tanh"
        fields = {"n_layer": n_layer, "n_head": n_head, "d_model": d, "n_ctx": min(positions, 1024),
                  "n_positions": positions, "dropout": 0.0, "bias": True, "activation": act}
        params_of = functools.partial(gpt2_params, n_layer, d, positions)
        embed, what, tensors_of = "wte.weight", f"a {n_layer}-layer GPT-2 of width {d}", None
    else:
        biogpt = family == hf_biogpt.MODEL_TYPE
        fields = (hf_biogpt if biogpt else hf_llama).model_fields(hf, cfg_file, _fail, _int)
        n_layer, d, n_head, positions = fields["n_layer"], fields["d_model"], fields["n_head"], fields["n_positions"]
        act = fields["activation"] if biogpt else "silu"
        tensors_of = (hf_biogpt if biogpt else hf_llama).expected_shapes(fields)
        params_of = functools.partial(_llama_params, tensors_of)
        embed, what = hf_biogpt.EMBED if biogpt else "model.embed_tokens.weight", f"a {n_layer}-layer {family} of width {d}"
        head = hf_biogpt.HEAD if biogpt else head
    vocab_cfg = hf.get("vocab_size")
    if family != "gpt2" and vocab_cfg is not None:
        _int(hf, "vocab_size", VOCAB, cfg_file)
    # the config alone says how large the model is: refused here before a header is read
    params = params_of(vocab_cfg or 0)
    check_memory(import_memory(params, 4 * params, True), cfg_file, f"{what} has {params:,} parameters", available)

    tensors = _Tensors(n_layer, d, positions, vocab_cfg, tensors_of, embed, "GPT-2" if family == "gpt2" else family, head)
    files = check_safetensors(folder, tensors, n_layer)
    bin_state = None
    if not files:
        loaded = check_bin(folder, tensors, params, available)
        if loaded is None:
            raise InputError(f"{show_path(folder)} has no weights: model.safetensors, model.safetensors.index.json or "
                             "pytorch_model.bin", key="dir", path=str(folder))
        files, bin_state = [loaded[0]], loaded[1]
    rows = tensors.rows[embed]
    # again with the weights' own sizes (the token rows where the config gives no vocab_size, the buffers)
    params = params_of(rows)
    need = import_memory(params, tensors.nbytes, tensors.all_fp32)
    check_memory(need, tensors.where[embed], f"{what} with {rows:,} token rows", available)

    tok, tok_file = check_tokenizer(folder, family)
    notes = []
    if tok.token_to_id(EOT) is None:
        tok = _own_eos(folder, family, hf, cfg_file, tok, tok_file)
        notes.append(f"documents end with the model's own end-of-text token {tok.roles[EOT]} (id "
                     f"{tok.token_to_id(EOT)}): the tokenizer has no {EOT}")
    if tok.token_to_id(PAD) is None:
        # our batches pad with <|pad|>; a new row of zeros gives it logit 0 (it is never a target)
        tok.add_special_tokens([PAD])
        notes.append(f"added {PAD} to the tokenizer (id {tok.token_to_id(PAD)}) with a zero embedding row")
    vocab = tok.get_vocab_size()
    if vocab < rows:
        raise _fail(tok_file, f"the tokenizer has {vocab:,} tokens but the embedding {rows:,} rows")
    if vocab > rows and (vocab - rows > 1 or not notes):
        raise _fail(tok_file, f"the tokenizer has {vocab:,} tokens but the embedding only {rows:,} rows")
    if vocab < MIN_VOCAB:
        raise _fail(tok_file, f"the tokenizer has {vocab} tokens; at least {MIN_VOCAB} (256 bytes and 2 special "
                              "tokens) are needed")
    config = from_dict({"name": name or folder.name, "stage": PRETRAIN, "model": fields,
                        "tokenizer": {"vocab_size": vocab}, "sparsity": {"level": 0.0}})
    return CheckedFolder(folder=folder, hf_config=hf, config=config, n_layer=n_layer, n_embd=d, n_head=n_head,
                         n_positions=positions, activation=act, rows=rows, vocab=vocab, tokenizer=tok,
                         weight_files=files, tensor_file=dict(tensors.where), bin_state=bin_state, notes=notes,
                         memory_bytes=need)
