"""File-system and disk faults, and corpora the run could not read, on purpose and with counts.

A file system that refuses a write (an immutable or read-only runs folder, a runs folder that is a file,
the file-size limit during a checkpoint and during a database write, a full small file system) exits 3
with one line naming the path and the errno; a run it hits ends ``failed`` with that line at once, with no
temporary file and no checkpoint file without a row left behind; a damaged database keeps its own
message. A corpus the run could not read is refused (exit 2, one line naming the file) before any run row
or folder exists. Each check is recorded in the fault tally (tests/faults/conftest.py)."""
from __future__ import annotations

import gc
import gzip
import json
import os
import resource
import shutil
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import PUBMED_TRAIN, REPO, CliResult, engine_env, needs_shared_data, tiny

from engine.core.errors import EXIT_BAD_INPUT, EXIT_IO_ERROR
from engine.store.rundb import RunDB

pytestmark = needs_shared_data()
ROOT = os.geteuid() == 0


def _lines(n: int) -> str:
    with PUBMED_TRAIN.open(encoding="utf-8") as fh:
        return "".join(next(fh) for _ in range(n))


@pytest.fixture(scope="module")
def small_corpus(tmp_path_factory) -> Path:
    f = tmp_path_factory.mktemp("corpus") / "small.txt"
    f.write_text(_lines(40), encoding="utf-8")
    return f


def _env(tmp: Path) -> dict:
    env = engine_env(tmp)
    env["HF_HOME"] = str(tmp / "hf")  # the datasets cache of the small corpus: inside the test's folder
    env["HF_DATASETS_OFFLINE"] = "1"
    return env


def _train(tmp: Path, db: Path, *args: str, fsize: int | None = None, timeout: float = 120) -> CliResult:
    """``mediswift train demo ARGS`` in a subprocess, with RLIMIT_FSIZE set to ``fsize`` bytes there."""
    def limit():
        if fsize is not None:
            resource.setrlimit(resource.RLIMIT_FSIZE, (fsize, fsize))

    cmd = [sys.executable, "-m", "engine", "train", "demo", "--db", str(db), *args]
    return CliResult(subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=REPO, env=_env(tmp),
                                    preexec_fn=limit))


def _main(capsys, *argv: str) -> tuple[int, str]:
    """The CLI in this process (no interpreter start): exit code and stderr."""
    from engine.cli.main import main

    capsys.readouterr()
    rc = main(list(argv))
    return rc, capsys.readouterr().err


def _one_line(rc: int, stderr: str, code: int, *needles: str) -> bool:
    """Exit ``code``, exactly one ``mediswift: error:`` line holding every needle, no traceback."""
    errors = [line for line in stderr.splitlines() if line.startswith("mediswift: error:")]
    return (rc == code and len(errors) == 1 and "Traceback" not in stderr and "Logging error" not in stderr
            and all(n in errors[0] for n in needles))


def _runs(db: Path) -> list[dict]:
    if not db.exists():
        return []
    rdb = RunDB(db)  # opening does not reap: what the engine itself left
    try:
        return rdb.list_runs()
    finally:
        rdb.close()


def _leftovers(runs_dir: Path, db: Path) -> list[str]:
    """Temporary files anywhere under the runs folder, and checkpoint files that no row names."""
    left = [str(p) for p in runs_dir.rglob("*.tmp")] if runs_dir.exists() else []
    rows = set()
    if db.exists():
        conn = sqlite3.connect(db)
        try:
            rows = {r[0] for r in conn.execute("SELECT path FROM checkpoints")}
        finally:
            conn.close()
    left += [str(p) for p in runs_dir.rglob("*.safetensors") if str(p) not in rows] if runs_dir.exists() else []
    return left


def _failed_with(db: Path, *needles: str) -> bool:
    runs = _runs(db)
    return (len(runs) == 1 and runs[0]["status"] == "failed"
            and all(n in (runs[0]["error"] or "") for n in needles))


# -- the runs folder ----------------------------------------------------------------------------------


def _refused_before_a_row(capsys, tmp_path, runs_dir: Path, *needles: str) -> bool:
    db = tmp_path / "runs.db"
    rc, err = _main(capsys, "train", "demo", "--db", str(db), "--runs-dir", str(runs_dir), *tiny("train.max_steps=1"))
    return _one_line(rc, err, EXIT_IO_ERROR, str(runs_dir), *needles) and _runs(db) == []


