"""Write a preview grid of the procedural datasets (label | photo pairs): python -m data.synthetic.preview OUT.png"""

from __future__ import annotations

import sys

import numpy as np
from PIL import Image

from data.labels import CITYSCAPES, FACES
from data.synthetic.city import street_scene
from data.synthetic.faces import face


def preview(n: int = 3, height: int = 128, width: int = 256) -> np.ndarray:
    rows = []
    for i in range(n):
        s = street_scene(height, width, i)
        f1, f2 = face(height, 2 * i), face(height, 2 * i + 1)
        rows.append(
            np.concatenate(
                [
                    CITYSCAPES.colorize(s.label),
                    s.image,
                    FACES.colorize(f1.label),
                    f1.image,
                    FACES.colorize(f2.label),
                    f2.image,
                ],
                1,
            )
        )
    return np.concatenate(rows, 0)


if __name__ == "__main__":
    out = sys.argv[1] if len(sys.argv) > 1 else "docs/synthetic_samples.png"
    Image.fromarray(preview()).save(out, optimize=True)
    print(f"wrote {out}")
