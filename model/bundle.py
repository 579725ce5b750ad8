"""The generator as one self-contained module for the model registry and inference.

`Pix2PixHDGenerator(x)` takes one integer tensor (B, 2, H, W): channel 0 label ids, channel 1 instance ids
(ignored when the model has no instance input), and returns images in [-1, 1], (B, 3, H, W). One tensor in,
one out, so MLflow's pyfunc can serve it too. With `instance_feat`, each instance gets a style: a centre of its
class's clusters of E's features (model/styles.py), random per instance from a seed (the reference's behaviour)
or the largest cluster's; `render` takes explicit styles per instance.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from model.inputs import prepare_inputs
from model.networks import Encoder
from model.options import ModelOptions
from model.styles import feature_map, instance_class


@dataclass
class PhotoStyles:
    styles: dict[int, list[float]]  # instance id -> E's feature of that instance in the photo
    missing: list[int]  # instance ids of the maps the photo does not have

    def said(self) -> str:
        taken = ", ".join(map(str, sorted(self.styles))) or "none"
        rest = ", ".join(map(str, self.missing))
        return f"instances {taken} styled as in the photo" + (
            f"; {rest} not in it: styled by the seed's draw" if self.missing else ""
        )


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

    @torch.no_grad()
    def photo_styles(self, photo: torch.Tensor, photo_inst: torch.Tensor, x: torch.Tensor) -> PhotoStyles:
        """The paper's styles from a real image (the reference's use_encoded_image): each instance of the maps `x`
        (B, 2, H, W) takes the feature E computes for the same instance id in `photo` (1, 3, h, w) in [-1, 1] with
        its instance map `photo_inst` (1, h, w); ids the photo lacks are listed apart (they keep the seed's draw)."""
        if self.E is None:
            raise ValueError("this generator has no encoder (instance_feat is off): it takes no styles from a photo")
        if photo.shape[-2:] != photo_inst.shape[-2:]:
            raise ValueError(
                f"the style photo is {photo.shape[-2]}x{photo.shape[-1]} (height x width) but its instance map is "
                f"{photo_inst.shape[-2]}x{photo_inst.shape[-1]}: give the instance map of that photo"
            )
        m = 2**self.opt.n_downsample_E
        if photo.shape[-2] % m or photo.shape[-1] % m:
            raise ValueError(
                f"the style photo is {photo.shape[-2]}x{photo.shape[-1]}; the encoder takes multiples of {m}"
            )
        label, inst = x[:, 0], x[:, 1]
        wanted = inst.unique().tolist()
        for i in wanted:  # an instance id names its class: the label map must agree
            classes = label[inst == i].unique().tolist()
            if classes != [instance_class(i)]:
                raise ValueError(
                    f"instance {i} is of class {instance_class(i)} by its id, but the label map marks its pixels "
                    f"as class {', '.join(map(str, classes))}: the instance map does not belong to this label map"
                )
        device = next(self.E.parameters()).device
        features = self.E.eval()(photo.to(device).float(), photo_inst.to(device).long())[0]
        found = set(photo_inst.unique().tolist())
        styles = {i: features[:, photo_inst[0] == i][:, 0].tolist() for i in wanted if i in found}
        return PhotoStyles(styles, sorted(i for i in wanted if i not in found))

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
