"""Train the seg-score segmenter on a dataset's real photos with Ray Train and register it in MLflow as
`segmenter-<dataset>` (what jobs.evaluate and the training's selection metric use by default).

    python -m jobs.train_segmenter --config configs/X.yaml [--data URI] [--storage URI] [--tracking-uri URI]
        [--no-tracking] [--run-id ID] [--set segmenter.epochs=40 ...]

The network and its schedule are the config's `segmenter:` section; workers, GPUs and CPUs its `train:` section.
Exit status: 0 trained (and registered); 2 bad input; 130 stopped.
"""

from __future__ import annotations

import argparse
import sys

from data.layouts import LayoutError
from data.shards import ManifestError
from data.storage import StorageError
from evaluation.segscore import EvaluationError
from orchestration.config import ConfigError, load_config
from orchestration.segmenter_training import SegmenterPlan, train
from orchestration.stopping import STOPPED_EXIT, finish, stop_on_sigterm, stop_reason
from orchestration.tracking import resolve_tracking_uri

DEFAULT_STORAGE = "outputs/runs"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m jobs.train_segmenter", description=__doc__.split("\n\n")[0])
    p.add_argument("--config", required=True, help="YAML recipe (see configs/): its dataset, data and segmenter")
    p.add_argument("--data", help="prepared dataset URI (overrides data.uri)")
    p.add_argument("--storage", help="storage URI (overrides train.storage; default outputs/runs)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override, repeatable")
    p.add_argument("--tracking-uri", help="MLflow server (default: MLFLOW_TRACKING_URI, else the local store)")
    p.add_argument("--no-tracking", action="store_true", help="train and save, do not register")
    p.add_argument("--run-id", help="resume this earlier segmenter run (same settings); default: a new run")
    a = p.parse_args(argv)
    stop_on_sigterm()
    try:
        cfg = load_config(a.config, a.set)
        data = a.data or cfg.data.uri
        if not data:
            raise ConfigError("no dataset: set data.uri in the config or pass --data URI (see jobs.prepare_data)")
        plan = SegmenterPlan(
            cfg,
            data,
            a.storage or cfg.train.storage or DEFAULT_STORAGE,
            None if a.no_tracking else resolve_tracking_uri(a.tracking_uri),
            a.run_id,
        )
        result = train(plan)
    except (ConfigError, ManifestError, StorageError, LayoutError, EvaluationError) as e:
        print(f"train_segmenter: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:
        print(f"train_segmenter: stopped ({stop_reason(e)})", file=sys.stderr)
        return STOPPED_EXIT
    if "registry" in result:
        print(f"segmenter: {result['registry']['uri']}")
    return 0


if __name__ == "__main__":
    finish(main())
