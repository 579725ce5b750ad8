"""FID (Heusel et al., 2017) and KID (Binkowski et al., 2018) between real and generated images, on the features
of a network the user gives as a file: NVIDIA's TorchScript `inception-2015-12-05.pt` (what StyleGAN's metrics and
many FID tools use; called with `return_features=True` it gives the 2048-d pool features of uint8 images of any
size), the `pt_inception-2015-12-05` state dict (the same graph's weights in PyTorch names, pytorch-fid's file:
loaded with weights_only=True into model/inception.py's network, then scripted), or any TorchScript /
torch.export network that maps a uint8 image batch to one vector per image.

The statistics are torchmetrics': features are computed wherever the images are (batched, on Ray workers), then
fed to torchmetrics' FID and KID through a pass-through feature module. FID is biased upward below a few thousand
images; KID is unbiased and the one to read for small sets (its std over subsets says how far to trust it).
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from evaluation.modules import file_identity, load_module, probe
from evaluation.segscore import EvaluationError
from model.inception import load_fid_inception

PROBE_SHAPE = (2, 3, 64, 128)


@dataclass
class FeatureNet:
    module: nn.Module
    identity: str  # sha256:<hex> of its file
    dim: int
    kwargs: dict = field(default_factory=dict)

    def features(self, images_uint8: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            out = self.module(images_uint8, **self.kwargs)
        out = out[0] if isinstance(out, (tuple, list)) else out
        return out.float().flatten(1).cpu()


def _takes(module, argument: str) -> bool:
    schema = getattr(getattr(module, "forward", None), "schema", None)  # a TorchScript method's signature
    return schema is not None and argument in str(schema)


def check_feature_net(module, what: str) -> tuple[int, dict]:
    kwargs = {"return_features": True} if _takes(module, "return_features") else {}
    out = probe(module, torch.randint(0, 256, PROBE_SHAPE, dtype=torch.uint8), what, **kwargs)
    if out.dim() != 2 or out.shape[0] != PROBE_SHAPE[0]:
        raise EvaluationError(
            f"{what} returns shape {tuple(out.shape)} for {PROBE_SHAPE[0]} images: FID/KID need one feature vector per "
            f"image, (N, D) (Inception's 2048-d pool features: NVIDIA's inception-2015-12-05.pt gives them with "
            f"return_features=True)"
        )
    return int(out.shape[1]), kwargs


def _fid_inception_from_state_dict(path: str) -> nn.Module | None:
    """The FID Inception network when `path` is a state dict of it (pt_inception-2015-12-05); None when the file is
    not a state dict at all (load_module then says what it is)."""
    import zipfile

    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as archive:
            if any(n.endswith(("/constants.pkl", "/archive_format")) for n in archive.namelist()):
                return None  # TorchScript or torch.export
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)  # tensors only: no code runs
    except Exception:  # noqa: BLE001 - not a weights file (or a pickle of objects, refused)
        return None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        return None
    try:
        return torch.jit.script(load_fid_inception(state))
    except ValueError as e:
        raise EvaluationError(
            f"feature network {path} is a state dict, {e}: give pt_inception-2015-12-05-6726825d.pth, NVIDIA's "
            f"TorchScript inception-2015-12-05.pt, or a TorchScript network mapping uint8 images to one vector each"
        ) from None


def load_feature_net(path: str) -> FeatureNet:
    if not Path(path).is_file():
        raise EvaluationError(f"feature network {path}: no such file")
    module = _fid_inception_from_state_dict(path) or load_module(path, "feature network")
    dim, kwargs = check_feature_net(module, f"feature network {path}")
    return FeatureNet(module, file_identity(path), dim, kwargs)


class _Given(nn.Module):
    """torchmetrics' FID/KID run their `feature` module on what `update` gets: here, features already computed."""

    def __init__(self, dim: int):
        super().__init__()
        self.num_features = dim

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return features


@dataclass
class FeatureDistance:
    """Features of real and of generated images, accumulated over batches; FID and KID between the two sets."""

    real: list[torch.Tensor] = field(default_factory=list)
    fake: list[torch.Tensor] = field(default_factory=list)

    def update(self, features: torch.Tensor, real: bool) -> None:
        (self.real if real else self.fake).append(features.detach().float().cpu())

    def counts(self) -> tuple[int, int]:
        return sum(len(f) for f in self.real), sum(len(f) for f in self.fake)

    def fid(self) -> float:
        from torchmetrics.image.fid import FrechetInceptionDistance

        if min(self.counts()) < 2:
            return math.nan
        metric = FrechetInceptionDistance(feature=_Given(self.real[0].shape[1]))
        metric.update(torch.cat(self.real).double(), real=True)
        metric.update(torch.cat(self.fake).double(), real=False)
        return float(metric.compute())

    def kid(self, subsets: int = 100, subset_size: int = 1000) -> tuple[float, float]:
        """KID's mean and std over `subsets` random subsets of min(subset_size, smaller set) images each."""
        from torchmetrics.image.kid import KernelInceptionDistance

        n = min(self.counts())
        if n < 2:
            return math.nan, math.nan
        with warnings.catch_warnings():  # "will save all extracted features": they are kept here anyway
            warnings.simplefilter("ignore", UserWarning)
            metric = KernelInceptionDistance(
                feature=_Given(self.real[0].shape[1]), subsets=subsets, subset_size=min(subset_size, n)
            )
        metric.update(torch.cat(self.real), real=True)
        metric.update(torch.cat(self.fake), real=False)
        mean, std = metric.compute()
        return float(mean), float(std)
