"""Which stage failures Ray Train retries: worker faults, yes; bad input, no.

Ray Train restarts the worker group after any worker error, up to `FailureConfig.max_failures` times, each time
from the latest checkpoint. That is right for a dead node or a killed process. An error that comes from the
input — a shard whose bytes are not what prepare_data wrote or that is gone, a damaged checkpoint, a config a
worker refuses, storage that refuses writes (full, read-only) — fails the same way on every restart: retrying it
only costs minutes and hides the message. `Trainer` is Ray's TorchTrainer with a failure policy that raises such
errors at once; the driver turns them into `InputError`, which the jobs report in one line (`train: error: ...`,
exit 2).

The policy is handed to Ray Train's controller through `_initialize_and_run_controller`, a private method of
Ray 2.60's DataParallelTrainer: tests/test_failure_policy.py fails if a Ray upgrade changes that route.
"""

from __future__ import annotations

from ray.train.torch import TorchTrainer
from ray.train.v2._internal.execution.failure_handling import DefaultFailurePolicy
from ray.train.v2._internal.execution.failure_handling.failure_policy import FailureDecision

from orchestration.run.config import ConfigError
from orchestration.run.input_errors import INPUT_ERRORS


class InputError(ConfigError):
    """A stage failed because of its input; the message is the worker's, naming the file and the fix."""


def input_error(error: BaseException) -> BaseException | None:
    """The input error behind a failed fit(), if that is what failed (worker errors are wrapped by Ray Train)."""
    failures = getattr(error, "worker_failures", None) or {}
    for failure in failures.values():
        base = getattr(failure, "_base_exc", failure)
        if isinstance(base, INPUT_ERRORS):
            return base
    return None


class InputAwareFailurePolicy(DefaultFailurePolicy):
    def make_decision(self, training_failed_error) -> FailureDecision:
        if input_error(training_failed_error) is not None:
            return FailureDecision.RAISE
        return super().make_decision(training_failed_error)


class Trainer(TorchTrainer):
    """TorchTrainer whose controller does not retry input errors (see the module's docstring)."""

    def _initialize_and_run_controller(self, **controller_init_kwargs):
        controller_init_kwargs["failure_policy"] = InputAwareFailurePolicy(self.run_config.failure_config)
        return super()._initialize_and_run_controller(**controller_init_kwargs)


def fit(trainer: Trainer, what: str):
    """trainer.fit(), with an input error raised as InputError naming `what` failed."""
    try:
        return trainer.fit()
    except Exception as e:
        cause = input_error(e)
        if cause is None:
            raise
        raise InputError(f"{what} stopped, not retried: {cause}") from None
