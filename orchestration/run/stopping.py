"""Stopped jobs end cleanly: `ray job stop` sends SIGTERM to the job's driver, waits 3 s, then SIGKILLs it.

`stop_on_sigterm()` turns the first SIGTERM into KeyboardInterrupt (what Ctrl-C raises), so that the driver's
`except`/`finally` blocks run inside those 3 s: `run_status` says the MLflow runs end KILLED instead of staying
RUNNING, the run's lease is released, and the job exits with `STOPPED_EXIT` and a resumable run (checkpoints and
run.json are written atomically: a stop at any moment leaves the last complete one). A second SIGTERM while that
cleanup runs is noted and ignored (a signal raised inside a `finally` would cut it short). `ray.init` installs a
handler of its own (sys.exit): `signal_handlers_kept` keeps ours. Before `main` installs it, `jobs/__init__` ends a
job stopped while it imports (nothing written yet) with the same exit code.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
from typing import NoReturn

STOPPED_EXIT = 130  # the shell's code for a job ended by a signal it handled
STOP_GRACE_S = 20.0  # a stopped job that has not ended this long after the signal exits at once

_received: list[str] = []  # the signals that stopped this process, first first


def stop_on_sigterm() -> None:
    if threading.current_thread() is not threading.main_thread():
        return

    def stop(signum, frame):
        name = signal.Signals(signum).name
        first = not _received
        _received.append(name)
        if first:
            _exit_after(STOP_GRACE_S, f"not ended {STOP_GRACE_S:.0f}s after {name}: exiting now")
            raise KeyboardInterrupt(f"stopped by {name}")
        print(f"{name} again: still ending cleanly", file=sys.stderr, flush=True)

    signal.signal(signal.SIGTERM, stop)


def _exit_after(seconds: float, why: str) -> None:
    def hard_exit() -> None:
        print(why, file=sys.stderr, flush=True)
        sys.stdout.flush()
        os._exit(STOPPED_EXIT)

    timer = threading.Timer(seconds, hard_exit)
    timer.daemon = True
    timer.start()


def finish(code: int) -> NoReturn:
    """sys.exit(code) for a job's `main`. A stopped job's code must not depend on what exit hooks do: ray.shutdown
    of a local Ray whose processes got the signal too (a process group stopped, Ctrl-C) can hang or raise. Ray is
    shut down here, within the grace time, then the process exits with `code` as it is."""
    if not _received:
        sys.exit(code)
    ray = sys.modules.get("ray")
    with contextlib.suppress(BaseException):
        if ray is not None and ray.is_initialized():
            ray.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def stop_reason(error: BaseException) -> str:
    """What stopped the job, for its last line: the signal, or Ctrl-C."""
    return f"by {_received[0]}" if _received else "interrupted"


@contextlib.contextmanager
def signal_handlers_kept():
    """Around ray.init, which replaces the SIGTERM handler with sys.exit(15)."""
    kept = signal.getsignal(signal.SIGTERM)
    try:
        yield
    finally:
        if threading.current_thread() is threading.main_thread() and kept is not None:
            signal.signal(signal.SIGTERM, kept)


def run_status(error: BaseException) -> str:
    """The MLflow status of a run that ended with `error`: KILLED when the job was stopped, else FAILED."""
    return "KILLED" if isinstance(error, KeyboardInterrupt | SystemExit) else "FAILED"
