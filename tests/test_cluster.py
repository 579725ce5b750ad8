"""The README's cluster path, as a user runs it on docker/compose.yaml's cluster (tests/compose_bed.py: each service
on a host of its own name and address; MinIO by moto, MLflow on PostgreSQL, a Ray head and two workers, Ray token
authentication). Everything is submitted from the client host with `ray job submit`, which holds the Ray token and
no S3 or MLflow secret; the nodes hold the S3 secret, which must appear in no file Ray writes and nowhere in MLflow.

Order (each step uses the ones before): data to S3, the seg-score segmenter, a sweep, the curriculum from the
sweep's best.yaml exactly as the sweep prints it (workers on both worker hosts), registration, evaluation, cluster
features, export, `mlflow models serve` and the editor reached from the client (chromium there), a job submitted
while the editor holds the CPUs that, once started, is stopped and resumed, a worker host cut off mid-stage and back
with MLflow stopped and back meanwhile."""

import base64
import json
import re
import shlex
import sys
import time
import urllib.request
import uuid
from pathlib import Path

import boto3
import numpy as np
import pytest
import torch

from data.synthetic.write import write_city
from orchestration.run import checkpoint
from serving.maps import encode_ids
from tests.conftest import BED_SECRET
from tests.services import stop_tree

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[1]
MODEL = "pix2pixhd-synthetic-city"
BUCKET = "pix2pixhd"  # docker/.env.example's BUCKET, made by the minio-bucket service
DATA = f"s3://{BUCKET}/data"
RUNS = f"s3://{BUCKET}/runs"
ENDED = ("FAILED", "SUCCEEDED", "STOPPED")
WORKER_HOSTS = {"ray-worker-1", "ray-worker-2"}
MLFLOW_ON_CLIENT = {"MLFLOW_TRACKING_URI": "http://mlflow:5000"}  # a user's shell names the server


@pytest.fixture(scope="module")
def bed(testbed):
    return testbed


def user_s3_env(bed) -> dict[str, str]:
    """A user who may write the bucket (to upload a dataset): S3 credentials in that shell only."""
    return {
        "AWS_ACCESS_KEY_ID": bed.env_file["MINIO_ROOT_USER"],
        "AWS_SECRET_ACCESS_KEY": BED_SECRET,
        "AWS_ENDPOINT_URL_S3": "http://minio:9000",
        "AWS_REGION": "us-east-1",
    }


@pytest.fixture(scope="module")
def s3(bed):
    """boto3 from this process, to MinIO's address."""
    return boto3.client(
        "s3",
        endpoint_url=bed.url("minio", 9000),
        region_name="us-east-1",
        aws_access_key_id=bed.env_file["MINIO_ROOT_USER"],
        aws_secret_access_key=BED_SECRET,
    )


@pytest.fixture(scope="module")
def s3_env(bed):
    """S3 at MinIO's address for code in this process that reads s3:// URIs (checkpoints, configs)."""
    with pytest.MonkeyPatch.context() as m:
        for k, v in {**user_s3_env(bed), "AWS_ENDPOINT_URL_S3": bed.url("minio", 9000)}.items():
            m.setenv(k, v)
        yield


@pytest.fixture(scope="module")
def tracking(bed):
    """The MLflow server's URL from this process (by address: a private IP is an allowed host)."""
    return bed.url("mlflow", 5000)


def mlflow_client(tracking):
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=tracking, registry_uri=tracking)


def experiment_id(tracking):
    return mlflow_client(tracking).get_experiment_by_name(f"{MODEL}").experiment_id


def submit(bed, *args: str, timeout: float = 900):
    """`ray job submit ... -- python -m ARGS` from the client host; asserts nothing."""
    return bed.submit(["python", "-m", *args], timeout=timeout)


def ok(r) -> str:
    assert r.returncode == 0, r.stdout[-5000:] + r.stderr[-3000:]
    return r.stdout


# ---- the deployment itself ------------------------------------------------------------------------------------


def test_every_node_reaches_mlflow_by_its_compose_name(bed):
    """MLflow >= 3.5 refuses Host headers it does not allow (403 "Invalid Host header"); the nodes use
    http://mlflow:5000 as compose's MLFLOW_TRACKING_URI says. Failed on the compose file before allowed hosts."""
    probe = "import os, urllib.request as u; print(u.urlopen(os.environ['URL']).status)"
    for host in ("ray-head", "ray-worker-1", "ray-worker-2", "client"):
        env = {"URL": "http://mlflow:5000/api/2.0/mlflow/experiments/search?max_results=1"}
        r = bed.hosts.run(host, [sys.executable, "-c", probe], {**bed.client_env(host), **env}, timeout=60)
        assert r.returncode == 0 and r.stdout.strip() == "200", f"{host}: {r.stdout}{r.stderr[-1500:]}"


def test_the_cluster_has_the_head_without_cpus_and_two_workers(bed):
    nodes = {n["host"]: n.get("resourcesTotal", {}) for n in bed.ray_nodes()}
    assert set(nodes) == {"ray-head"} | WORKER_HOSTS
    assert nodes["ray-head"].get("CPU", 0) == 0 and all(nodes[h]["CPU"] >= 1 for h in WORKER_HOSTS)


@pytest.fixture(scope="module")
def data(bed, tmp_path_factory):
    """40 procedural scenes prepared from the client host into MinIO, as a user with S3 access does."""
    src = write_city(tmp_path_factory.mktemp("city") / "src", count=40, height=64, width=128)
    cmd = f"{sys.executable} -m jobs.prepare_data --layout flat --source {src} --dest {DATA} --val-fraction 0.1"
    r = bed.run("client", [*cmd.split(), "--name", "synthetic-city"], env=user_s3_env(bed), timeout=300)
    ok(r)
    return DATA


# ---- the segmenter, a sweep, the curriculum from its best.yaml -------------------------------------------------


