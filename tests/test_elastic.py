"""An elastic stage on a two-node cluster (127.0.0.1): the second node gets a preemption notice (`ray drain-node`)
and the stage checkpoints for it, then the node stops mid-stage and the stage goes on at 1 worker; the node
starts again and the stage grows back to 2; the final epoch and step counts equal an uninterrupted run's (the
global batch is the same at both sizes)."""

import json
import re
import tempfile
from pathlib import Path

import boto3
import pytest

from data.shards import PrepareOptions, prepare
from data.synthetic.write import write_city
from tests.elastic_scenario import node_loss_and_return
from tests.services import make_bucket, ray_cluster, s3_environment

pytestmark = pytest.mark.slow
EPOCHS = 14  # outlasts a regrow of up to ~7 one-worker epochs after the node left at epoch 2-3


def elastic_cmd(run_id: str, every: int, *extra: str) -> list[str]:
    """Stage 1 of the tiny recipe on [1, 2] workers of 0.6 CPU (one fits a 1-CPU node, beside Ray Data's tasks)."""
    settings = {
        "train.num_workers": "[1,2]",
        "train.placement": "spread",
        "train.cpus_per_worker": 0.6,
        "data.read_cpus": 0.2,
        "data.decode_cpus": 0.3,
        "train.worker_start_timeout_s": 20,
        "train.checkpoint_every_steps": every,
        "train.resize_check_s": 3,
        "train.preemption_check_steps": 1,
        "train.log_every": 1,
        "stage1.niter": EPOCHS,
        "stage1.niter_decay": 0,
    }
    fixed = "--config configs/tiny.yaml --data s3://elastic/data --storage s3://elastic/runs --stages 1 --no-tracking"
    sets = [arg for key, value in settings.items() for arg in ("--set", f"{key}={value}")]
    return ["python", "-m", "jobs.train", *fixed.split(), "--run-id", run_id, *sets, *extra]


@pytest.fixture(scope="module")
def elastic_data(s3, tmp_path_factory):
    make_bucket(s3, "elastic")
    src = write_city(tmp_path_factory.mktemp("city") / "src", count=24, height=64, width=128)
    prepare(
        PrepareOptions("flat", str(src), "s3://elastic/data", val_fraction=0.1, name="synthetic-city"),
        log=lambda m: None,
    )
    return "s3://elastic/data"


def test_a_node_leaving_and_returning_resizes_the_stage_without_changing_its_counts(s3, elastic_data):
    # the head notices a dead node within ~3 s (Ray's default, 3 s x 5 failed health checks, leaves the controller
    # first retrying the old size until worker_start_timeout_s); benchmarks/elastic.py keeps Ray's defaults
    env = {**s3_environment(s3), "RAY_health_check_period_ms": "1000", "RAY_health_check_failure_threshold": "3"}
    with ray_cluster(Path(tempfile.mkdtemp(prefix="ray", dir="/tmp")), env, head_cpus=1, worker_cpus=[1]) as cluster:
        r = node_loss_and_return(cluster, elastic_cmd("elastic", 3), notice=True)
    assert r.status == "SUCCEEDED", r.logs[-4000:]
    assert "draining: checkpointed at step" in r.logs
    assert "resized 2 -> 1 workers" in r.logs and "resized 1 -> 2 workers" in r.logs
    assert "per-worker batch 4 -> 8, global batch 8 as before" in r.logs
    assert "1 workers eta" in r.logs and "2 workers eta" in r.logs  # epochs trained at each size
    body = boto3.client("s3").get_object(Bucket="elastic", Key="runs/elastic/run.json")["Body"].read()
    done = json.loads(body)["stages"]["1"]
    # 21 training samples, global batch 8 at either size: 2 steps an epoch, as an uninterrupted run has
    assert (done["epochs"], done["global_step"]) == (EPOCHS, EPOCHS * 2)
    assert r.redone_down <= 2  # the steps after the notice's checkpoint (or the epoch's, if Ray had not taken it)
    assert r.redone_up <= 3  # at most the steps since the last checkpoint (every 3)
    notice_step = re.search(r"draining: checkpointed at step (\d+)", r.logs).group(1)
    resumed_step = re.search(r"resized 2 -> 1 workers at [^(]*\([^)]*step (\d+)\)", r.logs).group(1)
    print(f"the notice's checkpoint: step {notice_step}; shrunk from the checkpoint of step {resumed_step}")
    print(
        f"resize 2 -> 1: {r.down_s:.1f}s from the node stopping to the next step ({r.redone_down} steps redone); "
        f"1 -> 2: {r.up_s:.1f}s from the node starting ({r.redone_up} redone); {r.tail_s:.1f}s of the stage left"
    )
