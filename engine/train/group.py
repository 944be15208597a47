"""One run on many processes, started through torchrun's own launcher (``torch.distributed.launcher``,
the Python API behind the ``torchrun`` command), and what the launching process does around it.

    mediswift train (this process: checks, the elastic agent, control relay, final status)
        └── workers, one per train.nproc (spawned by the agent, in this process's process group),
            each handed the run's plan (engine.train.plan.RunPlan), not a command line
              rank 0: the run's RunReporter (rows, events, log, the lease); the others: silent followers

- Bad input is refused before any worker starts (``check_group``, called when the run is planned):
  too many processes for the machine, a rendezvous endpoint that does not resolve or answer or that
  answers as another server (one TCPStore question tells), FSDP where it cannot shard.
- The rendezvous (torch's c10d, created through us: RendezvousWatch) says every 10 s how many nodes
  have joined and gives up after ``train.rdzv_timeout`` with one line (exit 3); a stop while it waits
  ends the wait at once (exit 130). The launcher's temporary folder names its pid and start time, so a
  later launch removes one that a SIGKILL left behind.
- Control: a stop or pause (stdin line or signal) reaches this process; it signals its local workers,
  which agree on it at the next step (engine.train.distributed.Group.any), so every rank stops at the
  same step and rank 0 writes the final checkpoint. SIGINT/SIGTERM stay ours
  (TORCHELASTIC_SIGNALS_TO_HANDLE): the agent's own handling would kill the workers after 30 s.
- The workers share this process's process group, so a forced stop (the studio kills the group named
  in ``run_started``) takes all of them; a worker whose launcher vanishes exits by itself.
- When a worker dies the agent ends the others; if rank 0 could not record it, this process marks
  the run ``crashed``, so it is never left ``running``.
"""
from __future__ import annotations

import _thread
import errno
import ipaddress
import logging
import os
import shutil
import signal
import socket
import struct
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Callable

import torch
from torch.distributed.elastic.multiprocessing import DefaultLogsSpecs, Std
from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
from torch.distributed.launcher.api import LaunchConfig, elastic_launch

from engine.core.errors import EXIT_IO_ERROR, InputError, error_line
from engine.core.events import EventWriter
from engine.core.machine_checks import check_processes
from engine.core.processes import pid_alive, process_start
from engine.train.control import Control
from engine.train.request import in_group, is_follower  # noqa: F401  (torch-free; re-exported)
from engine.train.reporter import record_lost_run

GROUP_DIR_ENV = "MEDISWIFT_GROUP_DIR"
RDZV_WAIT_ENV = "MEDISWIFT_RDZV_WAIT_S"  # how long a node waits for a remote rendezvous host to answer
RDZV_PROGRESS_S = 10.0  # a rendezvous that waits says so this often
GROUP_PREFIX = "mediswift-group-"  # the launcher's temporary folder: mediswift-group-PID-START-XXXXXXXX


def world_size(cfg) -> int:
    return cfg.train.nproc * cfg.train.nnodes


# -- checks before anything starts -----------------------------------------------------------------


def check_group(cfg, resuming: bool) -> None:
    """Refuse a process group this machine cannot run (exit 2, naming the key)."""
    tc = cfg.train
    cuda = tc.device == "cuda" or (tc.device == "auto" and torch.cuda.is_available())
    check_processes(cfg, torch.cuda.device_count() if cuda else 0, resuming)
    if world_size(cfg) > 1 and tc.rdzv_endpoint:
        check_rendezvous(tc.rdzv_endpoint, tc.nnodes, tc.rdzv_timeout)


def parse_endpoint(endpoint: str) -> tuple[str, int]:
    host, sep, port = endpoint.rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise InputError(f"train.rdzv_endpoint must be HOST:PORT (e.g. node0.example.org:29500), not {endpoint!r}",
                         key="train.rdzv_endpoint")
    return host, int(port)


