"""Model families (issue 27): llama and qwen2 folders written by transformers import with equal logits,
export back to their own transformers classes, and a config that contradicts the weights is refused."""
from __future__ import annotations

import json
import os

import pytest
import torch

from engine.core.config import ModelConfig, from_dict
from engine.data.vocab import EOT, load_tokenizer
from engine.model.checkpoint import load_checkpoint
from engine.model.gpt import GPT
from engine.store.rundb import RunDB

transformers = pytest.importorskip("transformers")
os.environ["HF_HUB_OFFLINE"] = "1"
TEXT = "Abnormality of the cardiovascular system, 3.5 mg/kg <|endoftext|> next words here"
SHAPE = dict(num_hidden_layers=2, hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
             intermediate_size=96, max_position_embeddings=128, rms_norm_eps=1e-6, rope_theta=5000.0)


def _tokenizer(folder) -> int:
    """A tiny byte-level BPE tokenizer.json with <|endoftext|>, saved so transformers loads it too."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=[EOT],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([TEXT, "the cardiovascular system of the heart", "abnormality abnormal"] * 20, trainer)
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOT)
    fast.save_pretrained(str(folder))
    return tok.get_vocab_size()


def _folder(tmp_path, kind: str, tied: bool, bin: bool = False, **save) -> tuple:
    folder = tmp_path / f"{kind}-{'tied' if tied else 'untied'}"
    vocab = _tokenizer(folder)
    torch.manual_seed(0)
    if kind == "llama":
        cfg = transformers.LlamaConfig(vocab_size=vocab, tie_word_embeddings=tied, **SHAPE)
        model = transformers.LlamaForCausalLM(cfg)
    else:
        cfg = transformers.Qwen2Config(vocab_size=vocab, tie_word_embeddings=tied, **SHAPE)
        model = transformers.Qwen2ForCausalLM(cfg)
        with torch.no_grad():  # random-initialised biases are zeros: make them matter
            for layer in model.model.layers:
                for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                    proj.bias.normal_(0, 0.1)
    model.eval().save_pretrained(str(folder), **save)
    if bin:  # transformers 5 writes safetensors only: the older .bin format by hand
        (folder / "model.safetensors").unlink()
        torch.save(model.state_dict(), folder / "pytorch_model.bin")
    return folder, model


def _import(tmp_path, folder) -> tuple[GPT, object, RunDB, dict]:
    from engine.publish.hf_import import import_hf

    db = RunDB(tmp_path / "runs.db")
    report = import_hf(db, folder, tmp_path / "runs", warn=lambda m: None)
    ck = load_checkpoint(db.latest_checkpoint(report["run_id"])["path"])
    model = GPT(from_dict(ck["config"]).model, ck["vocab_size"])
    model.load_state_dict(ck["model"])
    tok = load_tokenizer(db.get_run(report["run_id"])["run_dir"] + "/tokenizer.json")
    return model.eval(), tok, db, report


def _max_diff(ours: GPT, theirs, ids: list[int]) -> float:
    x = torch.tensor([ids])
    with torch.no_grad():
        mine = ours(x)[0][..., : theirs.config.vocab_size]  # ours has the <|pad|> row the import added
        return (mine - theirs(input_ids=x).logits).abs().max().item()


@pytest.mark.parametrize("kind,tied,save", [
    ("llama", False, {}),                                                   # grouped-query, untied head
    ("llama", True, {"bin": True}),                                         # tied head, pytorch_model.bin
    ("qwen2", False, {"max_shard_size": "60KB"}),                           # q/k/v biases, sharded safetensors
])
def test_import_gives_transformers_logits_and_export_loads_back(tmp_path, kind, tied, save):
    folder, theirs = _folder(tmp_path, kind, tied, **save)
    ours, tok, db, report = _import(tmp_path, folder)
    assert report["family"] == kind and ours.cfg.tie_embeddings is tied and ours.cfg.kv_heads == 2
    # the tokenizer as the model ships it: the ids transformers' own tokenizer gives
    ids = tok.encode(TEXT).ids
    assert ids == transformers.AutoTokenizer.from_pretrained(str(folder))(TEXT)["input_ids"]
    assert _max_diff(ours, theirs, ids) < 1e-4

    from engine.publish.hf_export import export_hf

    out = tmp_path / "export"
    export_hf(db, report["run_id"], out)
    cls = {"llama": transformers.LlamaForCausalLM, "qwen2": transformers.Qwen2ForCausalLM}[kind]
    assert json.loads((out / "config.json").read_text())["architectures"] == [cls.__name__]
    card = (out / "README.md").read_text()
    assert f"model = {cls.__name__}.from_pretrained" in card and f"tags: [{kind}," in card
    back = cls.from_pretrained(str(out)).eval()
    assert _max_diff(ours, back, ids) < 1e-4


@pytest.mark.quick
def test_every_llama_matrix_is_sparse_capable_and_trains():
    """Every llama matrix is a SparseLinear (k/v narrower under grouped-query), so masks apply to all."""
    from engine.model.sparsity import apply_sparsity, measure_sparsity

    cfg = ModelConfig(family="llama", n_layer=2, n_head=4, n_kv_head=2, d_model=32, d_ff=48, tie_embeddings=False)
    model = GPT(cfg, 300)
    shapes = {n: (m.out_features, m.in_features) for n, m in model.sparse_layers().items()}
    assert shapes["blocks.0.attn.k"] == (16, 32) and shapes["blocks.0.mlp.gate"] == (48, 32)
    assert sorted({n.split(".", 2)[2] for n in shapes}) == ["attn.k", "attn.out", "attn.q", "attn.v", "mlp.down",
                                                             "mlp.gate", "mlp.up"]
    apply_sparsity(model, 0.75, "erk", 0)
    assert abs(measure_sparsity(model)["total"] - 0.75) < 0.01
    x = torch.randint(0, 300, (2, 16))
    _, loss = model(x, targets=x)
    loss.backward()
    assert all(m.values.grad is not None for m in model.sparse_layers().values())


def _import_exit(tmp_path, capsys, folder) -> str:
    from engine.cli import main

    assert main(["import-hf", str(folder), "--db", str(tmp_path / "r.db")]) == 2
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert len(err) == 1, err
    return err[0]


@pytest.mark.quick
@pytest.mark.parametrize("model_type,arch", [("mixtral", "MixtralForCausalLM"), ("clip_vision_model", "CLIPVisionModel")])
def test_an_unsupported_model_type_exits_2_naming_it_and_the_families(tmp_path, capsys, model_type, arch):
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": model_type, "architectures": [arch]}))
    line = _import_exit(tmp_path, capsys, folder)
    assert model_type in line and all(f in line for f in ("gpt2", "llama", "qwen2")), line


@pytest.mark.quick
def test_a_config_contradicting_the_weights_exits_2_naming_the_tensor(tmp_path, capsys):
    folder, _ = _folder(tmp_path, "llama", False)
    cfg = json.loads((folder / "config.json").read_text())
    cfg["num_key_value_heads"] = 4  # the weights have 2: k and v are half as wide as the config says
    (folder / "config.json").write_text(json.dumps(cfg))
    capsys.readouterr()  # transformers' progress lines
    line = _import_exit(tmp_path, capsys, folder)
    assert "model.layers.0.self_attn.k_proj.weight" in line and "[32, 64]" in line and "[64, 64]" in line, line
    assert not (tmp_path / "runs").exists()


@pytest.mark.quick
@pytest.mark.parametrize("family,kv,ff", [("gpt2", 0, 0), ("llama", 2, 48), ("qwen2", 1, 40)])
def test_the_flop_counter_equals_the_family_formula(family, kv, ff):
    from engine.core.flops import flop_model_for_model
    from engine.core.sparsity_schedule import layer_shapes
    from engine.model.flops import flop_model_for
    from engine.model.sparsity import apply_sparsity

    cfg = ModelConfig(family=family, n_layer=3, n_head=4, n_kv_head=kv, d_model=32, d_ff=ff, n_ctx=16)
    model = GPT(cfg, 300)
    d, d_kv, inner = 32, (kv or 4) * 8, ff or 128
    # SwiGLU has three matrices; grouped-query attention projects fewer keys and values
    per_block = 4 * d * d + 2 * d * inner if family == "gpt2" else 2 * d * d + 2 * d * d_kv + 3 * d * inner
    assert layer_shapes(cfg) == {n: (m.out_features, m.in_features) for n, m in model.sparse_layers().items()}
    assert flop_model_for(model) == flop_model_for_model(cfg, 300, 0.0)
    assert flop_model_for(model).sparse_numel == 3 * per_block
    apply_sparsity(model, 0.5, "uniform", 0)
    counted, formula = flop_model_for(model), flop_model_for_model(cfg, 300, 0.5)
    assert counted.sparse_numel == formula.sparse_numel and abs(counted.sparse_nonzero - formula.sparse_nonzero) <= 21
    forward = 2 * counted.sparse_nonzero + 4 * 3 * 16 * d + 2 * d * 300
    assert counted.train_per_token(True) == 3 * forward
    # inspect counts the same matrices from a checkpoint's tensors
    from engine.publish.inspect import inspect_state

    report = inspect_state(model.state_dict(), 3, d, 16, 300)
    assert report["flops_per_token"]["sparse"] == counted.train_per_token(True)
    assert len(report["sparsity"]["layers"]) == len(model.sparse_layers())


def test_sparse_continued_pretraining_of_an_imported_llama_keeps_the_largest_weights(tmp_path, capsys):
    """import-hf, then pre-training with the import as parent: one-shot magnitude pruning of every matrix
    (k/v narrower, SwiGLU's three) to the configured sparsity, then a few steps on our own corpus."""
    import subprocess
    import sys

    from helpers import REPO, engine_env, tiny

    folder, _ = _folder(tmp_path, "llama", False)
    base, _tok, db, report = _import(tmp_path, folder)
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n\n".join(f"Abnormality {i} of the cardiovascular system, {i}.5 mg/kg in the heart."
                                  for i in range(300)))
    r = subprocess.run([sys.executable, "-m", "engine", "train", "demo", "--db", str(db.path),
                        *tiny(f"data.corpus={corpus}", f"parent={report['run_id']}", "model.n_ctx=32",
                              "sparsity.level=0.75", "sparsity.distribution=uniform", "train.max_steps=2")],
                       capture_output=True, text=True, timeout=300, cwd=REPO, env=engine_env(tmp_path))
    assert r.returncode == 0, r.stderr
    assert "continuing imported model" in r.stderr
    run = next(x for x in RunDB(db.path).list_runs() if x["stage"] == "pretrain")
    assert from_dict(run["config"]).model.family == "llama"
    masks = load_checkpoint(RunDB(db.path).checkpoints(run["id"])[0]["path"])["masks"]
    assert len(masks) == 2 * 7  # q, k, v, out, gate, up, down per block
    for name, mask in masks.items():
        w = base.get_submodule(name).weight.detach().abs()
        assert w[mask].min() >= w[~mask].max(), name
        assert abs(1 - mask.float().mean().item() - 0.75) < 1e-2, name
    # the sparse run exports back to LlamaForCausalLM, zeros included, with our logits
    from engine.model.sparsity import load_masks
    from engine.publish.hf_export import export_hf

    ck = load_checkpoint(RunDB(db.path).latest_checkpoint(run["id"])["path"])
    ours = GPT(from_dict(ck["config"]).model, ck["vocab_size"])
    load_masks(ours, ck["masks"])
    ours.load_state_dict(ck["model"])
    export_hf(RunDB(db.path), run["id"], tmp_path / "export")
    back = transformers.LlamaForCausalLM.from_pretrained(str(tmp_path / "export")).eval()
    assert (back.model.layers[0].mlp.gate_proj.weight == 0).float().mean().item() == pytest.approx(0.75, abs=1e-2)
    assert _max_diff(ours.eval(), back, _tok.encode(TEXT).ids) < 1e-4


