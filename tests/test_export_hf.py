"""Hugging Face export: a trained tiny run loads in transformers offline with the same tokens and logits."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

os.environ["HF_HUB_OFFLINE"] = "1"  # before transformers reads it: nothing may come from the network
os.environ["TRANSFORMERS_OFFLINE"] = "1"

import pytest
import torch
from helpers import REPO, engine_env, tiny

from engine.core.config import from_dict
from engine.store.rundb import RunDB
from engine.data.vocab import load_tokenizer
from engine.model.checkpoint import load_checkpoint, save_checkpoint
from engine.model.gpt import GPT
from engine.model.sparsity import apply_sparsity, load_masks, masks_state
from engine.publish.hf_export import PROMPT_FILE, export_hf

transformers = pytest.importorskip("transformers")

TEXTS = [
    "Abnormality of the cardiovascular system.",
    "A  rare héréditaire disorder — 3.5 mg/kg <|endoftext|> next document\n\twith tabs",
    "",
]


def _cli(tmp, *args):
    cmd = [sys.executable, "-m", "engine", *args, "--db", str(tmp / "runs.db")]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=REPO, env=engine_env(tmp))


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One trained 2-layer, 50 %-sparse tiny run (kernel=dense: the auto kernel timing is not needed here)."""
    tmp = tmp_path_factory.mktemp("hf")
    r = _cli(tmp, "train", "demo", *tiny("model.n_layer=2", "sparsity.level=0.5", "sparsity.kernel=dense",
                                         "train.max_steps=4", "train.eval_every=2"))
    assert r.returncode == 0, r.stderr
    db = RunDB(tmp / "runs.db")
    (run,) = db.list_runs()
    yield tmp, db, run
    db.close()


def _ours(db: RunDB, run_id: str) -> tuple[GPT, object]:
    ck = load_checkpoint(db.latest_checkpoint(run_id)["path"])
    cfg = from_dict(ck["config"])
    model = GPT(cfg.model, ck["vocab_size"])
    load_masks(model, ck["masks"])
    model.load_state_dict(ck["model"])
    return model.eval(), cfg


def test_export_loads_in_transformers_with_same_tokens_and_logits(trained):
    tmp, db, run = trained
    out = tmp / "hf"
    r = _cli(tmp, "export-hf", run["id"], "--out", str(out))
    assert r.returncode == 0, r.stderr
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "README.md"} <= {p.name for p in out.iterdir()}

    hf = transformers.GPT2LMHeadModel.from_pretrained(str(out)).eval()
    hf_tok = transformers.AutoTokenizer.from_pretrained(str(out))
    ours, cfg = _ours(db, run["id"])
    tok = load_tokenizer(run["run_dir"])

    for text in TEXTS:
        assert hf_tok(text)["input_ids"] == tok.encode(text).ids, text
        assert hf_tok.decode(tok.encode(text).ids) == text
    assert hf_tok.eos_token_id == tok.token_to_id("<|endoftext|>")
    assert hf_tok.pad_token_id == tok.token_to_id("<|pad|>")

    ids = tok.encode(" ".join(TEXTS[:2]) * 3).ids[: cfg.model.n_ctx]
    assert len(ids) == cfg.model.n_ctx  # a full context: every position is compared
    x = torch.tensor([ids])
    with torch.no_grad():
        a = ours(x)[0]
        b = hf(x).logits
    assert a.shape == b.shape
    assert float((a - b).abs().max()) < 1e-4
    assert torch.equal(a[0, -1].argmax(), b[0, -1].argmax())  # the same next token

    # sparse weights travel as dense tensors with their zeros, exactly where the masks are
    mask = ours.blocks[1].attn.k.mask
    c_attn = hf.transformer.h[1].attn.c_attn.weight  # Conv1D [d, 3d] = [q | k | v] transposed
    d = cfg.model.d_model
    assert torch.equal(c_attn[:, d:2 * d].t() == 0, ~mask)
    card = (out / "README.md").read_text()
    assert "50.0%" in card and "dense tensors" in card and run["id"] in card


@pytest.mark.quick
def test_exact_gelu_is_declared_and_tanh_gelu_would_differ(trained):
    """transformers' "gelu_new" is the tanh approximation; our MLP uses the exact erf GELU."""
    tmp, db, run = trained
    out = tmp / "hf_gelu"
    export_hf(db, run["id"], out)
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["activation_function"] == "gelu" and cfg["tie_word_embeddings"] is True
    x = torch.linspace(-4, 4, 101)
    exact = transformers.activations.ACT2FN["gelu"](x)
    assert float((exact - torch.nn.functional.gelu(x)).abs().max()) == 0.0
    assert float((transformers.activations.ACT2FN["gelu_new"](x) - exact).abs().max()) > 1e-4


