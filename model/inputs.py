"""Turn a batch (label ids, instance ids or edges, image) into the networks' input tensors, checking it first.

Bad input is a `ValueError` that names the offending ids or shapes, never a device-side assert. The checks run
where the batch is: give CPU tensors (pinned, as the data pipeline delivers them on GPU machines) and they cost
no GPU synchronisation; the copy to the device is then asynchronous.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.nn import functional as F

from model.networks import instance_edges
from model.options import ModelOptions


@dataclass
class Inputs:
    label: torch.Tensor  # (B, label_channels, H, W) float: one-hot labels (+ the instance-edge map)
    inst: torch.Tensor | None  # (B, H, W) int64 instance ids, when the batch had them
    image: torch.Tensor | None  # (B, output_nc, H, W) float in [-1, 1]


def _spatial(t: torch.Tensor, name: str) -> torch.Tensor:
    """Accept (B, H, W) or (B, 1, H, W); return (B, H, W)."""
    if t.dim() == 4 and t.shape[1] == 1:
        return t[:, 0]
    if t.dim() == 3:
        return t
    raise ValueError(f"{name} must have shape (B, H, W) or (B, 1, H, W), got {tuple(t.shape)}")


def _to(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Copy to `device` in the tensor's own dtype (the narrowest bytes), asynchronously from pinned memory."""
    return t.to(device, non_blocking=True)


def _check_label_ids(label: torch.Tensor, label_nc: int) -> None:
    if label.dtype.is_floating_point or label.dtype == torch.bool:
        raise ValueError(f"label must hold integer class ids (uint8/int), got dtype {label.dtype}")
    lo, hi = torch.aminmax(label)
    if lo.item() < 0 or hi.item() >= label_nc:
        bad = torch.unique(label[(label < 0) | (label >= label_nc)]).tolist()
        shown = ", ".join(str(v) for v in bad[:20]) + (" ..." if len(bad) > 20 else "")
        raise ValueError(
            f"label ids {shown} are outside [0, label_nc={label_nc}): raise label_nc above {max(bad)} "
            f"or remap those ids in the dataset"
        )


def prepare_inputs(
    opt: ModelOptions,
    label: torch.Tensor,
    image: torch.Tensor | None = None,
    inst: torch.Tensor | None = None,
    edges: torch.Tensor | None = None,
    device: torch.device | str | None = None,
) -> Inputs:
    """Validate a batch and build G's semantic input.

    label: (B, H, W) / (B, 1, H, W) integer ids when label_nc > 0, else (B, input_nc, H, W) float.
    image: (B, output_nc, H, W) in [-1, 1] (training). inst: instance ids. edges: a precomputed boundary map
    (used instead of computing it from `inst`).
    """
    device = torch.device(device) if device is not None else label.device
    semantic = _semantic(opt, label, device)
    b, h, w = semantic.shape[0], *semantic.shape[-2:]
    m = opt.size_multiple
    if h % m or w % m:
        raise ValueError(
            f"label size {h}x{w} is not a multiple of {m} (2^(n_downsample_global + local enhancers)): "
            f"crop or resize to e.g. {h // m * m or m}x{w // m * m or m}"
        )

    def same_size(t: torch.Tensor, name: str) -> None:
        if t.shape[0] != b or tuple(t.shape[-2:]) != (h, w):
            raise ValueError(f"{name} has shape {tuple(t.shape)} but label is {(b, h, w)} (batch, height, width)")

    inst_ids = None
    if inst is not None:
        inst = _spatial(inst, "inst")
        same_size(inst, "inst")
        if inst.dtype.is_floating_point:
            raise ValueError(f"inst must hold integer instance ids, got dtype {inst.dtype}")
        inst_ids = _to(inst, device).long()
    if not opt.no_instance:
        if edges is not None:
            edges = _spatial(edges, "edges")
            same_size(edges, "edges")
        semantic = torch.cat([semantic, _edge_map(edges, inst_ids, device)], 1)
    if opt.instance_feat and inst_ids is None:
        raise ValueError("instance_feat=true needs instance ids ('inst') in the batch for the feature encoder")
    if image is not None:
        if image.dim() != 4 or image.shape[1] != opt.output_nc:
            raise ValueError(f"image must be (B, output_nc={opt.output_nc}, H, W), got {tuple(image.shape)}")
        same_size(image, "image")
        image = _to(image, device).float()
    return Inputs(label=semantic, inst=inst_ids, image=image)


def _semantic(opt: ModelOptions, label: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Label ids one-hot (label_nc > 0), or the given float channels (label_nc = 0): (B, C, H, W) on `device`."""
    if opt.label_nc > 0:
        label = _spatial(label, "label")
        _check_label_ids(label, opt.label_nc)
        return F.one_hot(_to(label, device).long(), opt.label_nc).permute(0, 3, 1, 2).float()
    if label.dim() != 4 or label.shape[1] != opt.input_nc:
        raise ValueError(f"label with label_nc=0 must be (B, input_nc={opt.input_nc}, H, W), got {tuple(label.shape)}")
    return _to(label, device).float()


def _edge_map(edges: torch.Tensor | None, inst_ids: torch.Tensor | None, device) -> torch.Tensor:
    """The instance boundary channel: the precomputed one, else computed from the instance ids."""
    if edges is not None:
        return _to(edges, device).float().unsqueeze(1)
    if inst_ids is not None:
        return instance_edges(inst_ids)
    raise ValueError("the model uses instance boundaries (no_instance=false): the batch needs 'inst' or 'edges'")


def synthetic_batch(opt: ModelOptions, n: int, h: int, w: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """A CPU batch of the right shapes and dtypes for measuring a step (its cost does not depend on content):
    blocky label and instance maps, an image in [-1, 1]."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.randint(0, max(opt.label_nc, 1), (n, -(-h // 32), -(-w // 32)), generator=g)
    label = coarse.repeat_interleave(32, 1).repeat_interleave(32, 2)[:, :h, :w].to(torch.uint8).contiguous()
    if opt.label_nc == 0:
        label = label.unsqueeze(1).expand(n, opt.input_nc, h, w).float().contiguous()
    inst = (label if label.dim() == 3 else label[:, 0]).long() * 1000 + (torch.arange(w) // 64)
    image = torch.rand(n, opt.output_nc, h, w, generator=g) * 2 - 1
    return {"label": label, "inst": inst, "image": image}
