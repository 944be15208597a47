"""Distributed faults, each recorded in the fault tally: a two-node run whose second node never comes (it
says so every 10 s and gives up after train.rdzv_timeout with one line), an endpoint that speaks another
protocol (one line, at once), and the launcher killed while it waits (SIGKILL, SIGTERM, SIGINT): no
``mediswift-group-*`` folder is left once the next launch has run. Gloo on the CPU, the tiniest model; the
launchers wait in a rendezvous, so nothing trains (about 40 s on two cores)."""
from __future__ import annotations

import json
import signal
import socket
import socketserver
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import SimpleNamespace

import pytest
from helpers import PUBMED_TRAIN, REPO, engine_env, needs_shared_data, tiny

from engine.store.rundb import RunDB

pytestmark = needs_shared_data()
CORPUS = f"data.corpus={PUBMED_TRAIN}"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _two_nodes(port: int, timeout: int) -> list[str]:
    """This machine as one node of two (it hosts the rendezvous at 127.0.0.1:PORT); the other never comes."""
    return tiny(CORPUS, "train.nproc=1", "train.nnodes=2", f"train.rdzv_endpoint='127.0.0.1:{port}'",
                f"train.rdzv_timeout={timeout}")


def _env(tmp_path: Path) -> dict:
    env = engine_env(tmp_path)
    env["TMPDIR"] = str(tmp_path / "tmp")  # the launcher's temporary folders land here, to be counted
    (tmp_path / "tmp").mkdir(exist_ok=True)
    return env


def _launcher(tmp_path: Path, *args: str) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "engine", "train", "demo", "--db", str(tmp_path / "runs.db"), *args]
    return subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            cwd=REPO, env=_env(tmp_path))


def _group_dirs(tmp_path: Path, pid: int | None = None) -> list[Path]:
    return sorted((tmp_path / "tmp").glob(f"mediswift-group-{pid}-*" if pid else "mediswift-group-*"))


def _wait_for(predicate, timeout: float = 60.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.1)
    return False


# -- a node that never comes ------------------------------------------------------------------------


def test_a_missing_node_is_reported_every_10_s_and_the_wait_ends_at_rdzv_timeout(tmp_path, record):
    timeout = 11
    began = time.monotonic()
    proc = _launcher(tmp_path, *_two_nodes(_free_port(), timeout))
    try:
        out, err = proc.communicate(timeout=timeout + 60)
    finally:
        if proc.poll() is None:
            proc.kill()
    took = time.monotonic() - began
    events = [json.loads(ln) for ln in out.splitlines() if ln.startswith("{")]
    waits = [e for e in events if e["type"] == "log" and "waiting for the rendezvous" in e["message"]]
    errors = [e for e in events if e["type"] == "error"]
    lines = [ln for ln in err.splitlines() if ln.strip()]
    progress = [ln for ln in lines if ln.startswith("mediswift: waiting for the rendezvous at 127.0.0.1:")]
    final = [ln for ln in lines if ln not in progress]
    record("distributed: a node that never comes (progress every 10 s)",
           bool(progress) and "1 of 2 nodes joined" in progress[0] and len(waits) == len(progress))
    record("distributed: a node that never comes (one line at train.rdzv_timeout)",
           proc.returncode == 3 and len(final) == 1 and "Traceback" not in err
           and "timed out after 11 s (train.rdzv_timeout), 1 of 2 nodes joined" in final[0]
           and len(errors) == 1 and errors[0]["time"] - waits[0]["time"] < (timeout - 10) + 6)
    record("distributed: a node that never comes (nothing left behind)",
           not _group_dirs(tmp_path) and RunDB(tmp_path / "runs.db").list_runs() == [])
    assert progress and "1 of 2 nodes joined" in progress[0], err
    assert len(waits) == len(progress), out  # the studio sees each line as a log event
    assert proc.returncode == 3, err  # the engine's I/O exit code: the config was fine, a machine did not come
    assert len(final) == 1 and "Traceback" not in err, err
    assert final[0].startswith("mediswift: error: the rendezvous at 127.0.0.1:") and \
        "timed out after 11 s (train.rdzv_timeout), 1 of 2 nodes joined" in final[0], final
    assert len(errors) == 1 and errors[0]["key"] == "train.rdzv_endpoint"
    # the give-up comes at the timeout: the first progress line is at 10 s of the wait, the end at 11 s (+ the
    # rendezvous' own withdrawal); the whole command, its imports included, well within the timeout + a few s
    assert errors[0]["time"] - waits[0]["time"] < (timeout - 10) + 6
    assert took < timeout + 30
    assert not _group_dirs(tmp_path) and RunDB(tmp_path / "runs.db").list_runs() == []


def test_a_resumed_run_whose_rendezvous_does_not_form_ends_failed_with_the_reason(tmp_path, record, capsys):
    from engine.train import group

    db = RunDB(tmp_path / "runs.db")
    run_id = db.create_run(name="r", stage="pretrain", config={})
    db.set_status(run_id, "crashed", error="a process of the group was lost")
    plan = SimpleNamespace(db_path=str(tmp_path / "runs.db"), resume=SimpleNamespace(run_id=run_id))
    message = "the rendezvous at node0:29500 timed out after 300 s (train.rdzv_timeout), 1 of 2 nodes joined: node1"
    code = group._rendezvous_failed(plan, message)
    row = RunDB(tmp_path / "runs.db").get_run(run_id)
    err = capsys.readouterr().err
    held = code == 3 and row["status"] == "failed" and row["error"] == message and err.count("\n") == 1
    record("distributed: a node that never comes (a resumed run's row)", held)
    assert held, (code, row["status"], row["error"], err)


