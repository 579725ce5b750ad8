"""Learning-rate schedule and image pool, as in pix2pixHD."""

from __future__ import annotations

import torch


def lr_at(epoch: int, lr: float, niter: int, niter_decay: int) -> float:
    """lr for 0-based `epoch`: constant for `niter` epochs, then linear decay over `niter_decay` epochs.

    Epoch niter keeps the full lr, each later epoch loses lr/niter_decay, epoch niter+niter_decay reaches 0
    (the official code's steps, 0-based).
    """
    if epoch < niter or niter_decay <= 0:
        return lr
    return lr * max(0.0, (niter + niter_decay - epoch) / niter_decay)


class ImagePool:
    """A buffer of earlier generated images; D sees a mix of new and old fakes (Shrivastava et al. 2017). The
    step pools each fake with its label map (channels concatenated), so an old fake comes back with its own label.

    Each incoming image fills the pool while it is not full; after that, with probability 1/2 it is swapped
    with a random stored image (which is returned instead). pool_size 0 returns the input unchanged.
    """

    def __init__(self, pool_size: int, seed: int = 0):
        self.pool_size = pool_size
        self.images: list[torch.Tensor] = []
        self.rng = torch.Generator().manual_seed(seed)

    def query(self, images: torch.Tensor) -> torch.Tensor:
        if self.pool_size == 0:
            return images
        out = []
        for img in images.detach():
            img = img.unsqueeze(0)
            if len(self.images) < self.pool_size:
                self.images.append(img.clone())
                out.append(img)
            elif torch.rand((), generator=self.rng).item() > 0.5:
                i = int(torch.randint(len(self.images), (), generator=self.rng))
                out.append(self.images[i])
                self.images[i] = img.clone()
            else:
                out.append(img)
        return torch.cat(out, 0)
