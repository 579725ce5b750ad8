"""Train pix2pixHD through its three-stage curriculum on Ray Train (what `ray job submit` runs).

    python -m jobs.train --config configs/X.yaml|s3://.../X.yaml [--data URI] [--storage URI] [--num-workers N]
        [--use-gpu] [--run-id ID] [--stages 1,2,3] [--from-run RUN_ID | --init-checkpoint URI] [--set key=value ...]
    python -m jobs.train --config configs/X.yaml --data URI --estimate-memory 12   # will it fit a 12 GiB GPU?

No cluster address (RAY_ADDRESS unset, not under `ray job submit`): a local Ray instance. No storage: outputs/runs.
Exit status (jobs/cli.py): 0 trained (and registered); 2 bad input, nothing trained or a stage stopped on bad input;
3 trained but not registered (`python -m jobs.register --run ID` retries); 130 stopped (`ray job stop`, Ctrl-C).
"""

from __future__ import annotations

import argparse

from data.shards import load_manifest
from jobs import cli
from orchestration.records.tracking import resolve_tracking_uri
from orchestration.run import memory
from orchestration.run.config import ConfigError, check_name, load_config
from orchestration.run.stopping import finish
from orchestration.training.curriculum import RunPlan, default_run_id, run

DEFAULT_STORAGE = "outputs/runs"


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = cli.parser("train", __doc__)
    p.add_argument("--config", required=True, help="YAML recipe (see configs/)")
    p.add_argument("--data", help="prepared dataset URI (overrides data.uri)")
    p.add_argument("--storage", help="run storage URI (overrides train.storage; default outputs/runs)")
    p.add_argument("--num-workers", type=int, help="Ray Train workers (overrides train.num_workers)")
    p.add_argument("--use-gpu", action="store_true", default=None, help="one GPU per worker")
    p.add_argument("--cpus-per-worker", type=float)
    p.add_argument("--run-id", help="resubmitting an id skips finished stages and resumes an unfinished one")
    p.add_argument("--stages", default="1,2,3", help="which stages to run, e.g. 2,3")
    p.add_argument("--from-run", help="take the checkpoint the first stage starts from out of this run")
    p.add_argument(
        "--init-checkpoint",
        metavar="URI",
        help="the checkpoint the first stage (2 or 3) starts from, e.g. an older one of the previous stage",
    )
    p.add_argument(
        "--take-over",
        action="store_true",
        help="take the run's lease from the job that holds it, once that job is dead (one job writes a run at a time)",
    )
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override, repeatable")
    cli.add_tracking(p, no_tracking="no MLflow tracking and no registration")
    p.add_argument("--no-register", action="store_true", help="track, but do not register the final generator")
    p.add_argument(
        "--estimate-memory",
        type=float,
        metavar="GPU_GIB",
        help="estimate each stage's peak GPU memory per worker on the CPU, say whether it fits a card of "
        "GPU_GIB, and exit (1 when a stage does not fit); trains nothing",
    )
    return p.parse_args(argv)


def plan_from_args(a: argparse.Namespace) -> RunPlan:
    overrides = list(a.set)
    for flag, key in (
        ("num_workers", "train.num_workers"),
        ("use_gpu", "train.use_gpu"),
        ("cpus_per_worker", "train.cpus_per_worker"),
    ):
        if getattr(a, flag) is not None:
            overrides.append(f"{key}={getattr(a, flag)}".replace("=True", "=true"))
    cfg = load_config(a.config, overrides)
    for name, what in ((a.run_id, "--run-id"), (a.from_run, "--from-run")):
        if name is not None:
            check_name(name, what)
    data = a.data or cfg.data.uri
    if not data:
        raise ConfigError("no dataset: set data.uri in the config or pass --data URI (see jobs.prepare_data)")
    try:
        stages = [int(s) for s in a.stages.split(",") if s.strip()]
    except ValueError:
        raise ConfigError(f"--stages {a.stages!r}: expected comma-separated stage numbers, e.g. 2,3") from None
    return RunPlan(
        cfg=cfg,
        run_id=a.run_id or default_run_id(cfg),
        stages=stages,
        data_uri=data,
        storage_uri=a.storage or cfg.train.storage or DEFAULT_STORAGE,
        from_run=a.from_run,
        init_checkpoint=a.init_checkpoint,
        tracking_uri=None if a.no_tracking else resolve_tracking_uri(a.tracking_uri),
        register=not a.no_register,
        take_over=a.take_over,
    )


def estimate_memory(plan: RunPlan, gpu_gib: float) -> int:

    resolution = load_manifest(plan.data_uri, plan.cfg.data.train_split)["resolution"]
    print(f"estimating peak memory per worker for stages {plan.stages} on the CPU (a minute or two at 2048x1024)")
    text, fits = memory.report(memory.estimate(plan.cfg, plan.stages, resolution), gpu_gib)
    print(text)
    return 0 if fits else 1


def main(argv: list[str] | None = None) -> int:
    a = parse(argv)
    plan: RunPlan | None = None

    def body() -> int:
        nonlocal plan
        plan = plan_from_args(a)
        if a.estimate_memory is not None:
            return estimate_memory(plan, a.estimate_memory)
        results = run(plan)
        print(f"run {plan.run_id} done; final checkpoint {results.final['checkpoint']}")
        if results.registry:
            r = results.registry
            print(f"registered {r['name']} version {r['version']}: {r['uri']}")
        return 0

    def stopped() -> str:
        if plan is None:
            return ""
        runs = f"run {plan.run_id}'s MLflow runs end KILLED; " if plan.tracking_uri else ""
        return (
            f"; {runs}to resume run {plan.run_id} from its latest checkpoint, submit the same command again "
            f"(--run-id {plan.run_id})"
        )

    return cli.run("train", body, stopped=stopped, not_registered="training finished but ")


if __name__ == "__main__":
    finish(main())
