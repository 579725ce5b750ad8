"""Picture grids (colourised label | generated | real ...) as PNG: what a person looks at to judge a run."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from data.labels import LabelSet
from model.inference import to_uint8


def rgb_array(image: torch.Tensor) -> np.ndarray:
    """(3, H, W) in [-1, 1] -> (H, W, 3) uint8, as PIL and the image grids take it (model.inference.to_uint8)."""
    return to_uint8(image).cpu().permute(1, 2, 0).numpy()


def grid(rows: list[list[np.ndarray]], pad: int = 2) -> np.ndarray:
    """Rows of equally sized (H, W, 3) uint8 tiles -> one image with white gutters."""
    h, w = rows[0][0].shape[:2]
    ncol = max(len(r) for r in rows)
    out = np.full((len(rows) * (h + pad) + pad, ncol * (w + pad) + pad, 3), 255, np.uint8)
    for i, row in enumerate(rows):
        for j, tile in enumerate(row):
            y, x = pad + i * (h + pad), pad + j * (w + pad)
            out[y : y + h, x : x + w] = tile
    return out


def titled(image: np.ndarray, titles: list[str], tile_width: int, pad: int = 2, height: int = 14) -> np.ndarray:
    """`image` (a grid of columns `tile_width` wide) with a white strip of column titles above it."""
    from PIL import ImageDraw

    strip = Image.new("RGB", (image.shape[1], height), "white")
    draw = ImageDraw.Draw(strip)
    for j, title in enumerate(titles):
        x = pad + j * (tile_width + pad)
        text = title
        while text and draw.textlength(text) > tile_width:  # cut to the column
            text = text[:-1]
        draw.text((x, 1), text, fill="black")
    return np.concatenate([np.asarray(strip), image], axis=0)


def comparison_rows(labels: LabelSet, label: torch.Tensor, *images: torch.Tensor) -> list[list[np.ndarray]]:
    """One row per sample: colourised label, then each image batch's sample (e.g. generated, real)."""
    rows = []
    for i in range(label.shape[0]):
        lab = label[i].reshape(label.shape[-2:]).cpu().numpy()
        rows.append([labels.colorize(lab)] + [rgb_array(batch[i]) for batch in images])
    return rows


def save_png(array: np.ndarray, path: str | os.PathLike) -> Path:
    """Write atomically: a reader never sees a half-written PNG."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".png.tmp")
    os.close(fd)
    try:
        Image.fromarray(array).save(tmp, format="PNG")
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # as open() would create it (mkstemp's file is owner-only)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise
    return path
