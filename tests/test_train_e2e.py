"""The service as users run it on a real cluster: two `ray start` nodes of 1 CPU each on 127.0.0.1 (own ports and
temp dirs), data, checkpoints and MLflow artifacts in moto's S3 server, `mlflow server`, and `ray job submit` of
jobs.train and jobs.sweep. The nodes hold an S3 secret in their environment that must appear in no file Ray
writes and nowhere in MLflow."""

import json
import re
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import boto3
import psutil
import pytest
import torch

from data.shards import PrepareOptions, prepare
from data.synthetic.write import write_city
from orchestration import checkpoint
from tests.services import make_bucket, mlflow_server, ray_cluster, s3_environment, submit_job, submit_with_client

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[1]
SECRET = f"p2p-secret-{uuid.uuid4().hex}"
MODEL = "pix2pixhd-synthetic-city"


@pytest.fixture(scope="module")
def cluster(s3):
    env = {**s3_environment(s3), "AWS_SECRET_ACCESS_KEY": SECRET}  # moto takes any key; the nodes hold this one
    with ray_cluster(Path(tempfile.mkdtemp(prefix="ray", dir="/tmp")), env, head_cpus=1, worker_cpus=[1]) as c:
        yield c


@pytest.fixture(scope="module")
def tracking(s3, tmp_path_factory):
    make_bucket(s3, "tracking")
    with mlflow_server(tmp_path_factory.mktemp("mlflow"), s3, "tracking") as url:
        yield url


@pytest.fixture(scope="module")
def data(s3, tmp_path_factory):
    make_bucket(s3, "e2e")
    src = write_city(tmp_path_factory.mktemp("city") / "src", count=40, height=64, width=128)
    prepare(
        PrepareOptions("flat", str(src), "s3://e2e/data", val_fraction=0.1, name="synthetic-city"), log=lambda m: None
    )
    return "s3://e2e/data"


def train_cmd(data, run_id, *extra):
    fixed = f"--config configs/tiny.yaml --data {data} --storage s3://e2e/runs --num-workers 2"
    return ["python", "-m", "jobs.train", *fixed.split(), "--run-id", run_id, *extra]


@pytest.fixture(scope="module")
def full_run(cluster, data, tracking):
    r = submit_job(cluster.dashboard, REPO, train_cmd(data, "full", "--tracking-uri", tracking))
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-4000:]
    return r.stdout


def run_state(run_id):
    body = boto3.client("s3").get_object(Bucket="e2e", Key=f"runs/{run_id}/run.json")["Body"].read()
    return {int(k): v for k, v in json.loads(body)["stages"].items()}


def fetch(uri, tmp_path, name):
    return checkpoint.fetch(uri, tmp_path / name)


def test_the_three_stages_ran_in_order(full_run):
    ends = [full_run.index(f"[stage {k}] finished") for k in (1, 2, 3)]
    assert ends == sorted(ends)
    frozen = re.findall(r"\[stage (\d)\] epoch \d+/\d+ .*\(G1 frozen\)", full_run)
    assert frozen and set(frozen) == {"2"}
    assert "stage 1 -> 2: loaded" in full_run and "stage 2 -> 3: loaded" in full_run
    assert SECRET not in full_run


def test_the_job_log_holds_the_projects_lines_not_rays_routine_chatter(full_run):
    for chatter in (
        "Reporting training result",
        "Wrapping provided model",
        "Started training worker group",
        "Attempting to start training worker group",
        "Checkpoint successfully created",
        "View run",
        "execution finished in",
        "Requesting resources",
    ):
        assert chatter not in full_run, chatter
    lines = [line for line in full_run.splitlines() if line.strip()]
    ours = [line for line in lines if re.search(r"\[stage \d\]|^run |^registered |^registry|^tracking:", line)]
    assert len(ours) >= 12  # stage headers, epochs, hand-overs, registration
    print(f"job log: {len(lines)} lines, {len(ours)} of them the project's")


