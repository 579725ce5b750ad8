"""Sweep the loss weights of one curriculum stage with Ray Tune (ASHA on the validation metric).

    python -m jobs.sweep --config configs/X.yaml|s3://.../X.yaml --num-samples N [--stage 1] [--from-run RUN_ID]
        [--resume] [--name NAME] [--data URI] [--storage URI] [--tracking-uri URI] [--out best.yaml] [--set k=v ...]

Ranges come from the config's `sweep` section (log-uniform lambda_feat, lambda_vgg; lambda_l1, lr and gan_mode
optional).
On a cluster, submit it like jobs.train (`ray job submit ... -- python -m jobs.sweep ...`) with storage and
tracking that the cluster reaches. The best trial's configuration is written as YAML into
{storage}/sweeps/{name}/best.yaml, which `python -m jobs.train --config` accepts as a storage URI.
Exit status: 0 done, 2 bad input, 130 stopped.
"""

from __future__ import annotations

from jobs import cli
from orchestration.records.tracking import resolve_tracking_uri
from orchestration.run.config import ConfigError, check_name, load_config
from orchestration.run.run_state import RunState, run_root
from orchestration.run.stopping import finish
from orchestration.training.sweep import SweepPlan, run_sweep


def main(argv: list[str] | None = None) -> int:
    p = cli.parser("sweep", __doc__)
    p.add_argument("--config", required=True)
    p.add_argument("--num-samples", type=int, help="trials (overrides sweep.num_samples)")
    p.add_argument("--stage", type=int, help="stage to sweep (overrides sweep.stage; default 1)")
    p.add_argument("--from-run", help="for stages 2 and 3: the run whose previous stage the trials start from")
    p.add_argument("--name", help="sweep name; reuse it with --resume (default: <config name>-sweep)")
    p.add_argument("--resume", action="store_true", help="continue an interrupted sweep of this name")
    p.add_argument("--data")
    p.add_argument("--storage")
    cli.add_tracking(p, no_tracking="no MLflow: trials are not tracked, no segmenter from the registry")
    p.add_argument("--out", help="also write the best config YAML to this local path")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    a = p.parse_args(argv)

    def body() -> None:
        overrides = list(a.set)
        if a.num_samples is not None:
            overrides.append(f"sweep.num_samples={a.num_samples}")
        if a.stage is not None:
            overrides.append(f"sweep.stage={a.stage}")
        cfg = load_config(a.config, overrides)
        name = check_name(a.name or f"{cfg.name}-sweep", "--name")
        data = a.data or cfg.data.uri
        if not data:
            raise ConfigError("no dataset: set data.uri or pass --data")
        storage_uri = a.storage or cfg.train.storage or "outputs/runs"
        init = None
        if cfg.sweep.stage > 1 and a.from_run:
            prev = RunState(run_root(storage_uri, a.from_run, "--from-run")).done(cfg.sweep.stage - 1)
            if prev is None:
                raise ConfigError(f"run '{a.from_run}' in {storage_uri} has no finished stage {cfg.sweep.stage - 1}")
            init = prev["checkpoint"]
        plan = SweepPlan(
            cfg=cfg,
            name=name,
            data_uri=data,
            storage_uri=storage_uri,
            tracking_uri=None if a.no_tracking else resolve_tracking_uri(a.tracking_uri),
            init_checkpoint=init,
            resume=a.resume,
            out=a.out,
        )
        run_sweep(plan)

    return cli.run("sweep", body, stopped=lambda: "; --resume --name NAME continues it")


if __name__ == "__main__":
    finish(main())