def test_an_immutable_runs_folder_exits_3_before_a_run_row(tmp_path, capsys, record):
    if not ROOT or shutil.which("chattr") is None:
        pytest.skip("chattr +i needs root and the chattr tool (the chmod case covers other users)")
    runs = tmp_path / "runs"
    runs.mkdir()
    if subprocess.run(["chattr", "+i", str(runs)], capture_output=True).returncode != 0:
        pytest.skip("this file system does not take the immutable attribute (chattr +i failed)")
    try:
        held = _refused_before_a_row(capsys, tmp_path, runs, "(EPERM)") and not list(runs.iterdir())
    finally:
        subprocess.run(["chattr", "-i", str(runs)], check=True)
    assert record("disk: immutable runs folder: exit 3, no run row", held), capsys.readouterr()


def test_a_read_only_runs_folder_exits_3_before_a_run_row(tmp_path, capsys, record):
    if ROOT:
        pytest.skip("running as root: chmod does not stop root's writes (the immutable case covers it)")
    runs = tmp_path / "runs"
    runs.mkdir()
    runs.chmod(0o555)
    try:
        held = _refused_before_a_row(capsys, tmp_path, runs, "(EACCES)")
    finally:
        runs.chmod(0o755)
    assert record("disk: read-only runs folder: exit 3, no run row", held)


@pytest.mark.parametrize("where", ["the runs folder", "a folder above it"])
def test_a_runs_folder_that_is_a_file_exits_3_before_a_run_row(tmp_path, capsys, where, record):
    f = tmp_path / "runs"
    f.write_text("a file, not a folder")
    runs = f if where == "the runs folder" else f / "more" / "runs"
    held = _refused_before_a_row(capsys, tmp_path, runs, "(ENOTDIR)")
    assert record("disk: runs folder is a file: exit 3, no run row", held and f.read_text() == "a file, not a folder")


def test_a_run_folder_that_cannot_be_made_fails_the_row_at_once(tmp_path, record):
    """What prepare_run cannot see coming (the disk changed since): the row is written, the folder is not."""
    from engine.core.config import load_config
    from engine.core.errors import FileSystemError
    from engine.core.events import EventWriter
    from engine.core.paths import resolve_preset
    from engine.train.reporter import RunReporter

    db = tmp_path / "runs.db"
    blocker = tmp_path / "runs"
    blocker.write_text("x")
    cfg = load_config(resolve_preset("demo"), {})
    with pytest.raises(FileSystemError) as e:
        RunReporter(RunDB(db), EventWriter(open(os.devnull, "w")), cfg, blocker)
    held = "(ENOTDIR)" in str(e.value) and _failed_with(db, "cannot write", "(ENOTDIR)")
    assert record("disk: run folder not creatable: row failed at once", held), _runs(db)


@pytest.mark.quick
def test_created_rows_whose_process_is_gone_are_reaped(tmp_path, record):
    db = tmp_path / "runs.db"
    code = ("import sys; from engine.store.rundb import RunDB; "
            "RunDB(sys.argv[1]).create_run(name='x', stage='pretrain', config={})")
    subprocess.run([sys.executable, "-c", code, str(db)], check=True, cwd=REPO, timeout=60)
    live = RunDB(db).create_run(name="mine", stage="pretrain", config={})  # this process is alive: kept
    rdb = RunDB(db)
    reaped = rdb.reap_crashed()
    status = {r["id"]: r["status"] for r in rdb.list_runs()}
    held = len(reaped) == 1 and status[reaped[0]] == "failed" and status[live] == "created"
    assert record("disk: created row of a dead process reaped", held), status


# -- the run database ---------------------------------------------------------------------------------


def test_an_immutable_database_folder_is_a_file_system_error_not_a_damaged_database(tmp_path, capsys, record):
    if not ROOT or shutil.which("chattr") is None:
        pytest.skip("chattr +i needs root and the chattr tool")
    folder = tmp_path / "db"
    folder.mkdir()
    db = folder / "runs.db"
    if subprocess.run(["chattr", "+i", str(folder)], capture_output=True).returncode != 0:
        pytest.skip("this file system does not take the immutable attribute (chattr +i failed)")
    try:
        rc, err = _main(capsys, "runs", "list", "--db", str(db))
    finally:
        subprocess.run(["chattr", "-i", str(folder)], check=True)
    held = _one_line(rc, err, EXIT_IO_ERROR, str(db)) and "damaged" not in err
    assert record("disk: unwritable database folder: exit 3, not damaged", held), err


