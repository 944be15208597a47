"""Everything a sparse run holds and writes grows with its nonzeros: checkpoints store masked matrices
as values plus mask bits and read back as the same dense state; the memory estimate that decides what
is tried counts nonzeros, and says a 75 %-sparse mediswift-xl step fits where the dense one cannot."""
from __future__ import annotations
import pytest

import torch

from engine.core.config import ModelConfig, load_config
from engine.core.paths import resolve_preset
from engine.model.checkpoint import load_checkpoint, save_checkpoint
from engine.model.gpt import GPT
from engine.model.sparsity import apply_sparsity, masks_state, packed_state_dict
from engine.train.estimate import estimate


def _model(level):
    torch.manual_seed(0)
    m = GPT(ModelConfig(n_layer=2, n_head=4, d_model=128, n_ctx=32), 64)
    apply_sparsity(m, level, "uniform", 0)
    return m


@pytest.mark.quick
def test_a_checkpoint_holds_the_nonzeros_and_reads_back_dense(tmp_path):
    sizes = {}
    for level in (0.5, 0.9):
        m = _model(level)
        packed = packed_state_dict(m)
        assert list(packed) == list(m.state_dict())
        path = tmp_path / f"{level}.safetensors"
        sizes[level] = save_checkpoint({"model": packed, "masks": masks_state(m)}, path)
        ck = load_checkpoint(path)
        for k, v in m.state_dict().items():
            assert torch.equal(ck["model"][k], v), k
        for k, v in masks_state(m).items():
            assert ck["masks"][k].dtype == torch.bool and torch.equal(ck["masks"][k], v)
    sparse_numel = 2 * 12 * 128 * 128
    # 40 % of the sparse matrices' fp32 values fewer at 90 % than at 50 %; masks cost a bit per entry
    saved = sizes[0.5] - sizes[0.9]
    assert abs(saved - 0.4 * sparse_numel * 4) < 0.02 * sparse_numel * 4, sizes


@pytest.mark.quick
def test_a_damaged_masked_weight_is_refused_naming_the_file(tmp_path):
    from engine.core.errors import InputError
    from engine.model.checkpoint import MaskedWeight

    mask = torch.tensor([[True, False], [False, True]])
    path = tmp_path / "bad.safetensors"
    save_checkpoint({"model": {"w": MaskedWeight(torch.ones(3), mask)}}, path)  # 3 values for 2 entries
    try:
        load_checkpoint(path)
    except InputError as e:
        assert str(path) in str(e) and "damaged" in str(e)
    else:
        raise AssertionError("a masked weight with the wrong number of values was loaded")


@pytest.mark.quick
def test_the_estimate_fits_a_75_percent_sparse_xl_step_where_dense_cannot():
    base = {"train.batch_size": 1, "train.grad_accum": 1, "train.precision": "bf16"}
    cfg = load_config(resolve_preset("mediswift-xl"), base)
    sparse = estimate(cfg, probe_steps=0)
    dense = estimate(load_config(resolve_preset("mediswift-xl"), {**base, "sparsity.level": 0.0}), probe_steps=0)
    gib = 2 ** 30
    assert sparse["memory_bytes"] < 20 * gib < 22 * gib < dense["memory_bytes"]
    parts = sparse["memory_parts"]
    nnz = sparse["params"]["nonzero"]
    assert parts["states"] == 16 * nnz  # values, gradients, two moments: nonzeros only
    assert dense["memory_parts"]["states"] == 16 * dense["params"]["total"]
