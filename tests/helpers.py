"""Shared test helpers: real data from ../shared/data, a temporary run database, the real CLI in a subprocess."""
from __future__ import annotations

import contextlib
import io
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SHARED_DATA = (REPO.parent / "shared" / "data").resolve()
PUBMED_TRAIN = SHARED_DATA / "pubmed_abstracts" / "train.txt"

# A model small enough that a whole run takes seconds on two cores.
TINY = [
    "model.n_layer=1", "model.d_model=32", "model.n_head=2", "model.n_ctx=32",
    "tokenizer.vocab_size=300", "data.max_documents=300", "train.batch_size=4",
    "train.max_steps=6", "train.eval_every=3", "train.eval_batches=2", "train.checkpoint_every=3",
    "train.warmup_steps=2", "train.threads=1",
]


def hoc_slices(folder: Path, n_train: int, n_dev: int, prefix: str = "") -> tuple[Path, Path]:
    """Slices of the real HoC files written to ``folder``: the first ``n_train`` training abstracts and
    ``n_dev`` development abstracts whose hallmarks all occur in them (so the dev-label check passes)."""
    hoc = SHARED_DATA / "hoc"
    train = [json.loads(x) for x in (hoc / "train.jsonl").read_text().splitlines() if x.strip()][:n_train]
    seen = {label for r in train for label in r["labels"]}
    dev = [json.loads(x) for x in (hoc / "dev.jsonl").read_text().splitlines() if x.strip()]
    dev = [r for r in dev if set(r["labels"]) <= seen][:n_dev]
    assert len(dev) == n_dev
    paths = folder / f"{prefix}train.jsonl", folder / f"{prefix}dev.jsonl"
    for path, rows in zip(paths, (train, dev)):
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return paths


def sets(*items: str) -> list[str]:
    out: list[str] = []
    for item in items:
        out += ["--set", item]
    return out


def tiny(*extra: str) -> list[str]:
    """--set arguments for the tiny model; later items override earlier ones."""
    merged: dict[str, str] = {}
    for item in (*TINY, *extra):
        key, _, value = item.partition("=")
        merged[key] = value
    return sets(*(f"{k}={v}" for k, v in merged.items()))


def engine_env(tmp_path: Path) -> dict:
    env = dict(os.environ)
    env["MEDISWIFT_HOME"] = str(tmp_path / "home")
    env.pop("MEDISWIFT_DB", None)
    env.setdefault("OMP_NUM_THREADS", "1")
    return env


class CliResult:
    def __init__(self, proc: subprocess.CompletedProcess):
        self.rc = proc.returncode
        self.stdout = proc.stdout
        self.stderr = proc.stderr
        self.events = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]

    def of_type(self, t: str) -> list[dict]:
        return [e for e in self.events if e["type"] == t]

    @property
    def run_id(self) -> str | None:
        started = self.of_type("run_started")
        return started[0]["run_id"] if started else None


def cli_inproc(tmp_path: Path, db_path: Path, *args: str) -> CliResult:
    """``mediswift ARGS --db DB`` through the CLI's own ``main`` in this process, under the environment
    ``engine_env`` gives a subprocess (no interpreter start-up and no torch import per call: a run that only
    sets a test up, or a read-only command); stdout and stderr captured as ``CliResult`` reads them."""
    from unittest import mock

    from engine.cli.main import main

    out, err = io.StringIO(), io.StringIO()
    with mock.patch.dict(os.environ, engine_env(tmp_path), clear=True), contextlib.redirect_stdout(out), \
            contextlib.redirect_stderr(err):
        rc = main([*args, "--db", str(db_path)])
    return CliResult(subprocess.CompletedProcess(list(args), rc, out.getvalue(), err.getvalue()))


def needs_shared_data():
    return pytest.mark.skipif(not PUBMED_TRAIN.is_file(), reason=f"shared data missing: {PUBMED_TRAIN}")


def start_train(tmp_path: Path, db_path: Path, *args: str) -> subprocess.Popen:
    """``mediswift train demo ARGS`` running in the background, with stdin for control lines."""
    cmd = [sys.executable, "-m", "engine", "train", "demo", "--db", str(db_path), *args]
    return subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            cwd=REPO, env=engine_env(tmp_path))


def read_until(proc: subprocess.Popen, predicate, timeout: float = 240):
    """Events from a running engine up to the first that satisfies ``predicate``: (that event, all seen)."""
    deadline = time.monotonic() + timeout
    seen = []
    for line in proc.stdout:
        if line.startswith("{"):
            e = json.loads(line)
            seen.append(e)
            if predicate(e):
                return e, seen
        assert time.monotonic() < deadline, "timed out waiting for an event"
    raise AssertionError(f"stream ended before the expected event; stderr: {proc.stderr.read()}")


def process_table() -> list[dict]:
    """Every live process of this machine from /proc: pid, ppid, pgid and command line (zombies left out)."""
    out = []
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            with open(f"/proc/{d}/cmdline", "rb") as f:
                cmd = f.read()
        except (OSError, IndexError):
            continue
        if fields[0] != "Z":
            out.append({"pid": int(d), "ppid": int(fields[1]), "pgid": int(fields[2]), "cmdline": cmd})
    return out