@pytest.mark.quick
def test_cached_generation_of_a_llama_equals_its_full_forward():
    """Rotary positions continue after the cached ones, and the cache keeps the n_kv_head heads."""
    from engine.model.gpt import KVCache

    torch.manual_seed(0)
    model = GPT(ModelConfig(family="qwen2", n_layer=2, n_head=4, n_kv_head=2, d_model=32, d_ff=48), 300).eval()
    x = torch.randint(0, 300, (2, 12))
    with torch.no_grad():
        full = model.hidden(x)
        cache = KVCache(2)
        parts = [model.hidden(x[:, :7], cache=cache)] + [model.hidden(x[:, i:i + 1], cache=cache) for i in range(7, 12)]
    assert cache.blocks[0].k.shape == (2, 2, 12, 8)
    assert (torch.cat(parts, dim=1) - full).abs().max().item() < 1e-5


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_a_sparse_qwen2_step_on_the_sparse_core_equals_the_dense_path(precision):
    """q/k/v of different widths (grouped-query) with biases, and SwiGLU's gate/up, each as one stacked
    product on the sparse core: the same loss and value gradients as the masked dense path."""
    pytest.importorskip("numba")
    from engine.model.sparsity import apply_sparsity

    torch.manual_seed(0)
    cfg = ModelConfig(family="qwen2", n_layer=2, n_head=4, n_kv_head=2, d_model=32, d_ff=48)
    model = GPT(cfg, 300)
    apply_sparsity(model, 0.75, "erk", 0)
    x = torch.randint(0, 300, (2, 16))
    runs = []
    for kernel in ("dense", "sparse"):
        for m in model.sparse_layers().values():
            m.set_kernel(kernel)
            m.values.grad = None
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
            _, loss = model(x, targets=x)
        loss.backward()
        runs.append((loss.item(), [m.values.grad.clone() for m in model.sparse_layers().values()]))
    (dense_loss, dense_grads), (sparse_loss, sparse_grads) = runs
    tol = 1e-5 if precision == "fp32" else 2e-2
    assert abs(dense_loss - sparse_loss) < tol * 10
    for a, b in zip(dense_grads, sparse_grads):
        assert (a.float() - b.float()).abs().max().item() <= tol * (1 + a.float().abs().max().item())


