import pytest
import torch

from model.options import ModelOptions


def tiny_options(**overrides) -> ModelOptions:
    """A pix2pixHD small enough for CPU tests: 8 classes, ngf 8, two downsamplings."""
    base = dict(
        label_nc=8,
        ngf=8,
        n_downsample_global=2,
        n_blocks_global=2,
        n_blocks_local=1,
        ndf=8,
        num_D=2,
        n_layers_D=2,
        nef=4,
        n_downsample_E=2,
        niter=1,
        niter_decay=0,
    )
    base.update(overrides)
    return ModelOptions(**base)


def tiny_batch(opt: ModelOptions, n: int = 2, h: int = 32, w: int = 32, seed: int = 0) -> dict[str, torch.Tensor]:
    """Blocky labels, instances and an image that is a function of them (so G can learn it)."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.randint(0, opt.label_nc, (n, h // 8, w // 8), generator=g)
    label = coarse.repeat_interleave(8, 1).repeat_interleave(8, 2).to(torch.uint8)
    inst = label.long() * 1000 + (torch.arange(w) >= w // 2).long()
    palette = torch.rand(opt.label_nc, 3, generator=g) * 2 - 1
    image = palette[label.long()].permute(0, 3, 1, 2).contiguous()
    return {"label": label, "inst": inst, "image": image}


@pytest.fixture
def opt() -> ModelOptions:
    return tiny_options()
