"""Serve the registry's generator and the editor on Ray Serve.

    python -m jobs.serve --model models:/pix2pixhd-synthetic-city@champion [--tracking-uri URI]
        [--host 127.0.0.1 --port 8000] [--replicas N [--max-replicas M]] [--cpus C --gpus G] [--max-batch B]
        [--reload-s S] [--labels DIR --instances DIR [--images DIR]]

Then open http://HOST:PORT/ (the editor) or POST /render (see serving/editor_api.py). On a running cluster
(RAY_ADDRESS set, not `local`) it deploys there and returns once the application is running; on a machine without one it
starts local Ray and serves until Ctrl-C / SIGTERM. A new version under the alias is picked up within --reload-s
seconds, without a restart. Exit status: 0 served (or deployed), 2 bad input, 130 stopped while deploying.
"""

from __future__ import annotations

import argparse
from dataclasses import fields

from jobs import cli
from orchestration.cluster.ray_address import cluster_address
from orchestration.records.tracking import resolve_tracking_uri
from orchestration.run.stopping import finish
from orchestration.services.serve import ServeSettings, check_inputs, deploy


def parse(argv: list[str] | None) -> tuple[ServeSettings, argparse.Namespace]:
    d = ServeSettings()
    p = cli.parser("serve", __doc__)
    p.add_argument("--model", default=d.model, help=f"models:/NAME@ALIAS or models:/NAME/VERSION (default {d.model})")
    cli.add_tracking(p)
    p.add_argument(
        "--host",
        help="HTTP host the proxies bind (default: 0.0.0.0 on a cluster, reachable from outside the nodes, as "
        "docker/compose.yaml publishes port 8000 of the head; 127.0.0.1 on this machine)",
    )
    p.add_argument("--port", type=int, default=8000)
    p.add_argument(
        "--proxy-location",
        choices=("EveryNode", "HeadOnly"),
        default="EveryNode",
        help="HTTP proxies on every node (behind a load balancer) or on the head only",
    )
    p.add_argument("--replicas", type=int, default=d.replicas, help="Generator replicas (the minimum when autoscaled)")
    p.add_argument("--max-replicas", type=int, default=d.max_replicas, help="> --replicas: autoscale up to this")
    p.add_argument("--target-ongoing-requests", type=float, default=d.target_ongoing_requests)
    p.add_argument("--cpus", type=float, default=d.cpus, help="CPUs per Generator replica")
    p.add_argument("--gpus", type=float, default=d.gpus, help="GPUs per Generator replica")
    p.add_argument("--max-batch", type=int, default=d.max_batch, help="requests of one size rendered together")
    p.add_argument("--reload-s", type=float, default=d.reload_s, help="how often to look for a new alias target")
    p.add_argument("--labels", help="label maps the editor offers to open (folder or URI)")
    p.add_argument("--instances", help="their instance maps (paired by stem)")
    p.add_argument("--images", help="their photos (paired by stem): the editor's 'styles from this sample's photo'")
    a = p.parse_args(argv)
    names = {f.name for f in fields(ServeSettings)}
    values = {k: v for k, v in vars(a).items() if k in names}
    for key in ("replicas", "max_batch"):
        if values[key] < 1:
            p.error(f"--{key.replace('_', '-')} must be >= 1")
    if values["cpus"] <= 0 and values["gpus"] <= 0:
        p.error("--cpus or --gpus must be > 0")
    return ServeSettings(**values), a


def main(argv: list[str] | None = None) -> int:
    s, a = parse(argv)
    on_cluster = cluster_address() is not None

    def body() -> None:
        s.tracking_uri = resolve_tracking_uri(s.tracking_uri, ray_job=on_cluster)
        check_inputs(s)  # named here, not in a replica's log
        host = a.host or ("0.0.0.0" if on_cluster else "127.0.0.1")
        deploy(s, host, a.port, a.proxy_location, log=lambda line: print(line, flush=True))

    return cli.run("serve", body, also=(FileNotFoundError, ValueError))


if __name__ == "__main__":
    finish(main())
