"""Register a finished run's generator in the MLflow model registry (what `jobs.train` does after stage 3).

    python -m jobs.register --run RUN_ID [--storage URI] [--tracking-uri URI] [--data URI]

For a run whose registration failed (the job exited 3) or that trained with --no-register; first sends the
tracking records the run kept while MLflow was unreachable ({run}/tracking-unsent). Idempotent: a
checkpoint already registered is found by its tag and not registered again; the `champion` alias moves only
when the version is no worse than the champion. Exit status: 0 registered (or already), 2 bad input, 3 failed.
"""

from __future__ import annotations

from jobs import cli
from orchestration.records.registry import register_run
from orchestration.records.tracking import resolve_tracking_uri, send_unsent
from orchestration.run.run_state import run_root
from orchestration.run.stopping import finish

DEFAULT_STORAGE = "outputs/runs"


def main(argv: list[str] | None = None) -> int:
    p = cli.parser("register", __doc__)
    p.add_argument("--run", required=True, metavar="RUN_ID", help="the run id jobs.train ran with")
    p.add_argument("--storage", default=DEFAULT_STORAGE, help=f"the run storage it used (default {DEFAULT_STORAGE})")
    cli.add_tracking(p)
    p.add_argument("--data", help="the dataset URI, for runs whose run.json does not record it")
    a = p.parse_args(argv)

    def body() -> None:
        root = run_root(a.storage, a.run, "--run")
        tracking_uri = resolve_tracking_uri(a.tracking_uri)
        send_unsent(tracking_uri, root)  # what the run's trackers kept during an outage
        result = register_run(root, tracking_uri, data_uri=a.data)
        print(f"{result['name']} version {result['version']}: {result['uri']}")

    return cli.run("register", body)


if __name__ == "__main__":
    finish(main())
