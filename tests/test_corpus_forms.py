"""Corpora as users have them: save_to_disk folders, .arrow, gzip, split folders; tokens memory-mapped."""
from __future__ import annotations

import gzip
import json
from pathlib import Path

import numpy as np
import pytest
from helpers import PUBMED_TRAIN, needs_shared_data, tiny

from engine.store.rundb import RunDB
from engine.data.corpus import load_corpus
from engine.data.tokens import BlockLoader, tokenize_corpus
from engine.data.vocab import train_tokenizer

pytestmark = needs_shared_data()


@pytest.fixture(scope="module")
def texts() -> list[str]:
    lines = [ln.strip() for ln in PUBMED_TRAIN.read_text(encoding="utf-8").splitlines() if ln.strip()]
    return lines[:120]


@pytest.mark.quick
def test_a_saved_dataset_and_its_arrow_file_load_the_same_documents(tmp_path, texts):
    import datasets

    ds = datasets.Dataset.from_dict({"text": texts, "id": list(range(len(texts)))})
    ds.save_to_disk(str(tmp_path / "saved"))
    c = load_corpus([str(tmp_path / "saved")])
    assert list(c.documents) == texts and c.validation is None
    (arrow,) = sorted((tmp_path / "saved").glob("*.arrow"))
    assert list(load_corpus([str(arrow)]).documents) == texts


@pytest.mark.quick
def test_a_dataset_dict_trains_on_train_and_validates_on_its_validation_split(tmp_path, texts):
    import datasets

    dd = datasets.DatasetDict({"train": datasets.Dataset.from_dict({"text": texts[:100]}),
                               "validation": datasets.Dataset.from_dict({"text": texts[100:]}),
                               "test": datasets.Dataset.from_dict({"text": ["held out for testing"]})})
    dd.save_to_disk(str(tmp_path / "dd"))
    c = load_corpus([str(tmp_path / "dd")])
    assert list(c.documents) == texts[:100] and list(c.validation) == texts[100:]
    tok = train_tokenizer(texts, 300)
    splits = tokenize_corpus(c, tok, 0.05, 1, tmp_path / "cache")
    assert (splits.n_train_docs, splits.n_val_docs) == (100, 20)
    eot = tok.token_to_id("<|endoftext|>")
    want_val = sum(len(tok.encode(t, add_special_tokens=False).ids) + 1 for t in texts[100:])
    assert len(splits.val) == want_val and splits.val[-1] == eot
    assert isinstance(splits.train, np.memmap)  # read from the token cache, not held as a list or int64 tensor
    assert BlockLoader(splits.train, 16, 2, 1).tokens is splits.train


@pytest.mark.quick
def test_gzip_files_load_as_their_uncompressed_form(tmp_path, texts):
    with gzip.open(tmp_path / "a.txt.gz", "wt", encoding="utf-8") as f:
        f.write("\n".join(texts))
    with gzip.open(tmp_path / "b.jsonl.gz", "wt", encoding="utf-8") as f:
        f.write("\n".join(json.dumps({"abstract": t}) for t in texts))
    assert list(load_corpus([str(tmp_path / "a.txt.gz")]).documents) == texts
    assert list(load_corpus([str(tmp_path / "b.jsonl.gz")], text_field="abstract").documents) == texts


def test_a_folder_of_split_files_keeps_its_validation_split_out_of_training(cli, db_path, tmp_path, texts):
    folder = tmp_path / "splits"
    folder.mkdir()
    (folder / "train.txt").write_text("\n".join(texts[:100]), encoding="utf-8")
    (folder / "validation.jsonl").write_text("\n".join(json.dumps({"text": t}) for t in texts[100:]), encoding="utf-8")
    c = load_corpus([str(folder)])
    assert list(c.documents) == texts[:100] and list(c.validation) == texts[100:]
    r = cli("train", "demo", *tiny(f"data.corpus={folder}", "data.max_documents=0", "train.max_steps=2"))
    assert r.rc == 0, r.stderr
    meta = RunDB(db_path).get_run(r.run_id)["meta"]
    assert "20 validation documents" in r.stderr or "(20 docs)" in r.stderr
    assert meta["val_tokens"] > 0 and meta["train_tokens"] > 0


@pytest.mark.quick
def test_a_folder_that_is_neither_is_refused_naming_the_formats(tmp_path, capsys):
    from engine.cli import main

    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "notes.md").write_text("hello")
    assert main(["train", "demo", "--set", f"data.corpus='{tmp_path / 'c'}'", "--db", str(tmp_path / "r.db")]) == 2
    err = capsys.readouterr().err
    assert ".arrow" in err and "save_to_disk" in err
    assert not Path(tmp_path / "r.db").exists() or RunDB(tmp_path / "r.db").list_runs() == []
