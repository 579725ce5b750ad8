"""A short single-process CPU training of the global generator on procedural street scenes.

What `make demo` runs until the Ray curriculum lands: it shows the model learning label -> photo and ends
with a PNG grid (label | generated | real) of held-out scenes.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from data.labels import CITYSCAPES
from data.synthetic.city import street_scene
from model.inference import generate
from model.options import ModelOptions
from model.step import TrainStep
from orchestration.visuals import comparison_rows, grid, save_png


@dataclass
class DemoSettings:
    out_dir: str = "outputs/demo"
    train_samples: int = 64
    heldout_samples: int = 4
    height: int = 64
    width: int = 128
    batch_size: int = 4
    epochs: int = 40
    seed: int = 0


def scenes_to_tensors(n: int, height: int, width: int, seed: int) -> dict[str, torch.Tensor]:
    scenes = [street_scene(height, width, seed + i) for i in range(n)]
    return {
        "label": torch.from_numpy(np.stack([s.label for s in scenes])),
        "inst": torch.from_numpy(np.stack([s.inst.astype(np.int64) for s in scenes])),
        "image": torch.from_numpy(np.stack([s.image for s in scenes])).permute(0, 3, 1, 2).float() / 127.5 - 1,
    }


def run(settings: DemoSettings) -> Path:
    torch.manual_seed(settings.seed)
    opt = ModelOptions(
        label_nc=CITYSCAPES.label_nc,
        ngf=16,
        n_downsample_global=3,
        n_blocks_global=3,
        ndf=16,
        num_D=2,
        lr=4e-4,
        niter=settings.epochs // 2,
        niter_decay=settings.epochs - settings.epochs // 2,
    )
    print(
        f"generating {settings.train_samples}+{settings.heldout_samples} street scenes at {settings.height}x{settings.width}"
    )
    train = scenes_to_tensors(settings.train_samples, settings.height, settings.width, settings.seed)
    heldout = scenes_to_tensors(settings.heldout_samples, settings.height, settings.width, settings.seed + 10_000)
    step = TrainStep(opt, seed=settings.seed)
    g_params = sum(p.numel() for p in step.G.parameters())
    d_params = sum(p.numel() for p in step.D.parameters())
    print(f"G1 {g_params / 1e6:.2f} M parameters, D {d_params / 1e6:.2f} M; batch {settings.batch_size}, CPU")

    n = settings.train_samples
    start = time.perf_counter()
    for epoch in range(settings.epochs):
        lr = step.set_epoch(epoch)
        t0 = time.perf_counter()
        order = torch.randperm(n)
        sums: dict[str, float] = {}
        batches = 0
        for i in range(0, n - settings.batch_size + 1, settings.batch_size):
            idx = order[i : i + settings.batch_size]
            losses = step.step({k: v[idx] for k, v in train.items()})
            for k, v in losses.items():
                sums[k] = sums.get(k, 0.0) + v.item()
            batches += 1
        took = time.perf_counter() - t0
        eta = (time.perf_counter() - start) / (epoch + 1) * (settings.epochs - epoch - 1)
        shown = " ".join(f"{k}={v / batches:.3f}" for k, v in sums.items())
        print(
            f"epoch {epoch + 1}/{settings.epochs} {shown} lr={lr:.2e} "
            f"{batches * settings.batch_size / took:.1f} img/s eta {eta:.0f}s",
            flush=True,
        )

    fake = generate(step.G, opt, heldout["label"], inst=heldout["inst"])
    path = Path(settings.out_dir) / "demo.png"
    save_png(grid(comparison_rows(CITYSCAPES, heldout["label"], fake, heldout["image"])), path)
    l1 = (fake - heldout["image"]).abs().mean().item()
    print(f"held-out L1 (generated vs real, [-1,1] scale): {l1:.3f}")
    print(f"wrote {path.resolve()}  (columns: label | generated | real)")
    return path