@pytest.fixture(scope="module")
def segmenter(bed, data):
    """jobs.train_segmenter on the cluster: a small U-Net on the real photos, registered as version 1."""
    small = "--set segmenter.epochs=8 --set segmenter.width=12 --set segmenter.depth=3 --set segmenter.lr=0.003"
    args = f"jobs.train_segmenter --config configs/tiny.yaml --storage {RUNS} --set train.num_workers=1 {small}"
    return ok(submit(bed, *args.split(), "--data", data))


def test_the_segmenter_trains_in_a_run_folder_of_its_own_and_is_registered_without_pickle(bed, segmenter, tracking):
    assert "[segmenter] epoch 8/8" in segmenter and "segmenter: models:/segmenter-synthetic-city/1" in segmenter
    run_id = re.search(r"\[segmenter\] run (seg-\S+): ", segmenter).group(1)
    version = mlflow_client(tracking).get_model_version("segmenter-synthetic-city", "1")
    assert 0 < float(version.tags["val_miou"]) <= 1 and len(version.tags["sha256"]) == 64
    assert sorted(a.path for a in mlflow_client(tracking).list_artifacts(version.run_id, "segmenter")) == [
        "segmenter/class_map.yaml",
        "segmenter/segmenter.pt",
    ]
    # the same run id with another width is refused before anything trains (it would not load the run's state)
    again = submit(
        bed,
        *f"jobs.train_segmenter --config configs/tiny.yaml --storage {RUNS} --data {DATA}".split(),
        *f"--run-id {run_id} --set segmenter.width=8 --no-tracking".split(),
    )
    assert again.returncode != 0 and "segmenter.width differ" in again.stdout, again.stdout[-3000:]


SWEEP = (  # workers spread over the worker hosts; instance features on (styles, cluster_features, the editor's)
    f"jobs.sweep --config configs/tiny.yaml --num-samples 3 --data {DATA} --storage {RUNS} --name s3sweep "
    "--set train.placement=spread --set model.instance_feat=true"
)


@pytest.fixture(scope="module")
def sweep(bed, segmenter):
    """Three trials of stage 1 judged by seg-score; workers spread over the two worker hosts."""
    return ok(submit(bed, *SWEEP.split()))


def test_a_three_trial_sweep_judged_by_seg_score_keeps_each_trial_apart(bed, sweep, s3, tracking):
    assert "sweep s3sweep: 3 trials (0 errored)" in sweep
    assert "generators are judged by val_seg_miou (max) by models:/segmenter-synthetic-city/1" in sweep
    c = mlflow_client(tracking)
    runs = c.search_runs([experiment_id(tracking)], "tags.`p2p.sweep` = 's3sweep'")
    parent = [x for x in runs if x.data.tags.get("p2p.stage") == "parent"]
    trials = [x for x in runs if x.data.tags.get("mlflow.parentRunId") == parent[0].info.run_id]
    assert len(parent) == 1 and len(trials) == 3 and {x.info.status for x in runs} == {"FINISHED"}
    # one run folder per trial: its checkpoints, its images; no leftovers of one trial in another's
    ids = {t.data.tags["p2p.trial"] for t in trials}
    keys = [o["Key"] for o in s3.list_objects_v2(Bucket=BUCKET, Prefix="runs/sweeps/s3sweep/trials/")["Contents"]]
    assert {k.split("/")[4] for k in keys if not k.endswith("/")} == ids  # (folder markers aside)
    for trial in ids:
        assert any(re.match(rf"runs/sweeps/s3sweep/trials/{trial}/stage1/images/epoch_\d+\.png$", k) for k in keys)
        assert any(re.match(rf"runs/sweeps/s3sweep/trials/{trial}/stage1/checkpoint_[^/]+/state.pt$", k) for k in keys)
    pgs = bed.state("placement_groups")
    assert not [pg for pg in pgs if pg["state"] != "REMOVED"], pgs
    # --resume on the same name restores the Tune experiment from storage instead of starting new trials
    again = ok(submit(bed, *SWEEP.split(), "--resume"))
    assert "sweep s3sweep: resuming from" in again and "sweep s3sweep: 3 trials" in again
    assert len(c.search_runs([experiment_id(tracking)], "tags.`p2p.sweep` = 's3sweep'")) == 4  # no new trial runs


def printed_command(log: str) -> list[str]:
    return shlex.split(re.search(r"train it with (python -m jobs\.train .*)$", log, re.M).group(1))


@pytest.fixture(scope="module")
def full_run(bed, sweep):
    """The curriculum from the sweep's best.yaml, submitted exactly as the sweep printed it (its data and storage
    are in the file; MLflow comes from the nodes' MLFLOW_TRACKING_URI)."""
    log = ok(bed.submit(printed_command(sweep)))
    run_id = re.search(r"^run (\S+): stages \[1, 2, 3\]", log, re.M).group(1)
    return {"log": log, "run_id": run_id, "submission": submission_id(log)}


def submission_id(log: str) -> str:
    return re.search(r"Job '(raysubmit_\w+)' submitted successfully", log).group(1)


def run_state(s3, run_id):
    body = s3.get_object(Bucket=BUCKET, Key=f"runs/{run_id}/run.json")["Body"].read()
    return {int(k): v for k, v in json.loads(body)["stages"].items()}


def test_best_yaml_carries_the_data_and_storage_the_sweep_ran_on(full_run, sweep, s3_env):
    from orchestration.run.config import load_config

    assert printed_command(sweep) == printed_command_of(full_run)
    best = load_config(f"{RUNS}/sweeps/s3sweep/best.yaml")
    assert (best.data.uri, best.train.storage, best.train.placement) == (DATA, RUNS, "spread")
    assert f"data {DATA}, storage {RUNS}/{full_run['run_id']}" in full_run["log"]


def test_the_curriculum_ran_its_workers_on_both_worker_hosts(bed, full_run, capsys):
    """Where each Train worker of the run ran, from Ray's State API (a table in pytest's output, `-q` included)."""
    hosts = bed.host_of_node()
    job_id = bed.api(f"/api/jobs/{full_run['submission']}")["job_id"]
    workers = [a for a in bed.state("actors", class_name="RayTrainWorker") if a["job_id"] == job_id]
    rows = sorted((hosts.get(a["node_id"], "?"), a["pid"]) for a in workers)
    with capsys.disabled():
        print("\nTrain workers of the curriculum's three stages (host, pid):")
        print("\n".join(f"  {h:14} {pid}" for h, pid in rows))
    assert {h for h, _ in rows} == WORKER_HOSTS and len(rows) == 6  # 2 workers x 3 stages


