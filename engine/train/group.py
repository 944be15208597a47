"""One run on many processes, started through torchrun's own launcher (``torch.distributed.launcher``,
the Python API behind the ``torchrun`` command), and what the launching process does around it.

    mediswift train (this process: checks, the elastic agent, control relay, final status)
        └── workers, one per train.nproc (spawned by the agent, in this process's process group),
            each handed the run's plan (engine.train.plan.RunPlan), not a command line
              rank 0: the run's RunReporter (rows, events, log, the lease); the others: silent followers

- Bad input is refused before any worker starts (``check_group``, called when the run is planned):
  too many processes for the machine, a rendezvous endpoint that does not resolve or answer, FSDP
  where it cannot shard.
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

import ipaddress
import logging
import os
import shutil
import signal
import socket
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

from engine.core.errors import InputError
from engine.core.machine_checks import check_processes
from engine.train.control import Control
from engine.train.reporter import record_lost_run

GROUP_DIR_ENV = "MEDISWIFT_GROUP_DIR"
RDZV_WAIT_ENV = "MEDISWIFT_RDZV_WAIT_S"  # how long a node waits for a remote rendezvous host to answer


def in_group() -> bool:
    """This process is a worker that torchrun started (ours or a user's own ``torchrun -m engine``)."""
    return "RANK" in os.environ and int(os.environ.get("WORLD_SIZE", "1")) > 1


def is_follower() -> bool:
    """A worker of a group other than rank 0: rank 0 speaks for the run."""
    return in_group() and os.environ.get("RANK") != "0"


def world_size(cfg) -> int:
    return cfg.train.nproc * cfg.train.nnodes


# -- checks before anything starts -----------------------------------------------------------------


def check_group(cfg, resuming: bool) -> None:
    """Refuse a process group this machine cannot run (exit 2, naming the key)."""
    tc = cfg.train
    cuda = tc.device == "cuda" or (tc.device == "auto" and torch.cuda.is_available())
    check_processes(cfg, torch.cuda.device_count() if cuda else 0, resuming)
    if world_size(cfg) > 1 and tc.rdzv_endpoint:
        check_rendezvous(tc.rdzv_endpoint, tc.nnodes)


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


def check_rendezvous(endpoint: str, nnodes: int) -> None:
    """The endpoint resolves, and either this machine hosts it (a free port here) or its host answers."""
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
            return  # another node of this machine hosts it already
        with socket.socket(infos[0][0], socket.SOCK_STREAM) as s:
            try:
                s.bind((addr, port))
            except OSError as e:
                raise InputError(f"cannot host the rendezvous at {endpoint}: {e.strerror}", key="train.rdzv_endpoint") from None
        return
    wait = float(os.environ.get(RDZV_WAIT_ENV, "30"))
    deadline = time.monotonic() + wait
    reason = "no answer"
    while True:
        try:
            with socket.create_connection((addr, port), timeout=min(5.0, max(0.5, wait))):
                return
        except OSError as e:
            reason = e.strerror or type(e).__name__
        if time.monotonic() >= deadline:
            raise InputError(f"cannot reach the rendezvous endpoint {endpoint} ({reason}, for {wait:.0f} s); start the "
                             "run on that machine first, or check train.rdzv_endpoint", key="train.rdzv_endpoint")
        time.sleep(1.0)


def _answers(addr: str, port: int, timeout: float) -> bool:
    try:
        with socket.create_connection((addr, port), timeout=timeout):
            return True
    except OSError:
        return False


# -- the launch ------------------------------------------------------------------------------------


def launch(plan, run_rank: Callable) -> int:
    """Run ``plan`` on ``train.nproc`` local processes of a ``train.nnodes`` group, each of which calls
    ``run_rank(plan)``; returns the exit code of the run (rank 0's where it runs here)."""
    tc = plan.cfg.train
    group_dir = Path(tempfile.mkdtemp(prefix="mediswift-group-"))
    os.environ[GROUP_DIR_ENV] = str(group_dir)
    os.environ["TORCHELASTIC_SIGNALS_TO_HANDLE"] = "SIGHUP,SIGQUIT"  # SIGINT/SIGTERM are a graceful stop, ours
    logging.getLogger("torch.distributed.elastic").setLevel(logging.WARNING)
    standalone = not tc.rdzv_endpoint
    config = LaunchConfig(
        min_nodes=tc.nnodes, max_nodes=tc.nnodes, nproc_per_node=tc.nproc,
        run_id=str(uuid.uuid4()) if standalone else "mediswift",
        rdzv_backend="c10d", rdzv_endpoint="localhost:0" if standalone else tc.rdzv_endpoint,
        rdzv_configs={"join_timeout": 600}, max_restarts=0, monitor_interval=0.2, start_method="spawn",
        logs_specs=DefaultLogsSpecs(log_dir=str(group_dir / "logs"), redirects=Std.NONE, tee=Std.NONE))
    control = Control()
    control.install()
    done = threading.Event()
    relay = threading.Thread(target=_relay, args=(control, group_dir, done), name="control-relay", daemon=True)
    relay.start()
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
    return int(code)


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
