"""Label map (+ instances, + instance features) -> image, in eval mode without gradients."""

from __future__ import annotations

import torch
from torch import nn

from model.inputs import prepare_inputs
from model.options import ModelOptions


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """Generator output or a photo in [-1, 1] -> uint8 of the same shape (channels first): the one quantisation of
    images the project makes (pictures, PNGs served, FID/KID features)."""
    return ((images.detach().float() + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)


@torch.no_grad()
def generate(
    G: nn.Module,
    opt: ModelOptions,
    label: torch.Tensor,
    inst: torch.Tensor | None = None,
    features: torch.Tensor | None = None,
    edges: torch.Tensor | None = None,
) -> torch.Tensor:
    """Render images in [-1, 1], (B, output_nc, H, W), on G's device.

    With `instance_feat`, `features` is the (B, feat_num, H, W) instance feature map: E's output on a real
    image (reconstruction) or per-class cluster centres painted per instance (editing / sampling).
    """
    device = next(G.parameters()).device
    x = prepare_inputs(opt, label, inst=inst, edges=edges, device=device)
    g_in = x.label
    if opt.instance_feat:
        if features is None:
            raise ValueError("this generator was trained with instance_feat: pass the instance feature map")
        if features.shape[1] != opt.feat_num or features.shape[-2:] != g_in.shape[-2:]:
            raise ValueError(
                f"features must be (B, feat_num={opt.feat_num}, {g_in.shape[-2]}, {g_in.shape[-1]}), "
                f"got {tuple(features.shape)}"
            )
        g_in = torch.cat([g_in, features.to(device, g_in.dtype)], 1)
    was_training = G.training
    G.eval()
    try:
        return G(g_in)
    finally:
        G.train(was_training)
