"""Helpers several test modules share: a prepared procedural dataset, a VGG19 weights file of the torchvision
format (random weights: nothing downloads)."""

from __future__ import annotations

from pathlib import Path

import torch

from data.shards import PrepareOptions, prepare
from data.synthetic.write import write_city
from model.vgg import VGG19Features


def prepared_city(root: Path, count: int, height: int = 64, width: int = 128, **options) -> str:
    """`count` procedural street scenes written to root/src and prepared into root/data (PrepareOptions'
    keywords: val_fraction, name, shard_mb, ...); returns the data URI."""
    src = write_city(root / "src", count=count, height=height, width=width, workers=1)
    prepare(PrepareOptions("flat", str(src), str(root / "data"), **{"workers": 1, **options}), log=lambda m: None)
    return str(root / "data")


def untrained_checkpoint(where, cfg, stage: int, seed: int = 0, epoch: int = 1, lr: float = 1e-4) -> Path:
    """A checkpoint of `cfg`'s stage-`stage` networks as initialised from `seed`, saved as a stage's would be
    (global step = epoch)."""
    from model.step import TrainStep
    from orchestration.run import checkpoint

    step = TrainStep(cfg.stage_model(stage), seed=seed)
    return checkpoint.save(where, step, stage=stage, epoch=epoch, global_step=epoch, lr=lr, config=cfg.to_dict())


def write_fake_vgg19(path, seed=0):
    torch.manual_seed(seed)
    state = {f"features.{k}": v for k, v in VGG19Features().features.state_dict().items()}
    state["classifier.0.weight"] = torch.zeros(4, 4)  # torchvision files carry the classifier too
    torch.save(state, path)
    return state
