"""Start the engine in a session of its own, so a run outlives the program that launched it.

``python -m engine.launcher train demo.toml ...`` runs ``python -m engine train demo.toml ...`` as a
child in a new session (its own process group) that inherits this process's stdin/stdout/stderr,
then waits for it and exits with its code. The studio starts runs through this shim: if the studio
goes away (and Qt kills the shim), the engine keeps training and keeps writing the run database; the
studio re-attaches from there. Signals sent to the shim are forwarded to the engine.
"""
from __future__ import annotations

import signal
import subprocess
import sys


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    child = subprocess.Popen([sys.executable, "-m", "engine", *args], start_new_session=True)

    def forward(signum, _frame):
        try:
            child.send_signal(signum)
        except ProcessLookupError:
            pass

    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2):
        signal.signal(sig, forward)
    while True:
        try:
            return child.wait()
        except InterruptedError:  # pragma: no cover - wait() retries on EINTR in Python 3.5+
            continue


if __name__ == "__main__":
    sys.exit(main())