def test_a_damaged_database_keeps_its_own_message(tmp_path, capsys, record):
    db = tmp_path / "runs.db"
    db.write_bytes(b"this is not a database, only text " * 200)
    rc, err = _main(capsys, "runs", "list", "--db", str(db))
    assert record("disk: damaged database keeps exit 2 and its message", _one_line(rc, err, EXIT_BAD_INPUT, str(db), "damaged")), err


# -- the file-size limit and a full file system, during a run ----------------------------------------

BIG = ("model.d_model=128", "model.n_head=2", "train.max_steps=6", "train.checkpoint_every=3", "sparsity.kernel=dense")


def test_the_file_size_limit_during_a_checkpoint_write(tmp_path, small_corpus, record):
    db = tmp_path / "runs.db"
    # the checkpoint (~1.2 MB for d_model 128) is the only file over 600 kB
    r = _train(tmp_path, db, *tiny(f"data.corpus={small_corpus}", *BIG), fsize=600_000)
    runs_dir = tmp_path / "runs"
    held = (_one_line(r.rc, r.stderr, EXIT_IO_ERROR, "step_0000003.safetensors", "(EFBIG)")
            and _failed_with(db, "step_0000003.safetensors", "(EFBIG)") and not _leftovers(runs_dir, db))
    assert record("disk: RLIMIT_FSIZE in a checkpoint write: exit 3, failed", held), \
        (r.rc, r.stderr[-1500:], _runs(db), _leftovers(runs_dir, db))


def test_the_file_size_limit_during_a_database_write(tmp_path, small_corpus, record):
    db = tmp_path / "runs.db"
    RunDB(db).close()
    # a write-ahead log already near the limit (another connection holds it, unflushed): the engine's
    # first commits fit, a later one does not; every other file of the run stays far below the limit
    ballast = sqlite3.connect(db)
    ballast.execute("PRAGMA wal_autocheckpoint = 0")
    ballast.execute("CREATE TABLE ballast (id INTEGER PRIMARY KEY, data BLOB)")
    ballast.execute("INSERT INTO ballast VALUES (1, zeroblob(3000))")
    ballast.commit()
    for _ in range(300):
        ballast.execute("UPDATE ballast SET data = randomblob(3000) WHERE id = 1")
        ballast.commit()
    wal = db.with_name(db.name + "-wal").stat().st_size
    try:
        r = _train(tmp_path, db, *tiny(f"data.corpus={small_corpus}", "train.max_steps=40", "train.checkpoint_every=1000",
                                       "train.eval_every=1000", "sparsity.kernel=dense"), fsize=wal + 120_000)
    finally:
        ballast.close()
    runs_dir = tmp_path / "runs"
    conn = sqlite3.connect(db)
    try:
        intact = conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    finally:
        conn.close()
    held = (_one_line(r.rc, r.stderr, EXIT_IO_ERROR, str(db), "(EFBIG)") and _failed_with(db, str(db), "(EFBIG)")
            and intact and not _leftovers(runs_dir, db))
    assert record("disk: RLIMIT_FSIZE in a database write: exit 3, failed", held), \
        (r.rc, r.stderr[-1500:], _runs(db), _leftovers(runs_dir, db))


@pytest.fixture
def small_fs(tmp_path):
    """A 1 MiB tmpfs, where the machine lets this process mount one."""
    mnt = tmp_path / "small"
    mnt.mkdir()
    if not ROOT or shutil.which("mount") is None:
        pytest.skip("mounting a small tmpfs needs root")
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mnt)], capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"this machine does not allow mounting a tmpfs: {r.stderr.strip()}")
    try:
        yield mnt
    finally:
        gc.collect()  # database connections of the in-process commands, closed
        if subprocess.run(["umount", str(mnt)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(mnt)], check=False)  # still busy: detached, never left mounted


