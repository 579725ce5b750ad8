"""Cluster a generator's instance features into per-object styles over a whole training split, on Ray.

    python -m jobs.cluster_features --run RUN_ID [--storage URI] [--data URI] [--workers N --cpus C --gpus G]
    python -m jobs.cluster_features --model models:/NAME@ALIAS [--data URI] [--split train] [--tracking-uri URI]

--run: writes {storage}/{run}/clusters/stage3.pt; `jobs.register` (and jobs.train's registration) then store
these clusters in the model version instead of encoding the split in their own process.
--model: registers a new version of that model: the same weights with the new clusters (over --data, default the
data the version was registered from); the `champion` alias stays where it is.
The reference's rules: instances over 1/64 of the image, k-means++ per class, k = 10, fixed seed.
Exit status: 0 done, 2 bad input.
"""

from __future__ import annotations

from jobs import cli
from orchestration.records.tracking import resolve_tracking_uri
from orchestration.run.run_state import run_root
from orchestration.run.stopping import finish
from orchestration.services.feature_clusters import cluster_run, cluster_version


def main(argv: list[str] | None = None) -> int:
    p = cli.parser("cluster_features", __doc__)
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--run", metavar="RUN_ID", help="a finished run's final generator")
    which.add_argument(
        "--model", metavar="URI", help="a registered version: models:/NAME/VERSION or models:/NAME@ALIAS"
    )
    p.add_argument("--storage", default="outputs/runs", help="--run: the run storage (default outputs/runs)")
    p.add_argument("--data", help="the dataset URI (default: what the run or version records)")
    p.add_argument("--split", default="train", help="--model: the split to cluster over (default train)")
    cli.add_tracking(p, what="--model: ")
    p.add_argument("--workers", type=int, default=1, help="encoder actors")
    p.add_argument("--cpus", type=float, default=1.0, help="CPUs per actor")
    p.add_argument("--gpus", type=float, default=0.0, help="GPUs per actor")
    a = p.parse_args(argv)

    def body() -> None:
        if a.run:
            cluster_run(run_root(a.storage, a.run, "--run"), a.data, a.workers, a.cpus, a.gpus)
        else:
            found = cluster_version(
                a.model, resolve_tracking_uri(a.tracking_uri), a.data, a.split, a.workers, a.cpus, a.gpus
            )
            print(f"{found['uri']}")

    return cli.run("cluster_features", body, also=(FileNotFoundError, ValueError))


if __name__ == "__main__":
    finish(main())
