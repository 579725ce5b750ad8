"""What every job shares: its argument parser (the exit codes in --help, the tracking options with one help text)
and `run`, which maps how the job ended to its exit code and last line.

Input errors are one list, orchestration.run.input_errors.INPUT_ERRORS (what Ray Train's failure policy does not
retry either), with the storage and registry lookups a driver makes before anything runs; a job may add the errors
its own checks raise (e.g. ValueError from a map's check)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable

from data.storage import StorageError
from orchestration.records.registry import ModelNotFound, RegistrationError
from orchestration.run.input_errors import INPUT_ERRORS
from orchestration.run.stopping import STOPPED_EXIT, stop_on_sigterm, stop_reason

EXIT_CODES = (
    "exit status: 0 done; 1 a fault (its traceback); 2 bad input, one line naming it (nothing run or published); "
    "3 trained but not registered (python -m jobs.register retries); 130 stopped (Ctrl-C, SIGTERM, ray job stop)"
)
DRIVER_INPUT_ERRORS = (*INPUT_ERRORS, StorageError, ModelNotFound)


def parser(name: str, doc: str) -> argparse.ArgumentParser:
    """`python -m jobs.NAME`'s parser: the first paragraph of its docstring, the exit codes under --help."""
    return argparse.ArgumentParser(prog=f"python -m jobs.{name}", description=doc.split("\n\n")[0], epilog=EXIT_CODES)


def add_tracking(p: argparse.ArgumentParser, no_tracking: str | None = None, what: str = "") -> None:
    """--tracking-uri (and --no-tracking with its help, for jobs that can run without MLflow)."""
    p.add_argument("--tracking-uri", help=f"{what}MLflow server (default: MLFLOW_TRACKING_URI, else the local store)")
    if no_tracking:
        p.add_argument("--no-tracking", action="store_true", help=no_tracking)


def run(
    name: str,
    body: Callable[[], int | None],
    also: tuple[type[BaseException], ...] = (),
    stopped: Callable[[], str] = lambda: "",
    not_registered: str = "",
) -> int:
    """body() under the jobs' rules: input errors (and `also`) -> `NAME: error: ...`, 2; a registration that did not
    happen -> 3; Ctrl-C / SIGTERM -> `NAME: stopped (...)` + stopped(), 130."""
    stop_on_sigterm()
    try:
        return body() or 0
    except (*DRIVER_INPUT_ERRORS, *also) as e:
        print(f"{name}: error: {e}", file=sys.stderr)
        return 2
    except RegistrationError as e:
        print(f"{name}: error: {not_registered}{e}", file=sys.stderr)
        return 3
    except (KeyboardInterrupt, SystemExit) as e:  # Ctrl-C, or SIGTERM (orchestration/run/stopping.py)
        print(f"{name}: stopped ({stop_reason(e)}){stopped()}", file=sys.stderr, flush=True)
        return STOPPED_EXIT
