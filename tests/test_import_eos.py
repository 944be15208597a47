"""Imported models whose tokenizer ends documents with a token of its own instead of <|endoftext|> (Llama 2's
and TinyLlama's </s>, Llama 3's <|end_of_text|>): the tokenizer stays as shipped (transformers' ids), its eos
token plays the end-of-text role in every later process, and export-hf writes it back with that eos token.
A folder naming no end-of-text token at all is still one line and exit 2."""
from __future__ import annotations

import json
import pickle
import subprocess
import sys

import numpy as np
import pytest
from helpers import REPO, cli_inproc, engine_env, tiny
from test_model_families import TEXT, _folder, _import, _max_diff

from engine.data.vocab import EOT, PAD, load_tokenizer, special_ids, tokenizer_fingerprint
from engine.store.rundb import RunDB

transformers = pytest.importorskip("transformers")


def _eos_folder(tmp_path, bos: str = "<s>", eos: str = "</s>") -> tuple:
    """A tiny random LlamaForCausalLM (test_model_families._folder) whose tokenizer has ``bos`` and ``eos``
    and no <|endoftext|>, putting ``bos`` in front of a text as Llama's does."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    folder, model = _folder(tmp_path, "llama", False)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        (folder / name).unlink(missing_ok=True)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=model.config.vocab_size, special_tokens=[bos, eos],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([TEXT, "the cardiovascular system of the heart", "abnormality abnormal"] * 20, trainer)
    tok.post_processor = processors.TemplateProcessing(single=f"{bos} $A", special_tokens=[(bos, tok.token_to_id(bos))])
    assert tok.get_vocab_size() == model.config.vocab_size and tok.token_to_id(EOT) is None
    transformers.PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=eos, bos_token=bos).save_pretrained(str(folder))
    return folder, model


def _edit_json(path, **changes) -> None:
    """Set keys of a JSON file; a value None removes the key."""
    obj = json.loads(path.read_text())
    for k, v in changes.items():
        obj.pop(k, None) if v is None else obj.__setitem__(k, v)
    path.write_text(json.dumps(obj))


def test_a_llama_ending_documents_with_its_own_eos_imports_and_exports_with_it(tmp_path):
    folder, theirs = _eos_folder(tmp_path)
    ours, tok, db, report = _import(tmp_path, folder)
    hf_tok = transformers.AutoTokenizer.from_pretrained(str(folder))
    ids = tok.encode(TEXT).ids
    assert ids == hf_tok(TEXT)["input_ids"] and ids[0] == hf_tok.bos_token_id  # as shipped, <s> in front
    assert _max_diff(ours, theirs, ids) < 1e-4
    eos = hf_tok.eos_token_id
    assert special_ids(tok) == (eos, tok.token_to_id(PAD)) == (tok.token_to_id("</s>"), theirs.config.vocab_size)
    assert tok.token_to_id(EOT) == eos and tok.decode(ids[1:]) == TEXT
    assert any("</s>" in n for n in report["notes"]), report["notes"]

    from engine.publish.hf_export import export_hf, verify_export

    out = tmp_path / "export"
    export_hf(db, report["run_id"], out)
    config = json.loads((out / "tokenizer_config.json").read_text())
    assert (config["eos_token"], config["bos_token"], config["pad_token"]) == ("</s>", "<s>", PAD)
    assert json.loads((out / "special_tokens_map.json").read_text())["eos_token"] == "</s>"
    assert "mediswift_tokenizer" not in json.loads((out / "tokenizer.json").read_text())  # the model's own file
    for name in ("config.json", "generation_config.json"):
        ids_of = json.loads((out / name).read_text())
        assert (ids_of["eos_token_id"], ids_of["bos_token_id"]) == (eos, hf_tok.bos_token_id), name
    card = (out / "README.md").read_text()
    assert "`</s>` ending each document" in card and "separated by its end-of-text token `</s>`" in card
    back_tok = transformers.AutoTokenizer.from_pretrained(str(out))
    assert back_tok(TEXT)["input_ids"] == ids and back_tok.eos_token == "</s>"
    back = transformers.LlamaForCausalLM.from_pretrained(str(out)).eval()
    assert _max_diff(ours, back, ids) < 1e-4
    assert verify_export(db, report["run_id"], out)["same_tokens"]


def test_pretraining_that_continues_the_import_ends_documents_with_the_models_eos(tmp_path):
    """The role travels with the run's tokenizer.json: the child process's token stream ends each document
    with </s>, and the child's export names </s> as its eos token."""
    folder, _ = _eos_folder(tmp_path)
    _, tok, db, report = _import(tmp_path, folder)
    eos = tok.token_to_id("</s>")
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n\n".join(f"Abnormality {i} of the cardiovascular system, {i}.5 mg/kg in the heart."
                                  for i in range(300)))
    r = subprocess.run([sys.executable, "-m", "engine", "train", "demo", "--db", str(db.path),
                        *tiny(f"data.corpus={corpus}", f"parent={report['run_id']}", "model.n_ctx=32",
                              "sparsity.level=0.5", "train.max_steps=2")],
                       capture_output=True, text=True, timeout=300, cwd=REPO, env=engine_env(tmp_path))
    assert r.returncode == 0, r.stderr
    run = next(x for x in RunDB(db.path).list_runs() if x["stage"] == "pretrain")
    assert special_ids(load_tokenizer(run["run_dir"]))[0] == eos
    # the engine's own token stream, as the run cached it: every document followed by </s>
    (index,) = list(tmp_path.rglob("tokens-*.json"))
    meta = json.loads(index.read_text())
    for split in ("train", "val"):
        stream = np.fromfile(index.with_suffix(f".{split}.bin"), dtype=np.int32)
        assert len(stream) == meta[split] and stream[-1] == eos, split
        assert int((stream == eos).sum()) == meta[f"n_{split}_docs"], split

    from engine.publish.hf_export import export_hf

    export_hf(RunDB(db.path), run["id"], tmp_path / "export")
    assert json.loads((tmp_path / "export" / "tokenizer_config.json").read_text())["eos_token"] == "</s>"


