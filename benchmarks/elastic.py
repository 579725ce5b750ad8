"""How long an elastic stage takes to resize when a node leaves and comes back, and what it trains again.

    python -m benchmarks.elastic [--every 0 3] [--samples 72] [--epochs 30] [--kill-at 13]

For each `train.checkpoint_every_steps` value, and once more with a preemption notice (`ray drain-node`) before
the node goes: a fresh two-node cluster on 127.0.0.1 (3 CPUs each, workers of 2, Ray's default failure detection, moto's S3
server), stage 1 of configs/tiny.yaml on [1, 2] workers (spread: one per node), 8 steps an epoch, a checkpoint at
each epoch's end as by default; after step 13 (epoch 2's fifth) the worker node's processes are killed, and
started again once the stage trains at 1 worker. Printed per row: seconds from the node stopping to the next
step at 1 worker (Ray's node-death detection, the worker-group restart, the checkpoint load), seconds from the
node starting to the next step at 2 workers (the resize check, every 3 s here, and the restart), the steps
trained twice after each resize (those since the last checkpoint), and the seconds the stage still trained after
growing back. tests/test_cluster.py runs the scenario on the test bed's hosts (a link cut instead of a kill).
"""

from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path

from data.shards import PrepareOptions, prepare
from data.synthetic.write import write_city
from tests.elastic_scenario import elastic_cmd, node_loss_and_return
from tests.services import apply_env, make_bucket, moto_s3_server, ray_cluster, s3_environment


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m benchmarks.elastic", description=__doc__.split("\n\n")[0])
    p.add_argument("--every", type=int, nargs="+", default=[0, 3], help="checkpoint_every_steps values to compare")
    p.add_argument("--samples", type=int, default=72, help="synthetic samples (72: 8 steps an epoch at batch 8)")
    p.add_argument("--kill-at", type=int, default=13, help="the node leaves after this step (13: epoch 2's 5th)")
    p.add_argument("--epochs", type=int, default=30, help="stage 1 epochs (enough to outlast both resizes)")
    a = p.parse_args(argv)
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    tmp = Path(tempfile.mkdtemp(prefix="eb", dir="/tmp"))  # short: Ray's socket paths live below it
    rows = []
    with moto_s3_server(tmp) as s3:
        apply_env(s3_environment(s3))
        make_bucket(s3, "elastic")
        src = write_city(tmp / "src", count=a.samples, height=64, width=128)
        prepare(PrepareOptions("flat", str(src), "s3://elastic/data", val_fraction=0.1), log=lambda m: None)
        for every, notice in [*((e, False) for e in a.every), (0, True)]:
            name = f"bench-{every}-{'notice' if notice else 'kill'}"
            with ray_cluster(tmp / f"r{len(rows)}", s3_environment(s3), head_cpus=3, worker_cpus=[3]) as cluster:
                cmd = elastic_cmd(name, every, "--set", f"stage1.niter={a.epochs}")
                # mid-epoch: 5 steps after the epoch-1 checkpoint (8 steps an epoch at 72 samples)
                r = node_loss_and_return(cluster, cmd, notice, log=lambda m: print(f"  {m}"), after_step=a.kill_at)
            rows.append((every, notice, r))
            print(f"{name}: {r.status}")
    print(
        f"\n{'checkpoint_every_steps':>22} {'notice':>6} {'2->1 s':>7} {'redone':>6} {'1->2 s':>7} {'redone':>6} {'left s':>6}"
    )
    for every, notice, r in rows:
        print(
            f"{every:>22} {'yes' if notice else 'no':>6} {r.down_s:>7.1f} {r.redone_down:>6} {r.up_s:>7.1f} "
            f"{r.redone_up:>6} {r.tail_s:>6.1f}"
        )


if __name__ == "__main__":
    main()
