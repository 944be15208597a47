"""Every kind of bad input: one clear line naming the field or file, exit code 2, no run left running."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from helpers import PUBMED_TRAIN, needs_shared_data, tiny

from engine.store.rundb import RunDB

pytestmark = needs_shared_data()


def _assert_bad(r, *fragments: str, key: str | None = None) -> None:
    assert r.rc == 2, (r.rc, r.stderr)
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("mediswift: error:")]
    assert len(errors) == 1, r.stderr
    for f in fragments:
        assert f in errors[0], errors[0]
    evs = [e for e in r.events if e["type"] == "error"]
    assert evs and all(f in evs[0]["message"] for f in fragments)
    if key:
        assert evs[0]["key"] == key


def _no_live_runs(db_path) -> None:
    if db_path.exists():
        assert not [r for r in RunDB(db_path).list_runs() if r["status"] in ("running", "paused", "created")]


@pytest.mark.parametrize(
    "override, fragments, key",
    [
        ("sparsity.level=1.0", ["sparsity.level", "[0, 1)"], "sparsity.level"),
        ("sparsity.level=-0.1", ["sparsity.level"], "sparsity.level"),
        ("train.batch_size=many", ["train.batch_size", "integer"], "train.batch_size"),
        ("train.lr=fast", ["train.lr", "number"], "train.lr"),
        ("tokenizer.vocab_size=100", ["tokenizer.vocab_size", "at least 258"], "tokenizer.vocab_size"),
        ("model.n_positions=64", None, None),  # placeholder replaced below
        ("sparsity.distribution=gaussian", ["sparsity.distribution", "'uniform'", "'erk'"], "sparsity.distribution"),
        ("train.max_step=5", ["unknown config key 'train.max_step'", "did you mean 'train.max_steps'"], "train.max_step"),
        ("model.d_model=33", ["model.d_model (33)", "divisible", "model.n_head"], "model.n_head"),
    ],
)
def test_bad_config_values(cli, db_path, override, fragments, key):
    if override.startswith("model.n_positions"):
        override, fragments, key = "model.n_ctx=128", ["model.n_ctx (128)", "maximum context", "model.n_positions (64)"], "model.n_ctx"
        r = cli("train", "demo", *tiny(f"data.corpus={PUBMED_TRAIN}", "model.n_positions=64", override))
    else:
        r = cli("train", "demo", *tiny(f"data.corpus={PUBMED_TRAIN}", override))
    _assert_bad(r, *fragments, key=key)
    _no_live_runs(db_path)
    assert not db_path.exists() or RunDB(db_path).list_runs() == []  # rejected before a run exists


def test_missing_corpus_file(cli, db_path, tmp_path):
    missing = tmp_path / "nope.txt"
    _assert_bad(cli("train", "demo", *tiny(f"data.corpus={missing}")), "corpus file not found", str(missing), key="data.corpus")
    _no_live_runs(db_path)


def test_empty_corpus_file_and_blank_lines(cli, db_path, tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    _assert_bad(cli("train", "demo", *tiny(f"data.corpus={empty}")), "empty", str(empty))
    blank = tmp_path / "blank.txt"
    blank.write_text("\n   \n\n")
    r = cli("train", "demo", *tiny(f"data.corpus={blank}"))
    _assert_bad(r, "holds only whitespace", str(blank), key="data.corpus")
    # found before the run exists: no run row is left behind
    assert RunDB(db_path).list_runs() == []


def test_binary_and_non_utf8_files(cli, db_path, tmp_path):
    binary = tmp_path / "weights.txt"
    binary.write_bytes(os.urandom(4096) + b"\x00" * 64)
    _assert_bad(cli("train", "demo", *tiny(f"data.corpus={binary}")), "binary", str(binary))
    latin = tmp_path / "latin1.txt"
    latin.write_bytes(("caf\xe9 " * 2000).encode("latin-1"))
    _assert_bad(cli("train", "demo", *tiny(f"data.corpus={latin}")), "not UTF-8", str(latin))
    _no_live_runs(db_path)


@pytest.mark.quick
def test_unreadable_file(cli, tmp_path):
    if os.geteuid() == 0:
        pytest.skip("root reads any file")
    f = tmp_path / "secret.txt"
    f.write_text("text\n")
    f.chmod(0)
    _assert_bad(cli("train", "demo", *tiny(f"data.corpus={f}")), "not readable", str(f))


def test_unsupported_type_and_missing_column(cli, tmp_path):
    doc = tmp_path / "notes.docx"
    doc.write_text("x")
    _assert_bad(cli("train", "demo", *tiny(f"data.corpus={doc}")), "unsupported corpus file type", ".docx")
    jl = tmp_path / "abstracts.jsonl"
    jl.write_text("\n".join(json.dumps({"abstract": f"Aspirin reduces fever in case {i}."}) for i in range(50)))
    r = cli("train", "demo", *tiny(f"data.corpus={jl}"))
    _assert_bad(r, "no 'text' column", "abstract", "data.text_field")
    ok = cli("train", "demo", *tiny(f"data.corpus={jl}", "data.text_field=abstract", "train.max_steps=1",
                                    "data.val_fraction=0.3", "model.n_ctx=16"))
    assert ok.rc == 0, ok.stderr


def test_corpus_too_small_for_context(cli, db_path, tmp_path):
    small = tmp_path / "small.txt"
    small.write_text("Fever.\nCough.\n")
    r = cli("train", "demo", *tiny(f"data.corpus={small}"))
    _assert_bad(r, "too small")
    _no_live_runs(db_path)


def test_resume_unknown_run_and_missing_config(cli, tmp_path):
    _assert_bad(cli("train", "--resume", "deadbeef"), "unknown run deadbeef", key="resume")
    _assert_bad(cli("train", str(tmp_path / "missing.toml")), "config file not found")
    bad = tmp_path / "bad.toml"
    bad.write_text("[model\nn_layer = 2")
    _assert_bad(cli("train", str(bad)), "not a valid TOML file")
    wrong = tmp_path / "wrong.toml"
    wrong.write_text('[model]\nn_layer = "two"\n')
    _assert_bad(cli("train", str(wrong)), "model.n_layer must be an integer", key="model.n_layer")


def test_resume_from_a_checkpoint_with_dense_optimizer_moments_is_refused(cli, db_path):
    first = cli("train", "demo", *tiny(f"data.corpus={PUBMED_TRAIN}", "train.max_steps=2"))
    assert first.rc == 0, first.stderr
    from engine.model.checkpoint import file_sha256, load_checkpoint, save_checkpoint

    row = RunDB(db_path).latest_checkpoint(first.run_id)
    path = row["path"]
    ck = load_checkpoint(path)
    # what an older version wrote: moments of a masked matrix at its full [out, in] shape
    state = ck["optimizer"]["state"]
    i = max((k for k, v in state.items() if v["exp_avg"].dim() == 1), key=lambda k: state[k]["exp_avg"].numel())
    state[i] = {k: (v.new_zeros(128, 32) if k != "step" else v) for k, v in state[i].items()}
    n = save_checkpoint(ck, Path(path))
    RunDB(db_path).replace_checkpoint_file(row["id"], path, n, file_sha256(path))  # a consistent file, as written
    r = cli("train", "--resume", first.run_id, "--set", "train.max_steps=4")
    _assert_bad(r, "written by an older version", "cannot be resumed")
    _no_live_runs(db_path)


def test_unknown_parent(cli):
    _assert_bad(cli("train", "demo", *tiny(f"data.corpus={PUBMED_TRAIN}", "parent=0badc0de")), "parent run not found", key="parent")


def test_read_commands_on_unknown_runs(cli):
    for args in (("inspect", "nope1234", "--json"), ("runs", "show", "nope1234", "--json"), ("metrics", "nope1234", "--csv")):
        r = cli(*args)
        assert r.rc == 2 and "unknown run: nope1234" in r.stderr