def test_the_three_stages_ran_in_order_and_the_log_is_the_projects(full_run):
    log = full_run["log"]
    ends = [log.index(f"[stage {k}] finished") for k in (1, 2, 3)]
    assert ends == sorted(ends)
    frozen = re.findall(r"\[stage (\d)\] epoch \d+/\d+ .*\(G1 frozen\)", log)
    assert frozen and set(frozen) == {"2"}
    assert "stage 1 -> 2: loaded" in log and "stage 2 -> 3: loaded" in log
    for noise in (
        "Reporting training result",
        "Started training worker group",
        "Checkpoint successfully created",
        "View run",
        "pip install tqdm",
        "PreemptionWatcher",
        "Found multiple active Ray instances",
        "The hostname of the client socket cannot be retrieved",
    ):
        assert noise not in log, noise
    lines = [line for line in log.splitlines() if line.strip()]
    ours = [line for line in lines if PROJECT_LINE.search(line)]
    others = [line for line in lines if not PROJECT_LINE.search(line) and not RAY_CLI_LINE.search(line)]
    print(f"job log: {len(lines)} lines, {len(ours)} of them the project's, {len(others)} from elsewhere")
    assert len(ours) >= 12 and not others, "\n".join(others)


PROJECT_LINE = re.compile(
    r"\[stage \d\]|^(run|registered|registry|tracking|evaluating|judging|generators are judged)\b|^\||^evaluate: "
)
RAY_CLI_LINE = re.compile(
    r"(cli|sdk|dashboard_sdk|packaging|working_dir)\.py:\d+ -- |Running entrypoint for job|job_manager.py"
    # the one line left from Ray itself: its core worker in the driver warns, at ERROR, that the final judgement's
    # Ray Data actor pool has its constructor arguments (the networks) in the object store (ray-project/ray#53727)
    r"|core_worker\.cc:\d+: Actor with class name: 'MapWorker\(MapBatches\(ScoreBatch\)\)'"
)


def test_stage2_trained_only_the_enhancer_and_stage3_trained_g1(full_run, s3, s3_env, tmp_path):
    state = run_state(s3, full_run["run_id"])
    s1, s2, s3_ = (checkpoint.fetch(state[k]["checkpoint"], tmp_path / f"s{k}") for k in (1, 2, 3))
    g1 = {k: v for k, v in s1["G"].items() if not k.startswith(("model.28", "model.27"))}
    global_part = {k: v for k, v in s2["G"].items() if k.startswith("model.")}
    assert global_part.keys() <= g1.keys()
    assert all(torch.equal(global_part[k], g1[k]) for k in global_part), "stage 2 changed G1 while frozen"
    enhancer = [k for k in s2["G"] if k.startswith("model1_")]
    assert enhancer and any(not torch.equal(s2["G"][k], s3_["G"][k]) for k in enhancer)
    assert any(not torch.equal(s3_["G"][k], s2["G"][k]) for k in global_part), "stage 3 did not train G1"
    n_global = len([k for k in s2["G"] if k.startswith("model.") and k.endswith(("weight", "bias"))])
    buffers = ("running_mean", "running_var", "num_batches_tracked")
    e_params = [k for k in s2.get("E") or {} if not k.endswith(buffers)]  # E trains beside the enhancer
    assert len(s2["opt_G"]["state"]) == len(s2["G"]) - n_global + len(e_params)  # Adam stepped exactly those
    assert s3_["epoch"] == state[3]["epochs"] == 2


def test_checkpoints_images_and_mlflow_runs_of_the_curriculum(full_run, s3, tracking):
    run_id = full_run["run_id"]
    keys = [o["Key"] for o in s3.list_objects_v2(Bucket=BUCKET, Prefix=f"runs/{run_id}/")["Contents"]]
    for k in (1, 2, 3):
        assert any(re.match(rf"runs/{run_id}/stage{k}/checkpoint_[^/]+/state.pt$", key) for key in keys)
        assert any(re.match(rf"runs/{run_id}/stage{k}/images/epoch_\d+.png$", key) for key in keys)
    c = mlflow_client(tracking)
    runs = c.search_runs([experiment_id(tracking)], f"tags.`p2p.run_id` = '{run_id}'")
    parent = [r for r in runs if r.data.tags["p2p.stage"] == "parent"]
    stages = sorted((r for r in runs if r.data.tags["p2p.stage"] in "123"), key=lambda r: r.data.tags["p2p.stage"])
    assert len(parent) == 1 and [r.data.tags["p2p.stage"] for r in stages] == ["1", "2", "3"]
    assert parent[0].info.status == "FINISHED" and all(r.info.status == "FINISHED" for r in stages)
    for r in stages:
        assert {"G_GAN", "D_real", "lr", "img_per_s", "data_wait", "val_L1", "workers"} <= set(r.data.metrics)
        assert r.data.tags["checkpoint"].startswith(f"{RUNS}/{run_id}/stage{r.data.tags['p2p.stage']}/checkpoint_")
        # each epoch's grid in the image view at the epoch's step; rank 0's host in system metrics
        images = [a.path for a in c.list_artifacts(r.info.run_id, "images")]
        steps = {int(m.group(1)) for p in images if (m := re.match(r"images/held-out\+step\+(\d+)\+", p))}
        assert steps == {m.step for m in c.get_metric_history(r.info.run_id, "val_L1")}, images
        assert {"system/cpu_utilization_percentage", "system/system_memory_usage_megabytes"} <= set(r.data.metrics)


