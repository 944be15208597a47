"""Exports onto what they must never replace: device nodes, FIFOs, sockets, folders where a file goes, symlinks
to those, and existing files without --overwrite; and no temporary leftovers after success or failure.

`export` (metrics and --format toml), `export-config` and `export-hf`, called in-process through the CLI's
main (a run row with metric rows, and for export-hf a tiny model checkpoint built here: no training), plus two
real CLI processes. Every check is recorded in the fault tally (tests/faults/conftest.py) and asserted."""
from __future__ import annotations

import os
import shutil
import socket
import stat
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from helpers import REPO, engine_env

from engine.cli import main
from engine.core.config import RunConfig
from engine.store.rundb import RunDB

DEVICE = Path("/dev/full")  # a character device whose replacement would be noticed (never /dev/null itself)
needs_device = pytest.mark.skipif(not DEVICE.is_char_device(), reason="no /dev/full on this machine")

# (command line after the run id, the file it writes): metrics CSV, a config through `export`, `export-config`
FILE_EXPORTS = {
    "export csv": lambda rid, out: ["export", rid, "--format", "csv", "--out", out],
    "export toml": lambda rid, out: ["export", rid, "--format", "toml", "--out", out],
    "export-config": lambda rid, out: ["export-config", rid, "--out", out],
}


@pytest.fixture(scope="module")
def run_db(tmp_path_factory):
    """A run row with a few metric rows (what `export` and `export-config` read)."""
    tmp = tmp_path_factory.mktemp("targets")
    db = RunDB(tmp / "runs.db")
    cfg = RunConfig().replace({"name": "targets"})
    rid = db.create_run(name="targets", stage="pretrain", config=cfg.to_dict())
    db.insert_metric_rows([(rid, s, s * 64, s * 0.1, s * 1e6, s * 2e6, "loss", 5.0 - s / 10) for s in range(1, 21)])
    db.update_run(rid, status="completed")
    yield tmp, db, rid
    db.close()


@pytest.fixture
def place():
    """A short folder under /tmp (a UNIX socket's path must stay under about 100 bytes)."""
    d = Path(tempfile.mkdtemp(prefix="mst-", dir="/tmp"))
    yield d
    shutil.rmtree(d, ignore_errors=True)


def _cli(capsys, db: RunDB, args: list[str]) -> tuple[int, str]:
    capsys.readouterr()
    rc = main([*args, "--db", str(db.path)])
    return rc, capsys.readouterr().err


def _one_line(rc: int, err: str, *needles: str) -> bool:
    lines = err.strip().splitlines()
    return (rc == 2 and len(lines) == 1 and lines[0].startswith("mediswift: error:") and "Traceback" not in err
            and all(n in err for n in needles))


def _leftovers(folder: Path) -> list[str]:
    return [p.name for p in folder.iterdir() if p.name.endswith(".tmp") or ".tmp" in p.name]


def _make_special(kind: str, folder: Path) -> tuple[Path, object]:
    """The target and a fingerprint of what it is (to show it was left as it was)."""
    if kind == "fifo":
        p = folder / "fifo"
        os.mkfifo(p)
    elif kind == "device":
        p = DEVICE
    elif kind == "socket":
        p = folder / "sock"
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.bind(str(p))
        s.close()
    elif kind == "folder":
        p = folder / "out.csv"
        p.mkdir()
        (p / "inside.txt").write_text("keep me")
    elif kind == "symlink to a fifo":
        os.mkfifo(folder / "fifo2")
        p = folder / "link"
        p.symlink_to(folder / "fifo2")
    elif kind == "symlink to a device":
        p = folder / "devlink"
        p.symlink_to(DEVICE)
    else:
        raise AssertionError(kind)
    return p, _fingerprint(p)


def _fingerprint(p: Path):
    st = os.lstat(p)
    return (stat.S_IFMT(st.st_mode), st.st_ino, st.st_rdev, os.readlink(p) if p.is_symlink() else None,
            sorted(os.listdir(p)) if p.is_dir() and not p.is_symlink() else None)


SPECIALS = ["fifo", "device", "socket", "folder", "symlink to a fifo", "symlink to a device"]


@needs_device
@pytest.mark.parametrize("overwrite", [False, True], ids=["plain", "--overwrite"])
@pytest.mark.parametrize("kind", SPECIALS)
@pytest.mark.parametrize("command", list(FILE_EXPORTS))
def test_an_export_onto_a_special_file_is_refused_and_leaves_it(run_db, place, capsys, record, command, kind, overwrite):
    _, db, rid = run_db
    target, before = _make_special(kind, place)
    rc, err = _cli(capsys, db, FILE_EXPORTS[command](rid, str(target)) + (["--overwrite"] if overwrite else []))
    held = _one_line(rc, err, str(target), "not a regular file") and _fingerprint(target) == before
    held = held and not _leftovers(place) and not _leftovers(target.parent)
    assert record("export onto a special file: refused, left as it was", held), (rc, err)