def test_a_full_file_system_during_a_run_and_an_export(tmp_path, small_fs, small_corpus, capsys, record):
    db = small_fs / "runs.db"
    r = _train(tmp_path, db, *tiny(f"data.corpus={small_corpus}", *BIG))
    runs_dir = small_fs / "runs"
    held = (_one_line(r.rc, r.stderr, EXIT_IO_ERROR, str(small_fs), "(ENOSPC)")
            and _failed_with(db, str(small_fs), "(ENOSPC)") and not _leftovers(runs_dir, db))
    assert record("disk: full tmpfs during a run: exit 3, failed", held), \
        (r.rc, r.stderr[-1500:], _runs(db), _leftovers(runs_dir, db))
    # the same file system, filled to the last byte: an export of the run's metrics onto it (the
    # database read from a copy elsewhere: opening one needs its -wal and -shm files written)
    run_id = _runs(db)[0]["id"]
    copy = tmp_path / "copy.db"
    shutil.copy(db, copy)
    fd = os.open(small_fs / "filler", os.O_WRONLY | os.O_CREAT)
    try:
        while os.write(fd, b"\0" * 4096):
            pass
    except OSError:
        pass
    finally:
        os.close(fd)
    out = small_fs / "metrics.csv"
    rc, err = _main(capsys, "export", run_id, "--format", "csv", "--out", str(out), "--db", str(copy))
    leftovers = [p.name for p in small_fs.iterdir() if p.name not in ("filler", "runs.db", "runs")]
    held = _one_line(rc, err, EXIT_IO_ERROR, str(small_fs), "(ENOSPC)") and not leftovers
    assert record("disk: full tmpfs during an export: exit 3, no partial file", held), (rc, err, leftovers)


# -- corpora the run could not read ----------------------------------------------------------------