def test_the_generator_is_registered_once_with_the_champion_alias(full_run, s3, tracking):
    c = mlflow_client(tracking)
    versions = [v for v in c.search_model_versions(f"name = '{MODEL}'") if v.tags.get("run_id") == full_run["run_id"]]
    assert len(versions) == 1
    v = c.get_model_version_by_alias(MODEL, "champion")
    assert (
        v.version == versions[0].version and v.tags["checkpoint"] == run_state(s3, full_run["run_id"])[3]["checkpoint"]
    )
    assert len(v.tags["data_manifest_sha256"]) == 64 and v.tags["judged.metric"] == "val_seg_miou"
    assert 0 < float(v.tags["judged.value"]) <= 1 and v.tags["judged.by"].startswith(
        "models:/segmenter-synthetic-city/1"
    )
    # what was trained, judged and registered, named by digest (run.json, the judgement, the version's tags)
    run = json.loads(s3.get_object(Bucket=BUCKET, Key=f"runs/{full_run['run_id']}/run.json")["Body"].read())
    stage3 = run["stages"]["3"]["checkpoint_sha256"]
    meta = json.loads(
        s3.get_object(Bucket=BUCKET, Key=f"{v.tags['checkpoint'].split('/', 3)[3]}/meta.json")["Body"].read()
    )
    assert stage3 == meta["sha256"] == run["judgement"]["checkpoint_sha256"] == v.tags["checkpoint_sha256"]
    assert run["judgement"]["split"] == "val" and v.tags["judged.data_sha256"] == run["judgement"]["data_sha256"]
    assert len(run["data_sha256"]) == 64 and run["data_sha256"] != run["judgement"]["data_sha256"]  # train vs val


def test_resubmitting_a_finished_run_does_no_training(bed, full_run):
    again = ok(bed.submit([*printed_command_of(full_run), "--run-id", full_run["run_id"], "--no-tracking"]))
    assert again.count(f"already finished in run {full_run['run_id']}") == 3
    assert not re.search(r"\[stage \d\] epoch \d", again)


def printed_command_of(full_run) -> list[str]:
    return ["python", "-m", "jobs.train", "--config", f"{RUNS}/sweeps/s3sweep/best.yaml"]


def test_a_failed_registration_fails_the_job_and_jobs_register_retries_it(bed, full_run, s3):
    """A second MLflow server on the mlflow host whose artifact bucket does not exist yet: every upload fails."""
    db = bed.hosts.tmp / "late.db"
    cmd = f"mlflow server --host 0.0.0.0 --port 5001 --workers 1 --backend-store-uri sqlite:///{db}"
    env = {**bed.base_env("mlflow"), **bed.services["mlflow"].env}
    env["MLFLOW_SERVER_ALLOWED_HOSTS"] += ",mlflow:5001"  # (as compose allows mlflow:5000: else 403 for the nodes)
    proc = bed.hosts.popen(
        "mlflow", [*cmd.split(), "--artifacts-destination", "s3://late-artifacts/mlflow"], env, bed.work / "late.log"
    )
    try:
        bed._wait_http(f"{bed.url('mlflow', 5001)}/health", 180, "mlflow")
        late = "http://mlflow:5001"
        args = [
            *printed_command_of(full_run),
            "--run-id",
            "unregistered",
            "--stages",
            "3",
            "--from-run",
            full_run["run_id"],
        ]
        r = bed.submit([*args, "--tracking-uri", late])
        assert r.returncode != 0 and "Job entrypoint command failed with exit code 3" in r.stdout, r.stdout[-4000:]
        assert "train: error: training finished but registering run 'unregistered' failed 2 times" in r.stdout
        assert f"python -m jobs.register --run unregistered --storage {RUNS}" in r.stdout
        s3.create_bucket(Bucket="late-artifacts")
        for _ in range(2):  # the second finds the version by its checkpoint and registers nothing new
            again = ok(submit(bed, *f"jobs.register --run unregistered --storage {RUNS} --tracking-uri {late}".split()))
        assert "already holds" in again
        c = mlflow_client(bed.url("mlflow", 5001))
        (version,) = c.search_model_versions(f"name = '{MODEL}'")
        assert version.tags["run_id"] == "unregistered"
        assert all(
            run.info.status != "RUNNING" for run in c.search_runs([c.get_experiment_by_name(MODEL).experiment_id])
        )
    finally:
        stop_tree(proc, grace=10)  # the server, its workers and the namespaces' wrapper processes


# ---- evaluation, styles, export, serving -----------------------------------------------------------------------


def test_evaluate_compares_two_models_by_seg_score_with_a_report_and_mlflow_runs(bed, full_run, s3, tracking):
    c = mlflow_client(tracking)
    run = full_run["run_id"]  # the champion's own run, named by its id: a version and a run side by side
    args = f"jobs.evaluate --model models:/{MODEL}@champion --model {run} --storage {RUNS} --out s3://{BUCKET}/eval"
    log = ok(submit(bed, *args.split(), "--data", DATA))
    champion = c.get_model_version_by_alias(MODEL, "champion")
    assert "seg-score by models:/segmenter-synthetic-city/1" in log
    assert re.search(r"evaluate: (\d+)/\1 images", log)
    rows = [line for line in log.splitlines() if line.startswith("| ")]
    assert [row.split(" | ")[0] for row in rows[1:]] == [
        "| real photos",
        f"| {MODEL} v{champion.version}",
        f"| {run} (stage 3)",
    ]
    report = json.loads(s3.get_object(Bucket=BUCKET, Key="eval/metrics.json")["Body"].read())
    val_count = json.loads(s3.get_object(Bucket=BUCKET, Key="data/val/manifest.json")["Body"].read())["sample_count"]
    for name in (f"{MODEL} v{champion.version}", f"{run} (stage 3)"):
        m = report["metrics"][name]
        assert 0 <= m["seg_miou"] <= 1 and m["seg_miou_ratio"] > 0 and m["images"] == val_count
    assert s3.get_object(Bucket=BUCKET, Key="eval/grid.png")["Body"].read()[:4] == b"\x89PNG"
    parent = c.search_runs([experiment_id(tracking)], f"tags.`p2p.run_id` = '{run}' and tags.`p2p.stage` = 'parent'")[0]
    evaluations = c.search_runs(  # one per model, both under the run they come from (the same run here)
        [experiment_id(tracking)],
        f"tags.`mlflow.parentRunId` = '{parent.info.run_id}' and tags.`p2p.kind` = 'evaluation'",
    )
    scored = sorted(report["metrics"][n]["seg_miou"] for n in (f"{MODEL} v{champion.version}", f"{run} (stage 3)"))
    logged = [e.data.metrics["seg_miou"] for e in evaluations]
    assert len(evaluations) >= 2 and all(any(v == pytest.approx(x) for x in logged) for v in scored), logged
    tags = c.get_model_version(MODEL, champion.version).tags
    assert float(tags["eval.val.seg_miou"]) == pytest.approx(
        report["metrics"][f"{MODEL} v{champion.version}"]["seg_miou"], rel=1e-4
    )
    # scores name what they scored: the version's weights.pt, the run's checkpoint, the split's content
    assert (
        report["sha256"][f"{MODEL} v{champion.version}"] == tags["sha256.weights.pt"] == tags["eval.val.weights_sha256"]
    )
    assert (
        report["sha256"][f"{run} (stage 3)"] == run_state(s3, run)[3]["checkpoint_sha256"]
        and tags["eval.val.data_sha256"] == report["data_sha256"]
    )


