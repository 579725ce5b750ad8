"""VGG19 feature extractor for the perceptual loss, defined here so nothing is ever downloaded.

Layer indices are torchvision's `vgg19().features`, so a torchvision-format state dict (`features.N.weight`,
`features.N.bias`; `classifier.*` is ignored) loads by name. The user supplies the file.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import torch
from torch import nn

from model.networks import Recomputable

# torchvision's configuration "E": numbers are conv output channels, "M" is a 2x2 max-pool.
_VGG19_CFG = [64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M", 512, 512, 512, 512, "M", 512, 512, 512, 512, "M"]
# End indices (exclusive) of the slices ending at relu1_1, relu2_1, relu3_1, relu4_1, relu5_1.
_SLICE_ENDS = (2, 7, 12, 21, 30)


def _vgg19_features() -> nn.Sequential:
    layers: list[nn.Module] = []
    cin = 3
    for v in _VGG19_CFG:
        if v == "M":
            layers.append(nn.MaxPool2d(2, 2))
        else:
            layers += [nn.Conv2d(cin, v, 3, padding=1), nn.ReLU(inplace=True)]
            cin = v
    return nn.Sequential(*layers)


class VGG19Features(Recomputable, nn.Module):
    """Returns the activations at relu1_1 ... relu5_1. Frozen, always in eval mode.
    With checkpointing, each slice is recomputed in backward (only the five outputs are kept)."""

    def __init__(self):
        super().__init__()
        self.features = _vgg19_features()
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> VGG19Features:  # the perceptual net never trains
        return super().train(False)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        outs = []
        for start, end in zip((0, *_SLICE_ENDS), _SLICE_ENDS, strict=False):
            x = self.recompute(self.features[start:end], x)
            outs.append(x)
        return outs

    @classmethod
    def from_file(cls, path: str | os.PathLike) -> VGG19Features:
        """Load torchvision-format vgg19 weights from a local path or file:// URI."""
        p = Path(str(path).removeprefix("file://"))
        if not p.is_file():
            raise FileNotFoundError(
                f"vgg_weights: {p} does not exist; give the path of a torchvision-format vgg19 state dict "
                f"(e.g. vgg19-dcbb9e9d.pth), or turn the VGG loss off"
            )
        try:
            state = torch.load(p, map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001 - any unpickling failure is the same user error
            raise ValueError(f"vgg_weights: {p} is not a readable torch state dict ({e})") from e
        feats = {k[len("features.") :]: v for k, v in state.items() if k.startswith("features.")}
        net = cls()
        expected = net.features.state_dict()
        missing = sorted(set(expected) - set(feats))
        if missing:
            raise ValueError(
                f"vgg_weights: {p} is not a torchvision vgg19 state dict: it lacks features.{missing[0]} "
                f"(and {len(missing) - 1} more)"
            )
        for k, v in expected.items():
            if feats[k].shape != v.shape:
                raise ValueError(
                    f"vgg_weights: {p}: features.{k} has shape {tuple(feats[k].shape)}, vgg19 needs {tuple(v.shape)}"
                )
        net.features.load_state_dict({k: feats[k] for k in expected})
        return net


def random_weights_file() -> str:
    """A torchvision-format VGG19 state dict with random weights (cached in the temp folder): for measuring the
    step's cost, which does not depend on the weights, where the real file is not at hand."""
    path = Path(tempfile.gettempdir()) / "pix2pixhd-vgg19-random-weights.pth"
    if not path.exists():
        state = {f"features.{k}": v for k, v in VGG19Features().features.state_dict().items()}
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        torch.save(state, tmp)
        tmp.replace(path)
    return str(path)
