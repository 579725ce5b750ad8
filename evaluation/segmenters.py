"""A segmenter for seg-score: a network (image batch -> class logits) with the class map that says which dataset
label id each of its channels means, and the identity of the network (the file's sha256, or the registry version
it came from) that every score carries: scores of different segmenters are not comparable.

Input convention: RGB in [0, 1], (N, 3, H, W), float32; the network normalises itself. Output: (N, C, h, w)
logits; another size than the input's is resized to the label map's before the argmax.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from data.labels import LabelSet
from evaluation.modules import file_identity, load_module, probe
from evaluation.segscore import ClassMap, EvaluationError, load_class_map

PROBE_SHAPE = (2, 3, 64, 128)


@dataclass
class Segmenter:
    module: torch.nn.Module
    class_map: ClassMap
    identity: str  # sha256:<hex> of its file, or models:/segmenter-<dataset>/<version>

    def logits(self, images01: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            out = self.module(images01)
        return out[0] if isinstance(out, (tuple, list)) else out

    def to(self, device: str | torch.device) -> Segmenter:
        self.module = self.module.to(device)
        return self


def check_segmenter(module, class_map: ClassMap, labels: LabelSet, what: str) -> None:
    """A clear error unless `module` maps an image batch to logits over the class map's channels."""
    class_map.check(labels)
    out = probe(module, torch.rand(PROBE_SHAPE), what)
    if out.dim() != 4 or out.shape[0] != PROBE_SHAPE[0]:
        raise EvaluationError(
            f"{what} returns shape {tuple(out.shape)} for images {PROBE_SHAPE}: a segmenter returns class logits "
            f"(N, C, H, W)"
        )
    if out.shape[1] != len(class_map.classes):
        raise EvaluationError(
            f"{what} returns {out.shape[1]} channels but class map {class_map.source} maps {len(class_map.classes)}: "
            f"give the class map written for this segmenter (--class-map)"
        )


def load_segmenter_file(path: str, class_map: str | ClassMap, labels: LabelSet) -> Segmenter:
    """A user's segmenter: a TorchScript / torch.export file and its class map (a YAML file or a built-in name)."""
    cmap = class_map if isinstance(class_map, ClassMap) else load_class_map(class_map)
    module = load_module(path, "segmenter")
    check_segmenter(module, cmap, labels, f"segmenter {path}")
    return Segmenter(module, cmap, file_identity(path))
