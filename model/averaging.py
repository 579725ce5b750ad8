"""Generator averaging: an exponential moving average (EMA) of G's (and E's) weights, the copy that is validated,
judged, registered and rendered (imaginaire's pix2pixHD recipe, beta 0.999; the reference code has none).

After every optimizer step `ema = beta_t * ema + (1 - beta_t) * w` for each parameter that trains (a frozen one,
G1 while `niter_fix_global` holds it, keeps its average), with `beta_t = min(beta, (1 + t) / (10 + t))`, t the
updates so far: the first updates follow the weights closely, so an average of a short run is not dominated by
its random start. Buffers (batch norm's running statistics) are copied. Every worker holds the same weights after
each step (DDP), so every worker's average is the same without communication.
"""

from __future__ import annotations

import copy

import torch
from torch import nn


class Averaged:
    """The moving average of one module; `module` is the averaged copy (eval mode, no gradients)."""

    def __init__(self, source: nn.Module, beta: float):
        if not 0 < beta < 1:
            raise ValueError(f"option ema_beta={beta} must lie in (0, 1) to average (0 turns averaging off)")
        self.source, self.beta, self.updates = source, beta, 0
        self.module = copy.deepcopy(source).eval().requires_grad_(False)

    def beta_now(self) -> float:
        return min(self.beta, (1 + self.updates) / (10 + self.updates))

    @torch.no_grad()
    def update(self) -> None:
        pairs = [
            (a, p) for a, p in zip(self.module.parameters(), self.source.parameters(), strict=True) if p.requires_grad
        ]
        if pairs:
            averaged, trained = zip(*pairs, strict=True)
            torch._foreach_lerp_(list(averaged), [p.detach() for p in trained], 1 - self.beta_now())
        for a, b in zip(self.module.buffers(), self.source.buffers(), strict=True):
            a.copy_(b)
        self.updates += 1

    def restart(self) -> None:
        """The average starts again from the source's weights (a stage whose network has new parts)."""
        self.module.load_state_dict(self.source.state_dict())
        self.updates = 0


def shipped(state: dict, net: str) -> dict[str, torch.Tensor]:
    """The weights of `net` ('G' or 'E') a checkpoint's `state` ships: the average when it holds one."""
    return state.get(f"{net}_ema") or state[net]
