"""The biogpt family (issue "Model families"): a BioGptForCausalLM folder written by transformers imports
with equal logits, exports back to BioGptForCausalLM, its Moses + BPE tokenizer gives transformers' ids on
real PubMed abstracts, and sparse continued pre-training prunes every matrix by magnitude."""
from __future__ import annotations

import json
import os
import sys

import pytest
import torch
from helpers import PUBMED_TRAIN, needs_shared_data
from test_model_families import _import, _max_diff

from engine.core.config import ModelConfig, from_dict
from engine.core.errors import InputError
from engine.data.vocab import EOT, PAD, load_tokenizer
from engine.model.checkpoint import load_checkpoint
from engine.model.gpt import GPT
from engine.store.rundb import RunDB

transformers = pytest.importorskip("transformers")
pytest.importorskip("sacremoses")
os.environ["HF_HUB_OFFLINE"] = "1"
pytestmark = needs_shared_data()
PUBMED_VALID = PUBMED_TRAIN.with_name("valid.txt")
SHAPE = dict(num_hidden_layers=2, hidden_size=64, num_attention_heads=4, intermediate_size=96,
             max_position_embeddings=128)


def _abstracts(path, n: int, skip: int = 0) -> list[str]:
    lines = [ln for ln in path.read_text(encoding="utf-8").splitlines() if ln.strip()]
    return lines[skip:skip + n]


@pytest.fixture(scope="module")
def tokenizer_files(tmp_path_factory):
    """BioGPT-format vocab.json and merges.txt (``</w>`` word ends, specials at 0-3, a count after each
    merge as fairseq's codes have) learned on Moses-tokenized PubMed abstracts, then written by
    transformers' own BioGptTokenizer.save_pretrained, as a BioGPT folder ships them."""
    from sacremoses import MosesTokenizer
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    moses = MosesTokenizer(lang="en")
    words = [" ".join(moses.tokenize(t, aggressive_dash_splits=True, escape=True, return_str=False))
             for t in _abstracts(PUBMED_TRAIN, 300)]
    bpe = Tokenizer(models.BPE(end_of_word_suffix="</w>"))
    bpe.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    bpe.train_from_iterator(words, trainers.BpeTrainer(vocab_size=600, end_of_word_suffix="</w>", show_progress=False))
    model = json.loads(bpe.to_str())["model"]
    specials = ["<s>", "<pad>", "</s>", "<unk>"]
    vocab = {t: i for i, t in enumerate(specials)}
    for t, _ in sorted(model["vocab"].items(), key=lambda kv: kv[1]):
        vocab.setdefault(t, len(vocab))
    raw = tmp_path_factory.mktemp("biogpt-raw")
    (raw / "vocab.json").write_text(json.dumps(vocab), encoding="utf-8")
    (raw / "merges.txt").write_text("".join(f"{a} {b} {1000 - i}\n" for i, (a, b) in enumerate(model["merges"])),
                                    encoding="utf-8")
    shipped = tmp_path_factory.mktemp("biogpt-tokenizer")
    transformers.BioGptTokenizer(str(raw / "vocab.json"), str(raw / "merges.txt")).save_pretrained(str(shipped))
    return shipped, len(vocab)


def _folder(tmp_path, tokenizer_files, tied: bool = True, bin: bool = False, act: str = "gelu",
            scale: bool = True, **save) -> tuple:
    import shutil

    shipped, vocab = tokenizer_files
    folder = tmp_path / f"biogpt-{'tied' if tied else 'untied'}"
    shutil.copytree(shipped, folder)
    torch.manual_seed(0)
    cfg = transformers.BioGptConfig(vocab_size=vocab, tie_word_embeddings=tied, hidden_act=act, scale_embedding=scale,
                                    **SHAPE)
    model = transformers.BioGptForCausalLM(cfg)
    with torch.no_grad():  # random-initialised biases are zeros and norms ones: make them matter
        for name, p in model.named_parameters():
            if name.endswith("bias") or "layer_norm" in name:
                p.add_(torch.randn_like(p) * 0.1)
    model.eval().save_pretrained(str(folder), **save)
    if bin:  # transformers 5 writes safetensors only: the older .bin format by hand (the tied head included)
        (folder / "model.safetensors").unlink()
        torch.save(model.state_dict(), folder / "pytorch_model.bin")
    return folder, model


def _text_ids(tok, n: int = 100) -> list[int]:
    """A real abstract's ids, as transformers gives them (</s> in front), cut to fit the context."""
    return tok.encode(_abstracts(PUBMED_VALID, 1)[0]).ids[:n]


