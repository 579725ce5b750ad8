"""Peak tensor memory of a training step at full resolution, measured on a CPU (no GPU needed).

`StorageTracker` follows every tensor storage that ops create while it is active (and those handed to it at
the start: parameters, optimizer state, gradients, inputs) and records the live total after every op.

These networks are fully convolutional, so every activation's size is proportional to the pixel count and
everything else (parameters, gradients, Adam moments) is constant. `extrapolate_peak` runs the same step at
two small sizes and solves, op by op, live(pixels) = a + b * pixels; the peak at the target size is the
largest of those lines there. The op sequence must be identical at both sizes (it is checked).

What it counts: tensors, at their exact sizes. What a GPU adds on top: the caching allocator's rounding and
fragmentation, cuDNN workspaces, and the CUDA context (≈ 0.5 GiB, outside torch's `max_memory_allocated`).
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from functools import partial

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves


class StorageTracker(TorchDispatchMode):
    """Live bytes of tracked tensor storages after each op (`timeline`), and their maximum (`peak`)."""

    def __init__(self, existing: Iterable[torch.Tensor] = ()):
        super().__init__()
        self._seen: set[int] = set()  # ids of live tracked storages
        self.live = 0
        self.timeline: list[int] = []
        for t in existing:
            self._track(t)
        self.start = self.live

    @property
    def peak(self) -> int:
        return max(self.timeline, default=self.live)

    def _track(self, t: torch.Tensor) -> None:
        if not isinstance(t, torch.Tensor) or t.device.type == "meta":
            return
        storage = t.untyped_storage()
        key = id(storage)
        if key in self._seen:
            return
        nbytes = storage.nbytes()
        self._seen.add(key)
        self.live += nbytes
        weakref.finalize(storage, self._free, key, nbytes)

    def _free(self, key: int, nbytes: int) -> None:
        self._seen.discard(key)
        self.live -= nbytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            self._track(t)
        self.timeline.append(self.live)
        return out


def state_tensors(*objects) -> list[torch.Tensor]:
    """Every tensor a step holds before it runs: module parameters, buffers and gradients, optimizer state."""
    out: list[torch.Tensor] = []
    for obj in objects:
        if obj is None:
            continue
        if isinstance(obj, torch.nn.Module):
            for p in obj.parameters():
                out += [p] + ([p.grad] if p.grad is not None else [])
            out += list(obj.buffers())
        elif isinstance(obj, torch.optim.Optimizer):
            out += [v for s in obj.state.values() for v in s.values() if isinstance(v, torch.Tensor)]
        elif isinstance(obj, torch.Tensor):
            out.append(obj)
    return out


@dataclass(frozen=True)
class PeakEstimate:
    peak_bytes: int  # at the target size
    static_bytes: int  # live before the step (parameters, gradients, optimizer state)
    ops: int

    @property
    def peak_gib(self) -> float:
        return self.peak_bytes / 2**30


def extrapolate_peak(
    run: Callable[[int, int], StorageTracker], sizes: tuple[tuple[int, int], tuple[int, int]], target: tuple[int, int]
) -> PeakEstimate:
    """`run(h, w)` performs one step at h x w under a fresh StorageTracker and returns it. Runs it at the two
    `sizes` and extrapolates every op's live bytes linearly in the pixel count to `target`."""
    (h1, w1), (h2, w2) = sizes
    a, b = run(h1, w1), run(h2, w2)
    if len(a.timeline) != len(b.timeline):
        raise RuntimeError(
            f"the step ran {len(a.timeline)} ops at {h1}x{w1} but {len(b.timeline)} at {h2}x{w2}: its op "
            f"sequence depends on the size, so it cannot be extrapolated"
        )
    p1, p2, pt = h1 * w1, h2 * w2, target[0] * target[1]
    slope = [(y2 - y1) / (p2 - p1) for y1, y2 in zip(a.timeline, b.timeline, strict=True)]
    peak = max(y1 + s * (pt - p1) for y1, s in zip(a.timeline, slope, strict=True))
    return PeakEstimate(peak_bytes=int(peak), static_bytes=a.start, ops=len(a.timeline))


def reduced_sizes(
    size: tuple[int, int], multiple: int, divisors: tuple[int, int] = (8, 4)
) -> tuple[tuple[int, int], tuple[int, int]]:
    """Two sizes to extrapolate from: `size` divided by `divisors`, in multiples of `multiple` (what G needs) and
    at least 4 times it (G's bottleneck must be wider than its padding); `size` itself when they coincide."""
    h, w = size
    m = multiple
    a, b = ((max(4 * m, h // k // m * m), max(4 * m, w // k // m * m)) for k in divisors)
    if a == b:
        b = (h, w)
    if a == b:
        raise ValueError(f"{h}x{w} is too small to extrapolate from smaller sizes; measure it directly")
    return a, b


def step_peak(
    build: Callable[[], object],
    batch_at: Callable[[int, int], dict[str, torch.Tensor]],
    size: tuple[int, int],
    multiple: int,
    divisors: tuple[int, int] = (8, 4),
) -> PeakEstimate:
    """Peak memory of one training step at `size`, extrapolated from two smaller sizes (`measure_step`)."""
    return extrapolate_peak(partial(measure_step, build, batch_at), reduced_sizes(size, multiple, divisors), size)


def measure_step(
    build: Callable[[], object], batch_at: Callable[[int, int], dict[str, torch.Tensor]], h: int, w: int
) -> StorageTracker:
    """One training step at h x w under a StorageTracker: `build()` makes a TrainStep (or one like it),
    `batch_at(h, w)` a CPU batch. One warm-up step first, so Adam's moments exist, as in training."""
    step, batch = build(), batch_at(h, w)
    step.step(batch)
    held = state_tensors(step.G, step.D, step.E, step.opt_G, step.opt_D, *batch.values())
    with StorageTracker(held) as tracker:
        step.step(batch)
    return tracker
