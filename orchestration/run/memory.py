"""Will each stage fit the GPU? Peak memory per Train worker, estimated on the CPU before any GPU is rented.

    python -m jobs.train --config configs/cityscapes_1024p.yaml --data URI --estimate-memory 12

For each stage: its networks (stage_model), its batch per worker and its training size (the dataset's largest
resolution from the manifest through the stage's resize_or_crop geometry), the precision a GPU gets
(`train.precision`, auto = bf16) and `train.activation_checkpointing`; then `model.memory.step_peak`. The VGG loss
is measured with random weights when `vgg_weights` is set (its cost does not depend on them).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from functools import partial

import torch

from model.inputs import synthetic_batch
from model.memory import step_peak
from model.step import TrainStep, resolve_compile, resolve_precision
from model.vgg import random_weights_file
from orchestration.run.config import Config

CUDA_CONTEXT_GIB = 1.0  # CUDA context, cuDNN workspaces and allocator slack on top of the tensors counted


@dataclass(frozen=True)
class StageMemory:
    stage: int
    batch: int
    height: int
    width: int
    precision: str
    checkpointing: bool
    peak_gib: float
    compiled: bool = False  # train.compile on a GPU: the estimate is for the eager step


def training_size(cfg: Config, k: int, resolution: dict) -> tuple[int, int]:
    """The (H, W) stage k trains at, for the manifest's `resolution` (uniform, or min/max: the largest)."""
    h, w = (resolution["height"], resolution["width"]) if "height" in resolution else tuple(resolution["max"])
    g = cfg.stage_geometry(k)
    return (g.fine_size, g.fine_size) if g.crops else g.load_size_of(h, w)


def estimate(cfg: Config, stages: list[int], resolution: dict) -> list[StageMemory]:
    precision = "bf16" if resolve_precision(cfg.train.precision, torch.device("cuda")) else "fp32"
    ckpt = cfg.train.activation_checkpointing
    compiled = resolve_compile(cfg.train.compile, torch.device("cuda")) is not None
    rows = []
    for k in stages:
        opt = cfg.stage_model(k)
        if opt.vgg_enabled:
            opt = dataclasses.replace(opt, vgg_weights=random_weights_file())
        size, batch = training_size(cfg, k, resolution), cfg.stage_batch_size(k)
        peak = step_peak(
            partial(TrainStep, opt, "cpu", precision=precision, activation_checkpointing=ckpt),
            partial(synthetic_batch, opt, batch),
            size,
            opt.size_multiple,
        )
        rows.append(StageMemory(k, batch, size[0], size[1], precision, ckpt, peak.peak_gib, compiled))
    return rows


def report(rows: list[StageMemory], gpu_gib: float) -> tuple[str, bool]:
    """A table, whether every stage fits a `gpu_gib` card, and what to change where one does not."""
    budget = gpu_gib - CUDA_CONTEXT_GIB
    lines = [f"{'stage':>5} {'batch':>5} {'size':>10} {'precision':<9} {'checkpointing':<13} {'peak GiB':>8}  fits"]
    fits = True
    for r in rows:
        ok = r.peak_gib <= budget
        fits &= ok
        lines.append(
            f"{r.stage:>5} {r.batch:>5} {f'{r.width}x{r.height}':>10} {r.precision:<9} "
            f"{'on' if r.checkpointing else 'off':<13} {r.peak_gib:>8.2f}  {'yes' if ok else 'NO'}"
        )
    lines.append(
        f"(tensors per worker, estimated on the CPU; a {gpu_gib:g} GiB card leaves {budget:g} GiB for them "
        f"after {CUDA_CONTEXT_GIB:g} GiB of CUDA context and allocator slack)"
    )
    if any(r.compiled and r.checkpointing for r in rows):
        lines.append(
            "these are the eager step's figures; compiled (train.compile) with checkpointing, the local G "
            "peaked 8% below eager on a CPU, not yet measured on a GPU (BENCHMARKS.md)"
        )
    if not fits:
        advice = []
        if not rows[0].checkpointing:
            advice.append(
                "--set train.activation_checkpointing=true (at 2048x1024 about a third less memory "
                "for about a quarter more compute)"
            )
        if rows[0].precision == "fp32":
            advice.append("--set train.precision=bf16")
        advice.append("a smaller per-stage batch_size with more workers")
        lines.append("does not fit; try: " + "; ".join(advice))
    return "\n".join(lines), fits
