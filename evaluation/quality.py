"""The per-epoch quality score of a generator on held-out samples: what training reports and selection uses
instead of L1 alone. Metrics (names as reported):

    val_seg_miou, val_seg_pixel_acc   seg-score of the generated images (higher is better)
    val_kid, val_fid                  against the held-out real photos (lower is better)

`SELECTION` maps the config's `eval.metric` to the reported name and its direction.
"""

from __future__ import annotations

import torch

from data.labels import LabelSet
from evaluation.fid import FeatureDistance
from evaluation.segscore import ClassMap, SegScore
from model.inference import to_uint8

QUALITY = ("val_seg_miou", "val_seg_pixel_acc", "val_kid", "val_fid")
SELECTION = {  # eval.metric -> (reported metric, mode)
    "seg_miou": ("val_seg_miou", "max"),
    "kid": ("val_kid", "min"),
    "fid": ("val_fid", "min"),
    "val_L1": ("val_L1", "min"),
}


class QualityJudge:
    """Scores batches of generated images against their label maps (segmenter) and real photos (features)."""

    def __init__(self, labels: LabelSet, segmenter=None, class_map: ClassMap | None = None, feature=None, kwargs=None):
        self.labels, self.segmenter, self.class_map = labels, segmenter, class_map
        self.feature, self.kwargs = feature, kwargs or {}

    def _features(self, images: torch.Tensor) -> torch.Tensor:
        out = self.feature(to_uint8(images), **self.kwargs)
        return (out[0] if isinstance(out, (tuple, list)) else out).float().flatten(1).cpu()

    @torch.no_grad()
    def score(self, fake: torch.Tensor, real: torch.Tensor, label: torch.Tensor) -> dict[str, float]:
        """fake, real: (N, 3, H, W) in [-1, 1]; label: (N, H, W) dataset ids."""
        out: dict[str, float] = {}
        if self.segmenter is not None:
            seg = SegScore(self.class_map, self.labels)
            logits = self.segmenter((fake.float() + 1) / 2)
            seg.update((logits[0] if isinstance(logits, (tuple, list)) else logits).cpu(), label.cpu())
            r = seg.result()
            out |= {"val_seg_miou": r.miou, "val_seg_pixel_acc": r.pixel_accuracy}
        if self.feature is not None:
            d = FeatureDistance()
            d.update(self._features(real), real=True)
            d.update(self._features(fake), real=False)
            out["val_kid"] = d.kid()[0]
            out["val_fid"] = d.fid()
        return out
