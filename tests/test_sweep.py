"""Sweeps: Ray Tune must not copy the driver's credentials into trial runtime envs (every node's log prints them).
The sweep itself, with --resume, runs on the test bed of tests/test_cluster.py."""


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