def test_stage2_trained_only_the_enhancer_and_stage3_trained_g1(full_run, tmp_path):
    state = run_state("full")
    s1, s2, s3 = (fetch(state[k]["checkpoint"], tmp_path, f"s{k}") for k in (1, 2, 3))
    g1 = {k: v for k, v in s1["G"].items() if not k.startswith("model.28") and not k.startswith("model.27")}
    global_part = {k: v for k, v in s2["G"].items() if k.startswith("model.")}
    assert global_part.keys() <= g1.keys()
    assert all(torch.equal(global_part[k], g1[k]) for k in global_part), "stage 2 changed G1 while frozen"
    enhancer = [k for k in s2["G"] if k.startswith("model1_")]
    assert enhancer and any(not torch.equal(s2["G"][k], s3["G"][k]) for k in enhancer)
    assert any(not torch.equal(s3["G"][k], s2["G"][k]) for k in global_part), "stage 3 did not train G1"
    # Adam in stage 2 stepped exactly the enhancer's parameters
    n_global = len([k for k in s2["G"] if k.startswith("model.") and k.endswith(("weight", "bias"))])
    stepped = s2["opt_G"]["state"]
    assert len(stepped) == len(s2["G"]) - n_global
    assert s3["epoch"] == state[3]["epochs"] == 2


def test_final_checkpoints_and_images_are_in_the_bucket(full_run):
    keys = [o["Key"] for o in boto3.client("s3").list_objects_v2(Bucket="e2e", Prefix="runs/full/")["Contents"]]
    for k in (1, 2, 3):
        assert any(re.match(rf"runs/full/stage{k}/checkpoint_[^/]+/state.pt$", key) for key in keys)
        assert any(re.match(rf"runs/full/stage{k}/checkpoint_[^/]+/meta.json$", key) for key in keys)
        assert any(re.match(rf"runs/full/stage{k}/images/epoch_\d+.png$", key) for key in keys)
    assert "runs/full/run.json" in keys


def test_resubmitting_a_finished_run_does_no_training(full_run, cluster, data):
    r = submit_job(cluster.dashboard, REPO, train_cmd(data, "full", "--no-tracking"))
    assert r.returncode == 0, r.stdout[-3000:]
    assert r.stdout.count("already finished in run full") == 3
    assert not re.search(r"\[stage \d\] epoch \d", r.stdout)


def test_a_cluster_job_without_a_tracking_uri_is_refused(cluster, data):
    r = submit_job(cluster.dashboard, REPO, train_cmd(data, "untracked"))
    assert r.returncode != 0
    assert "train: error: no MLflow tracking URI, and this job runs on a Ray cluster" in r.stdout
    assert '{"env_vars": {"MLFLOW_TRACKING_URI"' in r.stdout


ENDED = ("FAILED", "SUCCEEDED", "STOPPED")


def job_in_stage1_epoch2(cluster, cmd, name):
    """Submit `cmd` without waiting; return (client, job id) once stage 1 has finished epoch 2 (checkpointed)."""
    from ray.job_submission import JobSubmissionClient

    client = JobSubmissionClient(cluster.dashboard)
    job = submit_with_client(
        client,
        entrypoint=" ".join(cmd),
        runtime_env={"working_dir": str(REPO)},
        submission_id=f"{name}-{uuid.uuid4().hex[:6]}",
    )
    deadline = time.monotonic() + 300
    while "[stage 1] epoch 2/" not in client.get_job_logs(job):
        assert str(client.get_job_status(job)) not in ENDED, client.get_job_logs(job)[-3000:]
        assert time.monotonic() < deadline
        time.sleep(0.5)
    return client, job


def wait_job_end(client, job, timeout=600):
    deadline = time.monotonic() + timeout
    while str(client.get_job_status(job)) not in ENDED:
        assert time.monotonic() < deadline
        time.sleep(0.5)
    return str(client.get_job_status(job))