@pytest.mark.quick
@pytest.mark.parametrize("command", list(FILE_EXPORTS))
def test_an_existing_file_needs_overwrite(run_db, place, capsys, record, command):
    _, db, rid = run_db
    target = place / "existing.out"
    target.write_text("keep me")
    rc, err = _cli(capsys, db, FILE_EXPORTS[command](rid, str(target)))
    held = _one_line(rc, err, str(target), "--overwrite") and target.read_text() == "keep me"
    assert record("export onto an existing file: needs --overwrite", held), (rc, err)
    rc, err = _cli(capsys, db, FILE_EXPORTS[command](rid, str(target)) + ["--overwrite"])
    held = rc == 0 and target.is_file() and target.read_text() != "keep me" and not _leftovers(place)
    assert record("export onto an existing file: needs --overwrite", held), (rc, err)


@pytest.mark.parametrize("command", list(FILE_EXPORTS))
def test_a_symlink_to_a_regular_file_is_replaced_never_written_through(run_db, place, capsys, record, command):
    _, db, rid = run_db
    victim = place / "victim.txt"
    victim.write_text("keep me")
    link = place / "link.out"
    link.symlink_to(victim)
    rc, err = _cli(capsys, db, FILE_EXPORTS[command](rid, str(link)))
    refused = _one_line(rc, err, "--overwrite") and link.is_symlink()
    rc, err = _cli(capsys, db, FILE_EXPORTS[command](rid, str(link)) + ["--overwrite"])
    held = refused and rc == 0 and victim.read_text() == "keep me" and link.is_file() and not link.is_symlink()
    assert record("export onto a symlinked file: target untouched", held), (rc, err)


def test_no_leftovers_after_success_or_failure(run_db, place, capsys, record, monkeypatch):
    import engine.publish.run_export as run_export
    from engine.core.errors import InputError

    _, db, rid = run_db
    # success: only the file itself
    rc, err = _cli(capsys, db, ["export", rid, "--out", str(place / "m.csv")])
    assert record("export leftovers: none", rc == 0 and sorted(os.listdir(place)) == ["m.csv"]), err
    # a folder as --out (the issue's `DIR.tmp`): refused, nothing beside it
    folder = place / "dir"
    folder.mkdir()
    rc, err = _cli(capsys, db, ["export", rid, "--format", "json", "--out", str(folder)])
    held = _one_line(rc, err, "folder") and sorted(os.listdir(place)) == ["dir", "m.csv"] and not os.listdir(folder)
    assert record("export leftovers: none", held), (rc, err, os.listdir(place))

    # failure half-way through the rows: the existing file stays whole, no temporary file remains
    def failing_rows(*a, **k):
        yield (rid, 1, 64, 0.1, 1e6, 2e6, "loss", 5.0)
        raise InputError("the database went away half-way")

    monkeypatch.setattr(run_export, "metric_rows", failing_rows)
    before = (place / "m.csv").read_text()
    for fmt in ("csv", "json", "parquet"):
        rc, err = _cli(capsys, db, ["export", rid, "--format", fmt, "--out", str(place / "m.csv"), "--overwrite"])
        held = _one_line(rc, err, "half-way") and (place / "m.csv").read_text() == before
        held = held and sorted(os.listdir(place)) == ["dir", "m.csv"]
        assert record("export leftovers: none", held), (fmt, rc, err, os.listdir(place))


# -- export-hf ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def model_run(run_db):
    """A tiny model run with one checkpoint and a tokenizer, built in-process (no training)."""
    import torch

    from engine.data.vocab import save_tokenizer, train_tokenizer
    from engine.model.checkpoint import save_checkpoint
    from engine.model.gpt import GPT
    from engine.model.sparsity import masks_state

    tmp, db, _ = run_db
    cfg = RunConfig().replace({"name": "hf-targets", "model.n_layer": 1, "model.d_model": 16, "model.n_head": 2,
                               "model.n_ctx": 16, "tokenizer.vocab_size": 300, "sparsity.level": 0.0})
    rid = db.create_run(name="hf-targets", stage="pretrain", config=cfg.to_dict())
    folder = tmp / "runs" / rid
    tok = train_tokenizer(["Abnormality of the heart.", "Abnormality of the liver."] * 50, 300)
    save_tokenizer(tok, folder)
    torch.manual_seed(0)
    model = GPT(cfg.model, tok.get_vocab_size())
    path = folder / "checkpoints" / "step_0000001.safetensors"
    n = save_checkpoint({"config": cfg.to_dict(), "model": model.state_dict(), "masks": masks_state(model),
                         "vocab_size": tok.get_vocab_size(), "step": 1, "stage": "pretrain"}, path)
    db.add_checkpoint(rid, 1, 0, str(path), n, True)
    db.update_run(rid, run_dir=str(folder), status="completed", meta={"vocab_size": tok.get_vocab_size()})
    return db, rid


