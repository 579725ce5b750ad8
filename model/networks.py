"""pix2pixHD networks (Wang et al., CVPR 2018, section 3 and the official defaults).

Read top to bottom like the paper: the coarse-to-fine generator (global generator G1, local enhancer G2),
the multi-scale PatchGAN discriminator, and the instance-wise feature encoder E.
"""

from __future__ import annotations

import torch
import torch.utils.checkpoint
from torch import nn

from model.options import ModelOptions


def norm_layer(kind: str, channels: int) -> nn.Module:
    if kind == "instance":
        # Under bf16 autocast the kernels accumulate the statistics in fp32 and round the output to bf16
        # (tests/test_networks.py checks this); an explicit fp32 copy of the input would store twice the bytes.
        return nn.InstanceNorm2d(channels, affine=False)
    if kind == "batch":
        return nn.BatchNorm2d(channels, affine=True)
    raise ValueError(f"norm={kind!r} is not one of instance, batch")


def downsample_input(x: torch.Tensor) -> torch.Tensor:
    """The 2x input pyramid step both G2 and the multi-scale D use."""
    return nn.functional.avg_pool2d(x, 3, stride=2, padding=1, count_include_pad=False)


def init_weights(module: nn.Module) -> None:
    """As the reference's weights_init: conv weights N(0, 0.02), conv biases left at PyTorch's default
    (uniform in +-1/sqrt(fan_in)); batch-norm weight N(1, 0.02), bias 0."""
    for m in module.modules():
        if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)):
            nn.init.normal_(m.weight, 0.0, 0.02)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.normal_(m.weight, 1.0, 0.02)
            nn.init.zeros_(m.bias)


def _conv_block(cin: int, cout: int, norm: str, **conv) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, **conv), norm_layer(norm, cout), nn.ReLU(True)]


def _up_block(cin: int, cout: int, norm: str) -> list[nn.Module]:
    return [
        nn.ConvTranspose2d(cin, cout, 3, stride=2, padding=1, output_padding=1),
        norm_layer(norm, cout),
        nn.ReLU(True),
    ]


def _output_head(cin: int, cout: int) -> list[nn.Module]:
    return [nn.ReflectionPad2d(3), nn.Conv2d(cin, cout, 7), nn.Tanh()]


class Recomputable:
    """A module that can recompute parts of its forward in backward instead of storing their activations
    (activation checkpointing: less memory for one more forward of those parts)."""

    checkpoint = False

    def recompute(self, fn, x: torch.Tensor) -> torch.Tensor:
        if self.checkpoint and torch.is_grad_enabled():
            return torch.utils.checkpoint.checkpoint(fn, x, use_reentrant=False)
        return fn(x)


