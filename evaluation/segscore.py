"""Seg-score (pix2pixHD, Table 1): a semantic segmenter runs on images and its prediction is compared with the
label map those images were generated from: per-class IoU, mean IoU and pixel accuracy. The same segmenter on the
real photos gives the ceiling a generator is judged against (pix2pixHD: 0.639 mIoU for its images, 0.686 for the
real ones).

A `ClassMap` says which dataset label id each of the segmenter's output channels means, and which dataset ids
are not scored (Cityscapes' evaluation ignores ids such as 'unlabeled' or 'license plate'). Scores accumulate
over batches in one confusion matrix (torchmetrics) of the scored ids plus one column for predictions of
nothing scored.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml
from torchmetrics.functional.classification import multiclass_confusion_matrix

from data import strict_yaml
from data.labels import CITY_ID, CITYSCAPES, LabelSet

UNSCORED = -1  # a segmenter channel whose class is not scored (predicting it is wrong for any scored pixel)


class EvaluationError(ValueError):
    """Bad evaluation input (a segmenter, class map, feature network): the message names it and the fix."""


@dataclass(frozen=True)
class ClassMap:
    classes: tuple[int, ...]  # output channel i of the segmenter means dataset label id classes[i] (-1: none scored)
    ignore: tuple[int, ...]  # dataset label ids that are not scored
    source: str = "given"  # where it came from, for messages

    @property
    def scored(self) -> tuple[int, ...]:
        """The dataset ids scored, ascending."""
        return tuple(sorted(set(self.classes) - {UNSCORED}))

    def check(self, labels: LabelSet) -> ClassMap:
        """Every dataset id is either scored or ignored, and nothing is outside the dataset's ids."""
        named = set(self.scored) | set(self.ignore)
        outside = sorted(i for i in named | set(self.classes) - {UNSCORED} if not 0 <= i < labels.label_nc)
        if outside:
            raise EvaluationError(
                f"class map {self.source}: ids {outside} are not {labels.name} label ids (0-{labels.label_nc - 1})"
            )
        both = sorted(set(self.scored) & set(self.ignore))
        if both:
            raise EvaluationError(f"class map {self.source}: ids {both} are both a class and ignored; keep one")
        missing = [i for i in range(labels.label_nc) if i not in named]
        if missing:
            shown = ", ".join(f"{i} ({labels.names[i]})" for i in missing)
            raise EvaluationError(
                f"class map {self.source} misses {labels.name} label ids {shown}: map a segmenter channel to each "
                f"under 'classes', or list them under 'ignore' when they are not scored"
            )
        return self

    def check_split(self, class_histogram: list[int], labels: LabelSet, split: str) -> ClassMap:
        """Every scored id has pixels in the split (its manifest's class_histogram): an id it never has cannot be
        scored, and a map of such ids scores whatever few classes remain (road alone: mIoU 1.0)."""
        absent = [i for i in self.scored if i >= len(class_histogram) or class_histogram[i] == 0]
        if absent:
            shown = ", ".join(f"{i} ({labels.names[i]})" for i in absent[:12])
            raise EvaluationError(
                f"class map {self.source} scores ids that {split} never has: {shown}"
                f"{' ...' if len(absent) > 12 else ''}. List them under 'ignore' (they cannot be scored on this "
                f"split), or evaluate on a split that has them"
            )
        return self

    def to_yaml(self) -> str:
        return yaml.safe_dump({"classes": list(self.classes), "ignore": list(self.ignore)}, default_flow_style=True)


def load_class_map(path: str | Path) -> ClassMap:
    """A YAML file `{classes: [id of channel 0, id of channel 1, ...], ignore: [ids not scored]}` (a channel of no
    scored class: -1), or the name of a built-in map: 'cityscapes-trainids' (the 19 classes of Cityscapes' benchmark, in train-id order)."""
    if str(path) in BUILT_IN:
        return BUILT_IN[str(path)]
    try:
        raw = strict_yaml.load(Path(path).read_text())
    except OSError as e:
        raise EvaluationError(
            f"class map {path}: cannot be read ({e}); or name a built-in one: {', '.join(BUILT_IN)}"
        ) from None
    except yaml.YAMLError as e:
        raise EvaluationError(f"class map {path} is not YAML: {e}") from None
    if not isinstance(raw, dict) or not isinstance(raw.get("classes"), list):
        raise EvaluationError(
            f"class map {path}: expected 'classes: [label id of channel 0, of channel 1, ...]' and 'ignore: [ids]'"
        )
    try:
        classes = tuple(int(i) for i in raw["classes"])
        ignore = tuple(int(i) for i in raw.get("ignore") or ())
    except (TypeError, ValueError) as e:
        raise EvaluationError(f"class map {path}: 'classes' and 'ignore' hold integer label ids ({e})") from None
    return ClassMap(classes, ignore, str(path))