def gaussian_blur(images: torch.Tensor, sigma: float) -> torch.Tensor:
    radius = int(3 * sigma)
    x = torch.arange(-radius, radius + 1, dtype=torch.float32)
    k = torch.exp(-(x**2) / (2 * sigma**2))
    k = (k / k.sum()).repeat(3, 1, 1, 1)
    images = torch.nn.functional.pad(images, (radius,) * 4, mode="reflect")
    images = torch.nn.functional.conv2d(images, k.view(3, 1, 1, -1), groups=3)
    return torch.nn.functional.conv2d(images, k.view(3, 1, -1, 1), groups=3)


def test_why_not_l1_a_blurred_photo_beats_the_generator_on_l1_yet_loses_on_seg_score_and_kid(
    full_run, s3_env, tracking
):
    """The service does not select by L1: on held-out photos, a blurred copy (Gaussian, sigma 3 px) is closer to
    the photo in L1 than the trained generator's image, yet the segmenter finds less of the scene in it than in
    the photo, and its KID to the real training photos is higher than the photos' own."""
    from data.labels import CITYSCAPES
    from data.pipeline import read_samples
    from data.pipeline_config import PipelineConfig
    from data.transforms import Geometry
    from evaluation.fid import FeatureDistance
    from evaluation.segscore import SegScore
    from model.inference import to_uint8
    from orchestration.records.registry import load_generator
    from orchestration.records.segmenter_registry import resolve_segmenter
    from orchestration.run.config import Config
    from tests.test_evaluation_metrics import TinyFeatures

    pcfg = PipelineConfig(geometry=Geometry("none", 1, 16, 16, True), instance_output="ids")
    held_out, train = read_samples(DATA, "val", pcfg, 64), read_samples(DATA, "train", pcfg, 64)
    photos, label = held_out["image"], held_out["label"]
    generated = load_generator(f"models:/{MODEL}@champion", tracking)(torch.stack([label, held_out["inst"]], 1))
    blurred = gaussian_blur(photos, sigma=3.0)
    seg = resolve_segmenter(None, Config(dataset="synthetic-city"), CITYSCAPES, tracking)

    def l1(images):
        return (images - photos).abs().mean().item()

    def seg_miou(images):
        score = SegScore(seg.class_map, CITYSCAPES)
        score.update(seg.logits((images + 1) / 2), label)
        return score.result().miou

    features = TinyFeatures()

    def kid(images):
        d = FeatureDistance()
        d.update(features(to_uint8(train["image"])).detach(), real=True)
        d.update(features(to_uint8(images)).detach(), real=False)
        return d.kid()[0]

    assert l1(blurred) < l1(generated)
    assert seg_miou(blurred) < seg_miou(photos)
    assert kid(blurred) > kid(photos)


def test_infer_pulls_the_champion_on_the_client_host(bed, full_run, tmp_path):
    src = write_city(tmp_path / "src", count=2, height=64, width=128, workers=1)
    args = f"-m jobs.infer --model models:/{MODEL}@champion --labels {src}/train_label --instances {src}/train_inst"
    r = bed.run("client", [sys.executable, *args.split(), "--out", str(tmp_path / "out")], env=MLFLOW_ON_CLIENT)
    ok(r)
    outs = sorted((tmp_path / "out").glob("*_synthesized.png"))
    assert len(outs) == 2


def test_cluster_features_of_a_version_leave_its_training_run_as_it_was(bed, full_run, tracking):
    """jobs.cluster_features --model registers a new version from a run of its own, nested under the version's
    run: the training run keeps its name and end time."""
    c = mlflow_client(tracking)
    champion = c.get_model_version_by_alias(MODEL, "champion")
    before = c.get_run(champion.run_id)
    log = ok(submit(bed, *f"jobs.cluster_features --model models:/{MODEL}@champion --cpus 0.5".split()))
    new = re.search(rf"registered {MODEL} version (\d+): version {champion.version}'s weights", log).group(1)
    after = c.get_run(champion.run_id)
    assert (after.info.run_name, after.info.end_time) == (before.info.run_name, before.info.end_time)
    made = c.get_run(c.get_model_version(MODEL, new).run_id)
    assert made.data.tags["mlflow.parentRunId"] == champion.run_id and made.info.run_name.startswith("cluster_features")
    assert c.get_model_version(MODEL, new).tags["clusters_of"] == f"{MODEL}/{champion.version}"


def test_export_to_onnx_from_the_client_says_one_thing(bed, full_run, tmp_path):
    out = tmp_path / "g.onnx"
    r = bed.run(
        "client",
        [
            sys.executable,
            "-m",
            "jobs.export",
            "--model",
            f"models:/{MODEL}@champion",
            "--format",
            "onnx",
            "--out",
            str(out),
        ],
        env=MLFLOW_ON_CLIENT,
        timeout=300,
    )
    ok(r)
    assert out.stat().st_size > 10_000
    noise = [line for line in (r.stdout + r.stderr).splitlines() if line.strip()]
    assert len(noise) <= 2, noise  # the export's line (and onnxruntime's check), no library warnings


