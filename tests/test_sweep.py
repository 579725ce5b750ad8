"""Sweeps: Ray Tune must not copy the driver's credentials into trial runtime envs (every node's log prints them).
The sweep itself, with --resume, runs on the test bed of tests/test_cluster.py."""

import pytest


def test_tune_does_not_copy_credentials_into_trial_runtime_envs(monkeypatch):
    from ray.tune.execution.class_cache import _ActorClassCache

    from orchestration.training.sweep import keep_credentials_out_of_runtime_envs

    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "shh")

    class Trainable:
        pass

    def runtime_env():
        return _ActorClassCache().get(Trainable)._default_options["runtime_env"]["env_vars"]

    assert runtime_env()["AWS_SECRET_ACCESS_KEY"] == "shh"  # what Ray Tune does on its own: into every node's log
    keep_credentials_out_of_runtime_envs()
    assert "AWS_SECRET_ACCESS_KEY" not in runtime_env()


def test_a_swept_lr_reaches_the_stage_even_when_the_stage_sets_its_own():
    """stageK.lr overrides model.lr: a sampled lr written to model.lr alone trained every trial at the stage's lr."""
    from orchestration.run.config import load_config
    from orchestration.training.sweep import trial_config

    own = load_config("configs/tiny.yaml", ["stage1.lr=0.001", "sweep.stage=1"])
    assert trial_config(own, {"lr": 3e-5}).stage_model(1).lr == 3e-5
    plain = load_config("configs/tiny.yaml", ["sweep.stage=1"])
    assert trial_config(plain, {"lr": 3e-5}).stage_model(1).lr == 3e-5
    assert trial_config(plain, {"lambda_feat": 2.0}).stage_model(1).lr == load_config("configs/tiny.yaml").model.lr


def test_a_swept_l1_weight_is_in_the_space_and_reaches_the_trial():
    from orchestration.run.config import ConfigError, load_config
    from orchestration.training.sweep import search_space, trial_config

    cfg = load_config("configs/tiny.yaml", ["sweep.lambda_l1=[3, 100]"])
    space = search_space(cfg)
    assert (space["lambda_l1"].lower, space["lambda_l1"].upper) == (3, 100)
    assert "lambda_l1" not in search_space(load_config("configs/tiny.yaml"))  # not swept unless given
    assert trial_config(cfg, {"lambda_l1": 20.0}).stage_model(1).lambda_l1 == 20.0
    with pytest.raises(ConfigError, match=r"sweep\.lambda_l1=\[0\.0, 10\.0\]: give a range"):
        load_config("configs/tiny.yaml", ["sweep.lambda_l1=[0, 10]"])