# Cityscapes' 19 benchmark classes in train-id order (the official labels.py); every other id is not scored
CITYSCAPES_TRAIN_CLASSES = (
    "road",
    "sidewalk",
    "building",
    "wall",
    "fence",
    "pole",
    "traffic light",
    "traffic sign",
    "vegetation",
    "terrain",
    "sky",
    "person",
    "rider",
    "car",
    "truck",
    "bus",
    "train",
    "motorcycle",
    "bicycle",
)


def _cityscapes_train_ids() -> ClassMap:
    classes = tuple(CITY_ID[n] for n in CITYSCAPES_TRAIN_CLASSES)
    ignore = tuple(i for i in range(CITYSCAPES.label_nc) if i not in classes)
    return ClassMap(classes, ignore, "cityscapes-trainids")


BUILT_IN = {"cityscapes-trainids": _cityscapes_train_ids()}


@dataclass
class SegScoreResult:
    miou: float  # mean over the scored classes that occur (in the labels or the predictions)
    pixel_accuracy: float  # over pixels of scored classes
    per_class: dict[str, float]  # IoU by class name; NaN where a class neither occurs nor is predicted
    pixels: int
    classes: int = 0  # scored classes with pixels in the real labels: what the mIoU stands on

    def as_metrics(self, prefix: str = "seg_") -> dict[str, float]:
        return {f"{prefix}miou": self.miou, f"{prefix}pixel_acc": self.pixel_accuracy, f"{prefix}classes": self.classes}


class SegScore:
    """Accumulates one confusion matrix over batches of (segmenter logits, label map)."""

    def __init__(self, class_map: ClassMap, labels: LabelSet):
        self.map, self.labels = class_map.check(labels), labels
        scored = class_map.scored
        self.k = len(scored)
        # dataset id -> row (scored ids 0..k-1, everything else k: ignored as a target, 'nothing scored' as a guess)
        self.id_to_row = torch.full((256,), self.k, dtype=torch.long)
        self.id_to_row[list(scored)] = torch.arange(self.k)
        self.channel_to_row = torch.tensor([self.id_to_row[c] if c != UNSCORED else self.k for c in class_map.classes])
        self.matrix = torch.zeros(self.k + 1, self.k + 1, dtype=torch.long)

    def update(self, logits: torch.Tensor, label: torch.Tensor) -> None:
        """logits (N, C, h, w) over the segmenter's channels; label (N, H, W) dataset ids. Logits at another size
        are resized to the label's (bilinear) before the argmax."""
        if logits.shape[1] != len(self.map.classes):
            raise EvaluationError(
                f"the segmenter gives {logits.shape[1]} channels but class map {self.map.source} names "
                f"{len(self.map.classes)}"
            )
        if logits.shape[-2:] != label.shape[-2:]:
            logits = torch.nn.functional.interpolate(logits.float(), size=label.shape[-2:], mode="bilinear")
        pred = self.channel_to_row.to(logits.device)[logits.argmax(1)]
        target = self.id_to_row.to(label.device)[label.long().clamp(0, 255)]
        self.matrix += multiclass_confusion_matrix(
            pred.flatten().cpu(),
            target.flatten().cpu(),
            num_classes=self.k + 1,
            ignore_index=self.k,
            validate_args=False,
        )

    def result(self) -> SegScoreResult:
        m = self.matrix.double()
        hit = m.diagonal()[: self.k]
        union = m[: self.k, :].sum(1) + m[:, : self.k].sum(0) - hit  # rows: truth, columns: prediction
        iou = torch.where(union > 0, hit / union.clamp(min=1), torch.tensor(float("nan"), dtype=torch.float64))
        occurring = iou[union > 0]
        gt_pixels = m[: self.k, :].sum()
        return SegScoreResult(
            miou=float(occurring.mean()) if len(occurring) else math.nan,
            pixel_accuracy=float(hit.sum() / gt_pixels) if gt_pixels > 0 else math.nan,
            per_class={self.labels.names[i]: float(v) for i, v in zip(self.map.scored, iou, strict=True)},
            pixels=int(gt_pixels),
            classes=int((m[: self.k, :].sum(1) > 0).sum()),
        )