@pytest.mark.parametrize("tied,save", [
    (True, {}),                                                    # tied head, model.safetensors
    (False, {"bin": True, "act": "gelu_new", "scale": False}),     # untied, pytorch_model.bin, tanh GELU, unscaled
    (True, {"max_shard_size": "60KB"}),                            # sharded safetensors
])
def test_import_gives_transformers_logits_and_export_loads_back(tmp_path, tokenizer_files, tied, save):
    folder, theirs = _folder(tmp_path, tokenizer_files, tied, **save)
    ours, tok, db, report = _import(tmp_path, folder)
    m = ours.cfg
    assert report["family"] == "biogpt" and m.tie_embeddings is tied and m.d_ff == 96
    assert m.scale_embedding is save.get("scale", True) and ours.wpe.weight.shape == (128 + 2, 64)
    assert m.activation == ("gelu_tanh" if save.get("act") == "gelu_new" else "gelu")
    assert report["vocab_size"] == tokenizer_files[1]  # BioGPT has its own <pad>: no row added
    ids = _text_ids(tok)
    assert ids[0] == 2 and ids == transformers.AutoTokenizer.from_pretrained(str(folder))(
        _abstracts(PUBMED_VALID, 1)[0])["input_ids"][:100]
    assert _max_diff(ours, theirs, ids) < 1e-4

    from engine.publish.hf_export import export_hf, verify_export

    out = tmp_path / "export"
    report_out = export_hf(db, report["run_id"], out)
    assert {"vocab.json", "merges.txt", "tokenizer_config.json"} <= set(report_out["files"])
    assert "tokenizer.json" not in report_out["files"]
    for name in ("vocab.json", "merges.txt"):  # the tokenizer as the model shipped it, byte for byte
        assert (out / name).read_bytes() == (folder / name).read_bytes(), name
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["architectures"] == ["BioGptForCausalLM"] and cfg["scale_embedding"] is m.scale_embedding
    assert (cfg["bos_token_id"], cfg["eos_token_id"], cfg["pad_token_id"]) == (0, 2, 1)
    card = (out / "README.md").read_text()
    assert "model = BioGptForCausalLM.from_pretrained" in card and "tags: [biogpt," in card and "Moses" in card
    back = transformers.BioGptForCausalLM.from_pretrained(str(out)).eval()
    assert _max_diff(ours, back, ids) < 1e-4
    assert type(transformers.AutoTokenizer.from_pretrained(str(out))).__name__ == "BioGptTokenizer"
    check = verify_export(db, report["run_id"], out)
    assert check["same_tokens"] and check["max_abs_diff"] < 1e-4


@pytest.mark.quick
def test_the_tokenizer_gives_transformers_ids_on_pubmed_abstracts(tmp_path, tokenizer_files):
    """What the engine tokenizes (a run's stored tokenizer, the LM task's reader) equals transformers'
    BioGptTokenizer on real abstracts, unknown pieces and Moses' escapes included."""
    from engine.data.corpus import load_corpus
    from engine.data.vocab import save_tokenizer, special_ids, tokenizer_fingerprint
    from engine.publish.hf_folder_check import check_tokenizer
    from engine.tasks.lm import read_tokens

    shipped, vocab = tokenizer_files
    tok, _ = check_tokenizer(shipped, "biogpt")
    save_tokenizer(tok, tmp_path / "run")
    ours = load_tokenizer(tmp_path / "run")  # as every later run reads it
    assert tokenizer_fingerprint(ours) == tokenizer_fingerprint(tok) and ours.get_vocab_size() == vocab
    assert special_ids(ours) == (2, 1)  # documents end with </s>, batches pad with <pad>
    assert ours.token_to_id(EOT) == ours.token_to_id("</s>") and ours.token_to_id(PAD) == ours.token_to_id("<pad>")
    theirs = transformers.BioGptTokenizer.from_pretrained(str(shipped))
    # real abstracts, and a line of characters they lack (<unk>) and Moses escapes (&amp; &apos;)
    texts = _abstracts(PUBMED_VALID, 40) + ["α-synuclein ☃ binds & 'folds' at 3.5 mg/kg -- in vivo."]
    want = theirs(texts, add_special_tokens=False)["input_ids"]
    assert [e.ids for e in ours.encode_batch(texts, add_special_tokens=False)] == want
    assert ours.encode(texts[0], add_special_tokens=False).ids == want[0]
    assert ours.encode(texts[0]).ids == [2] + want[0]  # transformers' own default: </s> in front
    flat = [i for ids in want for i in ids]
    assert 3 in want[-1] and len(set(flat)) > 300  # unknown pieces (<unk>) and most of the vocabulary occur
    assert ours.id_to_token(want[0][0]) == theirs.convert_ids_to_tokens(want[0][0])
    # the LM task's reader: every document's ids, each followed by </s>
    corpus = tmp_path / "valid.txt"
    corpus.write_text("\n".join(texts) + "\n", encoding="utf-8")
    docs = list(load_corpus([str(corpus)], "text").documents)
    expected = [i for ids in theirs(docs, add_special_tokens=False)["input_ids"] for i in [*ids, 2]]
    assert read_tokens(str(corpus), ours).tolist() == expected


