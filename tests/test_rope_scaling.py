"""Rotary position scaling (model.rope_scaling linear and llama3, Llama 3.x's): a llama folder written by
transformers with scaled rotary positions imports with transformers' logits past the pre-training context,
exports back to LlamaForCausalLM with the same logits; other scalings (yarn, dynamic) are refused by name,
and the families with learned positions refuse the keys."""
from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from test_model_families import (
    SHAPE,
    TEXT,
    _import,
    _import_exit,
    _max_diff,
    _tokenizer,
)

from engine.core.config import ModelConfig, from_dict
from engine.core.errors import InputError
from engine.model.gpt import GPT
from engine.model.rotary import Scaling, inverse_frequencies

transformers = pytest.importorskip("transformers")
ORIGINAL = 32  # the "pre-training" context: the test sequence is longer, so the scaled frequencies matter
SCALINGS = {
    "llama3": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": ORIGINAL},
    "linear": {"rope_type": "linear", "factor": 4.0},
}
OURS = {  # model.rope_* an import of SCALINGS gives
    "llama3": {"rope_scaling": "llama3", "rope_factor": 8.0, "rope_low_freq_factor": 1.0, "rope_high_freq_factor": 4.0,
               "rope_original_max_positions": ORIGINAL},
    "linear": {"rope_scaling": "linear", "rope_factor": 4.0},
}


def _scaled_folder(tmp_path, rope: dict, name: str = "llama"):
    """A tiny random LlamaForCausalLM with rotary scaling ``rope``, saved by transformers (rope_parameters)."""
    folder = tmp_path / name
    vocab = _tokenizer(folder)
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=vocab, tie_word_embeddings=False, rope_parameters=dict(rope), **SHAPE)
    model = transformers.LlamaForCausalLM(cfg).eval()
    model.save_pretrained(str(folder))
    return folder, model


def _rewrite(folder, change) -> None:
    path = folder / "config.json"
    cfg = json.loads(path.read_text())
    change(cfg)
    path.write_text(json.dumps(cfg))


def _long_ids(tok) -> list[int]:
    ids = tok.encode(" ".join([TEXT] * 12)).ids[:SHAPE["max_position_embeddings"]]
    assert len(ids) > 3 * ORIGINAL
    return ids


@pytest.mark.parametrize("kind", list(SCALINGS))
def test_a_scaled_llama_imports_with_transformers_logits_and_exports_back(tmp_path, kind):
    folder, theirs = _scaled_folder(tmp_path, SCALINGS[kind])
    assert theirs.model.rotary_emb.rope_type == kind and theirs.model.rotary_emb.attention_scaling == 1.0
    ours, tok, db, report = _import(tmp_path, folder)
    m = ours.cfg
    assert report["family"] == "llama" and {k: getattr(m, k) for k in OURS[kind]} == OURS[kind]
    ids = _long_ids(tok)
    assert _max_diff(ours, theirs, ids) < 1e-4
    # the scaling is what makes them equal: without it the logits part past the first positions
    plain = GPT(dataclasses.replace(m, rope_scaling="none"), ours.wte.weight.shape[0]).eval()
    plain.load_state_dict(ours.state_dict())
    assert _max_diff(plain, theirs, ids) > 1e-3

    from engine.publish.hf_export import export_hf

    out = tmp_path / "export"
    export_hf(db, report["run_id"], out)
    written = json.loads((out / "config.json").read_text())
    assert written["rope_scaling"]["rope_type"] == written["rope_parameters"]["rope_type"] == kind
    back = transformers.LlamaForCausalLM.from_pretrained(str(out)).eval()
    assert back.model.rotary_emb.rope_type == kind
    assert _max_diff(ours, back, ids) < 1e-4


@pytest.mark.quick
@pytest.mark.parametrize("layout", ["rope_scaling with rope_type", "rope_scaling with type"])
def test_the_older_rope_scaling_layout_imports_the_same_fields(tmp_path, layout):
    """transformers before 5 wrote rope_theta beside rope_scaling (the oldest with "type" for rope_type)."""
    folder, _ = _scaled_folder(tmp_path, SCALINGS["llama3"])
    key = "rope_type" if layout.endswith("rope_type") else "type"

    def old(cfg):
        rope = cfg.pop("rope_parameters")
        cfg["rope_theta"] = rope.pop("rope_theta")
        cfg["rope_scaling"] = {key: rope.pop("rope_type"), **rope}
    _rewrite(folder, old)
    ours, *_ = _import(tmp_path, folder)
    assert {k: getattr(ours.cfg, k) for k in OURS["llama3"]} == OURS["llama3"] and ours.cfg.rope_theta == SHAPE["rope_theta"]


