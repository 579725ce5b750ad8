"""orchestration/cluster/failures.py hands Ray Train's controller a failure policy that raises input errors at once, through
`_initialize_and_run_controller`, a private method of Ray 2.60's DataParallelTrainer. These tests fail if a Ray
upgrade changes that route (the method, the keyword it is given, the controller parameter it fills) or the policy's
decisions."""

import inspect

import pytest
from ray.train import FailureConfig
from ray.train.v2._internal.execution.controller.controller import TrainController
from ray.train.v2._internal.execution.failure_handling.failure_policy import FailureDecision
from ray.train.v2.api.data_parallel_trainer import DataParallelTrainer
from ray.train.v2.api.exceptions import WorkerGroupError

from data.shards import ManifestError
from data.storage import StorageRefused
from orchestration.cluster.failures import InputAwareFailurePolicy, InputError, Trainer, fit
from orchestration.run.checkpoint import CheckpointError
from orchestration.run.config import ConfigError


def test_the_private_route_the_policy_takes_is_still_there():
    method = DataParallelTrainer._initialize_and_run_controller
    kinds = [p.kind for p in inspect.signature(method).parameters.values()]
    assert inspect.Parameter.VAR_KEYWORD in kinds  # (self, **controller_init_kwargs)
    assert "failure_policy=" in inspect.getsource(DataParallelTrainer.fit)
    assert "failure_policy" in inspect.signature(TrainController.__init__).parameters


def test_the_trainer_gives_the_controller_the_input_aware_policy(monkeypatch):
    seen = {}

    def run(self, **kwargs):
        seen.update(kwargs)
        return "result"

    monkeypatch.setattr(DataParallelTrainer, "_initialize_and_run_controller", run)
    trainer = Trainer.__new__(Trainer)  # no Ray: only the override under test
    trainer.run_config = type("RunConfig", (), {"failure_config": FailureConfig(max_failures=3)})()
    assert trainer._initialize_and_run_controller(failure_policy="Ray's own", other=1) == "result"
    assert isinstance(seen["failure_policy"], InputAwareFailurePolicy) and seen["other"] == 1


@pytest.mark.parametrize(
    "error", [ManifestError("shard"), CheckpointError("ckpt"), ConfigError("cfg"), StorageRefused("full")]
)
def test_input_errors_are_raised_at_once_and_faults_retried(error):
    policy = InputAwareFailurePolicy(FailureConfig(max_failures=3))
    assert policy.make_decision(WorkerGroupError("input", {0: error})) == FailureDecision.RAISE
    fault = InputAwareFailurePolicy(FailureConfig(max_failures=3))
    assert fault.make_decision(WorkerGroupError("fault", {0: RuntimeError("node died")})) == FailureDecision.RETRY


def test_fit_names_the_stage_and_the_input_error():
    class Failing:
        def fit(self):
            raise WorkerGroupError("x", {1: ManifestError("URI/train/shard-00003.parquet is listed ... deleted")})

    with pytest.raises(InputError, match=r"^stage 2 stopped, not retried: URI/train/shard-00003.parquet is listed"):
        fit(Failing(), "stage 2")
