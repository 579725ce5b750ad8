"""Label sets: Cityscapes ids 0-33 (with colours and which classes have instances) and CelebAMask-HQ's 19 parts."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class LabelSet:
    name: str
    label_nc: int
    names: tuple[str, ...]
    colors: np.ndarray  # (label_nc, 3) uint8
    instance_classes: frozenset[int]  # classes whose pixels carry class*1000+k instance ids

    def colorize(self, label: np.ndarray) -> np.ndarray:
        """(H, W) ids -> (H, W, 3) uint8; ids without a colour become magenta so they stand out."""
        lut = np.zeros((256, 3), np.uint8)
        lut[:] = (255, 0, 255)
        lut[: len(self.colors)] = self.colors
        return lut[np.asarray(label, np.int64).clip(0, 255)]


# Cityscapes (labels.py of the official scripts): id, name, colour. Ids 24-33 have instances.
_CITYSCAPES = [
    ("unlabeled", (0, 0, 0)),
    ("ego vehicle", (0, 0, 0)),
    ("rectification border", (0, 0, 0)),
    ("out of roi", (0, 0, 0)),
    ("static", (0, 0, 0)),
    ("dynamic", (111, 74, 0)),
    ("ground", (81, 0, 81)),
    ("road", (128, 64, 128)),
    ("sidewalk", (244, 35, 232)),
    ("parking", (250, 170, 160)),
    ("rail track", (230, 150, 140)),
    ("building", (70, 70, 70)),
    ("wall", (102, 102, 156)),
    ("fence", (190, 153, 153)),
    ("guard rail", (180, 165, 180)),
    ("bridge", (150, 100, 100)),
    ("tunnel", (150, 120, 90)),
    ("pole", (153, 153, 153)),
    ("polegroup", (153, 153, 153)),
    ("traffic light", (250, 170, 30)),
    ("traffic sign", (220, 220, 0)),
    ("vegetation", (107, 142, 35)),
    ("terrain", (152, 251, 152)),
    ("sky", (70, 130, 180)),
    ("person", (220, 20, 60)),
    ("rider", (255, 0, 0)),
    ("car", (0, 0, 142)),
    ("truck", (0, 0, 70)),
    ("bus", (0, 60, 100)),
    ("caravan", (0, 0, 90)),
    ("trailer", (0, 0, 110)),
    ("train", (0, 80, 100)),
    ("motorcycle", (0, 0, 230)),
    ("bicycle", (119, 11, 32)),
    ("license plate", (0, 0, 142)),  # id 34 in pix2pixHD's label_nc=35
]

CITYSCAPES = LabelSet(
    name="cityscapes",
    label_nc=35,
    names=tuple(n for n, _ in _CITYSCAPES),
    colors=np.array([c for _, c in _CITYSCAPES], np.uint8),
    instance_classes=frozenset(range(24, 34)),
)
CITY_ID = {n: i for i, n in enumerate(CITYSCAPES.names)}

# CelebAMask-HQ parts in the order they are painted (later overwrite earlier); index = class id.
CELEBAMASK_PARTS = (
    "background",
    "skin",
    "nose",
    "eye_g",
    "l_eye",
    "r_eye",
    "l_brow",
    "r_brow",
    "l_ear",
    "r_ear",
    "mouth",
    "u_lip",
    "l_lip",
    "hair",
    "hat",
    "ear_r",
    "neck_l",
    "neck",
    "cloth",
)

FACES = LabelSet(
    name="celebamask",
    label_nc=19,
    names=CELEBAMASK_PARTS,
    colors=np.array(
        [
            (0, 0, 0),
            (204, 0, 0),
            (76, 153, 0),
            (204, 204, 0),
            (51, 51, 255),
            (204, 0, 204),
            (0, 255, 255),
            (255, 204, 204),
            (102, 51, 0),
            (255, 0, 0),
            (102, 204, 0),
            (255, 255, 0),
            (0, 0, 153),
            (0, 0, 204),
            (255, 51, 153),
            (0, 204, 204),
            (0, 51, 0),
            (255, 153, 51),
            (0, 204, 0),
        ],
        np.uint8,
    ),
    instance_classes=frozenset(),
)

LABEL_SETS = {s.name: s for s in (CITYSCAPES, FACES)}


def label_set_of(label_nc: int) -> LabelSet | None:
    """The known label set with `label_nc` classes (a model records only its class count), or None."""
    return next((s for s in LABEL_SETS.values() if s.label_nc == label_nc), None)
