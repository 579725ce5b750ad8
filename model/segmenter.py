"""The seg-score segmenter the service trains itself: a compact U-Net (Ronneberger et al., 2015), pure PyTorch.

pix2pixHD judges its images by running a semantic segmenter on them and comparing the prediction with the label
map they were generated from (Table 1, with PSPNet). No pretrained backbone can be downloaded here, so the
service trains this network from scratch on the dataset's real photos; a user with a stronger segmenter exports
it to TorchScript instead (evaluation/segmenters.py loads either).

Input: RGB images in [0, 1], (N, 3, H, W), any H and W (padded to a multiple of 2**depth inside). Output: class
logits (N, num_classes, H, W).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class SegmenterOptions:
    num_classes: int
    width: int = 32  # channels at full resolution; doubled at each level down
    depth: int = 4  # levels of 2x downsampling


def _block(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, padding=1, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
        nn.Conv2d(cout, cout, 3, padding=1, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
    )


class UNetSegmenter(nn.Module):
    def __init__(self, opt: SegmenterOptions):
        super().__init__()
        self.opt = opt
        self.multiple = 2**opt.depth
        widths = [opt.width * 2**i for i in range(opt.depth + 1)]
        self.stem = _block(3, widths[0])
        self.down = nn.ModuleList(_block(widths[i], widths[i + 1]) for i in range(opt.depth))
        self.up = nn.ModuleList(
            nn.ConvTranspose2d(widths[i + 1], widths[i], 2, stride=2) for i in reversed(range(opt.depth))
        )
        self.merge = nn.ModuleList(_block(2 * widths[i], widths[i]) for i in reversed(range(opt.depth)))
        self.head = nn.Conv2d(widths[0], opt.num_classes, 1)
        # ImageNet statistics: a fixed input normalisation, part of the network so that exports carry it
        self.register_buffer("mean", torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1), persistent=False)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        h, w = image.shape[-2:]
        m = self.multiple
        pad_h, pad_w = (m - h % m) % m, (m - w % m) % m
        x = (image - self.mean) / self.std
        x = nn.functional.pad(x, (0, pad_w, 0, pad_h), mode="replicate")
        skips = [self.stem(x)]
        for down in self.down:
            skips.append(down(nn.functional.max_pool2d(skips[-1], 2)))
        x = skips.pop()
        for up, merge in zip(self.up, self.merge, strict=True):
            x = merge(torch.cat([up(x), skips.pop()], dim=1))
        return self.head(x)[..., :h, :w]
