"""Checks every sample must pass before anything is written: parts present, decodable, sizes agree,
label ids < label_nc, instance ids consistent with labels (Cityscapes scheme: id < 1000 is the class id,
id >= 1000 is class*1000 + k)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from data.layouts import BadSample, LoadedSample


@dataclass
class SampleStats:
    stem: str
    height: int
    width: int
    histogram: np.ndarray  # pixel count per class id, length label_nc


def check(sample: LoadedSample, label_nc: int, instance_scheme: str = "cityscapes") -> SampleStats:
    f = sample.files
    h, w = sample.image_size
    label_file = f.label or f.image
    if sample.label.shape != (h, w):
        lh, lw = sample.label.shape
        raise BadSample(label_file, f"label map is {lw}x{lh} but the image {f.image.name} is {w}x{h}")
    if sample.inst is not None and sample.inst.shape != (h, w):
        ih, iw = sample.inst.shape
        raise BadSample(f.inst, f"instance map is {iw}x{ih} but the image {f.image.name} is {w}x{h}")
    counts = np.bincount(sample.label.ravel(), minlength=256)
    bad_ids = np.flatnonzero(counts[label_nc:]) + label_nc
    if bad_ids.size:
        raise BadSample(
            label_file,
            f"label ids {bad_ids.tolist()} are >= label_nc {label_nc} ({int(counts[label_nc:].sum())} pixels); "
            f"raise label_nc or remap these ids",
        )
    if sample.inst is not None and instance_scheme == "cityscapes":
        inst = sample.inst
        cls = np.where(inst >= 1000, inst // 1000, inst)
        wrong = cls != sample.label
        if wrong.any():
            y, x = np.argwhere(wrong)[0]
            raise BadSample(
                f.inst,
                f"{int(wrong.sum())} pixels have instance ids that disagree with the label map, e.g. at (x={x}, "
                f"y={y}) instance {int(inst[y, x])} but label {int(sample.label[y, x])} (ids < 1000 must equal the "
                f"class, ids >= 1000 must be class*1000 + k); use --instance-scheme any for other conventions",
            )
    return SampleStats(sample.stem, h, w, counts[:label_nc].astype(np.int64))