@pytest.mark.quick
def test_without_sacremoses_a_biogpt_import_or_run_is_one_line_naming_what_to_install(tmp_path, tokenizer_files,
                                                                                       capsys, monkeypatch):
    from engine.cli import main
    from engine.data.vocab import save_tokenizer
    from engine.publish.hf_folder_check import check_tokenizer

    tok, _ = check_tokenizer(tokenizer_files[0], "biogpt")
    save_tokenizer(tok, tmp_path / "run")
    folder, _ = _folder(tmp_path, tokenizer_files)
    capsys.readouterr()
    monkeypatch.setitem(sys.modules, "sacremoses", None)  # import sacremoses now raises ImportError
    assert main(["import-hf", str(folder), "--db", str(tmp_path / "r.db")]) == 2
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert len(err) == 1 and "sacremoses" in err[0] and "pip install" in err[0] and "loads" not in err[0], err
    assert not (tmp_path / "runs").exists()
    with pytest.raises(InputError, match="sacremoses"):
        load_tokenizer(tmp_path / "run")


@pytest.mark.quick
def test_an_unsupported_biogpt_variant_exits_2_naming_it(tmp_path, capsys):
    from engine.cli import main

    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "biogpt", "architectures": ["BioGptForCausalLM"],
                                                    "hidden_act": "relu", **SHAPE}))
    assert main(["import-hf", str(folder), "--db", str(tmp_path / "r.db")]) == 2
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert len(err) == 1 and "hidden_act" in err[0] and "'relu'" in err[0], err


@pytest.mark.quick
def test_biogpt_config_keys_and_gpt2_untouched():
    """biogpt fixes what transformers' BioGPT fixes; gpt2 builds as before (no offset, no scale)."""
    for bad in ({"n_kv_head": 2}, {"norm_eps": 1e-6}, {"bias": False}):
        with pytest.raises(InputError, match=f"model.{next(iter(bad))} .* 'biogpt'"):
            ModelConfig(family="biogpt", n_head=4, **bad)
    for family in ("gpt2", "llama"):
        with pytest.raises(InputError, match="model.scale_embedding"):
            ModelConfig(family=family, scale_embedding=True)
    gpt2 = GPT(ModelConfig(n_ctx=16), 300)
    assert gpt2.embed_scale == 1.0 and gpt2.position_offset == 0 and gpt2.wpe.weight.shape[0] == 16
    bio = GPT(ModelConfig(family="biogpt", n_ctx=16, d_model=64, scale_embedding=True, tie_embeddings=False), 300)
    assert bio.embed_scale == 8.0 and bio.wpe.weight.shape[0] == 18 and bio.lm_head.weight is not bio.wte.weight


@pytest.mark.quick
def test_every_biogpt_matrix_is_sparse_capable_and_the_flop_counter_equals_the_family_formula():
    from engine.core.flops import flop_model_for_model
    from engine.core.sparsity_schedule import layer_shapes
    from engine.model.flops import flop_model_for
    from engine.model.sparsity import apply_sparsity, measure_sparsity
    from engine.publish.inspect import inspect_state

    cfg = ModelConfig(family="biogpt", n_layer=3, n_head=4, d_model=32, d_ff=48, n_ctx=16, scale_embedding=True)
    model = GPT(cfg, 300)
    d, ff = 32, 48
    shapes = {n: (m.out_features, m.in_features) for n, m in model.sparse_layers().items()}
    assert layer_shapes(cfg) == shapes and shapes["blocks.0.mlp.fc"] == (ff, d) and len(shapes) == 3 * 6
    per_block = 4 * d * d + 2 * d * ff  # GPT-2's blocks, the MLP d_ff wide: BioGPT differs in its embeddings only
    assert flop_model_for(model) == flop_model_for_model(cfg, 300, 0.0)
    assert flop_model_for(model).sparse_numel == 3 * per_block
    apply_sparsity(model, 0.5, "uniform", 0)
    assert abs(measure_sparsity(model)["total"] - 0.5) < 0.01
    counted, formula = flop_model_for(model), flop_model_for_model(cfg, 300, 0.5)
    assert counted.sparse_numel == formula.sparse_numel and abs(counted.sparse_nonzero - formula.sparse_nonzero) <= 18
    assert counted.train_per_token(True) == 3 * (2 * counted.sparse_nonzero + 4 * 3 * 16 * d + 2 * d * 300)
    report = inspect_state(model.state_dict(), 3, d, 16, 300)
    assert report["flops_per_token"]["sparse"] == counted.train_per_token(True)
    x = torch.randint(0, 300, (2, 16))
    _, loss = model(x, targets=x)
    loss.backward()
    assert all(m.values.grad is not None for m in model.sparse_layers().values())