def test_killed_worker_resumes_without_losing_or_repeating_epochs(full_run, cluster, data):
    state = run_state("full")
    steps_per_epoch = state[1]["global_step"] // state[1]["epochs"]
    epochs = 6
    cmd = train_cmd(data, "fault", "--stages", "1", "--set", f"stage1.niter={epochs - 1}", "--no-tracking")
    client, job = job_in_stage1_epoch2(cluster, cmd, "fault")
    workers = [p for p in psutil.process_iter(["cmdline"]) if "RayTrainWorker" in " ".join(p.info["cmdline"] or [])]
    assert workers, "no Ray Train worker process found"
    workers[-1].kill()
    status = wait_job_end(client, job)
    logs = client.get_job_logs(job)
    assert status == "SUCCEEDED", logs[-4000:]
    assert "resuming from its checkpoint" in logs
    done = run_state("fault")[1]
    assert done["epochs"] == epochs
    assert done["global_step"] == epochs * steps_per_epoch


def test_a_stopped_job_ends_its_mlflow_runs_killed_and_resubmitted_resumes(full_run, cluster, data, tracking):
    state = run_state("full")
    steps_per_epoch = state[1]["global_step"] // state[1]["epochs"]
    cmd = train_cmd(data, "resume", "--stages", "1", "--set", "stage1.niter=5", "--tracking-uri", tracking)
    client, job = job_in_stage1_epoch2(cluster, cmd, "resume")
    client.stop_job(job)
    wait_job_end(client, job)
    runs = mlflow_client(tracking).search_runs([experiment_id(tracking)], "tags.`p2p.run_id` = 'resume'")
    assert {r.data.tags["p2p.stage"]: r.info.status for r in runs} == {"parent": "KILLED", "1": "KILLED"}
    r = submit_job(cluster.dashboard, REPO, [*cmd[:-2], "--no-tracking"])
    assert r.returncode == 0, r.stdout[-4000:]
    # it resumes from the latest checkpoint Ray had registered (epoch 1 or 2: registration is asynchronous)
    resumed = re.search(r"resuming from its checkpoint: epoch (\d+), step (\d+)", r.stdout)
    assert resumed and int(resumed.group(1)) >= 1
    first = int(resumed.group(1))
    assert int(resumed.group(2)) == first * steps_per_epoch
    trained = [int(e) for e in re.findall(r"\[stage 1\] epoch (\d+)/6", r.stdout)]
    assert trained == list(range(first + 1, 7))  # nothing before the checkpoint is trained again
    done = run_state("resume")[1]
    assert (done["epochs"], done["global_step"]) == (6, 6 * steps_per_epoch)


# ---- MLflow tracking and the model registry ------------------------------------------------------------


def mlflow_client(tracking):
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=tracking, registry_uri=tracking)


def experiment_id(tracking):
    return mlflow_client(tracking).get_experiment_by_name("pix2pixhd-synthetic-city").experiment_id


def test_mlflow_has_the_parent_and_three_nested_stage_runs(full_run, tracking):
    c = mlflow_client(tracking)
    runs = c.search_runs([experiment_id(tracking)], "tags.`p2p.run_id` = 'full'")
    parent = [r for r in runs if r.data.tags["p2p.stage"] == "parent"]
    stages = sorted((r for r in runs if r.data.tags["p2p.stage"] != "parent"), key=lambda r: r.data.tags["p2p.stage"])
    assert len(parent) == 1 and [r.data.tags["p2p.stage"] for r in stages] == ["1", "2", "3"]
    assert parent[0].info.status == "FINISHED"
    assert all(r.data.tags["mlflow.parentRunId"] == parent[0].info.run_id for r in stages)
    assert parent[0].data.params["model.label_nc"] == "35" and parent[0].data.params["stage2.niter_fix_global"] == "2"
    for r in stages:
        assert r.info.status == "FINISHED"
        assert {
            "G_GAN",
            "G_GAN_Feat",
            "G_VGG",
            "D_real",
            "D_fake",
            "lr",
            "img_per_s",
            "data_wait",
            "val_L1",
            "workers",
        } <= set(r.data.metrics)
        assert r.data.tags["checkpoint"].startswith(f"s3://e2e/runs/full/stage{r.data.tags['p2p.stage']}/checkpoint_")
        images = [a.path for a in c.list_artifacts(r.info.run_id, "images")]
        assert images and all(p.endswith(".png") for p in images)
    history = c.get_metric_history(stages[0].info.run_id, "val_L1")
    assert len(history) == 3  # one per epoch of stage 1


