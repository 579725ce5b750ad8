"""The generator as an ONNX graph: the reference's deployment route (ONNX, then TensorRT).

The graph takes `maps` (B, 2, H, W) int64 (label ids, instance ids; batch, height and width dynamic) and, for a
generator with instance features, `features` (B, feat_num, H, W) float (each instance's style, as
model/styles.py's `feature_map` makes it: the styles stay in the caller); it returns the images (B, 3, H, W) in
[-1, 1]. The one-hot labels and the instance-boundary map are computed inside the graph. What the graph cannot
check (label ids < label_nc, sizes that are multiples of 2^downsamplings) the caller must.
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from model.bundle import Pix2PixHDGenerator
from model.networks import instance_edges


class ExportedGenerator(nn.Module):
    def __init__(self, bundle: Pix2PixHDGenerator):
        super().__init__()
        self.G = bundle.G.eval()
        opt = bundle.opt
        self.label_nc, self.instances, self.features = opt.label_nc, not opt.no_instance, opt.instance_feat

    def forward(self, maps: torch.Tensor, features: torch.Tensor | None = None) -> torch.Tensor:
        x = F.one_hot(maps[:, 0], self.label_nc).permute(0, 3, 1, 2).float()
        if self.instances:
            x = torch.cat([x, instance_edges(maps[:, 1])], 1)
        if self.features:
            x = torch.cat([x, features], 1)
        return self.G(x)


def export_onnx(bundle: Pix2PixHDGenerator, path: Path, height: int, width: int) -> Path:
    """Export with dynamic batch, height and width (traced at height x width, which must fit the generator)."""
    opt = bundle.opt
    module = ExportedGenerator(bundle).eval()
    maps = torch.zeros(2, 2, height, width, dtype=torch.int64)
    args: tuple = (maps,)
    b, h, w = torch.export.Dim("batch", min=1), torch.export.Dim.AUTO, torch.export.Dim.AUTO
    shapes: dict = {"maps": {0: b, 2: h, 3: w}}
    names = ["maps"]
    if opt.instance_feat:
        args += (torch.zeros(2, opt.feat_num, height, width),)
        shapes["features"] = {0: b, 2: h, 3: w}
        names.append("features")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.onnx")
    # the exporter's own chatter (progress lines, "torchvision is not installed. Skipping torchvision::nms" x4, a
    # FutureWarning from torch.export, "the axis name batch will not be used") is no news to the user: kept out
    registration = logging.getLogger("torch.onnx._internal.exporter._registration")
    level = registration.level
    registration.setLevel(logging.ERROR)
    try:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            warnings.filterwarnings("ignore", message=r".*axis name.*will not be used", category=UserWarning)
            torch.onnx.export(
                module,
                args,
                str(tmp),
                input_names=names,
                output_names=["images"],
                dynamic_shapes=shapes,
                dynamo=True,
                verbose=False,
            )
    finally:
        registration.setLevel(level)
    tmp.replace(path)
    return path
