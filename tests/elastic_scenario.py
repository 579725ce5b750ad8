"""A node leaving and coming back in the middle of an elastic stage, as on spot GPUs, on a cluster of `ray start`
nodes on 127.0.0.1: benchmarks/elastic.py (how long each resize takes). The correctness test runs the same on the
test bed's hosts (tests/test_cluster.py, a worker host cut off mid-stage)."""

from __future__ import annotations

import re
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from tests.services import RayCluster, submit_with_client

REPO = Path(__file__).resolve().parents[1]


def elastic_cmd(run_id: str, every: int, *extra: str) -> list[str]:
    """Stage 1 of the tiny recipe on [1, 2] workers of 2 CPUs on 3-CPU nodes: one worker per node, so losing a node
    shrinks the stage to 1; Ray Train then still reserves the maximum's CPUs, as many as fit the node left (one
    worker's 2), and a whole CPU stays for Ray Data's tasks (orchestration/cluster/resources.py; 1-CPU workers on 2-CPU
    nodes left it none: the shrunk stage waited for data forever)."""
    settings = {
        "train.num_workers": "[1,2]",
        "train.placement": "spread",
        "train.cpus_per_worker": 2,
        "train.worker_start_timeout_s": 20,
        "train.checkpoint_every_steps": every,
        "train.resize_check_s": 3,
        "train.preemption_check_steps": 1,
        "train.log_every": 1,
        "stage1.niter_decay": 0,
    }
    fixed = "--config configs/tiny.yaml --data s3://elastic/data --storage s3://elastic/runs --stages 1 --no-tracking"
    sets = [arg for key, value in settings.items() for arg in ("--set", f"{key}={value}")]
    return ["python", "-m", "jobs.train", *fixed.split(), "--run-id", run_id, *sets, *extra]


ENDED = ("FAILED", "SUCCEEDED", "STOPPED")
STEP = re.compile(r"\[stage 1\] epoch \d+/\d+ step (\d+) ")


@dataclass
class Resizes:
    status: str
    logs: str
    down_s: float  # node stopped -> first step at 1 worker
    up_s: float  # node started again -> first step at 2 workers
    redone_down: int  # steps trained again after shrinking (since the last checkpoint)
    redone_up: int
    tail_s: float  # first step at 2 workers -> the job's end: how much slack the regrow had


def _wait(client, job, until, what: str, timeout: float = 300) -> str:
    deadline = time.monotonic() + timeout
    while True:
        logs = client.get_job_logs(job)
        if until(logs):
            return logs
        if str(client.get_job_status(job)) in ENDED:
            raise AssertionError(f"the job ended before {what}:\n{logs[-4000:]}")
        if time.monotonic() > deadline:
            raise AssertionError(f"no {what} within {timeout}s:\n{logs[-4000:]}")
        time.sleep(0.25)


def _stepped_after(marker: str):
    """until(): a step line appears after the last `marker` line; returns that step."""

    def until(logs: str) -> bool:
        at = logs.rfind(marker)
        return at >= 0 and STEP.search(logs, at) is not None

    return until


def _redone(logs: str, marker: str) -> int:
    """Steps trained again after `marker`: the last step before it minus the first step after it, plus one."""
    at = logs.rfind(marker)
    before = [int(s) for s in STEP.findall(logs[:at])]
    after = STEP.search(logs, at)
    return max(0, before[-1] - int(after.group(1)) + 1) if before and after else 0


def node_loss_and_return(
    cluster: RayCluster, cmd: list[str], notice: bool = False, log=print, after_step: int = 0
) -> Resizes:
    """The node leaves once the stage is in its second epoch and past `after_step`. With `notice`, it is first
    drained (a preemption notice) and stopped once the stage has checkpointed for it."""
    from ray.job_submission import JobSubmissionClient

    client = JobSubmissionClient(cluster.dashboard)
    job = submit_with_client(
        client,
        entrypoint=" ".join(cmd),
        runtime_env={"working_dir": str(REPO)},
        submission_id=f"elastic-{uuid.uuid4().hex[:6]}",
    )
    _wait(
        client,
        job,
        lambda logs: "[stage 1] epoch 2/" in logs and max(map(int, STEP.findall(logs)), default=0) >= after_step,
        f"a second epoch and step {after_step}",
    )
    if notice:
        cluster.drain_worker()
        log("worker node drained (preemption notice)")
        # the stage says so once the checkpoint is reported; one more step gives Ray's controller time to take it
        _wait(client, job, _stepped_after("draining: checkpointed at step"), "a checkpoint for the notice", 120)
    stop = time.monotonic()
    cluster.stop_worker(0)
    log("worker node stopped")
    logs = _wait(client, job, _stepped_after("resized 2 -> 1"), "a step at 1 worker")
    down = time.monotonic() - stop
    log(f"training again at 1 worker after {down:.1f}s")
    start = time.monotonic()
    cluster.start_worker(0)
    logs = _wait(client, job, _stepped_after("resized 1 -> 2"), "a step at 2 workers")
    up = time.monotonic() - start
    log(f"training again at 2 workers {up:.1f}s after the node started")
    grown = time.monotonic()
    deadline = grown + 600
    while str(client.get_job_status(job)) not in ENDED:
        assert time.monotonic() < deadline
        time.sleep(0.5)
    tail = time.monotonic() - grown
    log(f"the job ended {tail:.1f}s later")
    logs = client.get_job_logs(job)
    return Resizes(
        str(client.get_job_status(job)),
        logs,
        down,
        up,
        _redone(logs, "resized 2 -> 1"),
        _redone(logs, "resized 1 -> 2"),
        tail,
    )
