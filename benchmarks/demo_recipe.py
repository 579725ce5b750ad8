"""Where the demo's quality goes: its three stages trained in this process (one TrainStep, the demo's global batch,
no Ray), each stage's generator scored by seg-score on the held-out scenes after it, per-stage wall time.

    python -m benchmarks.demo_recipe --name base                                  # the demo's recipe as it is
    python -m benchmarks.demo_recipe --name ema --set model.ema_beta=0.99 --set stage1.niter=8

Reads the scenes and the seg-score segmenter a `make demo` left (outputs/demo/data, the registered
segmenter-synthetic-city). The same networks, losses, lr schedule and stage hand-over as the Ray Train stages
(orchestration/training/worker.py); what differs: one process with all the CPU threads instead of two DDP workers
(same global batch), horizontal flips only. It ranks recipes quickly; `make demo` measures the chosen one. Each
run appends one JSON line to outputs/demo_recipe.jsonl.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import tempfile
import time
from pathlib import Path

import torch

from data.layouts import label_set
from data.pipeline import iter_local_batches
from data.shards import load_manifest
from model.step import TrainStep
from orchestration.judging.evaluate import EvalPlan, evaluate
from orchestration.records.segmenter_registry import resolve_segmenter
from orchestration.records.tracking import resolve_tracking_uri
from orchestration.run import checkpoint
from orchestration.run.config import load_config, pipeline_config
from orchestration.services.demo import DemoSettings


def stage_batches(data_uri: str, cfg, k: int) -> list[dict]:
    pcfg = dataclasses.replace(pipeline_config(cfg, k), batch_size=cfg.global_batch(k))
    return list(iter_local_batches(data_uri, cfg.data.train_split, pcfg))


def train_stage(cfg, k: int, batches: list[dict], previous: dict | None, seed: int) -> tuple[TrainStep, float]:
    step = TrainStep(cfg.stage_model(k), seed=seed, precision=cfg.train.precision)
    if previous is not None:
        print(checkpoint.init_from_previous_stage(step, previous, k))
    g = torch.Generator().manual_seed(seed + k)
    t0 = time.perf_counter()
    stage = cfg.stage(k)
    for epoch in range(stage.epochs):
        step.set_trainable("local" if k == 2 and epoch < stage.niter_fix_global else "all")
        step.train(True)
        step.set_epoch(epoch)
        for i in torch.randperm(len(batches), generator=g).tolist():
            b = dict(batches[i])
            if torch.rand((), generator=g) < 0.5:
                b = {n: v.flip(-1) if v.dim() >= 3 else v for n, v in b.items()}
            step.step(b)
    return step, time.perf_counter() - t0


def seg_score(cfg, step: TrainStep, k: int, data_uri: str, networks, tmp: Path, report: Path) -> dict:
    """Stage k's seg-score; the evaluation's report (grid.png, per_class_iou.png, metrics.json) kept in `report`."""
    ckpt = checkpoint.save(tmp / f"stage{k}", step, stage=k, epoch=0, global_step=0, lr=0.0, config=cfg.to_dict())
    half = cfg.stage1.load_size if k == 1 else None
    plan = EvalPlan([str(ckpt)], data_uri, cfg.data.val_split, out=str(report), load_size=half, networks=networks)
    scored = evaluate(plan, lambda *a: None)
    real, model = list(scored["results"].values())
    per_class = list(scored["per_class_iou"].values())[1]
    return {
        "seg": model["seg_miou"],
        "real": real["seg_miou"],
        "ratio": model["seg_miou_ratio"],
        "per_class": {name: round(v, 3) for name, v in per_class.items()},
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--name", required=True)
    p.add_argument("--data", default="outputs/demo/data")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--stages", type=int, nargs="+", default=[1, 2, 3])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="outputs/demo_recipe.jsonl")
    p.add_argument("--stage1-from", help="start from the stage-1 state another run saved (outputs/demo_recipe/NAME)")
    a = p.parse_args()
    torch.set_num_threads(2)
    demo = DemoSettings()
    cfg = load_config(demo.config, [*demo.overrides, *a.set])
    labels = label_set(load_manifest(a.data, cfg.data.val_split)["layout"])
    segmenter = resolve_segmenter("models:/segmenter-synthetic-city/1", cfg, labels, resolve_tracking_uri())
    row: dict = {"name": a.name, "set": a.set}
    previous = None
    with tempfile.TemporaryDirectory() as tmp:
        saved = Path(a.out).with_suffix("")
        saved.mkdir(parents=True, exist_ok=True)
        for k in a.stages:
            if k == 1 and a.stage1_from:
                previous = torch.load(saved / f"{a.stage1_from}.stage1.pt", weights_only=True)
                row["stage1"] = {"from": a.stage1_from}
                continue
            step, took = train_stage(cfg, k, stage_batches(a.data, cfg, k), previous, a.seed)
            row[f"stage{k}"] = {
                "seconds": round(took, 1),
                **seg_score(cfg, step, k, a.data, (segmenter, None), Path(tmp), saved / f"{a.name}.stage{k}"),
            }
            print(json.dumps(row[f"stage{k}"]), flush=True)
            previous = step.state_dict()
            torch.save(previous, saved / f"{a.name}.stage{k}.pt")
    with open(a.out, "a") as f:
        f.write(json.dumps(row) + "\n")
    print(json.dumps(row))


if __name__ == "__main__":
    main()
