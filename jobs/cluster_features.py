"""Cluster a finished run's instance features into per-object styles over the whole training split, on Ray.

    python -m jobs.cluster_features --run RUN_ID [--storage URI] [--data URI] [--workers N --cpus C --gpus G]

Writes {storage}/{run}/clusters/stage3.pt (the reference's rules: instances over 1/64 of the image, k-means++ per
class, k = 10, fixed seed); `jobs.register` (and jobs.train's registration) then store these clusters in the model
version instead of encoding the split in its own process. Exit status: 0 done, 2 bad input.
"""

from __future__ import annotations

import argparse
import sys

from data.storage import StorageError
from orchestration.config import ConfigError
from orchestration.feature_clusters import cluster_run
from orchestration.run_state import run_root


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m jobs.cluster_features", description=__doc__.split("\n\n")[0])
    p.add_argument("--run", required=True, metavar="RUN_ID")
    p.add_argument("--storage", default="outputs/runs", help="the run storage (default outputs/runs)")
    p.add_argument("--data", help="the dataset URI, for runs whose run.json does not record it")
    p.add_argument("--workers", type=int, default=1, help="encoder actors")
    p.add_argument("--cpus", type=float, default=1.0, help="CPUs per actor")
    p.add_argument("--gpus", type=float, default=0.0, help="GPUs per actor")
    a = p.parse_args(argv)
    try:
        cluster_run(run_root(a.storage, a.run, "--run"), a.data, a.workers, a.cpus, a.gpus)
    except (ConfigError, StorageError, FileNotFoundError) as e:
        print(f"cluster_features: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
