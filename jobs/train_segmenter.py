"""Train the seg-score segmenter on a dataset's real photos with Ray Train and register it in MLflow as
`segmenter-<dataset>` (what jobs.evaluate and the training's selection metric use by default).

    python -m jobs.train_segmenter --config configs/X.yaml [--data URI] [--storage URI] [--tracking-uri URI]
        [--no-tracking] [--run-id ID] [--set segmenter.epochs=40 ...]

The network and its schedule are the config's `segmenter:` section; workers, GPUs and CPUs its `train:` section.
Exit status: 0 trained (and registered); 2 bad input; 130 stopped.
"""

from __future__ import annotations

from jobs import cli
from orchestration.records.tracking import resolve_tracking_uri
from orchestration.run.config import ConfigError, load_config
from orchestration.run.stopping import finish
from orchestration.training.segmenter_training import SegmenterPlan, train

DEFAULT_STORAGE = "outputs/runs"


def main(argv: list[str] | None = None) -> int:
    p = cli.parser("train_segmenter", __doc__)
    p.add_argument("--config", required=True, help="YAML recipe (see configs/): its dataset, data and segmenter")
    p.add_argument("--data", help="prepared dataset URI (overrides data.uri)")
    p.add_argument("--storage", help="storage URI (overrides train.storage; default outputs/runs)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override, repeatable")
    cli.add_tracking(p, no_tracking="train and save, do not register")
    p.add_argument("--run-id", help="resume this earlier segmenter run (same settings); default: a new run")
    a = p.parse_args(argv)

    def body() -> None:
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
        if "registry" in result:
            print(f"segmenter: {result['registry']['uri']}")

    return cli.run("train_segmenter", body)


if __name__ == "__main__":
    finish(main())