@pytest.mark.quick
@pytest.mark.parametrize("where,value", [("config.json", 1), ("config.json", [1, 0]), ("generation_config.json", [1])])
def test_without_an_eos_token_in_the_tokenizer_config_the_eos_token_id_names_it(tmp_path, where, value):
    """Llama 3's end token, named by an eos_token_id only (an int, or a list: the first)."""
    from engine.publish.hf_folder_check import check_folder

    folder, _ = _eos_folder(tmp_path, "<|begin_of_text|>", "<|end_of_text|>")
    _edit_json(folder / "tokenizer_config.json", eos_token=None)
    _edit_json(folder / "config.json", eos_token_id=value if where == "config.json" else None)
    _edit_json(folder / "generation_config.json", eos_token_id=value if where != "config.json" else None)
    tok = check_folder(folder).tokenizer
    assert special_ids(tok)[0] == tok.token_to_id("<|end_of_text|>") == 1


@pytest.mark.quick
def test_the_run_tokenizer_round_trips_with_its_role(tmp_path):
    """Saved and loaded (every later process), or pickled: the same tokenizer, the same role."""
    from engine.data.vocab import save_tokenizer
    from engine.publish.hf_folder_check import check_folder

    folder, _ = _eos_folder(tmp_path)
    tok = check_folder(folder).tokenizer
    for back in (load_tokenizer(save_tokenizer(tok, tmp_path / "run")), pickle.loads(pickle.dumps(tok))):
        assert tokenizer_fingerprint(back) == tokenizer_fingerprint(tok)
        assert back.token_to_id(EOT) == tok.token_to_id("</s>") and back.encode(TEXT).ids == tok.encode(TEXT).ids
        assert back.get_vocab_size() == tok.get_vocab_size() and back.id_to_token(1) == "</s>"


@pytest.mark.quick
@pytest.mark.parametrize("case", ["no-eos", "eos-not-a-token"])
def test_a_folder_naming_no_end_token_exits_2_with_one_line(tmp_path, case):
    folder, _ = _eos_folder(tmp_path)
    if case == "no-eos":
        _edit_json(folder / "tokenizer_config.json", eos_token=None)
        for name in ("config.json", "generation_config.json"):
            _edit_json(folder / name, eos_token_id=None)
        named = ("tokenizer.json: the tokenizer lacks <|endoftext|>", "eos_token in tokenizer_config.json",
                 "eos_token_id in config.json or generation_config.json")
    else:
        _edit_json(folder / "tokenizer_config.json", eos_token={"content": "<|eot_id|>", "special": True})
        named = ("tokenizer_config.json: its eos_token \"<|eot_id|>\" is not a token of the tokenizer",)
    db_path = tmp_path / "runs.db"
    r = cli_inproc(tmp_path, db_path, "import-hf", str(folder))
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert r.rc == 2 and len(lines) == 1 and "error:" in lines[0], r.stderr
    assert all(n in lines[0] for n in named), lines[0]
    assert RunDB(db_path).list_runs() == []