# -- an endpoint that speaks another protocol -------------------------------------------------------


class _Quiet(BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200)
        self.end_headers()
        self.wfile.write(b"<html>not a rendezvous</html>")

    do_HEAD = do_GET

    def log_message(self, *args):
        pass


@contextmanager
def _server(kind: str):
    """A server on a free local port: http (python's http.server), banner (speaks first, like SSH),
    closer (closes at once), silent (accepts and says nothing)."""
    if kind == "http":
        srv = ThreadingHTTPServer(("127.0.0.1", 0), _Quiet)
    else:
        class Handler(socketserver.BaseRequestHandler):
            def handle(self):
                if kind == "banner":
                    self.request.sendall(b"SSH-2.0-OpenSSH_9.6\r\n")
                if kind == "silent":
                    time.sleep(2)  # holds the connection open and says nothing, whatever it is sent
                if kind == "banner":
                    self.request.settimeout(3)
                    try:
                        while self.request.recv(512):
                            pass
                    except OSError:
                        pass

        srv = socketserver.ThreadingTCPServer(("127.0.0.1", 0), Handler)
        srv.daemon_threads = True
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    try:
        yield srv.server_address[1]
    finally:
        srv.shutdown()
        srv.server_close()


def test_an_http_server_at_the_endpoint_is_one_line_at_once(tmp_path, capsys, record):
    from engine.cli import main

    with _server("http") as port:
        began = time.monotonic()
        rc = main(["train", "demo", *_two_nodes(port, 300), "--db", str(tmp_path / "runs.db")])
        took = time.monotonic() - began
    out, err = capsys.readouterr()
    lines = [ln for ln in err.splitlines() if ln.strip()]
    held = (rc == 2 and len(lines) == 1 and took < 10
            and f"127.0.0.1:{port} answered, but not as a rendezvous (got 'HTTP/1.0 200 OK')" in lines[0])
    record("distributed: an endpoint that speaks another protocol", held)
    assert rc == 2 and len(lines) == 1, err
    assert f"127.0.0.1:{port} answered, but not as a rendezvous (got 'HTTP/1.0 200 OK')" in lines[0], lines
    assert took < 10, f"{took:.1f} s"
    assert [e["key"] for e in map(json.loads, filter(None, out.splitlines())) if e["type"] == "error"] == \
        ["train.rdzv_endpoint"]
    assert RunDB(tmp_path / "runs.db").list_runs() == []


@pytest.mark.quick
@pytest.mark.parametrize("kind,words", [("banner", "got 'SSH-2.0-OpenSSH_9.6'"), ("closer", "closed the connection"),
                                        ("silent", "no answer in 1 s")])
def test_other_servers_are_named_and_a_real_store_passes(kind, words, record):
    from engine.train.group import rendezvous_answer

    with _server(kind) as port:
        began = time.monotonic()
        what = rendezvous_answer("127.0.0.1", port, timeout=1.0)
        took = time.monotonic() - began
    held = what is not None and words in what and took < 3
    record("distributed: an endpoint that speaks another protocol", held)
    assert held, (what, took)


def test_a_real_rendezvous_store_is_recognised(record):
    from datetime import timedelta

    import torch.distributed as dist

    from engine.train.group import rendezvous_answer

    store = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False, multi_tenant=True,
                          timeout=timedelta(seconds=10))
    held = rendezvous_answer("127.0.0.1", store.port, timeout=2.0) is None
    store.set("still", "works")  # the probe left the store serving
    held = held and store.get("still") == b"works"
    record("distributed: a real rendezvous store still accepted", held)
    assert held


# -- the launcher killed ----------------------------------------------------------------------------


def test_a_killed_launcher_leaves_no_temporary_folder_after_the_next_launch(tmp_path, record):
    """SIGKILL leaves the launcher no chance: the next launch removes its folder (its pid and start time
    name a process that is gone). SIGTERM and SIGINT while waiting end the wait at once (exit 130, one line)
    and remove the launcher's own folder."""
    results = {}
    for sig in (signal.SIGKILL, signal.SIGTERM, signal.SIGINT):
        before = _group_dirs(tmp_path)
        proc = _launcher(tmp_path, *_two_nodes(_free_port(), 60))
        try:
            assert _wait_for(lambda: _group_dirs(tmp_path, proc.pid) or proc.poll() is not None), "no launch"
            mine = _group_dirs(tmp_path, proc.pid)
            stale_gone = not [d for d in before if d.exists()]  # the launch removed what a killed launcher left
            proc.send_signal(sig)  # its folder exists: its stop handling is in place
            began = time.monotonic()
            _, err = proc.communicate(timeout=30)
            took = time.monotonic() - began
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        lines = [ln for ln in err.splitlines() if ln.strip()]
        if sig == signal.SIGKILL:
            ok = len(mine) == 1 and mine[0].exists()  # what the next launch has to remove
        else:
            ok = (proc.returncode == 130 and took < 10 and not mine[0].exists() and len(lines) == 1
                  and f"stopped ({sig.name}) while waiting for the rendezvous" in lines[0])
        results[sig.name] = (ok, stale_gone, proc.returncode, round(took, 1), lines)
    left = _group_dirs(tmp_path)
    record("distributed: launcher killed (SIGKILL), folder removed by the next launch",
           results["SIGKILL"][0] and results["SIGTERM"][1])
    record("distributed: launcher stopped while waiting (SIGTERM)", results["SIGTERM"][0])
    record("distributed: launcher stopped while waiting (SIGINT)", results["SIGINT"][0] and not left)
    assert all(r[0] for r in results.values()) and results["SIGTERM"][1], results
    assert not left, left
