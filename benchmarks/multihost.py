"""Two Train workers on two hosts against the same two packed on one host, on docker/compose.yaml's cluster.

    sudo .venv/bin/python -m benchmarks.multihost [--samples 176] [--epochs 4] [--cpus-per-worker 1]

Starts the test bed (tests/compose_bed.py: each compose service on a host of its own; needs root), prepares
`--samples` procedural scenes into MinIO from the client host, then submits stage 1 of configs/tiny.yaml three
times with `ray job submit`, one after the other on the same cluster:
- spread:    2 workers, one per worker host (`placement: strict_spread`);
- packed:    the same 2 workers on one worker host (`placement: pack`); the cluster's CPUs are the same;
- fraction:  spread, with workers of 1.5 CPUs on the 2-CPU hosts: 0.5 CPU left on each (the layout the check in
             orchestration/cluster/resources.py now refuses; submitted with train.check_resources=false to measure it).
For each: img/s and data wait of every epoch (the job's progress lines), the steady state (the median of the
epochs after the first, whose time is mostly the pipeline's start), the whole CPUs Ray Data's autoscaling coordinator
leaves it beside the Train workers (floor per host, from where Ray's State API says the workers ran), and on which hosts Ray Data's read and decode tasks ran (Ray's State API). The ratio spread / packed is the figure of merit.
"""

from __future__ import annotations

import argparse
import math
import re
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path

from data.synthetic.write import write_city
from tests.compose_bed import ComposeBed
from tests.hosts import unavailable

EPOCH = re.compile(r"\[stage 1\] epoch (\d+)/\d+ .* ([\d.]+) img/s data-wait (\d+)%")
ROWS = {
    "spread": ("strict_spread", None),
    "packed": ("pack", None),
    "fraction": ("strict_spread", 1.5),
}


def data_budget(bed: ComposeBed, hosts: list[str], trainer_hosts: list[str], cpus: float) -> int:
    """The CPUs Ray Data's autoscaling coordinator leaves it: the whole CPUs each host keeps beside the Train
    workers it holds (floor per host; orchestration/cluster/resources.py)."""
    total = {n["host"]: n.get("resourcesTotal", {}).get("CPU", 0) for n in bed.ray_nodes()}
    return sum(math.floor(total[h] - cpus * trainer_hosts.count(h) + 1e-9) for h in hosts)


