"""A 2-trial Tune sweep on 2 CPUs: both trials in MLflow under the sweep's run; the best config is one that
jobs.train takes (the cluster test trains nothing from it either: loading checks every key)."""

import subprocess
import sys

import pytest
import yaml
from mlflow import MlflowClient

from data.shards import PrepareOptions, prepare
from data.synthetic.write import write_city

pytestmark = pytest.mark.slow


def python_m(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", *args], capture_output=True, text=True, timeout=600)


def test_two_trial_sweep_logs_both_and_writes_a_best_config_jobs_train_takes(tmp_path):
    src = write_city(tmp_path / "src", count=24, height=64, width=128)
    data = str(tmp_path / "data")
    prepare(PrepareOptions("flat", str(src), data, val_fraction=0.15), log=lambda m: None)
    tracking = f"sqlite:///{tmp_path}/mlflow.db"
    best = tmp_path / "best.yaml"
    sweep = (
        f"jobs.sweep --config configs/tiny.yaml --num-samples 2 --data {data} --storage {tmp_path}/runs "
        f"--tracking-uri {tracking} --out {best} --name t"
    ).split()
    r = python_m(*sweep)
    assert r.returncode == 0, (r.stdout + r.stderr)[-4000:]
    assert "sweep t: 2 trials (0 errored)" in r.stdout

    c = MlflowClient(tracking_uri=tracking)
    exp = c.get_experiment_by_name("pix2pixhd-synthetic-city")
    runs = c.search_runs([exp.experiment_id], "tags.`p2p.sweep` = 't'")
    parent = [x for x in runs if x.data.tags.get("p2p.stage") == "parent"]
    trials = [x for x in runs if x.data.tags.get("mlflow.parentRunId") == parent[0].info.run_id]
    assert len(parent) == 1 and len(trials) == 2
    assert all("val_L1" in t.data.metrics and "lambda_feat" in t.data.params for t in trials)
    sampled = {float(t.data.params["lambda_feat"]) for t in trials}
    assert len(sampled) == 2 and all(1.0 <= v <= 30.0 for v in sampled)

    # --resume on the same name restores the Tune experiment instead of starting new trials
    again = python_m(*sweep, "--resume")
    assert again.returncode == 0, (again.stdout + again.stderr)[-4000:]
    assert "sweep t: resuming from" in again.stdout and "sweep t: 2 trials" in again.stdout

    chosen = yaml.safe_load(best.read_text())
    assert chosen["model"]["lambda_feat"] in sampled
    best_trial = min(trials, key=lambda t: t.data.metrics["val_L1"])
    assert chosen["model"]["lambda_feat"] == pytest.approx(float(best_trial.data.params["lambda_feat"]))
    # it is a whole configuration that jobs.train --config takes (every key checked as when a job starts)
    from orchestration.config import load_config

    assert load_config(str(best)).model.lambda_feat == pytest.approx(chosen["model"]["lambda_feat"])


def test_tune_does_not_copy_credentials_into_trial_runtime_envs(monkeypatch):
    from ray.tune.execution.class_cache import _ActorClassCache

    from orchestration.sweep import keep_credentials_out_of_runtime_envs

    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "shh")

    class Trainable:
        pass

    def runtime_env():
        return _ActorClassCache().get(Trainable)._default_options["runtime_env"]["env_vars"]

    assert runtime_env()["AWS_SECRET_ACCESS_KEY"] == "shh"  # what Ray Tune does on its own: into every node's log
    keep_credentials_out_of_runtime_envs()
    assert "AWS_SECRET_ACCESS_KEY" not in runtime_env()
