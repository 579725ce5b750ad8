"""Helpers several test modules share: a prepared procedural dataset, a VGG19 weights file of the torchvision
format (random weights: nothing downloads)."""

from __future__ import annotations

import base64
from pathlib import Path

import numpy as np
import torch

from data.shards import PrepareOptions, prepare
from data.synthetic.write import write_city
from model.vgg import VGG19Features
from serving.maps import encode_ids


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


def png64(ids: np.ndarray) -> str:
    """A map of ids as the editor's API takes it: a PNG, base64."""
    return base64.b64encode(encode_ids(ids)).decode()


def street(h: int = 64, w: int = 128) -> tuple[np.ndarray, np.ndarray]:
    """Label and instance maps of a street: sky over road, one car (instance 26001)."""
    label = np.full((h, w), 23)  # sky
    label[h // 2 :] = 7  # road
    inst = label.copy()
    label[h // 2 + 4 : h // 2 + 20, w // 4 : w // 4 + 32] = 26
    inst[label == 26] = 26001
    return label, inst


def write_fake_vgg19(path, seed=0):
    torch.manual_seed(seed)
    state = {f"features.{k}": v for k, v in VGG19Features().features.state_dict().items()}
    state["classifier.0.weight"] = torch.zeros(4, 4)  # torchvision files carry the classifier too
    torch.save(state, path)
    return state