def _is_local(addr: str) -> bool:
    try:
        if ipaddress.ip_address(addr).is_loopback:
            return True
    except ValueError:
        return False
    with socket.socket(socket.AF_INET6 if ":" in addr else socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind((addr, 0))  # only an address of this machine can be bound
            return True
        except OSError:
            return False


def check_rendezvous(endpoint: str, nnodes: int, timeout: float = 300) -> None:
    """The endpoint resolves, and either this machine hosts it (a free port here) or its host answers, as
    a rendezvous (torch's TCPStore), not as some other server."""
    host, port = parse_endpoint(endpoint)
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as e:
        raise InputError(f"cannot resolve the rendezvous host {host!r} of train.rdzv_endpoint ({e.strerror})",
                         key="train.rdzv_endpoint") from None
    addr = infos[0][4][0]
    if _is_local(addr):
        if _answers(addr, port, 0.5):
            if nnodes == 1:
                raise InputError(f"port {port} of train.rdzv_endpoint {endpoint} is already in use on this machine; "
                                 "choose another port (or leave train.rdzv_endpoint empty on one machine)",
                                 key="train.rdzv_endpoint")
            _check_speaks_rendezvous(addr, port, endpoint)
            return  # another node of this machine hosts it already
        with socket.socket(infos[0][0], socket.SOCK_STREAM) as s:
            try:
                s.bind((addr, port))
            except OSError as e:
                raise InputError(f"cannot host the rendezvous at {endpoint}: {e.strerror}", key="train.rdzv_endpoint") from None
        return
    wait = min(float(os.environ.get(RDZV_WAIT_ENV, "30")), timeout)
    start = time.monotonic()
    said = start
    reason = "no answer"
    while True:
        try:
            with socket.create_connection((addr, port), timeout=min(5.0, max(0.5, wait))):
                pass
            _check_speaks_rendezvous(addr, port, endpoint)
            return
        except OSError as e:
            reason = e.strerror or type(e).__name__
        now = time.monotonic()
        if now - start >= wait:
            raise InputError(f"cannot reach the rendezvous endpoint {endpoint} ({reason}, for {wait:.0f} s); start the "
                             "run on that machine first, or check train.rdzv_endpoint", key="train.rdzv_endpoint")
        if now - said >= RDZV_PROGRESS_S:
            said = now
            say_progress(f"waiting for the rendezvous host at {endpoint} to answer ({reason}; {now - start:.0f} s of "
                         f"{wait:.0f} s)")
        time.sleep(1.0)


def _answers(addr: str, port: int, timeout: float) -> bool:
    try:
        with socket.create_connection((addr, port), timeout=timeout):
            return True
    except OSError:
        return False


# torch's TCPStore wire protocol (torch/csrc/distributed/c10d/TCPStoreBackend.hpp), stable since torch 1.13:
# a client opens with VALIDATE and the magic number, then asks CHECK for keys; the answer is one byte,
# READY (0) or NOT_READY (1). A store never speaks first.
_STORE_VALIDATE, _STORE_CHECK, _STORE_MAGIC = 0, 5, 0x3C85F7CE
PROBE_TIMEOUT_S = 5.0


def _check_speaks_rendezvous(addr: str, port: int, endpoint: str) -> None:
    """Refuse, in a second or so, an endpoint whose server is not a rendezvous (an HTTP server on that
    port): torch's own client would retry against it for a minute and end in a long traceback."""
    what = rendezvous_answer(addr, port)
    if what is not None:
        raise InputError(f"{endpoint} answered, but not as a rendezvous ({what}); train.rdzv_endpoint must name the "
                         "port where the first machine of the run hosts it, not another server's",
                         key="train.rdzv_endpoint")


def rendezvous_answer(addr: str, port: int, timeout: float = PROBE_TIMEOUT_S) -> str | None:
    """None when ``addr:port`` answers a CHECK as torch's TCPStore does; else what answered, in words."""
    key = b"mediswift/probe"
    query = struct.pack("<BI", _STORE_VALIDATE, _STORE_MAGIC) + struct.pack("<BQQ", _STORE_CHECK, 1, len(key)) + key
    try:
        reply, silent = _exchange(addr, port, query, timeout, half_close=True)
    except OSError as e:
        return f"the connection failed: {e.strerror or type(e).__name__}"
    if reply in (b"\x00", b"\x01"):
        return None
    if not reply:
        return f"no answer in {timeout:g} s" if silent else "it closed the connection without an answer"
    if not reply.startswith(b"HTTP/"):
        try:  # a web server answering an HTTP/0.9-style request sends a page without its status line: ask properly
            again, _ = _exchange(addr, port, b"HEAD / HTTP/1.0\r\n\r\n", min(timeout, 2.0), half_close=False)
            if again.startswith(b"HTTP/"):
                reply = again
        except OSError:
            pass
    line = next((ln for ln in reply.splitlines() if ln.strip()), reply)[:80]
    return f"got {line.decode('ascii', 'replace').strip()!r}"


def _exchange(addr: str, port: int, data: bytes, timeout: float, half_close: bool) -> tuple[bytes, bool]:
    """What ``addr:port`` answers to ``data`` within ``timeout`` (up to 512 bytes), and whether it was still
    silent then."""
    deadline = time.monotonic() + timeout
    with socket.create_connection((addr, port), timeout=timeout) as s:
        reply = b""
        try:
            s.sendall(data)
            if half_close:
                s.shutdown(socket.SHUT_WR)  # a line-based server waits for the end of a line: give it the end of input
            while len(reply) < 512:
                left = deadline - time.monotonic()
                if left <= 0:
                    return reply, True
                s.settimeout(left)
                try:
                    chunk = s.recv(512)
                except socket.timeout:
                    return reply, True
                if not chunk:
                    break
                reply += chunk
        except OSError as e:
            # connected, then the server closed or reset before (or while) we spoke: what it said so far
            if not isinstance(e, ConnectionError) and e.errno != errno.ENOTCONN:
                raise
        return reply, False


def say_progress(message: str) -> None:
    """A line of a wait, for a terminal (stderr) and for the studio (a ``log`` event on stdout)."""
    sys.stderr.write(f"mediswift: {message}\n")
    sys.stderr.flush()
    EventWriter().emit("log", message=message)


# -- the launch ------------------------------------------------------------------------------------


def launch(plan, run_rank: Callable) -> int:
    """Run ``plan`` on ``train.nproc`` local processes of a ``train.nnodes`` group, each of which calls
    ``run_rank(plan)``; returns the exit code of the run (rank 0's where it runs here)."""
    from torch.distributed.elastic.rendezvous import RendezvousError, RendezvousTimeoutError

    global _watch
    tc = plan.cfg.train
    standalone = not tc.rdzv_endpoint
    endpoint = "localhost:0" if standalone else tc.rdzv_endpoint
    watch = _watch = RendezvousWatch(endpoint, tc.nnodes, tc.rdzv_timeout)
    control = Control()
    control.install()  # before the folder exists: a SIGTERM from here on is a stop, never a kill that leaves it
    watch.install_stop(control)
    remove_stale_group_dirs()
    group_dir = make_group_dir()
    os.environ[GROUP_DIR_ENV] = str(group_dir)
    os.environ["TORCHELASTIC_SIGNALS_TO_HANDLE"] = "SIGHUP,SIGQUIT"  # SIGINT/SIGTERM are a graceful stop, ours
    logging.getLogger("torch.distributed.elastic").setLevel(logging.WARNING)
    _register_backend()
    config = LaunchConfig(
        min_nodes=tc.nnodes, max_nodes=tc.nnodes, nproc_per_node=tc.nproc,
        run_id=str(uuid.uuid4()) if standalone else "mediswift",
        rdzv_backend=WATCHED_BACKEND, rdzv_endpoint=endpoint,
        rdzv_configs={"join_timeout": tc.rdzv_timeout}, max_restarts=0, monitor_interval=0.2, start_method="spawn",
        logs_specs=DefaultLogsSpecs(log_dir=str(group_dir / "logs"), redirects=Std.NONE, tee=Std.NONE))
    done = threading.Event()
    relay = threading.Thread(target=_relay, args=(control, group_dir, done), name="control-relay", daemon=True)
    relay.start()
    waiter = threading.Thread(target=_report_wait, args=(watch, control, done), name="rendezvous-wait", daemon=True)
    waiter.start()
    code = 1
    try:
        results = elastic_launch(config, worker)(plan, run_rank)
        code = results.get(0, max(results.values(), default=1)) if results else 1
    except ChildFailedError as e:
        rank, failure = e.get_first_failure()
        how = f"signal {failure.signal_name()}" if failure.exitcode < 0 else f"exit code {failure.exitcode}"
        _mark_crashed(plan.db_path, group_dir, f"rank {rank} of the process group died ({how}); the others were ended")
        sys.stderr.write(f"mediswift: error: rank {rank} of the process group died ({how})\n")
        code = 1
    except RendezvousAbandoned as e:
        watch.look()
        sys.stderr.write(f"mediswift: stopped ({e}) while waiting for the rendezvous at {endpoint}, "
                         f"{watch.joined_text()}; nothing was started\n")
        code = 130
    except RendezvousTimeoutError:
        code = _rendezvous_failed(plan, f"the rendezvous at {endpoint} timed out after {tc.rdzv_timeout} s "
                                        f"(train.rdzv_timeout), {watch.joined_text()}; start the run on every machine "
                                        "with the same train.rdzv_endpoint, or raise train.rdzv_timeout")
    except RendezvousError as e:  # the host went away, the rendezvous was closed, its state could not be read
        cause = e.__cause__ or e
        detail = f"{type(cause).__name__}: {str(cause).splitlines()[0]}" if str(cause) else type(cause).__name__
        code = _rendezvous_failed(plan, f"the rendezvous at {endpoint} failed ({detail}), {watch.joined_text()}")
    except KeyboardInterrupt:
        _signal_workers(group_dir, signal.SIGKILL)
        _mark_crashed(plan.db_path, group_dir, "interrupted twice; the processes were killed without a final checkpoint",
                      status="stopped")
        code = 130
    finally:
        done.set()
        control.uninstall()
        _mark_crashed(plan.db_path, group_dir, "the process group ended without finishing the run")
        shutil.rmtree(group_dir, ignore_errors=True)
        _watch = None
    return int(code)


def _rendezvous_failed(plan, message: str) -> int:
    """The one line (and ``error`` event) of a rendezvous that did not form; a resumed run's row ends
    ``failed`` with it (a new run has no row yet: rank 0 creates it once the group exists)."""
    error_line(message)
    EventWriter().emit("error", message=message, key="train.rdzv_endpoint")
    if plan.resume is not None:
        from engine.store.rundb import RunDB

        db = RunDB(plan.db_path)
        try:
            row = db.get_run(plan.resume.run_id)
            if row and row["status"] not in ("running", "paused", "completed"):  # never one another engine holds
                db.set_status(row["id"], "failed", error=message)
        finally:
            db.close()
    return EXIT_IO_ERROR


# -- the rendezvous, watched -----------------------------------------------------------------------

WATCHED_BACKEND = "mediswift-c10d"  # torch's c10d rendezvous, created through us so the wait can be watched
_watch: RendezvousWatch | None = None


class RendezvousAbandoned(Exception):
    """A stop (a signal or a stdin line) while this node waited for the others: no worker has started."""


class RendezvousWatch:
    """This launch's c10d rendezvous: whether this node is waiting in it, and which nodes have joined."""

    def __init__(self, endpoint: str, nnodes: int, timeout: int):
        self.endpoint, self.nnodes, self.timeout = endpoint, nnodes, timeout
        self.handler = None
        self.waiting = threading.Event()
        self.since = time.monotonic()
        self.joined: list[str] = []
        self.abandoned = False
        self.stop_reason = ""

    def create(self, params):
        """The rendezvous handler torchrun's c10d backend makes, with its wait marked."""
        from torch.distributed.elastic.rendezvous.c10d_rendezvous_backend import create_backend
        from torch.distributed.elastic.rendezvous.dynamic_rendezvous import create_handler

        backend, store = create_backend(params)
        handler = create_handler(store, backend, params)
        inner = handler.next_rendezvous

        def next_rendezvous():
            self.since = time.monotonic()
            self.waiting.set()
            try:
                return inner()
            finally:
                self.waiting.clear()

        handler.next_rendezvous = next_rendezvous
        handler.get_backend = lambda: WATCHED_BACKEND  # the registry checks the name it was asked for
        self.handler = handler
        return handler

    def look(self) -> list[str]:
        """The nodes of the rendezvous's current round, as this node last read it (every second while it
        waits); the last such list once the wait is over its time (torch then withdraws this node)."""
        try:
            nodes = sorted(self.handler._state_holder.state.participants)  # DynamicRendezvousHandler's synced state
        except (AttributeError, RuntimeError, TypeError):  # not that handler, or read while it changed
            return self.joined
        if time.monotonic() - self.since < self.timeout:
            self.joined = [getattr(n, "addr", str(n)) for n in nodes]
        return self.joined

    def joined_text(self) -> str:
        n = len(self.joined)
        names = f": {', '.join(self.joined)}" if self.joined else ""
        return f"{n} of {self.nnodes} node{'s' if self.nnodes != 1 else ''} joined{names}"

    def install_stop(self, control) -> None:
        """A stop while this node waits leaves the wait at once (the agent's loop would keep waiting for
        the whole train.rdzv_timeout): SIGINT and SIGTERM raise RendezvousAbandoned in the main thread."""
        handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}

        def on_stop(signum, frame):
            handler = handlers.get(signum)
            if callable(handler):
                handler(signum, frame)  # Control's: the stop is requested (a second SIGINT raises KeyboardInterrupt)
            if self.waiting.is_set() and not self.abandoned:
                self.abandoned = True
                raise RendezvousAbandoned(self.stop_reason or signal.Signals(signum).name)

        for sig in handlers:
            signal.signal(sig, on_stop)