def test_mlflow_models_serve_on_a_host_answers_the_client(bed, full_run):
    """`mlflow models serve` of the champion on the ray-head host (the nodes' environment: the registry by name),
    asked from the client host for a 64x128 map: an image of that size comes back."""
    env = {**bed.base_env("ray-head"), **bed.image_env, **bed.services["ray-head"].env}
    cmd = f"mlflow models serve -m models:/{MODEL}@champion --env-manager local --host 0.0.0.0 --port 5005 --workers 1"
    proc = bed.hosts.popen("ray-head", cmd.split(), env, bed.work / "models-serve.log")
    try:
        bed._wait_http(f"{bed.url('ray-head', 5005)}/ping", 240, "ray-head")
        body = json.dumps({"inputs": np.stack([street(), street()])[None].tolist()})
        ask = (
            "import sys, json, urllib.request as u; r = u.urlopen(u.Request('http://ray-head:5005/invocations', "
            "data=sys.stdin.buffer.read(), headers={'Content-Type': 'application/json'}), timeout=120);"
            "print(json.dumps(__import__('numpy').asarray(json.load(r)['predictions']).shape))"
        )
        r = bed.run("client", [sys.executable, "-c", ask], input=body, timeout=180)
        assert json.loads(r.stdout) == [1, 3, 64, 128], r.stdout + r.stderr[-2000:]
    finally:
        stop_tree(proc, grace=10)


def post_render(url: str, label: np.ndarray) -> tuple[bytes, dict]:
    body = json.dumps({"label": base64.b64encode(encode_ids(label)).decode()}).encode()
    with urllib.request.urlopen(urllib.request.Request(f"{url}/render", data=body), timeout=120) as answer:
        return answer.read(), dict(answer.headers)


def street() -> np.ndarray:
    label = np.full((64, 128), 7)
    label[40:56, 20:60] = 26
    return label


@pytest.fixture(scope="module")
def editor(bed, full_run):
    """jobs.serve submitted to the cluster: the proxy on the head's port 8000, which users reach through
    editor-gateway (nginx, docker/nginx/editor.conf); its Generator replicas hold 1.5 CPUs each on the worker hosts
    (three quarters of the cluster's CPUs)."""
    args = f"jobs.serve --model models:/{MODEL}@champion --replicas 2 --cpus 1.5 --proxy-location HeadOnly"
    log = ok(submit(bed, *args.split()))
    yield log
    shutdown_serve(bed)


def shutdown_serve(bed) -> None:
    serve = str(Path(sys.executable).with_name("serve"))
    bed.run("client", [serve, "shutdown", "-y", "--address", bed.dashboard], timeout=180)


def test_the_editor_answers_the_client_host_through_its_gateway(bed, editor, tracking):
    assert re.search(r"serving models:/\S+ at http://[\d.]+:8000/", editor)
    probe = (
        "import json, sys, base64, urllib.request as u; body = sys.stdin.buffer.read();"
        "r = u.urlopen(u.Request('http://editor-gateway:8000/render', data=body), timeout=120);"
        "print(r.headers['X-Model-Version'], r.read()[:4] == b'\\x89PNG')"
    )
    body = json.dumps({"label": base64.b64encode(encode_ids(street())).decode()})
    r = bed.run("client", [sys.executable, "-c", probe], input=body, timeout=180)
    champion = mlflow_client(tracking).get_model_version_by_alias(MODEL, "champion").version
    assert r.stdout.split() == [f"{MODEL}/{champion}", "True"], r.stdout + r.stderr[-2000:]


SLOW_CLIENTS = """
import socket, sys, time
def slow(send):
    s = socket.create_connection(("editor-gateway", 8000), timeout=60)
    send(s)
    t0 = time.monotonic()
    answer = b""
    while part := s.recv(65536):  # until the gateway closes the connection
        answer += part
    return time.monotonic() - t0, answer.split(b"\\r\\n", 1)[0].decode()
def headers(s):  # a header line begun, never ended
    s.sendall(b"GET /classes HTTP/1.1\\r\\nHost: editor-gateway\\r\\nX-Slow: a")
def body(s):  # 1000 bytes promised, 10 sent
    s.sendall(b"POST /render HTTP/1.1\\r\\nHost: editor-gateway\\r\\nContent-Length: 1000\\r\\n\\r\\n{\\"label\\": ")
import threading
def run(kind):  # both at once
    took, status = slow(kind)
    print(kind.__name__, round(took, 1), status or "closed", flush=True)
threads = [threading.Thread(target=run, args=(kind,)) for kind in (headers, body)]
[t.start() for t in threads]
[t.join() for t in threads]
"""


def test_the_gateway_ends_clients_that_send_headers_or_body_too_slowly(bed, editor):
    """Serve's proxy has no header read timeout: the gateway's 10 s for headers and 15 s between body reads end such
    connections (nginx closes a header timeout without an answer, answers a body timeout 408), and the editor never
    saw them."""
    r = bed.run("client", [sys.executable, "-c", SLOW_CLIENTS], timeout=120)
    got = dict((line.split(" ", 1)[0], line.split(" ", 1)[1]) for line in r.stdout.splitlines())
    assert set(got) == {"headers", "body"}, r.stdout + r.stderr[-2000:]
    header_s, _ = got["headers"].split(" ", 1)
    body_s, body_status = got["body"].split(" ", 1)
    assert 9 <= float(header_s) <= 14, got
    assert 14 <= float(body_s) <= 20 and body_status in ("HTTP/1.1 408 Request Time-out", "closed"), got