def run_row(bed: ComposeBed, name: str, data: str, epochs: int, cpus: float) -> dict:
    placement, override = ROWS[name]
    workers = ["ray-worker-1", "ray-worker-2"]
    sets = {
        "train.placement": placement,
        "train.cpus_per_worker": override or cpus,
        "train.check_resources": str(override is None).lower(),
        "train.ray_logs": "info",
        "stage1.niter": epochs,
        "stage1.niter_decay": 0,
    }
    args = f"--config configs/tiny.yaml --data {data} --storage s3://pix2pixhd/bench --stages 1 --no-tracking"
    cmd = ["python", "-m", "jobs.train", *args.split(), "--run-id", f"mh-{name}-{uuid.uuid4().hex[:4]}"]
    cmd += [a for k, v in sets.items() for a in ("--set", f"{k}={v}")]
    t0 = time.monotonic()
    r = bed.submit(cmd, timeout=1800)
    took = time.monotonic() - t0
    if r.returncode != 0:
        raise SystemExit(f"{name}: the job failed:\n{r.stdout[-4000:]}")
    sid = re.search(r"Job '(raysubmit_\w+)' submitted successfully", r.stdout).group(1)
    job_id = bed.api(f"/api/jobs/{sid}")["job_id"]
    hosts = bed.host_of_node()
    tasks: dict[str, dict[str, int]] = {}
    for t in bed.state("tasks", job_id=job_id):
        kind = "read" if "ReadParquet" in t["name"] else "decode" if "Decode" in t["name"] else None
        if kind:
            where = hosts.get(t.get("node_id") or "", "?")
            tasks.setdefault(kind, {}).setdefault(where, 0)
            tasks[kind][where] += 1
    epochs_seen = [(int(e), float(i), int(w)) for e, i, w in EPOCH.findall(r.stdout)]
    steady = [(i, w) for e, i, w in epochs_seen if e > 1]
    trainers = sorted(  # one entry per Train worker: its host
        hosts.get(a["node_id"], "?") for a in bed.state("actors", class_name="RayTrainWorker") if a["job_id"] == job_id
    )
    return {
        "name": name,
        "placement": placement,
        "cpus": override or cpus,
        "epochs": epochs_seen,
        "img_s": statistics.median(i for i, _ in steady),
        "wait": statistics.median(w for _, w in steady),
        "data_cpus": data_budget(bed, workers, trainers, override or cpus),
        "tasks": tasks,
        "trainers": trainers,
        "seconds": took,
    }


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m benchmarks.multihost", description=__doc__.split("\n\n")[0])
    p.add_argument("--samples", type=int, default=176, help="procedural scenes (176: 158 training, 19 steps)")
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--cpus-per-worker", type=float, default=1.0)
    p.add_argument("--rows", nargs="+", default=list(ROWS), choices=list(ROWS))
    a = p.parse_args(argv)
    reason = unavailable()
    if reason:
        sys.exit(f"benchmarks.multihost: {reason}")
    work = Path(tempfile.mkdtemp(prefix="p2pbed-", dir="/tmp"))
    work.chmod(0o711)
    secret = uuid.uuid4().hex
    bed = ComposeBed(work, {"MINIO_ROOT_PASSWORD": secret, "POSTGRES_PASSWORD": secret[:16], "RAY_AUTH_TOKEN": secret})
    rows = []
    try:
        bed.up()
        nodes = {n["host"]: n.get("resourcesTotal", {}).get("CPU", 0) for n in bed.ray_nodes()}
        print(f"cluster: {', '.join(f'{h} {c:g} CPU' for h, c in sorted(nodes.items()))}", flush=True)
        src = write_city(work / "src", count=a.samples, height=64, width=128)
        s3 = {
            "AWS_ACCESS_KEY_ID": bed.env_file["MINIO_ROOT_USER"],
            "AWS_SECRET_ACCESS_KEY": secret,
            "AWS_ENDPOINT_URL_S3": "http://minio:9000",
            "AWS_REGION": "us-east-1",
        }
        data = "s3://pix2pixhd/bench-data"
        prep = f"{sys.executable} -m jobs.prepare_data --layout flat --source {src} --dest {data} --val-fraction 0.1"
        r = bed.run("client", prep.split(), env=s3, timeout=600)
        if r.returncode:
            raise SystemExit(r.stderr[-3000:])
        for name in a.rows:
            row = run_row(bed, name, data, a.epochs, a.cpus_per_worker)
            rows.append(row)
            per_epoch = ", ".join(f"{i:.1f} img/s {w}%" for _, i, w in row["epochs"])
            print(f"{name}: Train workers on {', '.join(row['trainers'])}; epochs: {per_epoch}", flush=True)
    finally:
        bed.down()
    print(
        f"\n{'row':9} {'placement':13} {'CPU/worker':>10} {'img/s':>7} {'wait':>5} {'Data CPUs':>9} "
        "  read tasks / decode tasks by host"
    )
    for r in rows:
        where = " / ".join(
            ", ".join(f"{h[-8:]} {n}" for h, n in sorted(r["tasks"].get(k, {}).items())) or "-"
            for k in ("read", "decode")
        )
        print(
            f"{r['name']:9} {r['placement']:13} {r['cpus']:>10g} {r['img_s']:>7.1f} {r['wait']:>4.0f}% "
            f"{r['data_cpus']:>9g}  {where}"
        )
    by = {r["name"]: r for r in rows}
    if "spread" in by and "packed" in by:
        print(f"\nspread / packed img/s: {by['spread']['img_s'] / by['packed']['img_s']:.2f}")
    if "fraction" in by and "spread" in by:
        print(f"fraction / spread img/s: {by['fraction']['img_s'] / by['spread']['img_s']:.2f}")


if __name__ == "__main__":
    main()
