"""The errors that come from a job's input (a file, a key, a shard, a checkpoint, storage that refuses writes): the
same on every try, so Ray Train's failure policy raises them at once (orchestration/cluster/failures.py) and the jobs answer
them in one line with exit 2 (jobs/cli.py). One list for both."""

from data.layouts import LayoutError
from data.shards import ManifestError
from data.storage import StorageRefused
from evaluation.segscore import EvaluationError
from orchestration.run.checkpoint import CheckpointError
from orchestration.run.config import ConfigError

INPUT_ERRORS = (ManifestError, CheckpointError, ConfigError, StorageRefused, LayoutError, EvaluationError)