def test_the_editor_page_in_chromium_on_the_client_host(bed, editor, tmp_path):
    """Chromium runs on the client host (Playwright drives it through its pipe): the page loads from
    http://editor-gateway:8000/, the open list shows what is displayed, choosing a blank street opens it, a render
    comes."""
    from playwright.sync_api import sync_playwright

    from tests.test_editor import ARTIFACTS, CHROMIUM

    wrapper = tmp_path / "chromium-on-client"
    wrapper.write_text(
        "#!/bin/sh\nexec "
        + shlex.join(bed.hosts.command("client", ["env", *[f"{k}={v}" for k, v in bed.client_env().items()], CHROMIUM]))
        + ' "$@"\n'
    )
    wrapper.chmod(0o755)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(wrapper), args=["--no-sandbox"])
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 860})
            errors: list[str] = []
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.goto("http://editor-gateway:8000/")
            page.wait_for_selector("body[data-ready='1']", timeout=90_000)
            shown = page.eval_on_selector("#open", "s => s.options[s.selectedIndex].text")
            assert shown.startswith("blank"), shown  # no --labels: the blank street opened is the one listed
            blanks = page.eval_on_selector_all("#open option", "os => os.map(o => o.value)")
            n = int(page.evaluate("Number(document.body.dataset.renders || 0)"))
            page.select_option("#open", blanks[-1])
            page.wait_for_function("n => Number(document.body.dataset.renders || 0) > n", arg=n, timeout=90_000)
            assert page.eval_on_selector("#open", "s => s.value") == blanks[-1]
            ARTIFACTS.mkdir(exist_ok=True)
            page.screenshot(path=str(ARTIFACTS / "editor-on-the-cluster.png"))
            assert page.inner_text("#model").startswith(f"{MODEL}/") and not errors, errors
        finally:
            browser.close()


def test_a_job_submitted_while_the_editor_holds_the_cpus_waits_then_stopped_ends_killed_and_resumes(
    bed, editor, full_run, s3, tracking
):
    """The Serve replicas hold 3 of the 4 worker CPUs. when_busy=fail: refused at once naming them; the default
    waits with a line naming them, and trains once `serve shutdown` frees them. That job, stopped mid-stage, ends
    its MLflow runs KILLED and says how to resume; the same command resumes it from its checkpoint. (One job for
    both stories: on the bed each job's first stage costs ~40 s of start-up.)"""
    run_id = f"resume-{uuid.uuid4().hex[:4]}"
    cmd = [*printed_command_of(full_run), "--run-id", run_id, "--stages", "1", "--set", "stage1.niter=5"]
    try:
        t0 = time.monotonic()
        fail = [*printed_command_of(full_run), "--stages", "1", "--no-tracking"]
        r = bed.submit([*fail, "--run-id", f"busy-fail-{uuid.uuid4().hex[:4]}", "--set", "train.when_busy=fail"])
        assert r.returncode != 0 and time.monotonic() - t0 < 60, r.stdout[-3000:]
        assert "other work holds them" in r.stdout, r.stdout[-3000:]
        assert "Serve replicas of pix2pixhd-editor / Generator: 2 x {CPU 1.5}" in r.stdout, r.stdout[-3000:]
        sid = submission_id(bed.submit(cmd, wait=False).stdout)
        deadline = time.monotonic() + 60
        while "resources: waiting" not in bed.job_logs(sid):
            assert time.monotonic() < deadline, bed.job_logs(sid)[-3000:]
            time.sleep(1)
        assert "Serve replicas of pix2pixhd-editor" in bed.job_logs(sid)
    finally:  # later tests need the CPUs: no job may wait on the replicas
        shutdown_serve(bed)
    wait_log(bed, sid, lambda logs: "[stage 1] epoch 2/" in logs, "a second epoch once the CPUs were free")
    assert re.search(r"resources: free after \d+s; stage 1 starts", bed.job_logs(sid))

    bed.stop_job(sid)
    assert wait_job(bed, sid) == "STOPPED"
    logs = bed.job_logs(sid)
    assert f"run {run_id}'s MLflow runs end KILLED; to resume run {run_id} from its latest checkpoint" in logs, logs[
        -3000:
    ]
    assert "SIGTERM received" not in logs and "PC: @" not in logs  # no stack dump of each worker process
    runs = mlflow_client(tracking).search_runs([experiment_id(tracking)], f"tags.`p2p.run_id` = '{run_id}'")
    assert {r.data.tags["p2p.stage"]: r.info.status for r in runs} == {"parent": "KILLED", "1": "KILLED"}
    log = ok(bed.submit([*cmd, "--no-tracking"]))
    resumed = re.search(r"resuming from its checkpoint: epoch (\d+), step (\d+)", log)
    assert resumed and int(resumed.group(1)) >= 1
    trained = [int(e) for e in re.findall(r"\[stage 1\] epoch (\d+)/6", log)]
    assert trained == list(range(int(resumed.group(1)) + 1, 7))  # nothing before the checkpoint is trained again
    assert run_state(s3, run_id)[1]["epochs"] == 6


def wait_job(bed, sid: str, timeout: float = 900) -> str:
    deadline = time.monotonic() + timeout
    while (status := bed.job_status(sid)) not in ENDED:
        assert time.monotonic() < deadline, bed.job_logs(sid)[-3000:]
        time.sleep(1)
    return status


def wait_log(bed, sid: str, until, what: str, timeout: float = 300) -> str:
    deadline = time.monotonic() + timeout
    while not until(logs := bed.job_logs(sid)):
        assert bed.job_status(sid) not in ENDED, f"the job ended before {what}:\n{logs[-4000:]}"
        assert time.monotonic() < deadline, f"no {what} in {timeout}s:\n{logs[-4000:]}"
        time.sleep(0.5)
    return logs


# ---- a worker host cut off and MLflow stopped, mid-stage ---------------------------------------------------------


STEP = re.compile(r"\[stage 1\] epoch \d+/\d+ step (\d+) ")


def stepped_after(marker: str):
    return lambda logs: (at := logs.rfind(marker)) >= 0 and STEP.search(logs, at) is not None