def _bad_corpora(folder: Path) -> dict[str, Path]:
    """name -> a corpus (file or folder) that must be refused before any run row exists."""
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    text = _lines(20)
    docs = [line for line in text.splitlines() if line.strip()]
    jl = "".join(json.dumps({"text": d}) + "\n" for d in docs)
    out: dict[str, Path] = {}

    def put(name: str, data: bytes | str) -> Path:
        p = folder / name
        p.write_bytes(data.encode() if isinstance(data, str) else data)
        return p

    out["plain text named .txt.gz"] = put("plain.txt.gz", text)
    out["JSON lines named .jsonl.gz"] = put("plain.jsonl.gz", jl)
    out["truncated gzip"] = put("cut.txt.gz", gzip.compress(text.encode())[: len(gzip.compress(text.encode())) // 2])
    out["gzip of nothing"] = put("nothing.txt.gz", gzip.compress(b""))
    out["gzip holding binary"] = put("binary.txt.gz", gzip.compress(os.urandom(2048) + b"\0" * 64))
    out["empty .jsonl"] = put("empty.jsonl", b"")
    out["JSON lines without the text field"] = put("nofield.jsonl", "".join(json.dumps({"abstract": d}) + "\n" for d in docs))
    out["JSON lines whose text is a number"] = put("number.jsonl", "".join(json.dumps({"text": i}) + "\n" for i in range(20)))
    out["JSON lines whose text is a list"] = put("list.jsonl", "".join(json.dumps({"text": [d]}) + "\n" for d in docs))
    out["JSON lines that are not JSON"] = put("garbage.jsonl", "{not json at all\n" + jl)
    out["JSON lines of arrays"] = put("arrays.jsonl", "".join(json.dumps([d]) + "\n" for d in docs))
    out["one JSON object in a .json"] = put("object.json", json.dumps({"meta": 1, "rows": docs}, indent=2))
    out["CSV without the text column"] = put("nocol.csv", "id,abstract\n" + "".join(f"{i},\"{d[:50]}\"\n" for i, d in enumerate(docs)))
    out["CSV whose text column holds numbers"] = put("numbers.csv", "text,label\n" + "".join(f"{i},1\n" for i in range(20)))
    pq.write_table(pa.table({"abstract": docs}), folder / "nocol.parquet")
    out["Parquet without the text column"] = folder / "nocol.parquet"
    pq.write_table(pa.table({"text": list(range(len(docs)))}), folder / "ints.parquet")
    out["Parquet whose text column is int64"] = folder / "ints.parquet"
    out["garbage named .parquet"] = put("garbage.parquet", os.urandom(4096))
    out["garbage named .arrow"] = put("garbage.arrow", os.urandom(4096))
    with pa.ipc.new_stream(folder / "lists.arrow", pa.schema([("text", pa.list_(pa.string()))])) as w:
        w.write_table(pa.table({"text": [[d] for d in docs]}))
    out["Arrow stream whose text column is a list"] = folder / "lists.arrow"
    for name in ("state", "missing", "ints"):
        data = {"text": docs} if name != "ints" else {"text": list(range(len(docs)))}
        datasets.Dataset.from_dict(data).save_to_disk(str(folder / f"saved_{name}"))
    (folder / "saved_state" / "state.json").write_text("{ damaged")
    for f in (folder / "saved_missing").glob("*.arrow"):
        f.unlink()
    out["save_to_disk folder with a damaged state.json"] = folder / "saved_state"
    out["save_to_disk folder without its data file"] = folder / "saved_missing"
    out["save_to_disk folder whose text column is int"] = folder / "saved_ints"
    (folder / "nothing_usable").mkdir()
    put("nothing_usable/notes.docx", "x")
    put("nothing_usable/weights.bin", os.urandom(64))
    out["folder with no corpus files"] = folder / "nothing_usable"
    (folder / "empty_only").mkdir()
    put("empty_only/a.txt", "")
    out["folder whose only file is empty"] = folder / "empty_only"
    return out


@pytest.fixture(scope="module")
def bad_corpora(tmp_path_factory) -> dict[str, Path]:
    return _bad_corpora(tmp_path_factory.mktemp("bad_corpora"))


BAD_CORPORA = ["plain text named .txt.gz", "JSON lines named .jsonl.gz", "truncated gzip", "gzip of nothing",
               "gzip holding binary", "empty .jsonl", "JSON lines without the text field",
               "JSON lines whose text is a number", "JSON lines whose text is a list", "JSON lines that are not JSON",
               "JSON lines of arrays", "one JSON object in a .json", "CSV without the text column",
               "CSV whose text column holds numbers", "Parquet without the text column",
               "Parquet whose text column is int64", "garbage named .parquet", "garbage named .arrow",
               "Arrow stream whose text column is a list", "save_to_disk folder with a damaged state.json",
               "save_to_disk folder without its data file", "save_to_disk folder whose text column is int",
               "folder with no corpus files", "folder whose only file is empty"]


@pytest.mark.quick
@pytest.mark.parametrize("case", BAD_CORPORA)
def test_a_bad_corpus_is_refused_before_a_run_row_or_folder(tmp_path, bad_corpora, capsys, case, record):
    corpus = bad_corpora[case]
    db = tmp_path / "runs.db"
    rc, err = _main(capsys, "train", "demo", "--db", str(db), *tiny(f"data.corpus={corpus}", "train.max_steps=1"))
    held = _one_line(rc, err, EXIT_BAD_INPUT, str(corpus)) and _runs(db) == [] and not (tmp_path / "runs").exists()
    assert record("bad corpus: exit 2, one line, no run row or folder", held), (case, rc, err)


def test_a_bad_corpus_through_the_real_cli(tmp_path, bad_corpora, record):
    corpus = bad_corpora["plain text named .txt.gz"]
    db = tmp_path / "runs.db"
    r = _train(tmp_path, db, *tiny(f"data.corpus={corpus}"))
    events = r.of_type("error")
    held = (_one_line(r.rc, r.stderr, EXIT_BAD_INPUT, str(corpus), "not a gzip file") and _runs(db) == []
            and not (tmp_path / "runs").exists() and events and events[0]["path"] == str(corpus))
    assert record("bad corpus: exit 2, one line, no run row or folder", held), r.stderr


def test_good_corpora_of_every_kind_still_pass_the_check(tmp_path, record):
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    from engine.data.corpus import check_corpus_spec

    docs = [line for line in _lines(20).splitlines() if line.strip()]
    (tmp_path / "a.txt.gz").write_bytes(gzip.compress("\n".join(docs).encode()))
    (tmp_path / "b.jsonl.gz").write_bytes(gzip.compress("".join(json.dumps({"text": d}) + "\n" for d in docs).encode()))
    (tmp_path / "c.json").write_text(json.dumps([{"text": d} for d in docs]))
    (tmp_path / "d.csv").write_text("id,text\n" + "".join(f"{i},\"{d[:60]}\"\n" for i, d in enumerate(docs)))
    pq.write_table(pa.table({"text": docs}), tmp_path / "e.parquet")
    with pa.ipc.new_stream(tmp_path / "f.arrow", pa.schema([("text", pa.string())])) as w:
        w.write_table(pa.table({"text": docs}))
    datasets.Dataset.from_dict({"text": docs}).save_to_disk(str(tmp_path / "saved"))
    specs = [str(tmp_path / n) for n in ("a.txt.gz", "b.jsonl.gz", "c.json", "d.csv", "e.parquet", "f.arrow", "saved")]
    held = len(check_corpus_spec(specs)) == len(specs)
    assert record("bad corpus: valid corpora of every kind still accepted", held)