def test_the_generator_is_registered_once_with_tags_and_the_champion_alias(full_run, tracking):
    c = mlflow_client(tracking)
    versions = [v for v in c.search_model_versions(f"name = '{MODEL}'") if v.tags.get("run_id") == "full"]
    assert len(versions) == 1
    v = c.get_model_version_by_alias(MODEL, "champion")
    assert v.version == versions[0].version and v.tags["checkpoint"] == run_state("full")[3]["checkpoint"]
    assert v.tags["run_id"] == "full" and len(v.tags["config_hash"]) == 16
    assert len(v.tags["data_manifest_sha256"]) == 64 and float(v.tags["val_L1"]) > 0


def test_infer_pulls_the_champion_in_a_fresh_process(full_run, tracking, tmp_path):
    import numpy as np
    from PIL import Image

    src = write_city(tmp_path / "src", count=2, height=64, width=128, workers=1)
    infer = (
        f"jobs.infer --model models:/{MODEL}@champion --labels {src}/train_label --instances {src}/train_inst "
        f"--out {tmp_path}/out --tracking-uri {tracking}"
    )
    r = subprocess.run(
        [sys.executable, "-m", *infer.split()],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    outs = sorted((tmp_path / "out").glob("*_synthesized.png"))
    assert len(outs) == 2
    assert all(np.asarray(Image.open(p)).shape == (64, 128, 3) for p in outs)


def test_jobs_serve_deploys_the_champion_on_the_cluster_and_renders(full_run, cluster, tracking):
    """`ray job submit -- python -m jobs.serve`: the job returns once the application runs on the cluster; POST
    /render answers a PNG from the champion named in X-Model-Version; `serve shutdown` frees the CPUs again."""
    import base64
    import urllib.request

    import numpy as np

    from serving.maps import encode_ids
    from tests.services import free_port, job_env

    port = free_port()
    serve = f"python -m jobs.serve --model models:/{MODEL}@champion --tracking-uri {tracking} --port {port}"
    r = submit_job(cluster.dashboard, REPO, [*serve.split(), "--cpus", "0.3", "--proxy-location", "HeadOnly"])
    try:
        assert r.returncode == 0 and f"serving models:/{MODEL}@champion at http://127.0.0.1:{port}/" in r.stdout, (
            r.stdout[-3000:] + r.stderr[-2000:]
        )
        label = np.full((64, 128), 7)
        label[40:56, 20:60] = 26
        body = json.dumps({"label": base64.b64encode(encode_ids(label)).decode()}).encode()
        with urllib.request.urlopen(urllib.request.Request(f"http://127.0.0.1:{port}/render", data=body)) as answer:
            png, version = answer.read(), answer.headers["X-Model-Version"]
        champion = mlflow_client(tracking).get_model_version_by_alias(MODEL, "champion").version
        assert version == f"{MODEL}/{champion}" and png.startswith(b"\x89PNG")
    finally:
        serve_bin = str(Path(sys.executable).with_name("serve"))
        subprocess.run(
            [serve_bin, "shutdown", "-y", "--address", cluster.dashboard],
            env=job_env(cluster.dashboard),
            capture_output=True,
            timeout=120,
        )


def test_a_worse_run_does_not_take_the_alias(full_run, cluster, data, tracking):
    c = mlflow_client(tracking)
    champion = c.get_model_version_by_alias(MODEL, "champion")
    # stage 3 again from the full run's stage 2, with a learning rate that wrecks the generator
    r = submit_job(
        cluster.dashboard,
        REPO,
        train_cmd(
            data, "worse", "--stages", "3", "--from-run", "full", "--set", "stage3.lr=0.05", "--tracking-uri", tracking
        ),
    )
    assert r.returncode == 0, r.stdout[-3000:]
    worse = [v for v in c.search_model_versions(f"name = '{MODEL}'") if v.tags.get("run_id") == "worse"]
    assert len(worse) == 1 and float(worse[0].tags["val_L1"]) > float(champion.tags["val_L1"])
    assert c.get_model_version_by_alias(MODEL, "champion").version == champion.version
    assert f"alias 'champion' kept on version {champion.version}" in r.stdout


def test_a_failed_registration_fails_the_job_and_jobs_register_retries_it(full_run, cluster, data, s3, tmp_path):
    # a second MLflow server whose artifact store (a bucket) does not exist yet: every model upload fails
    with mlflow_server(tmp_path, s3, "late-artifacts") as broken:
        r = submit_job(
            cluster.dashboard,
            REPO,
            train_cmd(data, "unregistered", "--stages", "3", "--from-run", "full", "--tracking-uri", broken),
        )
        assert r.returncode != 0 and "Job entrypoint command failed with exit code 3" in r.stdout, r.stdout[-4000:]
        assert "train: error: training finished but registering run 'unregistered' failed 2 times" in r.stdout
        assert "Traceback (most recent call last)" in r.stdout  # the full cause, not its first line
        assert "python -m jobs.register --run unregistered --storage s3://e2e/runs" in r.stdout
        c = mlflow_client(broken)
        assert not c.search_registered_models() or not c.search_model_versions(f"name = '{MODEL}'")
        make_bucket(s3, "late-artifacts")
        for _ in range(2):  # the second run finds the version by its checkpoint and registers nothing new
            register = f"python -m jobs.register --run unregistered --storage s3://e2e/runs --tracking-uri {broken}"
            again = submit_job(cluster.dashboard, REPO, register.split())
            assert again.returncode == 0, again.stdout[-4000:]
        assert "already holds" in again.stdout
        versions = c.search_model_versions(f"name = '{MODEL}'")
        assert len(versions) == 1 and versions[0].tags["run_id"] == "unregistered"
        runs = c.search_runs([c.get_experiment_by_name("pix2pixhd-synthetic-city").experiment_id])
        assert runs and all(run.info.status != "RUNNING" for run in runs)


@pytest.fixture(scope="module")
def segmenter(full_run, cluster, data, tracking):
    """jobs.train_segmenter on the cluster: a small U-Net on the real photos, registered as version 1. (Late in the
    module: from here on, runs of this dataset are judged by seg-score, the earlier tests' by val_L1.)"""
    seg = "jobs.train_segmenter --config configs/tiny.yaml --storage s3://e2e/runs --set train.num_workers=1"
    small = "--set segmenter.epochs=8 --set segmenter.width=12 --set segmenter.depth=3 --set segmenter.lr=0.003"
    cmd = ["python", "-m", *f"{seg} {small}".split(), "--data", data, "--tracking-uri", tracking]
    r = submit_job(cluster.dashboard, REPO, cmd)
    assert r.returncode == 0, r.stdout[-4000:]
    return r.stdout


def test_the_segmenter_trains_on_the_cluster_and_is_registered_without_pickle(segmenter, tracking):
    assert "[segmenter] epoch 8/8" in segmenter and "segmenter: models:/segmenter-synthetic-city/1" in segmenter
    c = mlflow_client(tracking)
    version = c.get_model_version("segmenter-synthetic-city", "1")
    assert 0 < float(version.tags["val_miou"]) <= 1 and len(version.tags["sha256"]) == 64
    assert sorted(a.path for a in c.list_artifacts(version.run_id, "segmenter")) == [
        "segmenter/class_map.yaml",
        "segmenter/segmenter.pt",
    ]


def test_evaluate_compares_two_models_by_seg_score_with_a_report_and_mlflow_runs(segmenter, cluster, data, tracking):
    c = mlflow_client(tracking)
    evaluate = (
        f"jobs.evaluate --model models:/{MODEL}@champion --model worse --storage s3://e2e/runs --out s3://e2e/eval"
    )
    r = submit_job(
        cluster.dashboard, REPO, ["python", "-m", *evaluate.split(), "--data", data, "--tracking-uri", tracking]
    )
    assert r.returncode == 0, r.stdout[-4000:]
    champion = c.get_model_version_by_alias(MODEL, "champion")
    assert "seg-score by models:/segmenter-synthetic-city/1" in r.stdout  # the registered one, by default
    assert re.search(r"evaluate: (\d+)/\1 images", r.stdout)  # progress, to the whole split
    rows = [line for line in r.stdout.splitlines() if line.startswith("| ")]
    assert [row.split(" | ")[0] for row in rows[1:]] == [
        "| real photos",
        f"| {MODEL} v{champion.version}",
        "| worse (stage 3)",
    ]
    s3 = boto3.client("s3")
    report = json.loads(s3.get_object(Bucket="e2e", Key="eval/metrics.json")["Body"].read())
    val_count = json.loads(s3.get_object(Bucket="e2e", Key="data/val/manifest.json")["Body"].read())["sample_count"]
    for name in (f"{MODEL} v{champion.version}", "worse (stage 3)"):
        m = report["metrics"][name]
        assert 0 <= m["seg_miou"] <= 1 and m["seg_miou_ratio"] > 0 and m["l1"] > 0 and m["images"] == val_count
        assert set(report["per_class_iou"][name]) == set(report["per_class_iou"]["real photos"])
    for png in ("grid.png", "per_class_iou.png"):
        assert s3.get_object(Bucket="e2e", Key=f"eval/{png}")["Body"].read()[:4] == b"\x89PNG"
    # an evaluation run under each model's training run; the registry version carries the scores as tags
    parent = c.search_runs([experiment_id(tracking)], "tags.`p2p.run_id` = 'worse' and tags.`p2p.stage` = 'parent'")[0]
    (evaluation,) = c.search_runs(
        [experiment_id(tracking)],
        f"tags.`mlflow.parentRunId` = '{parent.info.run_id}' and tags.`p2p.kind` = 'evaluation'",
    )
    assert evaluation.data.metrics["seg_miou"] == pytest.approx(report["metrics"]["worse (stage 3)"]["seg_miou"])
    assert evaluation.data.params["segmenter"].startswith("models:/segmenter-synthetic-city/1")
    tags = c.get_model_version(MODEL, champion.version).tags
    assert float(tags["eval.val.seg_miou"]) == pytest.approx(
        report["metrics"][f"{MODEL} v{champion.version}"]["seg_miou"], rel=1e-4
    )


def gaussian_blur(images: torch.Tensor, sigma: float) -> torch.Tensor:
    radius = int(3 * sigma)
    x = torch.arange(-radius, radius + 1, dtype=torch.float32)
    k = torch.exp(-(x**2) / (2 * sigma**2))
    k = (k / k.sum()).repeat(3, 1, 1, 1)
    images = torch.nn.functional.pad(images, (radius,) * 4, mode="reflect")
    images = torch.nn.functional.conv2d(images, k.view(3, 1, 1, -1), groups=3)
    return torch.nn.functional.conv2d(images, k.view(3, 1, -1, 1), groups=3)


def test_why_not_l1_a_blurred_photo_beats_the_generator_on_l1_yet_loses_on_seg_score_and_kid(segmenter, data, tracking):
    """The service does not select by L1: on held-out photos, a blurred copy (Gaussian, sigma 3 px) is closer to
    the photo in L1 than the trained generator's image, yet the segmenter finds less of the scene in it than in
    the photo, and its KID to the real training photos is higher than the photos' own."""
    from data.labels import CITYSCAPES
    from data.pipeline import PipelineConfig, read_samples
    from data.transforms import Geometry
    from evaluation.fid import FeatureDistance, to_uint8
    from evaluation.segscore import SegScore
    from orchestration.config import Config
    from orchestration.registry import load_generator
    from orchestration.segmenter_registry import resolve_segmenter
    from tests.test_evaluation_metrics import TinyFeatures

    pcfg = PipelineConfig(geometry=Geometry("none", 1, 16, 16, True), instance_output="ids")
    held_out, train = read_samples(data, "val", pcfg, 64), read_samples(data, "train", pcfg, 64)
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

    print(
        f"L1 blurred {l1(blurred):.4f} generated {l1(generated):.4f}; seg mIoU photos {seg_miou(photos):.3f} blurred "
        f"{seg_miou(blurred):.3f} generated {seg_miou(generated):.3f}; KID photos {kid(photos):.4f} blurred {kid(blurred):.4f}"
    )
    assert l1(blurred) < l1(generated)
    assert seg_miou(blurred) < seg_miou(photos)
    assert kid(blurred) > kid(photos)


def test_a_three_trial_sweep_judged_by_seg_score_on_one_cpu_nodes_completes_and_leaks_nothing(
    segmenter, cluster, data, tracking
):
    """After the segmenter is registered: trials are ranked (and ASHA stops them) by seg-score, not val_L1."""
    sweep = (
        f"python -m jobs.sweep --config configs/tiny.yaml --num-samples 3 --data {data} --storage s3://e2e/runs "
        f"--tracking-uri {tracking} --name s3sweep"
    )
    r = submit_job(cluster.dashboard, REPO, sweep.split())
    assert r.returncode == 0, r.stdout[-4000:]
    assert "sweep s3sweep: 3 trials (0 errored)" in r.stdout
    assert "sweep.lambda_vgg=[1.0, 30.0] is not swept: the VGG loss is off" in r.stdout
    assert "train it with python -m jobs.train --config s3://e2e/runs/sweeps/s3sweep/best.yaml" in r.stdout
    assert "generators are judged by val_seg_miou (max) by models:/segmenter-synthetic-city/1" in r.stdout
    c = mlflow_client(tracking)
    runs = c.search_runs([experiment_id(tracking)], "tags.`p2p.sweep` = 's3sweep'")
    parent = [x for x in runs if x.data.tags.get("p2p.stage") == "parent"]
    trials = [x for x in runs if x.data.tags.get("mlflow.parentRunId") == parent[0].info.run_id]
    assert len(parent) == 1 and len(trials) == 3
    assert {x.info.status for x in runs} == {"FINISHED"}
    import ray

    with ray.init(address=cluster.gcs_address, log_to_driver=False):
        leaked = [pg for pg in ray.util.placement_group_table().values() if pg["state"] != "REMOVED"]
    assert not leaked, leaked
    # the best config, read from the storage it was written to, is what jobs.train --config takes
    from orchestration.config import load_config

    best = load_config("s3://e2e/runs/sweeps/s3sweep/best.yaml")
    chosen = max(trials, key=lambda t: t.data.metrics["val_seg_miou"])  # each trial's last reported value
    assert best.model.lambda_feat == pytest.approx(float(chosen.data.params["lambda_feat"]))
    by_l1 = min(trials, key=lambda t: t.data.metrics["val_L1"])
    if by_l1.info.run_id != chosen.info.run_id:  # they disagree: the header says which metric chose
        assert f"val_seg_miou={chosen.data.metrics['val_seg_miou']:.4f}" in r.stdout
    # --resume on the same name restores the Tune experiment from storage instead of starting new trials
    again = submit_job(cluster.dashboard, REPO, [*sweep.split(), "--resume"])
    assert again.returncode == 0, again.stdout[-4000:]
    assert "sweep s3sweep: resuming from" in again.stdout and "sweep s3sweep: 3 trials" in again.stdout
    assert len(c.search_runs([experiment_id(tracking)], "tags.`p2p.sweep` = 's3sweep'")) == 4  # no new trial runs


def test_every_mlflow_run_ended_and_no_secret_reached_a_ray_log_or_mlflow(full_run, cluster, tracking, s3):
    c = mlflow_client(tracking)
    runs = c.search_runs([experiment_id(tracking)], max_results=1000)
    assert runs and not [r.info.run_name for r in runs if r.info.status == "RUNNING"]
    leaked = []
    for f in Path(cluster.tmp_dir).rglob("*"):
        if f.is_file() and not f.is_symlink():
            try:
                if SECRET.encode() in f.read_bytes():
                    leaked.append(str(f))
            except OSError:
                pass
    assert not leaked, leaked
    for bucket in ("tracking", "e2e"):
        s3c = boto3.client("s3")
        for page in s3c.get_paginator("list_objects_v2").paginate(Bucket=bucket):
            for obj in page.get("Contents", []):
                assert SECRET.encode() not in s3c.get_object(Bucket=bucket, Key=obj["Key"])["Body"].read(), obj["Key"]
    for run in runs:
        assert SECRET not in json.dumps({**run.data.params, **run.data.tags})
