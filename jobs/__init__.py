"""Thin entrypoints: `python -m jobs.<name> ...`, what `ray job submit` runs.

A job stopped while it still imports (torch, Ray and MLflow take seconds) has written nothing: it ends at once with
the stopped exit code instead of Python's default death by SIGTERM; its `main` then installs the handler that ends
it cleanly (orchestration/run/stopping.py). Only for `python -m jobs.X`: importing a job in a program changes nothing."""

import os
import signal
import sys
import threading

if (
    sys.argv[:1] == ["-m"] and threading.current_thread() is threading.main_thread()
):  # -m sets argv[0] so while importing
    signal.signal(signal.SIGTERM, lambda signum, frame: os._exit(130))
