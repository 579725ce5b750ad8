"""Register a finished run's generator in the MLflow model registry (what `jobs.train` does after stage 3).

    python -m jobs.register --run RUN_ID [--storage URI] [--tracking-uri URI] [--data URI]

For a run whose registration failed (the job exited 3) or that trained with --no-register; first sends the
tracking records the run kept while MLflow was unreachable ({run}/tracking-unsent). Idempotent: a
checkpoint already registered is found by its tag and not registered again; the `champion` alias moves only
when the version is no worse than the champion. Exit status: 0 registered (or already), 2 bad input, 3 failed.
"""

from __future__ import annotations

import argparse
import sys

from data.storage import StorageError
from orchestration.config import ConfigError
from orchestration.registry import RegistrationError, register_run
from orchestration.run_state import run_root
from orchestration.tracking import resolve_tracking_uri, send_unsent

DEFAULT_STORAGE = "outputs/runs"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m jobs.register", description=__doc__.split("\n\n")[0])
    p.add_argument("--run", required=True, metavar="RUN_ID", help="the run id jobs.train ran with")
    p.add_argument("--storage", default=DEFAULT_STORAGE, help=f"the run storage it used (default {DEFAULT_STORAGE})")
    p.add_argument("--tracking-uri", help="MLflow server (default: MLFLOW_TRACKING_URI, else the local store)")
    p.add_argument("--data", help="the dataset URI, for runs whose run.json does not record it")
    a = p.parse_args(argv)
    try:
        root = run_root(a.storage, a.run, "--run")
        tracking_uri = resolve_tracking_uri(a.tracking_uri)
        send_unsent(tracking_uri, root)  # what the run's trackers kept during an outage
        result = register_run(root, tracking_uri, data_uri=a.data)
    except (ConfigError, StorageError) as e:
        print(f"register: error: {e}", file=sys.stderr)
        return 2
    except RegistrationError as e:
        print(f"register: error: {e}", file=sys.stderr)
        return 3
    print(f"{result['name']} version {result['version']}: {result['uri']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
