"""pix2pixHD's `resize_or_crop` geometry, applied identically to label (nearest), instances (nearest) and
image (bicubic).

The geometry is split in two:
- `load_geometry` (deterministic: resizes) runs in Ray Data's CPU workers on decoded arrays;
- `random_crop_flip` (the random part: crop offset, horizontal flip) runs in the Train worker on the batch,
  with draws keyed by (seed, epoch, sample index). Ray Data re-executes the same pipeline every epoch and its
  functions cannot see the epoch, so drawing there would repeat the same crop and flip every epoch.

Modes (the official code's): `resize_and_crop` (resize to load_size^2, random fine_size^2 crop), `scale_width`
(width to load_size, aspect kept), `scale_width_and_crop` (then a random fine_size^2 crop), `crop` (random
fine_size^2 crop of the original), `none`. Sizes of non-cropping modes are rounded to a multiple of
`size_multiple` (the generator's 2^downsamplings).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

MODES = ("resize_and_crop", "scale_width", "scale_width_and_crop", "crop", "none")


@dataclass(frozen=True)
class Geometry:
    resize_or_crop: str = "scale_width"
    load_size: int = 1024
    fine_size: int = 512
    size_multiple: int = 16
    no_flip: bool = False

    def __post_init__(self) -> None:
        if self.resize_or_crop not in MODES:
            raise ValueError(f"resize_or_crop={self.resize_or_crop!r} is not one of {', '.join(MODES)}")
        if self.crops and self.fine_size % self.size_multiple:
            raise ValueError(f"fine_size={self.fine_size} must be a multiple of {self.size_multiple} (the generator's)")

    @property
    def crops(self) -> bool:
        return "crop" in self.resize_or_crop

    def load_size_of(self, h: int, w: int) -> tuple[int, int]:
        """(H, W) after the deterministic part."""
        mode = self.resize_or_crop
        if mode == "resize_and_crop":
            h, w = self.load_size, self.load_size
        elif mode in ("scale_width", "scale_width_and_crop"):
            h, w = int(self.load_size * h / w), self.load_size
        if not self.crops:
            m = self.size_multiple
            h, w = max(m, int(round(h / m) * m)), max(m, int(round(w / m) * m))
        elif min(h, w) < self.fine_size:
            raise ValueError(f"{mode}: the loaded size {w}x{h} is smaller than fine_size {self.fine_size}")
        return h, w


def _resize(a: np.ndarray, hw: tuple[int, int], resample) -> np.ndarray:
    if a.shape[:2] == hw:
        return a
    return np.asarray(Image.fromarray(a).resize((hw[1], hw[0]), resample))  # int32 ids: PIL mode "I"


def load_geometry(g: Geometry, label: np.ndarray, inst: np.ndarray | None, image: np.ndarray):
    hw = g.load_size_of(*label.shape)
    label = _resize(label, hw, Image.NEAREST)
    inst = _resize(inst, hw, Image.NEAREST) if inst is not None else None
    image = _resize(image, hw, Image.BICUBIC)
    return label, inst, image


def edges_of(inst: np.ndarray) -> np.ndarray:
    """1 where a 4-neighbour has another instance id (the same map the model computes from ids)."""
    e = np.zeros(inst.shape, bool)
    dx = inst[..., :, 1:] != inst[..., :, :-1]
    dy = inst[..., 1:, :] != inst[..., :-1, :]
    e[..., :, 1:] |= dx
    e[..., :, :-1] |= dx
    e[..., 1:, :] |= dy
    e[..., :-1, :] |= dy
    return e.astype(np.uint8)


def random_crop_flip(
    g: Geometry, batch: dict[str, torch.Tensor], seed: int, epoch: int, train: bool = True
) -> dict[str, torch.Tensor]:
    """Crop (crop modes) and flip each sample; spatial tensors are (B, H, W) or (B, C, H, W).

    Training: offsets and flips drawn from a generator seeded by (seed, epoch, sample index), so a sample gets
    the same augmentation whichever worker reads it. Validation: centre crop, no flip.
    """
    spatial = {k: v for k, v in batch.items() if k != "index"}
    h, w = next(iter(spatial.values())).shape[-2:]
    out: dict[str, list[torch.Tensor]] = {k: [] for k in spatial}
    for i, index in enumerate(batch["index"].tolist()):
        if train:
            gen = torch.Generator().manual_seed(((seed * 1_000_003 + epoch) * 1_000_033 + index) % 2**62)
            y = int(torch.randint(h - g.fine_size + 1, (), generator=gen)) if g.crops else 0
            x = int(torch.randint(w - g.fine_size + 1, (), generator=gen)) if g.crops else 0
            flip = (not g.no_flip) and bool(torch.rand((), generator=gen) < 0.5)
        else:
            y, x = ((h - g.fine_size) // 2, (w - g.fine_size) // 2) if g.crops else (0, 0)
            flip = False
        for k, v in spatial.items():
            t = v[i]
            if g.crops:
                t = t[..., y : y + g.fine_size, x : x + g.fine_size]
            if flip:
                t = t.flip(-1)
            out[k].append(t)
    result = {k: torch.stack(v) for k, v in out.items()}
    result["index"] = batch["index"]
    return result
