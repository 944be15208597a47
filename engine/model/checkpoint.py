"""Checkpoint files: data, never code.

A checkpoint is one safetensors file: every tensor of the state (weights, masks, optimizer moments,
RNG states) is a safetensors tensor, and the structure around them (dicts, lists, tuples, numbers,
strings) is JSON in the file's metadata. Opening one never unpickles anything, so a crafted file
cannot run code. Files are written atomically (a per-process temporary file, fsync, rename), so a
crash never leaves half a file under the final name, and their SHA-256 is recorded with the
checkpoint row so damage is found on load (engine.model.runs picks the newest good one).

Checkpoints of earlier versions are pickles (``step_N.pt``): they are refused with a line saying how
to convert them (``mediswift migrate-checkpoints RUN_ID``, which asks before trusting one).
"""
from __future__ import annotations

import errno
import hashlib
import json
import math
import os
import re
from pathlib import Path

import numpy as np
import torch

from engine.core.errors import FileSystemError, InputError

FORMAT = 3  # 3: bool tensors as bits, masked weights as their nonzeros (2 is read alike)
SUFFIX = ".safetensors"
_META_KEY = "mediswift_state"


def checkpoint_name(step: int) -> str:
    return f"step_{step:07d}{SUFFIX}"


# -- encoding: nested state <-> (JSON skeleton, flat tensors) ----------------------------------------


class MaskedWeight:
    """A masked matrix as a checkpoint stores it: its nonzeros in row-major order and its mask (as
    bits), so a checkpoint grows with the nonzeros, not the dense shape. Loading gives the dense
    matrix back, so every reader sees an ordinary state dict."""

    def __init__(self, values: torch.Tensor, mask: torch.Tensor):
        self.values, self.mask = values, mask

    def dense(self) -> torch.Tensor:
        w = torch.zeros(self.mask.numel(), dtype=self.values.dtype)
        w[self.mask.reshape(-1)] = self.values
        return w.view(self.mask.shape)


def _tensor(t: torch.Tensor, tensors: dict[str, torch.Tensor], seen: set[int]) -> dict:
    t = t.detach().to("cpu").contiguous()
    if t.dtype == torch.bool:  # masks: one bit per entry instead of a byte
        bits = torch.from_numpy(np.packbits(t.reshape(-1).numpy()))
        return {"__bits__": _tensor(bits, tensors, seen), "shape": list(t.shape)}
    if t.untyped_storage().data_ptr() in seen and t.numel():  # safetensors stores no shared memory (tied weights)
        t = t.clone()
    seen.add(t.untyped_storage().data_ptr())
    key = f"t{len(tensors)}"
    tensors[key] = t
    return {"__tensor__": key}


def _encode(obj, tensors: dict[str, torch.Tensor], seen: set[int]):
    if isinstance(obj, MaskedWeight):
        return {"__masked__": _tensor(obj.values, tensors, seen), "mask": _tensor(obj.mask, tensors, seen)}
    if isinstance(obj, np.ndarray):
        obj = torch.from_numpy(np.ascontiguousarray(obj))
    if isinstance(obj, torch.Tensor):
        return _tensor(obj, tensors, seen)
    if isinstance(obj, dict):
        return {"__items__": [[_encode(k, tensors, seen), _encode(v, tensors, seen)] for k, v in obj.items()]}
    if isinstance(obj, tuple):
        return {"__tuple__": [_encode(v, tensors, seen) for v in obj]}
    if isinstance(obj, list):
        return [_encode(v, tensors, seen) for v in obj]
    if isinstance(obj, np.generic):
        obj = obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return {"__float__": repr(obj)}
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise TypeError(f"cannot store a {type(obj).__name__} in a checkpoint")


