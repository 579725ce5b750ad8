"""The generator as one self-contained module for the model registry and inference.

`Pix2PixHDGenerator(x)` takes one integer tensor (B, 2, H, W): channel 0 label ids, channel 1 instance ids
(ignored when the model has no instance input), and returns images in [-1, 1], (B, 3, H, W). One tensor in,
one out, so MLflow's pyfunc can serve it too. With `instance_feat`, each instance gets a style: a centre of its
class's clusters of E's features (model/styles.py), random per instance from a seed (the reference's behaviour)
or the largest cluster's; `render` takes explicit styles per instance.
"""

from __future__ import annotations

import torch
from torch import nn

from model.inputs import prepare_inputs
from model.networks import Encoder
from model.options import ModelOptions
from model.styles import feature_map


class Pix2PixHDGenerator(nn.Module):
    def __init__(
        self,
        options: dict,
        G: nn.Module,
        E: Encoder | None = None,
        clusters: torch.Tensor | None = None,
        cluster_counts: torch.Tensor | None = None,
        style_mode: str | None = None,
    ):
        super().__init__()
        self.options = dict(options)
        self.G = G
        self.E = E
        self.style_mode = style_mode or self.opt.style_mode
        self.register_buffer("clusters", clusters if clusters is not None else torch.zeros(0))
        self.register_buffer("cluster_counts", cluster_counts if cluster_counts is not None else torch.zeros(0))

    @property
    def opt(self) -> ModelOptions:
        return ModelOptions(**self.options)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.render(x)

    @torch.no_grad()
    def render(
        self, x: torch.Tensor, styles: dict | None = None, seed: int = 0, mode: str | None = None
    ) -> torch.Tensor:
        """x: (B, 2, H, W) label ids and instance ids. With instance features: `styles` maps instance ids to a
        cluster index or a feature vector, the others get a style by `mode` (default: this model's `style_mode`)
        drawn from `seed` (model/styles.py)."""
        self.G.eval()
        return self.G(self.generator_input(x, styles, seed, mode))

    @torch.no_grad()
    def render_many(self, requests: list[tuple[torch.Tensor, dict | None, int, str | None]]) -> list:
        """Several (x (1, 2, H, W), styles, seed, mode) requests -> for each, its image (1, 3, H, W) as `render`
        gives it, or the ValueError its input raised (a style that does not fit); requests of one size go through
        G as one batch."""
        inputs: list = []
        for r in requests:
            try:
                inputs.append(self.generator_input(*r))
            except ValueError as e:
                inputs.append(e)
        out: list = list(inputs)
        by_size: dict[tuple, list[int]] = {}
        for i, g_in in enumerate(inputs):
            if isinstance(g_in, torch.Tensor):
                by_size.setdefault(tuple(g_in.shape[-2:]), []).append(i)
        self.G.eval()
        for idx in by_size.values():
            images = self.G(torch.cat([inputs[i] for i in idx]))
            for i, image in zip(idx, images.split(1), strict=True):
                out[i] = image
        return out

    def generator_input(
        self, x: torch.Tensor, styles: dict | None = None, seed: int = 0, mode: str | None = None
    ) -> torch.Tensor:
        """G's input for `render`'s arguments: one-hot labels, instance edges, instance features."""
        opt = self.opt
        if x.dim() != 4 or x.shape[1] not in (1, 2):
            raise ValueError(f"input must be (B, 2, H, W): label ids and instance ids; got {tuple(x.shape)}")
        if x.dtype.is_floating_point:
            raise ValueError(f"label and instance maps must be integer ids, got {x.dtype}")
        x = x.to(next(self.G.parameters()).device)
        label, inst = x[:, 0].long(), (x[:, 1].long() if x.shape[1] == 2 else None)
        if inst is None and not opt.no_instance:
            inst = label.clone()  # one instance per class region: boundaries between classes only
        g_in = prepare_inputs(opt, label, inst=inst).label
        if opt.instance_feat:
            if not self.clusters.numel():
                raise ValueError("this generator has no feature clusters: register it with its training data")
            features = feature_map(
                label if inst is None else inst,
                self.clusters,
                self.cluster_counts,
                styles,
                seed,
                mode or self.style_mode,
            )
            g_in = torch.cat([g_in, features.to(g_in.dtype)], 1)
        elif styles:
            raise ValueError("styles were given, but this generator has no instance features (instance_feat is off)")
        return g_in
