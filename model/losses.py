"""pix2pixHD losses: adversarial (over all discriminator scales), feature matching, VGG perceptual.

Every loss is computed in fp32, whatever precision the networks ran in.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from model.vgg import VGG19Features

DFeatures = list[list[torch.Tensor]]  # per discriminator scale, every layer's output; the last is the logit map


def gan_loss(preds: DFeatures, target_is_real: bool, mode: str, for_discriminator: bool = True) -> torch.Tensor:
    """Adversarial loss summed over discriminator scales (each scale's last output is its patch logits).

    lsgan: MSE to 1 (real) / 0 (fake). vanilla: BCE with logits. hinge: D gets relu(1 - x) on real and
    relu(1 + x) on fake; G gets -mean(x) (only `target_is_real=True` makes sense for G).
    """
    total = torch.zeros((), device=preds[0][-1].device)
    for scale in preds:
        x = scale[-1].float()
        if mode == "lsgan":
            total = total + F.mse_loss(x, torch.full_like(x, 1.0 if target_is_real else 0.0))
        elif mode == "vanilla":
            total = total + F.binary_cross_entropy_with_logits(x, torch.full_like(x, 1.0 if target_is_real else 0.0))
        elif mode == "hinge":
            if for_discriminator:
                total = total + (F.relu(1.0 - x) if target_is_real else F.relu(1.0 + x)).mean()
            else:
                if not target_is_real:
                    raise ValueError("hinge loss for the generator is defined on target_is_real=True only")
                total = total - x.mean()
        else:
            raise ValueError(f"gan_mode={mode!r} is not one of lsgan, vanilla, hinge")
    return total


class _L1Distance(torch.autograd.Function):
    """mean |a - b| computed in fp32 whatever the inputs' dtype; `b` is a target (no gradient).

    F.l1_loss on fp32 copies would keep the fp32 difference for backward (4 bytes per element, for every
    full-resolution VGG and D feature map); the gradient only needs its sign, kept here as int8.
    """

    @staticmethod
    def forward(ctx, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        diff = a.to(torch.float32, copy=True).sub_(b)  # one fp32 temporary, freed on return
        ctx.save_for_backward(diff.gt(0).to(torch.int8).sub_(diff.lt(0).to(torch.int8)))
        ctx.dtype = a.dtype
        return diff.abs_().mean()

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        (sign,) = ctx.saved_tensors
        return sign.to(ctx.dtype) * (grad / sign.numel()).to(ctx.dtype), None


def l1_distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """mean |a - b| in fp32, the gradient for `a` only (= F.l1_loss(a.float(), b.detach().float()))."""
    return _L1Distance.apply(a, b.detach())


def feature_matching_loss(fake: DFeatures, real: DFeatures, n_layers_D: int, lambda_feat: float) -> torch.Tensor:
    """sum_i sum_j (1/num_D) * (4/(n_layers_D+1)) * L1(D_ij(fake), D_ij(real).detach()) * lambda_feat,
    over every output of each D but its last (the logits)."""
    num_D = len(fake)
    w = (1.0 / num_D) * (4.0 / (n_layers_D + 1)) * lambda_feat
    total = torch.zeros((), device=fake[0][0].device)
    for f_scale, r_scale in zip(fake, real, strict=True):
        for f, r in zip(f_scale[:-1], r_scale[:-1], strict=True):
            total = total + w * l1_distance(f, r)
    return total


class VGGLoss(nn.Module):
    """L1 between VGG19 activations of fake and real at relu1_1..relu5_1, weighted 1/32, 1/16, 1/8, 1/4, 1.

    As in the official code, images in [-1, 1] go into VGG as they are. The real image's features are targets:
    they are computed without autograd, so backward runs through VGG for the fake image only.
    """

    WEIGHTS = (1.0 / 32, 1.0 / 16, 1.0 / 8, 1.0 / 4, 1.0)

    def __init__(self, vgg: VGG19Features, lambda_vgg: float):
        super().__init__()
        self.vgg = vgg
        self.lambda_vgg = lambda_vgg

    def forward(self, fake: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            real_feats = self.vgg(real)
        total = torch.zeros((), device=fake.device)
        for w, f, r in zip(self.WEIGHTS, self.vgg(fake), real_feats, strict=True):
            total = total + w * l1_distance(f, r)
        return total * self.lambda_vgg