def _corpus(tmp_path):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n\n".join(f"Abnormality {i} of the cardiovascular system, {i % 7}.5 mg/kg in the heart "
                                  f"of patient {i * 13 % 101}." for i in range(400)))
    return corpus


def test_a_sparse_llama_run_resumed_after_sigkill_equals_the_uninterrupted_run_bitwise(tmp_path):
    """Grouped-query attention, SwiGLU and an untied head on the sparse core (fp32): killed right after
    its step-4 checkpoint and resumed in a new process, it logs the uninterrupted run's losses bit for bit."""
    import signal
    import subprocess
    import sys

    from helpers import REPO, cli_inproc, engine_env, tiny

    args = tiny(f"data.corpus={_corpus(tmp_path)}", "model.family=llama", "model.n_head=4", "model.n_kv_head=2",
                "model.d_ff=48", "model.tie_embeddings=false", "sparsity.level=0.75", "sparsity.kernel=sparse",
                "train.precision=fp32", "train.max_steps=8", "train.checkpoint_every=4", "train.eval_every=4",
                "train.log_every=1")
    db = tmp_path / "runs.db"
    fresh = cli_inproc(tmp_path, db, "train", "demo", *args)
    assert fresh.rc == 0, fresh.stderr
    cmd = [sys.executable, "-m", "engine"]
    proc = subprocess.Popen([*cmd, "train", "demo", *args, "--db", str(db)], stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, cwd=REPO,
                            env=engine_env(tmp_path))
    run_id = None
    for line in proc.stdout:
        e = json.loads(line) if line.startswith("{") else {}
        run_id = run_id or e.get("run_id")
        if e.get("type") == "checkpoint":
            os.kill(proc.pid, signal.SIGKILL)
            break
    proc.wait(timeout=60)
    proc.stdout.close()
    RunDB(db).reap_crashed()
    r = subprocess.run([*cmd, "train", "--resume", run_id, "--db", str(db)], capture_output=True, text=True,
                       cwd=REPO, env=engine_env(tmp_path), timeout=300, check=False)
    assert r.returncode == 0, r.stderr[-2000:]
    runs = RunDB(db)
    losses = [{m["step"]: m["value"] for m in runs.metrics(rid, names=["loss"])} for rid in (fresh.run_id, run_id)]
    assert from_dict(runs.get_run(run_id)["config"]).model.family == "llama"
    assert len(losses[0]) == 8 and losses[0] == losses[1]