def _watched_handler(params):
    return _watch.create(params)


def _register_backend() -> None:
    from torch.distributed.elastic.rendezvous import rendezvous_handler_registry

    rendezvous_handler_registry.register(WATCHED_BACKEND, _watched_handler)  # the same creator each time: once


def _report_wait(watch: RendezvousWatch, control, done: threading.Event) -> None:
    """Every RDZV_PROGRESS_S seconds of a rendezvous wait, one line saying how many nodes have joined; a
    stop from stdin ends the wait as a signal would."""
    said = 0
    while not done.wait(0.5):
        if not watch.waiting.is_set():
            said = 0
            continue
        watch.look()
        if control.stop_requested.is_set() and not watch.abandoned:
            watch.stop_reason = control.stop_reason
            _thread.interrupt_main(signal.SIGTERM)  # the main thread is inside torch's wait loop
            continue
        waited = time.monotonic() - watch.since
        if waited >= (said + 1) * RDZV_PROGRESS_S:
            said = int(waited // RDZV_PROGRESS_S)
            say_progress(f"waiting for the rendezvous at {watch.endpoint}: {watch.joined_text()} "
                         f"({waited:.0f} s of {watch.timeout} s)")


# -- the launcher's temporary folder ---------------------------------------------------------------


def make_group_dir() -> Path:
    """The launcher's temporary folder, named after this process (pid and kernel start time), so that a
    later launch can tell a folder whose launcher was killed (SIGKILL leaves no chance to remove it)."""
    pid = os.getpid()
    return Path(tempfile.mkdtemp(prefix=f"{GROUP_PREFIX}{pid}-{process_start(pid) or 0}-"))


def remove_stale_group_dirs(root: str | None = None) -> list[Path]:
    """Remove this user's launcher folders whose launcher is gone; returns them."""
    removed = []
    root_dir = Path(root or tempfile.gettempdir())
    try:
        entries = list(root_dir.glob(f"{GROUP_PREFIX}*"))
    except OSError:
        return removed
    for d in entries:
        parts = d.name[len(GROUP_PREFIX):].split("-")
        if len(parts) < 3 or not parts[0].isdigit() or not parts[1].isdigit():
            continue  # not named by a launcher of this version: whose it is cannot be told
        try:
            st = d.lstat()
        except OSError:
            continue
        if not d.is_dir() or d.is_symlink() or st.st_uid != os.getuid():
            continue
        pid, start = int(parts[0]), parts[1]
        if pid == os.getpid() or pid_alive(pid, start if start != "0" else None):
            continue
        shutil.rmtree(d, ignore_errors=True)
        removed.append(d)
    return removed


def worker(plan, run_rank: Callable) -> int:
    """A worker's whole life: announce its pid, watch its launcher, run its rank of the plan."""
    group_dir = os.environ.get(GROUP_DIR_ENV)
    if group_dir:
        Path(group_dir, f"rank{os.environ.get('LOCAL_RANK', '0')}.pid").write_text(str(os.getpid()))
    _watch_launcher()
    try:
        return run_rank(plan)
    except BrokenPipeError:  # the reader of stdout went away
        return 0


def record_run_id(run_id: str) -> None:
    """Rank 0 tells its launcher which run this is (for the final status if rank 0 cannot write it)."""
    group_dir = os.environ.get(GROUP_DIR_ENV)
    if group_dir and Path(group_dir).is_dir():
        Path(group_dir, "run_id").write_text(run_id)


def _watch_launcher() -> None:
    parent = os.getppid()

    def watch():
        while True:
            time.sleep(1.0)
            if os.getppid() != parent:  # the launcher is gone (killed): nobody would end this process
                os._exit(1)

    threading.Thread(target=watch, name="launcher-watch", daemon=True).start()


def _worker_pids(group_dir: Path) -> list[int]:
    pids = []
    for f in group_dir.glob("rank*.pid"):
        try:
            pids.append(int(f.read_text()))
        except (OSError, ValueError):
            pass
    return pids


def _signal_workers(group_dir: Path, sig: int) -> None:
    for pid in _worker_pids(group_dir):
        try:
            os.kill(pid, sig)
        except (ProcessLookupError, PermissionError):
            pass


def _relay(control, group_dir: Path, done: threading.Event) -> None:
    """This process's stop/pause/resume, passed on to its workers as the signals they handle."""
    sent_stop, paused = False, False
    while not done.is_set():
        control.wake.wait(0.2)
        control.wake.clear()
        if control.stop_requested.is_set() and not sent_stop:
            sent_stop = True
            _signal_workers(group_dir, signal.SIGTERM)
        want_pause = control.pause_requested.is_set()
        if want_pause != paused:
            paused = want_pause
            _signal_workers(group_dir, signal.SIGUSR1 if paused else signal.SIGUSR2)


def _mark_crashed(db_path: str, group_dir: Path, message: str, status: str = "crashed") -> None:
    f = group_dir / "run_id"
    if f.is_file():
        record_lost_run(db_path, f.read_text().strip(), message, status)
