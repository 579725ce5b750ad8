"""Per-step overhead of the Ray Train loop against calling the model's step directly on the same data.

    python -m benchmarks.train_overhead [--samples 96] [--epochs 3]

Both sides train stage 1 of configs/tiny.yaml (overridable with --set) on the same procedural shards:
  - direct: `TrainStep.step` in a loop over batches already in memory (no Ray, no data loading)
  - Ray Train: `jobs.train --stages 1` with one worker; the worker's last-epoch img/s and data-wait share
The overhead is the Ray step time over the direct step time, minus 1, with and without the data wait.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import torch

from data.pipeline import read_samples
from data.shards import PrepareOptions, prepare
from data.synthetic.write import write_city
from model.step import TrainStep
from orchestration.run.config import load_config, pipeline_config
from orchestration.training.curriculum import RunPlan, run


def direct_step_seconds(cfg, data_uri: str, steps: int) -> float:
    pcfg = pipeline_config(cfg, 1)
    bs = cfg.stage_batch_size(1)
    samples = read_samples(data_uri, cfg.data.train_split, pcfg, bs * 4)
    batches = [{k: v[i * bs : (i + 1) * bs] for k, v in samples.items()} for i in range(4)]
    torch.set_num_threads(max(1, int(cfg.train.cpus_per_worker)))
    step = TrainStep(cfg.stage_model(1), precision=cfg.train.precision, seed=cfg.train.seed)
    for b in batches:  # warm-up
        step.step(b)
    t0 = time.perf_counter()
    for i in range(steps):
        step.step(batches[i % len(batches)])
    return (time.perf_counter() - t0) / steps


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m benchmarks.train_overhead", description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default="configs/tiny.yaml")
    p.add_argument("--samples", type=int, default=96)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--set", action="append", default=[])
    a = p.parse_args(argv)
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    overrides = [
        "train.num_workers=1",
        "train.cpus_per_worker=1",
        "data.val_split=null",
        f"stage1.niter={a.epochs}",
        "stage1.niter_decay=0",
        *a.set,
    ]
    cfg = load_config(a.config, overrides)
    with tempfile.TemporaryDirectory() as tmp:
        src = write_city(Path(tmp) / "src", a.samples, 64, 128)
        data = str(Path(tmp) / "data")
        prepare(PrepareOptions("flat", str(src), data), log=lambda m: None)
        bs = cfg.stage_batch_size(1)
        steps_per_epoch = a.samples // bs
        direct = direct_step_seconds(cfg, data, steps_per_epoch)
        results = run(RunPlan(cfg, "overhead", [1], data, str(Path(tmp) / "runs")), log=lambda m: None)
    m = results.stages[1]["metrics"]
    ray_step = bs / m["img_per_s"]
    compute = ray_step * (1 - m["data_wait"])
    print(
        json.dumps(
            {
                "batch": bs,
                "steps_per_epoch": steps_per_epoch,
                "direct_ms": round(1000 * direct, 2),
                "ray_ms": round(1000 * ray_step, 2),
                "data_wait_share": round(m["data_wait"], 3),
            }
        )
    )
    print(
        f"direct step {1000 * direct:.1f} ms; Ray Train step {1000 * ray_step:.1f} ms "
        f"(data wait {100 * m['data_wait']:.0f}%): overhead {100 * (ray_step / direct - 1):+.1f}% with the data "
        f"wait, {100 * (compute / direct - 1):+.1f}% without"
    )


if __name__ == "__main__":
    main()