HF_OUT = ["fifo", "device", "socket", "regular file", "symlink to a fifo"]


@needs_device
@pytest.mark.parametrize("kind", HF_OUT)
def test_export_hf_refuses_an_out_that_is_not_a_folder(model_run, place, capsys, record, kind):
    db, rid = model_run
    if kind == "regular file":
        out = place / "file"
        out.write_text("keep me")
        before = _fingerprint(out)
    else:
        out, before = _make_special(kind, place)
    rc, err = _cli(capsys, db, ["export-hf", rid, "--out", str(out), "--overwrite"])
    held = _one_line(rc, err, str(out), "not a folder") and _fingerprint(out) == before and not _leftovers(place)
    assert record("export-hf onto a special file or folder entry: refused", held), (rc, err)


HF_ENTRIES = {  # an export file's place in an existing export folder
    "config.json a FIFO": lambda out, place: os.mkfifo(out / "config.json"),
    "model.safetensors a folder": lambda out, place: (out / "model.safetensors").mkdir(),
    "README.md a symlink to a device": lambda out, place: (out / "README.md").symlink_to(DEVICE),
    "tokenizer.json a socket": lambda out, place: _bind(out / "tokenizer.json"),
    "prompt_adapter a symlink to a folder elsewhere": lambda out, place: (out / "prompt_adapter").symlink_to(place),
}


def _bind(p: Path) -> None:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(str(p))
    s.close()


@needs_device
@pytest.mark.parametrize("case", list(HF_ENTRIES))
def test_export_hf_refuses_special_files_inside_its_folder_even_with_overwrite(model_run, place, capsys, record, case):
    db, rid = model_run
    out = place / "hf"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    HF_ENTRIES[case](out, place)
    before = {p.name: _fingerprint(p) for p in out.iterdir()}
    rc, err = _cli(capsys, db, ["export-hf", rid, "--out", str(out), "--overwrite"])
    after = {p.name: _fingerprint(p) for p in out.iterdir()}
    held = _one_line(rc, err, str(out)) and after == before  # refused before anything was written
    assert record("export-hf onto a special file or folder entry: refused", held), (rc, err, sorted(after))


def test_export_hf_into_an_existing_folder_needs_overwrite_and_leaves_no_temporary_files(model_run, place, capsys, record):
    db, rid = model_run
    out = place / "hf"
    rc, err = _cli(capsys, db, ["export-hf", rid, "--out", str(out)])
    assert record("export-hf: existing folder needs --overwrite, no leftovers", rc == 0 and not _leftovers(out)), err
    (out / "config.json").write_text("stale")
    rc, err = _cli(capsys, db, ["export-hf", rid, "--out", str(out)])
    held = _one_line(rc, err, "--overwrite") and (out / "config.json").read_text() == "stale"
    assert record("export-hf: existing folder needs --overwrite, no leftovers", held), err
    rc, err = _cli(capsys, db, ["export-hf", rid, "--out", str(out), "--overwrite"])
    held = rc == 0 and (out / "config.json").read_text() != "stale" and not _leftovers(out)
    assert record("export-hf: existing folder needs --overwrite, no leftovers", held), err


# -- the real CLI ------------------------------------------------------------------------------------


@needs_device
def test_the_cli_refuses_a_fifo_and_a_device_with_one_line(run_db, model_run, place, record):
    tmp, db, rid = run_db
    _, hf_rid = model_run
    os.mkfifo(place / "fifo")
    for args in (["export", rid, "--format", "csv", "--out", str(place / "fifo"), "--overwrite"],
                 ["export-config", rid, "--out", str(DEVICE), "--overwrite"],
                 ["export-hf", hf_rid, "--out", str(place / "fifo"), "--overwrite"]):
        p = subprocess.run([sys.executable, "-m", "engine", *args, "--db", str(db.path)], capture_output=True,
                           text=True, timeout=120, cwd=REPO, env=engine_env(tmp))
        held = _one_line(p.returncode, p.stderr, "not a") and stat.S_ISFIFO(os.lstat(place / "fifo").st_mode)
        held = held and DEVICE.is_char_device() and not _leftovers(place)
        assert record("export onto a special file: refused, left as it was", held), (args, p.returncode, p.stderr)