@pytest.mark.quick
def test_refuses_to_overwrite_and_rejects_unknown_run(trained, capsys):
    from engine.cli import main

    tmp, db, run = trained
    out = tmp / "busy"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert main(["export-hf", run["id"], "--out", str(out), "--db", str(db.path)]) == 2
    assert "not empty" in capsys.readouterr().err
    assert (out / "keep.txt").read_text() == "mine"
    assert main(["export-hf", "nosuchrun", "--out", str(tmp / "x"), "--db", str(db.path)]) == 2
    assert "unknown run" in capsys.readouterr().err


def _fake_run(db: RunDB, tmp, src_run: dict, config: dict, model: GPT, stage: str = "pretrain", parent: str | None = None) -> dict:
    """A run row + folder + checkpoint built in-process (no training), reusing a trained run's tokenizer."""
    rid = db.create_run(name=f"fake-{stage}", stage=stage, config=config, parent_id=parent)
    folder = tmp / "runs" / rid
    folder.mkdir(parents=True)
    shutil.copy(os.path.join(src_run["run_dir"], "tokenizer.json"), folder / "tokenizer.json")
    db.update_run(rid, run_dir=str(folder), status="completed")
    path = folder / "checkpoints" / "step_0000001.safetensors"
    n = save_checkpoint({"config": config, "model": model.state_dict(), "masks": masks_state(model),
                         "vocab_size": model.vocab_size, "step": 1, "stage": stage}, path)
    db.add_checkpoint(rid, 1, 0, str(path), n, True)
    return db.get_run(rid)


@pytest.mark.quick
def test_bias_free_model_exports_zero_biases(trained):
    tmp, db, run = trained
    cfg = from_dict(run["config"]).replace({"model.bias": False, "sparsity.level": 0.75})
    torch.manual_seed(0)
    model = GPT(cfg.model, run["meta"]["vocab_size"])
    apply_sparsity(model, 0.75, "uniform", seed=1)
    with torch.no_grad():  # larger weights than the init, so a layout slip shows in the logits
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.2)
        for m in model.sparse_layers().values():
            m.weight.mul_(m.mask)
    fake = _fake_run(db, tmp, run, cfg.to_dict(), model)
    out = tmp / "hf_nobias"
    report = export_hf(db, fake["id"], out)
    assert abs(report["sparsity"]["matrices"] - 0.75) < 1e-3
    hf = transformers.GPT2LMHeadModel.from_pretrained(str(out)).eval()
    x = torch.randint(0, model.vocab_size, (2, cfg.model.n_ctx))
    with torch.no_grad():
        diff = (model.eval()(x)[0] - hf(x).logits).abs().max()
    assert float(diff) < 1e-4
    assert float(hf.transformer.h[0].attn.c_attn.bias.detach().abs().sum()) == 0.0


@pytest.mark.quick
def test_prompt_run_exports_parent_model_and_prompt_file(trained):
    tmp, db, run = trained
    ours, cfg = _ours(db, run["id"])
    prompt_cfg = from_dict({**run["config"], "stage": "prompt", "parent": run["id"]}).to_dict()
    rid = db.create_run(name="prompt", stage="prompt", config=prompt_cfg, parent_id=run["id"])
    folder = tmp / "runs" / rid
    folder.mkdir(parents=True)
    db.update_run(rid, run_dir=str(folder), status="completed")
    prompt = torch.randn(4, cfg.model.d_model) * 0.5
    torch.save({"prompt": prompt, "n_tokens": 4}, folder / "prompt.pt")
    db.add_artifact(rid, "prompt", str(folder / "prompt.pt"), {"n_tokens": 4})

    out = tmp / "hf_prompt"
    report = export_hf(db, rid, out)
    assert report["model_run"] == run["id"] and report["prompt"]["n_tokens"] == 4
    from safetensors.torch import load_file

    loaded = load_file(str(out / PROMPT_FILE))["prompt_embeddings"]
    assert torch.equal(loaded, prompt)
    card = (out / "README.md").read_text()
    assert "Soft prompt" in card and PROMPT_FILE in card

    hf = transformers.GPT2LMHeadModel.from_pretrained(str(out)).eval()
    ids = torch.tensor([load_tokenizer(run["run_dir"]).encode(TEXTS[0]).ids[:20]])
    with torch.no_grad():
        a = ours(ids, prefix=prompt[None])[0][:, 4:]
        emb = hf.transformer.wte(ids)
        b = hf(inputs_embeds=torch.cat([loaded[None], emb], 1)).logits[:, 4:]
    assert float((a - b).abs().max()) < 1e-4
