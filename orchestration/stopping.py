"""Stopped jobs end cleanly: `ray job stop` sends SIGTERM to the job's driver, waits 3 s, then SIGKILLs it.

`stop_on_sigterm()` turns SIGTERM into KeyboardInterrupt (what Ctrl-C raises) until Ray connects, after which
Ray's own handler turns it into SystemExit; either way the driver's `except`/`finally` blocks run inside those
3 s, and `run_status` says the MLflow runs end KILLED instead of staying RUNNING.
"""

from __future__ import annotations

import signal
import threading

STOPPED_EXIT = 130  # the shell's code for a job ended by a signal it handled


def stop_on_sigterm() -> None:
    if threading.current_thread() is not threading.main_thread():
        return

    def stop(signum, frame):
        raise KeyboardInterrupt(f"stopped by signal {signal.Signals(signum).name}")

    signal.signal(signal.SIGTERM, stop)


def run_status(error: BaseException) -> str:
    """The MLflow status of a run that ended with `error`: KILLED when the job was stopped, else FAILED."""
    return "KILLED" if isinstance(error, KeyboardInterrupt | SystemExit) else "FAILED"