@pytest.mark.quick
def test_cached_generation_of_a_biogpt_equals_its_full_forward():
    """The offset positions continue after the cached ones."""
    from engine.model.gpt import KVCache

    torch.manual_seed(0)
    model = GPT(ModelConfig(family="biogpt", n_layer=2, n_head=4, d_model=32, d_ff=48, scale_embedding=True), 300).eval()
    x = torch.randint(0, 300, (2, 12))
    with torch.no_grad():
        full = model.hidden(x)
        cache = KVCache(2)
        parts = [model.hidden(x[:, :7], cache=cache)] + [model.hidden(x[:, i:i + 1], cache=cache) for i in range(7, 12)]
    assert (torch.cat(parts, dim=1) - full).abs().max().item() < 1e-5


def test_sparse_continued_pretraining_of_an_imported_biogpt_keeps_the_largest_weights(tmp_path, tokenizer_files):
    """import-hf, then pre-training on PubMed abstracts with the import as parent: one-shot magnitude
    pruning of every matrix to the configured sparsity, a few steps on BioGPT's own token ids, and an
    export that BioGptForCausalLM loads with our logits."""
    import subprocess

    from helpers import REPO, engine_env, tiny

    from engine.model.sparsity import load_masks
    from engine.publish.hf_export import export_hf

    folder, _ = _folder(tmp_path, tokenizer_files)
    base, tok, db, report = _import(tmp_path, folder)
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(_abstracts(PUBMED_TRAIN, 200, skip=300)) + "\n", encoding="utf-8")
    r = subprocess.run([sys.executable, "-m", "engine", "train", "demo", "--db", str(db.path),
                        *tiny(f"data.corpus={corpus}", f"parent={report['run_id']}", "model.n_ctx=32",
                              "sparsity.level=0.75", "sparsity.distribution=uniform", "train.max_steps=2")],
                       capture_output=True, text=True, timeout=600, cwd=REPO, env=engine_env(tmp_path))
    assert r.returncode == 0, r.stderr[-3000:]
    assert "continuing imported model" in r.stderr
    runs = RunDB(db.path)
    run = next(x for x in runs.list_runs() if x["stage"] == "pretrain")
    m = from_dict(run["config"]).model
    assert m.family == "biogpt" and m.scale_embedding and m.d_ff == 96
    masks = load_checkpoint(runs.checkpoints(run["id"])[0]["path"])["masks"]
    assert len(masks) == 2 * 6  # q, k, v, out, fc, proj per block
    for name, mask in masks.items():
        w = base.get_submodule(name).weight.detach().abs()
        assert w[mask].min() >= w[~mask].max(), name
        assert abs(1 - mask.float().mean().item() - 0.75) < 1e-2, name
    ck = load_checkpoint(runs.latest_checkpoint(run["id"])["path"])
    ours = GPT(from_dict(ck["config"]).model, ck["vocab_size"])
    load_masks(ours, ck["masks"])
    ours.load_state_dict(ck["model"])
    export_hf(runs, run["id"], tmp_path / "export")
    back = transformers.BioGptForCausalLM.from_pretrained(str(tmp_path / "export")).eval()
    assert (back.biogpt.layers[0].fc1.weight == 0).float().mean().item() == pytest.approx(0.75, abs=1e-2)
    assert _max_diff(ours.eval(), back, _text_ids(tok)) < 1e-4


def test_a_biogpt_trained_from_scratch_keeps_our_tokenizer_and_exports_to_biogpt(tmp_path):
    """model.family = "biogpt" without an import: our byte-level BPE, an untied head, the offset table and
    the scale; the export is a BioGptForCausalLM with tokenizer.json, equal in tokens and logits."""
    from helpers import cli_inproc, tiny

    from engine.publish.hf_export import export_hf, verify_export

    r = cli_inproc(tmp_path, tmp_path / "r.db", "train", "demo",
                   *tiny("model.family=biogpt", "model.d_ff=48", "model.scale_embedding=true",
                         "model.tie_embeddings=false", "train.max_steps=2"))
    assert r.rc == 0, r.stderr[-2000:]
    db = RunDB(tmp_path / "r.db")
    run = next(x for x in db.list_runs() if x["stage"] == "pretrain")
    report = export_hf(db, run["id"], tmp_path / "out")
    assert "tokenizer.json" in report["files"] and "vocab.json" not in report["files"]
    cfg = json.loads((tmp_path / "out" / "config.json").read_text())
    assert cfg["architectures"] == ["BioGptForCausalLM"] and cfg["tie_word_embeddings"] is False
    check = verify_export(db, run["id"], tmp_path / "out")
    assert check["same_tokens"] and check["max_abs_diff"] < 1e-4