def test_a_worker_host_cut_off_mid_stage_and_back_with_mlflow_down_meanwhile(bed, full_run, s3, tracking):
    """An elastic stage of [1, 2] workers, one on each worker host: ray-worker-2 gets a preemption notice (`ray
    drain-node`) and the stage checkpoints for it and leaves that host; MLflow stops; the host's link goes down (it
    drops off the network) and the stage goes on; the link comes back (Ray declared the node dead: its `ray start`
    exits and compose's restart policy starts it again) and MLflow too. Counts equal an uninterrupted run's; every
    epoch's metrics reach MLflow once it is back.

    On these 2-CPU hosts the stage does not shrink to 1 worker: the workers (0.5 CPU) both fit ray-worker-1, and
    a layout where they would not (1.5 CPU) leaves Ray Data no whole CPU beside Ray Train's reservation of the
    maximum workers, which orchestration/cluster/resources.py refuses (BENCHMARKS.md, elastic resize). A shrink to 1 and
    growth back are measured by benchmarks/elastic.py."""
    epochs = 14
    settings = {
        "train.num_workers": "[1,2]",
        "train.placement": "spread",
        "train.cpus_per_worker": 0.5,
        "train.worker_start_timeout_s": 20,
        "train.checkpoint_every_steps": 3,
        "train.resize_check_s": 3,
        "train.preemption_check_steps": 1,
        "train.log_every": 1,
        "stage1.niter": epochs,
        "stage1.niter_decay": 0,
    }
    run_id = f"elastic-{uuid.uuid4().hex[:4]}"
    sets = [arg for k, v in settings.items() for arg in ("--set", f"{k}={v}")]
    sid = submission_id(
        bed.submit([*printed_command_of(full_run), "--run-id", run_id, "--stages", "1", *sets], wait=False).stdout
    )
    wait_log(bed, sid, lambda logs: "[stage 1] epoch 2/" in logs, "a second epoch")
    job_id = bed.api(f"/api/jobs/{sid}")["job_id"]

    def trainers() -> list[str]:
        hosts = bed.host_of_node()
        actors = bed.state("actors", class_name="RayTrainWorker", state="ALIVE")
        return sorted(hosts.get(a["node_id"], "?") for a in actors if a["job_id"] == job_id)

    assert trainers() == ["ray-worker-1", "ray-worker-2"]
    node = next(n for n in bed.state("nodes") if n["node_ip"] == bed.address("ray-worker-2") and n["state"] == "ALIVE")
    drain = f"ray drain-node --address ray-head:6379 --node-id {node['node_id']} --reason DRAIN_NODE_REASON_PREEMPTION"
    r = bed.run(
        "client",
        [*drain.split(), "--reason-message", "spot reclaim (test)", "--deadline-remaining-seconds=60"],
        timeout=60,
    )
    assert r.returncode == 0, r.stderr[-2000:]
    logs = wait_log(bed, sid, stepped_after("draining: checkpointed at step"), "a checkpoint for the notice", 120)
    drained_at = logs.rfind("draining: checkpointed at step")
    try:
        bed.stop("mlflow")
        bed.cut("ray-worker-2")
        cut_at = len(bed.job_logs(sid))

        def restarted_and_stepped(logs: str) -> bool:
            """The worker group began again from a checkpoint since the notice (before or after the cut: Ray may
            act on the drain or on the dead link), and a step was logged after the cut. Lines logged before the
            cut can arrive after it, so a step alone says nothing of where the workers are."""
            at = logs.find("resuming from its checkpoint", drained_at)
            return at >= 0 and STEP.search(logs, max(at, cut_at)) is not None

        wait_log(bed, sid, restarted_and_stepped, "a step of the group begun again with the host cut off")
        deadline = time.monotonic() + 120  # the old group's actors end (the cut host's once its node is declared dead)
        while (where := trainers()) != ["ray-worker-1", "ray-worker-1"]:  # the stage left the host that had notice
            assert time.monotonic() < deadline, where
            time.sleep(1)
    finally:  # whatever happened, the bed's host and MLflow come back for the tests after this one
        bed.restore("ray-worker-2")
        if bed.services["mlflow"].stopped:
            bed.start("mlflow")
    assert wait_job(bed, sid) == "SUCCEEDED", bed.job_logs(sid)[-4000:]
    deadline = time.monotonic() + 120  # the host's Ray node back (restarted by the restart policy)
    while not any(n["node_ip"] == bed.address("ray-worker-2") and n["state"] == "ALIVE" for n in bed.state("nodes")):
        assert time.monotonic() < deadline, "ray-worker-2 did not rejoin the cluster"
        time.sleep(2)
    logs = bed.job_logs(sid)
    assert "training continues, records are queued and retried" in logs and "reachable again" in logs
    done = run_state(s3, run_id)[1]
    samples = json.loads(s3.get_object(Bucket=BUCKET, Key="data/train/manifest.json")["Body"].read())["sample_count"]
    steps = samples // 8  # global batch 8 at either size
    assert (done["epochs"], done["global_step"]) == (epochs, epochs * steps)
    c = mlflow_client(tracking)
    runs = c.search_runs([experiment_id(tracking)], f"tags.`p2p.run_id` = '{run_id}'")
    assert {r.data.tags["p2p.stage"]: r.info.status for r in runs} == {"parent": "FINISHED", "1": "FINISHED"}
    stage = next(r for r in runs if r.data.tags["p2p.stage"] == "1")
    assert sorted({m.step for m in c.get_metric_history(stage.info.run_id, "val_L1")}) == [
        steps * e for e in range(1, epochs + 1)
    ]


def test_no_secret_reached_a_ray_log_or_mlflow_and_every_run_ended(bed, tracking, s3):
    c = mlflow_client(tracking)
    runs = c.search_runs([experiment_id(tracking)], max_results=1000)
    assert runs and not [r.info.run_name for r in runs if r.info.status == "RUNNING"]
    leaked = []
    for host in ("ray-head", *WORKER_HOSTS, "client"):
        for f in bed.host_tmp(host).rglob("*"):
            if f.is_file() and not f.is_symlink():
                try:
                    if BED_SECRET.encode() in f.read_bytes():
                        leaked.append(str(f))
                except OSError:
                    pass
    assert not leaked, leaked
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=BUCKET):
        for obj in page.get("Contents", []):
            assert BED_SECRET.encode() not in s3.get_object(Bucket=BUCKET, Key=obj["Key"])["Body"].read(), obj["Key"]
    for run in runs:
        assert BED_SECRET not in json.dumps({**run.data.params, **run.data.tags})