class ResnetBlock(Recomputable, nn.Module):
    def __init__(self, dim: int, norm: str):
        super().__init__()
        self.conv_block = nn.Sequential(
            nn.ReflectionPad2d(1),
            *_conv_block(dim, dim, norm, kernel_size=3),
            nn.ReflectionPad2d(1),
            nn.Conv2d(dim, dim, 3),
            norm_layer(norm, dim),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.recompute(self.conv_block, x)


def set_activation_checkpointing(module: nn.Module, on: bool) -> int:
    """Turn recomputation on or off in every `Recomputable` part of `module`; returns how many parts."""
    parts = [m for m in module.modules() if isinstance(m, Recomputable)]
    for m in parts:
        m.checkpoint = on
    return len(parts)


def _encoder_decoder(cin: int, cout: int, nf: int, n_down: int, n_blocks: int, norm: str) -> list[nn.Module]:
    """c7s1-nf, n_down stride-2 convs doubling channels, n_blocks residual blocks, n_down transposed convs
    halving them, c7s1-cout + tanh: G1's layout, and E's with no residual blocks."""
    layers: list[nn.Module] = [nn.ReflectionPad2d(3), *_conv_block(cin, nf, norm, kernel_size=7)]
    for i in range(n_down):
        c = nf * 2**i
        layers += _conv_block(c, 2 * c, norm, kernel_size=3, stride=2, padding=1)
    layers += [ResnetBlock(nf * 2**n_down, norm) for _ in range(n_blocks)]
    for i in range(n_down):
        c = nf * 2 ** (n_down - i)
        layers += _up_block(c, c // 2, norm)
    return layers + _output_head(nf, cout)


class GlobalGenerator(nn.Module):
    """G1: c7s1-ngf, `n_downsampling` stride-2 convs, `n_blocks` residual blocks, as many up-convs, c7s1-out."""

    def __init__(
        self,
        input_nc: int,
        output_nc: int,
        ngf: int = 64,
        n_downsampling: int = 4,
        n_blocks: int = 9,
        norm: str = "instance",
    ):
        super().__init__()
        self.model = nn.Sequential(*_encoder_decoder(input_nc, output_nc, ngf, n_downsampling, n_blocks, norm))
        init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)


class LocalEnhancer(Recomputable, nn.Module):
    """G2: a G1 at ngf*2^n (without its output head) on the input pooled n times, refined by n enhancers.

    Parameter names: `model` is the global part (the same indices as G1's `model`, so a stage-1 state dict
    loads by name), `model{n}_1` / `model{n}_2` are enhancer n's down and up branches.
    With checkpointing, the down branch and the up branch after its residual blocks (the full-resolution
    layers) are recomputed in backward.
    """

    def __init__(
        self,
        input_nc: int,
        output_nc: int,
        ngf: int = 32,
        n_downsample_global: int = 4,
        n_blocks_global: int = 9,
        n_local_enhancers: int = 1,
        n_blocks_local: int = 3,
        norm: str = "instance",
    ):
        super().__init__()
        self.n_local_enhancers = n_local_enhancers
        g1 = GlobalGenerator(
            input_nc, output_nc, ngf * 2**n_local_enhancers, n_downsample_global, n_blocks_global, norm
        )
        self.model = nn.Sequential(*list(g1.model.children())[:-3])
        for n in range(1, n_local_enhancers + 1):
            c = ngf * 2 ** (n_local_enhancers - n)
            down = [nn.ReflectionPad2d(3), *_conv_block(input_nc, c, norm, kernel_size=7)]
            down += _conv_block(c, 2 * c, norm, kernel_size=3, stride=2, padding=1)
            up: list[nn.Module] = [ResnetBlock(2 * c, norm) for _ in range(n_blocks_local)]
            up += _up_block(2 * c, c, norm)
            if n == n_local_enhancers:
                up += _output_head(ngf, output_nc)
            setattr(self, f"model{n}_1", nn.Sequential(*down))
            setattr(self, f"model{n}_2", nn.Sequential(*up))
        init_weights(self)

    def global_parameters(self) -> list[nn.Parameter]:
        return list(self.model.parameters())

    def enhancer_parameters(self) -> list[nn.Parameter]:
        return [p for name, p in self.named_parameters() if not name.startswith("model.")]

    def outermost_parameters(self) -> list[nn.Parameter]:
        """The full-resolution enhancer's (`model{n}_*`): what the reference trains while `niter_fix_global`
        holds the rest fixed (with two enhancers, the inner one is fixed too)."""
        prefix = f"model{self.n_local_enhancers}_"
        return [p for name, p in self.named_parameters() if name.startswith(prefix)]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pyramid = [x]
        for _ in range(self.n_local_enhancers):
            pyramid.append(downsample_input(pyramid[-1]))
        out = self.model(pyramid[-1])
        for n in range(1, self.n_local_enhancers + 1):
            down = getattr(self, f"model{n}_1")
            up = getattr(self, f"model{n}_2")
            out = self.recompute(down, pyramid[self.n_local_enhancers - n]) + out
            blocks = sum(isinstance(m, ResnetBlock) for m in up)
            out = self.recompute(up[blocks:], up[:blocks](out))
        return out


class NLayerDiscriminator(nn.Module):
    """PatchGAN: C64 (no norm) - C128 - C256 (stride 2) - C512 (stride 1) - 1-channel map; 4x4 kernels, pad 2.

    Returns every layer's output, for the feature-matching loss.
    """

    def __init__(self, input_nc: int, ndf: int = 64, n_layers: int = 3, norm: str = "instance"):
        super().__init__()
        kw, pad = 4, 2
        blocks: list[list[nn.Module]] = [[nn.Conv2d(input_nc, ndf, kw, stride=2, padding=pad), nn.LeakyReLU(0.2, True)]]
        nf = ndf
        for _ in range(1, n_layers):
            prev, nf = nf, min(nf * 2, 512)
            blocks.append(
                [nn.Conv2d(prev, nf, kw, stride=2, padding=pad), norm_layer(norm, nf), nn.LeakyReLU(0.2, True)]
            )
        prev, nf = nf, min(nf * 2, 512)
        blocks.append([nn.Conv2d(prev, nf, kw, stride=1, padding=pad), norm_layer(norm, nf), nn.LeakyReLU(0.2, True)])
        blocks.append([nn.Conv2d(nf, 1, kw, stride=1, padding=pad)])
        self.layers = nn.ModuleList(nn.Sequential(*b) for b in blocks)
        init_weights(self)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        feats = []
        for layer in self.layers:
            x = layer(x)
            feats.append(x)
        return feats


class MultiscaleDiscriminator(nn.Module):
    """`num_D` PatchGANs; D_k sees the input average-pooled k times. Output k is D_k's feature list."""

    def __init__(self, input_nc: int, ndf: int = 64, n_layers: int = 3, num_D: int = 2, norm: str = "instance"):
        super().__init__()
        self.num_D = num_D
        self.n_layers = n_layers
        self.scales = nn.ModuleList(NLayerDiscriminator(input_nc, ndf, n_layers, norm) for _ in range(num_D))

    def forward(self, x: torch.Tensor, split: int | None = None) -> list[list[torch.Tensor]]:
        """`split`: run x[:split] and x[split:] apart (each its own batch statistics) and join the outputs."""
        if split is not None:
            a, b = self.forward(x[:split]), self.forward(x[split:])
            return [[torch.cat([fa, fb]) for fa, fb in zip(sa, sb, strict=True)] for sa, sb in zip(a, b, strict=True)]
        outs = []
        for k, d in enumerate(self.scales):
            if k > 0:
                x = downsample_input(x)
            outs.append(d(x))
        return outs


class Encoder(nn.Module):
    """E: an encoder-decoder on the real image whose output is averaged within each instance."""

    def __init__(self, input_nc: int, output_nc: int, nef: int = 16, n_downsampling: int = 4, norm: str = "instance"):
        super().__init__()
        self.model = nn.Sequential(*_encoder_decoder(input_nc, output_nc, nef, n_downsampling, 0, norm))
        init_weights(self)

    def forward(self, image: torch.Tensor, inst: torch.Tensor) -> torch.Tensor:
        return instance_mean(self.model(image), inst)


def instance_mean(features: torch.Tensor, inst: torch.Tensor) -> torch.Tensor:
    """Replace every pixel's features by the mean over its instance (per sample, per channel). Vectorised.

    features: (B, C, H, W); inst: (B, H, W) or (B, 1, H, W) integer instance ids.
    """
    b, c, h, w = features.shape
    ids = inst.reshape(b, h * w).long()
    # Make ids unique across the batch, then map them to 0..K-1.
    span = int(ids.max().item()) + 1 if ids.numel() else 1
    keys = ids + torch.arange(b, device=ids.device).unsqueeze(1) * span
    _, inverse = torch.unique(keys, return_inverse=True)
    k = int(inverse.max().item()) + 1
    flat = features.permute(0, 2, 3, 1).reshape(b * h * w, c)
    idx = inverse.reshape(-1)
    sums = flat.new_zeros(k, c).index_add_(0, idx, flat)
    counts = flat.new_zeros(k).index_add_(0, idx, flat.new_ones(idx.shape[0]))
    means = sums / counts.unsqueeze(1)
    return means[idx].reshape(b, h, w, c).permute(0, 3, 1, 2).contiguous()


def instance_edges(inst: torch.Tensor) -> torch.Tensor:
    """1 where any 4-neighbour has another instance id, else 0. (B, H, W) or (B,1,H,W) -> (B, 1, H, W) float."""
    t = inst if inst.dim() == 4 else inst.unsqueeze(1)
    edge = torch.zeros(t.shape, dtype=torch.bool, device=t.device)
    dx = t[..., :, 1:] != t[..., :, :-1]
    dy = t[..., 1:, :] != t[..., :-1, :]
    edge[..., :, 1:] |= dx
    edge[..., :, :-1] |= dx
    edge[..., 1:, :] |= dy
    edge[..., :-1, :] |= dy
    return edge.float()


# ---- builders from options -----------------------------------------------------------------------


def build_generator(opt: ModelOptions) -> nn.Module:
    if opt.netG == "global":
        return GlobalGenerator(
            opt.generator_input_nc, opt.output_nc, opt.ngf, opt.n_downsample_global, opt.n_blocks_global, opt.norm
        )
    return LocalEnhancer(
        opt.generator_input_nc,
        opt.output_nc,
        opt.ngf,
        opt.n_downsample_global,
        opt.n_blocks_global,
        opt.n_local_enhancers,
        opt.n_blocks_local,
        opt.norm,
    )


def build_discriminator(opt: ModelOptions) -> MultiscaleDiscriminator:
    return MultiscaleDiscriminator(opt.discriminator_input_nc, opt.ndf, opt.n_layers_D, opt.num_D, opt.norm)


def check_discriminator_fits(opt: ModelOptions, h: int, w: int) -> None:
    """D's every scale takes an h x w image: run on PyTorch's meta device (shapes only, no memory, no compute),
    as in training (train mode, batch 2). Else ValueError naming num_D and n_layers_D."""
    with torch.device("meta"):
        D = build_discriminator(opt).train()
        x = torch.empty(2, opt.discriminator_input_nc, h, w)
    try:
        D(x)
    except (ValueError, RuntimeError) as e:
        raise ValueError(
            f"num_D={opt.num_D} with n_layers_D={opt.n_layers_D}: at {h}x{w} (height x width) D's coarsest scale "
            f"(1/{2 ** (opt.num_D - 1)} of the image) is too small for its layers ({str(e).splitlines()[0][:120]}); "
            f"lower num_D or train at a larger size"
        ) from None


def network_shapes(opt: ModelOptions) -> dict[str, dict[str, list[int]]]:
    """The shape of every tensor of G, D (and E) that `opt` builds, by network and state-dict name: built on
    PyTorch's meta device (no memory, no compute)."""
    with torch.device("meta"):
        nets = {"G": build_generator(opt), "D": build_discriminator(opt), "E": build_encoder(opt)}
    return {k: state_shapes(net.state_dict()) for k, net in nets.items() if net is not None}


def state_shapes(state: dict[str, torch.Tensor]) -> dict[str, list[int]]:
    return {name: list(t.shape) for name, t in state.items()}


def build_encoder(opt: ModelOptions) -> Encoder | None:
    if not opt.instance_feat:
        return None
    return Encoder(opt.output_nc, opt.feat_num, opt.nef, opt.n_downsample_E, opt.norm)


def load_global_into_local(local: LocalEnhancer, global_state: dict[str, torch.Tensor]) -> dict[str, list[str]]:
    """Load a stage-1 GlobalGenerator state dict into a LocalEnhancer's global part, by parameter name.

    G1's output head (its last three layers) has no counterpart in G2 and is reported as skipped.
    Returns {"loaded": [...], "skipped": [...], "initialised": [...]} (names in G2's namespace).
    """
    target = local.model.state_dict()
    loaded, skipped = [], []
    to_load = {}
    for name, tensor in global_state.items():
        key = name[len("model.") :] if name.startswith("model.") else name
        if key not in target:
            skipped.append(name)
            continue
        if target[key].shape != tensor.shape:
            raise ValueError(
                f"stage-1 generator parameter {name} has shape {tuple(tensor.shape)} but the local enhancer's "
                f"global part expects {tuple(target[key].shape)}: stage 1's ngf must be the local ngf * "
                f"2^n_local_enhancers and n_downsample_global / n_blocks_global / label channels must match"
            )
        to_load[key] = tensor
        loaded.append("model." + key)
    missing = sorted(set(target) - set(to_load))
    if missing:
        raise ValueError(
            f"stage-1 generator state dict lacks {len(missing)} tensors of the global part "
            f"(first: model.{missing[0]}); was it saved from a GlobalGenerator with the same options?"
        )
    local.model.load_state_dict(to_load, strict=True)
    initialised = [n for n, _ in local.named_parameters() if not n.startswith("model.")]
    return {"loaded": loaded, "skipped": skipped, "initialised": initialised}