def _decode(obj, tensors):
    if isinstance(obj, list):
        return [_decode(v, tensors) for v in obj]
    if isinstance(obj, dict):
        if "__tensor__" in obj:
            return tensors(obj["__tensor__"])
        if "__bits__" in obj:
            shape = [int(n) for n in obj["shape"]]
            bits = _decode(obj["__bits__"], tensors).numpy()
            flat = np.unpackbits(bits, count=int(np.prod(shape, dtype=np.int64))).astype(bool)
            return torch.from_numpy(flat).view(shape)
        if "__masked__" in obj:
            mask = _decode(obj["mask"], tensors)
            values = _decode(obj["__masked__"], tensors)
            if values.numel() != int(mask.sum()):
                raise ValueError(f"a masked weight holds {values.numel()} values for {int(mask.sum())} mask entries")
            return MaskedWeight(values, mask).dense()
        if "__items__" in obj:
            return {_decode(k, tensors): _decode(v, tensors) for k, v in obj["__items__"]}
        if "__tuple__" in obj:
            return tuple(_decode(v, tensors) for v in obj["__tuple__"])
        if "__float__" in obj:
            return float(obj["__float__"])
    return obj


# -- files ----------------------------------------------------------------------------------------------


def save_checkpoint(state: dict, path: Path) -> int:
    """Write ``state`` atomically to ``path``; returns its size in bytes. A file system that refuses
    it (full, the file-size limit, read-only) raises FileSystemError naming ``path`` and the errno,
    and no temporary file is left."""
    from safetensors import SafetensorError
    from safetensors.torch import save_file

    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise FileSystemError.of(e, path.parent) from None
    tensors: dict[str, torch.Tensor] = {}
    skeleton = json.dumps(_encode({**state, "format": FORMAT}, tensors, set()))
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")  # per process: two writers never share a temporary file
    try:
        save_file(tensors, str(tmp), metadata={_META_KEY: skeleton})
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
        return path.stat().st_size
    except OSError as e:
        raise FileSystemError.of(e, path) from None
    except SafetensorError as e:  # the Rust writer's I/O errors: "... (os error 28)"
        m = re.search(r"os error (\d+)", str(e))
        if m is None:
            raise
        raise FileSystemError(int(m.group(1)) or errno.EIO, path) from None
    finally:
        tmp.unlink(missing_ok=True)


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def is_legacy(path: str | Path) -> bool:
    """A checkpoint of an earlier version: a torch pickle (zip archive or raw pickle), not safetensors."""
    with open(path, "rb") as fh:
        head = fh.read(9)
    if len(head) == 9 and head[8:9] == b"{" and int.from_bytes(head[:8], "little") < Path(path).stat().st_size:
        return False  # safetensors: an 8-byte header length, then the JSON header
    return head[:4] == b"PK\x03\x04" or (head[:1] == b"\x80" and head[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05"))


def load_checkpoint(path: str | Path) -> dict:
    """The state saved by save_checkpoint. Damaged files and old pickles raise InputError naming the file."""
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    try:
        legacy = is_legacy(path)
    except OSError as e:
        raise InputError(f"cannot read checkpoint {path}: {e.strerror or e}", path=str(path)) from None
    if legacy:
        raise InputError(f"{path} is a checkpoint of an earlier version (a pickle, which can run code when opened); "
                         "convert it with `mediswift migrate-checkpoints RUN_ID` if you trust it", key="checkpoint",
                         path=str(path))
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            if _META_KEY not in meta:
                raise InputError(f"{path} is a safetensors file but not a MediSwift checkpoint", key="checkpoint",
                                 path=str(path))
            return _decode(json.loads(meta[_META_KEY]), f.get_tensor)
    except (SafetensorError, ValueError, OSError, KeyError) as e:
        if isinstance(e, InputError):
            raise
        raise InputError(f"checkpoint {path} is damaged: {str(e).splitlines()[0] if str(e) else type(e).__name__}",
                         key="checkpoint", path=str(path)) from None


def current_path(path: str | Path) -> Path:
    """A recorded checkpoint path, or the converted file beside it once migrate-checkpoints replaced a pickle."""
    path = Path(path)
    converted = path.with_suffix(SUFFIX)
    return converted if not path.exists() and path.suffix != SUFFIX and converted.is_file() else path


def load_legacy_checkpoint(path: str | Path) -> dict:
    """Unpickle a checkpoint of an earlier version. This can run code hidden in the file: only for
    ``mediswift migrate-checkpoints``, after the user said they trust it."""
    return torch.load(Path(path), map_location="cpu", weights_only=False)
