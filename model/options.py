"""The pix2pixHD options that define networks, losses and optimisation.

Names and defaults are those of the paper's official code, because those are the names users know
(`label_nc`, `ngf`, `n_downsample_global`, ...). The orchestration config embeds this dataclass per stage.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Literal

GanMode = Literal["lsgan", "vanilla", "hinge"]
NetG = Literal["global", "local"]
Norm = Literal["instance", "batch"]
Trainable = Literal["all", "local"]
StyleMode = Literal["random", "largest"]

_CHOICES = {
    "netG": ("global", "local"),
    "norm": ("instance", "batch"),
    "gan_mode": ("lsgan", "vanilla", "hinge"),
    "style_mode": ("random", "largest"),
}


@dataclass
class ModelOptions:
    # input / output
    label_nc: int = 35  # number of label classes; 0: the label image is fed as is with `input_nc` channels
    input_nc: int = 3  # channels of the label image when label_nc == 0
    output_nc: int = 3
    no_instance: bool = False  # True: no instance-boundary channel
    instance_feat: bool = False  # True: an encoder E adds `feat_num` instance-wise feature channels
    feat_num: int = 3
    # generator
    netG: NetG = "global"
    ngf: int = 64
    n_downsample_global: int = 4
    n_blocks_global: int = 9
    n_local_enhancers: int = 1
    n_blocks_local: int = 3
    norm: Norm = "instance"
    # encoder
    nef: int = 16
    n_downsample_E: int = 4
    # at generation, an instance without a chosen style gets a random centre of its class's clusters (the
    # reference's behaviour; a seed makes it repeatable) or the centre of its class's largest cluster
    style_mode: StyleMode = "random"
    # discriminator
    num_D: int = 2
    n_layers_D: int = 3
    ndf: int = 64
    # losses
    gan_mode: GanMode = "lsgan"
    lambda_feat: float = 10.0
    lambda_vgg: float = 10.0
    # pix2pix's L1 between output and photo (Isola et al. 2017; 100 there). 0 = off, as in pix2pixHD, whose VGG loss
    # took its place; a run without VGG weights (the demo: nothing downloads) can use it instead.
    lambda_l1: float = 0.0
    no_ganFeat_loss: bool = False
    vgg_weights: str | None = None  # path to a torchvision-format vgg19 state dict
    use_vgg: bool | None = None  # None: on exactly when vgg_weights is given; True without weights is an error
    pool_size: int = 0  # image pool of earlier fakes shown to D; 0 = off
    # optimisation
    lr: float = 2e-4
    beta1: float = 0.5
    niter: int = 100
    niter_decay: int = 100
    # At the end of niter_fix_global the reference builds a new Adam for G (and E): every moment starts afresh.
    # True keeps the enhancer's moments instead (one Adam throughout; what this project did before 2026-11-27).
    keep_adam_after_fix_global: bool = False
    # Generator averaging (model/averaging.py): 0 = off (the reference code's behaviour); e.g. 0.999 keeps an
    # exponential moving average of G's and E's weights, which is validated, judged, registered and rendered.
    ema_beta: float = 0.0

    def __post_init__(self) -> None:
        for name, allowed in _CHOICES.items():
            value = getattr(self, name)
            if value not in allowed:
                raise ValueError(f"option {name}={value!r} is not one of {', '.join(allowed)}")
        positive = ("ngf", "ndf", "nef", "num_D", "n_layers_D", "output_nc", "feat_num", "n_local_enhancers")
        for name in positive:
            if getattr(self, name) < 1:
                raise ValueError(f"option {name}={getattr(self, name)} must be >= 1")
        for name in ("label_nc", "n_downsample_global", "n_blocks_global", "n_blocks_local", "pool_size"):
            if getattr(self, name) < 0:
                raise ValueError(f"option {name}={getattr(self, name)} must be >= 0")
        for name in ("lambda_feat", "lambda_vgg", "lambda_l1", "niter", "niter_decay"):
            if getattr(self, name) < 0:
                raise ValueError(f"option {name}={getattr(self, name)} must be >= 0")
        if not self.lr > 0:
            raise ValueError(f"option lr={self.lr} must be > 0 (the paper's is 0.0002)")
        if not 0 <= self.ema_beta < 1:
            raise ValueError(f"option ema_beta={self.ema_beta} must lie in [0, 1): 0 is off, 0.999 imaginaire's")
        if not 0 <= self.beta1 < 1:
            raise ValueError(f"option beta1={self.beta1} must lie in [0, 1) (the paper's is 0.5)")
        if self.label_nc == 0 and self.input_nc < 1:
            raise ValueError("option input_nc must be >= 1 when label_nc == 0")
        if self.use_vgg and not self.vgg_weights:
            raise ValueError(
                "option use_vgg=true needs vgg_weights: the path to a torchvision-format vgg19 state dict "
                "(nothing is downloaded); set vgg_weights or turn use_vgg off"
            )

    @classmethod
    def field_names(cls) -> set[str]:
        return {f.name for f in fields(cls)}

    # ---- derived channel counts ------------------------------------------------------------
    @property
    def label_channels(self) -> int:
        """Channels of the semantic part of G's input: one-hot labels (+ the instance-edge map)."""
        base = self.label_nc if self.label_nc > 0 else self.input_nc
        return base + (0 if self.no_instance else 1)

    @property
    def generator_input_nc(self) -> int:
        return self.label_channels + (self.feat_num if self.instance_feat else 0)

    @property
    def discriminator_input_nc(self) -> int:
        return self.label_channels + self.output_nc

    @property
    def vgg_enabled(self) -> bool:
        return bool(self.vgg_weights) if self.use_vgg is None else bool(self.use_vgg)

    @property
    def size_multiple(self) -> int:
        """Height and width must be multiples of this for G to return an image of the input's size."""
        local = self.n_local_enhancers if self.netG == "local" else 0
        return 2 ** (self.n_downsample_global + local)

    @property
    def min_size(self) -> int:
        """The smallest height and width G takes: its residual blocks pad by reflection at 1/size_multiple of the
        input size, which needs 2 pixels there."""
        return 2 * self.size_multiple

    def fit_size(self, h: int, w: int) -> tuple[int, int] | None:
        """None when G takes h x w; else the nearest size it takes (multiples of size_multiple, >= min_size)."""
        m = self.size_multiple
        if h % m == 0 and w % m == 0 and min(h, w) >= self.min_size:
            return None
        return max(self.min_size, round(h / m) * m), max(self.min_size, round(w / m) * m)
