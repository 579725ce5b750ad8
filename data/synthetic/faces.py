"""Procedural faces with CelebAMask-HQ's 19 part classes: per-part binary masks and a rendered portrait.

Parts are drawn as ellipses and bands in normalised coordinates; optional parts (glasses, hat, earrings,
necklace) appear at random. Skin, hair, eye, lip, cloth and background colours vary per face, so the photo is
not a function of the label alone. Deterministic per (seed, size).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from data.labels import CELEBAMASK_PARTS

PART = {name: i for i, name in enumerate(CELEBAMASK_PARTS)}


@dataclass
class Face:
    masks: dict[str, np.ndarray]  # part -> (h, w) bool at mask resolution
    label: np.ndarray  # (H, W) uint8 at image resolution (masks painted in order, upsampled)
    image: np.ndarray  # (H, W, 3) uint8


def _ellipse(yy, xx, cy, cx, ry, rx) -> np.ndarray:
    return ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 < 1


def face_masks(size: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    yy, xx = (np.mgrid[0:size, 0:size].astype(np.float32) + 0.5) / size
    cx, cy = 0.5 + rng.uniform(-0.04, 0.04), 0.47 + rng.uniform(-0.03, 0.03)
    fw, fh = rng.uniform(0.18, 0.23), rng.uniform(0.25, 0.3)
    eye_dx, eye_y = fw * 0.42, cy - fh * 0.12
    m: dict[str, np.ndarray] = {}
    m["skin"] = _ellipse(yy, xx, cy, cx, fh, fw)
    m["neck"] = (np.abs(xx - cx) < fw * 0.5) & (yy > cy + fh * 0.5) & (yy < 0.92) & ~m["skin"]
    m["cloth"] = (yy > 0.84) & _ellipse(yy, xx, 1.05, cx, 0.25, 0.48)
    for side, sign in (("l", -1), ("r", 1)):
        m[f"{side}_ear"] = _ellipse(yy, xx, cy, cx + sign * fw * 1.02, fh * 0.16, fw * 0.12)
        m[f"{side}_brow"] = _ellipse(yy, xx, eye_y - fh * 0.12, cx + sign * eye_dx, fh * 0.025, fw * 0.2)
        m[f"{side}_eye"] = _ellipse(yy, xx, eye_y, cx + sign * eye_dx, fh * 0.04, fw * 0.15)
    m["nose"] = _ellipse(yy, xx, cy + fh * 0.15, cx, fh * 0.16, fw * 0.1) & (yy > eye_y + fh * 0.05)
    mouth_y, mouth_w = cy + fh * 0.5, fw * rng.uniform(0.3, 0.45)
    lips = _ellipse(yy, xx, mouth_y, cx, fh * 0.08, mouth_w)
    opening = _ellipse(yy, xx, mouth_y, cx, fh * rng.uniform(0.01, 0.04), mouth_w * 0.8)
    m["u_lip"] = lips & (yy < mouth_y) & ~opening
    m["l_lip"] = lips & (yy >= mouth_y) & ~opening
    m["mouth"] = opening
    hair_len = rng.uniform(0.0, 0.45)
    m["hair"] = _ellipse(yy, xx, cy - fh * 0.25, cx, fh * 1.0, fw * 1.25) & (
        (yy < cy - fh * 0.55) | ((np.abs(xx - cx) > fw * 0.95) & (yy < cy + hair_len))
    )
    if rng.random() < 0.35:
        rings = [_ellipse(yy, xx, eye_y, cx + s * eye_dx, fh * 0.09, fw * 0.27) for s in (-1, 1)]
        bridge = (np.abs(yy - eye_y) < fh * 0.015) & (np.abs(xx - cx) < eye_dx)
        m["eye_g"] = rings[0] | rings[1] | bridge
    if rng.random() < 0.3:
        m["hat"] = _ellipse(yy, xx, cy - fh * 0.85, cx, fh * 0.45, fw * 1.35) & (yy < cy - fh * 0.55)
    if rng.random() < 0.3:
        for s in (-1, 1):
            ring = _ellipse(yy, xx, cy + fh * 0.2, cx + s * fw * 1.02, fh * 0.04, fw * 0.05)
            m["ear_r"] = m.get("ear_r", np.zeros_like(ring)) | ring
    if rng.random() < 0.3:
        arc = np.abs(_dist(yy, xx, cy + fh * 0.55, cx) - fh * 0.55) < 0.008
        m["neck_l"] = arc & (yy > cy + fh * 0.75) & (np.abs(xx - cx) < fw * 0.5)
        m["neck"] &= ~m["neck_l"]  # neck is painted after the necklace: keep the necklace visible
    return {k: v for k, v in m.items() if v.any()}


def _dist(yy, xx, cy, cx):
    return np.sqrt((yy - cy) ** 2 + (xx - cx) ** 2)


def compose(masks: dict[str, np.ndarray], shape: tuple[int, int]) -> np.ndarray:
    label = np.zeros(shape, np.uint8)
    for cls, part in enumerate(CELEBAMASK_PARTS):
        if part in masks:
            label[masks[part]] = cls
    return label


def face(size: int, seed: int, mask_scale: int = 2) -> Face:
    """A `size` x `size` portrait; masks at size // mask_scale like CelebAMask-HQ (1024 images, 512 masks)."""
    rng = np.random.default_rng(seed)
    msize = size // mask_scale
    masks = face_masks(msize, rng)
    label = compose(masks, (msize, msize)).repeat(mask_scale, 0).repeat(mask_scale, 1)

    tone = rng.uniform()
    skin = (1 - tone) * np.array([95, 60, 45]) + tone * np.array([245, 215, 190]) + rng.normal(0, 8, 3)
    palette = np.zeros((len(CELEBAMASK_PARTS), 3), np.float32)
    palette[PART["background"]] = rng.uniform(20, 235, 3)
    for p in ("skin", "nose", "l_ear", "r_ear", "neck"):
        palette[PART[p]] = skin
    palette[PART["nose"]] = skin * 0.93
    palette[PART["neck"]] = skin * 0.85
    palette[PART["hair"]] = rng.choice([[30, 20, 15], [90, 60, 30], [200, 170, 110], [140, 60, 30], [120, 120, 120]])
    for p in ("l_brow", "r_brow"):
        palette[PART[p]] = palette[PART["hair"]] * 0.8
    eye = rng.choice([[60, 40, 30], [60, 100, 140], [70, 110, 70]])
    for p in ("l_eye", "r_eye"):
        palette[PART[p]] = eye
    lips = rng.uniform([150, 60, 60], [220, 120, 120])
    palette[PART["u_lip"]], palette[PART["l_lip"]] = lips * 0.9, lips
    palette[PART["mouth"]] = [60, 20, 25]
    palette[PART["eye_g"]] = rng.uniform(0, 80, 3)
    palette[PART["hat"]] = rng.uniform(20, 235, 3)
    palette[PART["ear_r"]] = [230, 200, 80]
    palette[PART["neck_l"]] = [220, 220, 230]
    palette[PART["cloth"]] = rng.uniform(20, 235, 3)

    yy, xx = (np.mgrid[0:size, 0:size].astype(np.float32) + 0.5) / size
    light = 1.1 - 0.35 * np.clip(_dist(yy, xx, 0.35, rng.uniform(0.3, 0.7)), 0, 1)
    image = palette[label] * light[..., None]
    bg = label == PART["background"]
    image[bg] = palette[0] * (0.75 + 0.3 * yy[bg, None])
    image += rng.normal(0, 4, image.shape)
    return Face(masks=masks, label=label, image=np.clip(image, 0, 255).astype(np.uint8))