@pytest.mark.quick
@pytest.mark.parametrize("rope_type", ["yarn", "dynamic"])
def test_another_rotary_scaling_exits_2_naming_it_and_the_supported_ones(tmp_path, capsys, rope_type):
    folder, _ = _scaled_folder(tmp_path, SCALINGS["linear"])
    _rewrite(folder, lambda cfg: cfg["rope_parameters"].update(rope_type=rope_type, original_max_position_embeddings=32))
    capsys.readouterr()
    line = _import_exit(tmp_path, capsys, folder)
    assert rope_type in line and "config.json" in line and all(t in line for t in ("'linear'", "'llama3'")), line
    assert not (tmp_path / "runs").exists()


@pytest.mark.quick
def test_a_llama3_scaling_missing_a_factor_exits_2_naming_it(tmp_path, capsys):
    folder, _ = _scaled_folder(tmp_path, SCALINGS["llama3"])
    _rewrite(folder, lambda cfg: cfg["rope_parameters"].pop("high_freq_factor"))
    capsys.readouterr()
    line = _import_exit(tmp_path, capsys, folder)
    assert "high_freq_factor" in line and "llama3" in line, line


@pytest.mark.quick
@pytest.mark.parametrize("family", ["gpt2", "biogpt"])
@pytest.mark.parametrize("key,value", [("rope_scaling", "llama3"), ("rope_factor", 8.0),
                                       ("rope_original_max_positions", 8192)])
def test_learned_position_families_refuse_rotary_scaling_in_one_line(family, key, value):
    with pytest.raises(InputError) as e:
        ModelConfig(family=family, **{key: value})
    assert e.value.key == f"model.{key}" and family in str(e.value) and "\n" not in str(e.value)
    assert ModelConfig(family="llama", **{key: value}).family == "llama"  # a rotary family takes it


@pytest.mark.quick
def test_config_checks_the_scaling_numbers():
    for bad in ({"rope_factor": 0.0}, {"rope_factor": -2.0}, {"rope_low_freq_factor": 0.0},
                {"rope_scaling": "llama3", "rope_low_freq_factor": 4.0, "rope_high_freq_factor": 4.0},
                {"rope_scaling": "yarn"}):
        with pytest.raises(InputError):
            from_dict({"model": {"family": "llama", **bad}})
    m = ModelConfig(family="qwen2")
    assert m.rope_scaling == "none" and Scaling.of(m) is None  # unscaled: the frequencies exactly as before


@pytest.mark.quick
@pytest.mark.parametrize("kind", list(SCALINGS))
def test_the_frequencies_equal_transformers_at_llama_3_2_s_numbers(kind):
    """Llama 3.2's head width, theta and scaling (factor 32, pre-trained on 8192 positions), and linear."""
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    rope = {**SCALINGS[kind], "factor": 32.0, "rope_theta": 500000.0}
    if kind == "llama3":
        rope["original_max_position_embeddings"] = 8192
    cfg = transformers.LlamaConfig(hidden_size=2048, num_attention_heads=32, max_position_embeddings=131072,
                                   rope_parameters=rope)
    theirs, attention = ROPE_INIT_FUNCTIONS[kind](cfg, "cpu")
    m = from_dict({"model": {"family": "llama", "d_model": 2048, "n_head": 32, "n_positions": 131072, "n_ctx": 1024,
                             "rope_theta": 500000.0, "rope_scaling": kind, "rope_factor": 32.0,
                             "rope_original_max_positions": 8192 if kind == "llama3" else 0}}).model
    ours = inverse_frequencies(64, m.rope_theta, "cpu", Scaling.of(m))
    assert attention == 1.0
    assert torch.allclose(ours, theirs, rtol=1e-6, atol=0)
    assert not torch.allclose(ours, inverse_frequencies(64, m.rope_theta, "cpu"))


@pytest.mark.quick
def test_cached_generation_with_llama3_scaling_equals_the_full_forward():
    from engine.model.gpt import KVCache

    torch.manual_seed(0)
    cfg = ModelConfig(family="llama", n_layer=2, n_head=4, n_kv_head=2, d_model=32, d_ff=48, n_ctx=64,
                      rope_scaling="llama3", rope_factor=8.0, rope_original_max_positions=16)
    model = GPT(cfg, 300).eval()
    x = torch.randint(0, 300, (1, 40))
    cache = KVCache(2)
    with torch.no_grad():  # a prompt past the pre-training context, then one token, then a few
        chunks = [model.hidden(x[:, a:b], cache=cache) for a, b in ((0, 30), (30, 31), (31, 36), (36, 40))]
        assert (torch.cat(chunks, dim=1) - model.hidden(x)).abs().max().item() < 1e-5
