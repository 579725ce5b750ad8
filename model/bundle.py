"""The generator as one self-contained module for the model registry and inference.

`Pix2PixHDGenerator(x)` takes one integer tensor (B, 2, H, W): channel 0 label ids, channel 1 instance ids
(ignored when the model has no instance input), and returns images in [-1, 1], (B, 3, H, W). One tensor in,
one out, so MLflow's pyfunc can serve it too. With `instance_feat`, each instance gets the centre of the largest
feature cluster of its class (the paper's per-class clusters of E's features).
"""

from __future__ import annotations

import torch
from torch import nn

from model.inputs import prepare_inputs
from model.networks import Encoder
from model.options import ModelOptions


class Pix2PixHDGenerator(nn.Module):
    def __init__(self, options: dict, G: nn.Module, E: Encoder | None = None, clusters: torch.Tensor | None = None):
        super().__init__()
        self.options = dict(options)
        self.G = G
        self.E = E
        self.register_buffer("clusters", clusters if clusters is not None else torch.zeros(0))

    @property
    def opt(self) -> ModelOptions:
        return ModelOptions(**self.options)

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        opt = self.opt
        if x.dim() != 4 or x.shape[1] not in (1, 2):
            raise ValueError(f"input must be (B, 2, H, W): label ids and instance ids; got {tuple(x.shape)}")
        x = x.to(self.clusters.device if self.clusters.numel() else next(self.G.parameters()).device)
        label, inst = x[:, 0].long(), (x[:, 1].long() if x.shape[1] == 2 else None)
        if inst is None and not opt.no_instance:
            inst = label.clone()  # one instance per class region: boundaries between classes only
        inputs = prepare_inputs(opt, label, inst=inst)
        g_in = inputs.label
        if opt.instance_feat:
            g_in = torch.cat([g_in, self.cluster_features(label)], 1)
        self.G.eval()
        return self.G(g_in)

    def cluster_features(self, label: torch.Tensor) -> torch.Tensor:
        """(B, H, W) ids -> (B, feat_num, H, W): each pixel gets its class's largest-cluster centre."""
        centres = self.clusters[:, 0, :]  # (label_nc, feat_num), clusters sorted by size
        return centres[label].permute(0, 3, 1, 2).contiguous()


def kmeans(x: torch.Tensor, k: int, iters: int = 20, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain k-means on (N, D); returns (centres (k', D), sizes (k',)) sorted by size, k' = min(k, N)."""
    g = torch.Generator().manual_seed(seed)
    k = min(k, x.shape[0])
    centres = x[torch.randperm(x.shape[0], generator=g)[:k]].clone()
    for _ in range(iters):
        assign = torch.cdist(x, centres).argmin(1)
        for j in range(k):
            members = x[assign == j]
            if len(members):
                centres[j] = members.mean(0)
    sizes = torch.bincount(torch.cdist(x, centres).argmin(1), minlength=k)
    order = sizes.argsort(descending=True)
    return centres[order], sizes[order]


def feature_clusters(per_class: dict[int, torch.Tensor], label_nc: int, feat_num: int, k: int = 10) -> torch.Tensor:
    """Per-class k-means of instance feature vectors -> (label_nc, k, feat_num); classes never seen stay 0."""
    out = torch.zeros(label_nc, k, feat_num)
    for cls, vectors in per_class.items():
        centres, _ = kmeans(vectors, k)
        out[cls, : len(centres)] = centres
    return out
