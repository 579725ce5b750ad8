"""Throughput and peak memory of the full pix2pixHD training step (G, D on [fake, real], D on fake for G,
losses, both Adam updates), on CPU or CUDA.

    python -m benchmarks.step --config global-1024 --batch 1 4 --precision fp32 bf16 --device cuda
    python -m benchmarks.step --config tiny --batch 2 --steps 10          # CPU smoke run

Every (config, batch, precision) combination is one row; all rows run in one invocation and the last
column is img/s relative to the first row, so figures from a noisy machine compare within the run.
Warm-up steps (allocator, cuDNN autotune, compilation) are timed apart from the measured steps.
"""

from __future__ import annotations

import argparse
import itertools
import resource
import time

import torch

from model.options import ModelOptions
from model.step import TrainStep

# Named configurations: (options, height, width). The paper's Cityscapes networks and a CPU-sized one.
CONFIGS: dict[str, tuple[dict, int, int]] = {
    "global-1024": (dict(netG="global", ngf=64, num_D=2), 512, 1024),
    "local-2048": (dict(netG="local", ngf=32, num_D=3), 1024, 2048),
    "tiny": (dict(netG="global", ngf=16, n_downsample_global=3, n_blocks_global=3, ndf=16, num_D=2), 64, 128),
}


def synthetic_batch(opt: ModelOptions, n: int, h: int, w: int, device: torch.device) -> dict[str, torch.Tensor]:
    """Blocky label and instance maps and an image in [-1, 1]; the step's cost does not depend on content."""
    g = torch.Generator().manual_seed(0)
    coarse = torch.randint(0, opt.label_nc, (n, h // 32, w // 32), generator=g)
    label = coarse.repeat_interleave(32, 1).repeat_interleave(32, 2).to(torch.uint8)
    inst = label.long() * 1000 + (torch.arange(w) // 64)
    image = torch.rand(n, 3, h, w, generator=g) * 2 - 1
    return {k: v.to(device) for k, v in {"label": label, "inst": inst, "image": image}.items()}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def measure(config: str, batch: int, precision: str, device: torch.device, steps: int, warmup: int, **kw) -> dict:
    overrides, h, w = CONFIGS[config]
    opt = ModelOptions(**overrides)
    step = TrainStep(opt, device, precision=precision, **kw)
    data = synthetic_batch(opt, batch, h, w, device)
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    t0 = time.perf_counter()
    for _ in range(warmup):
        step.step(data)
    _sync(device)
    warm = time.perf_counter() - t0
    t0 = time.perf_counter()
    for _ in range(steps):
        losses = step.step(data)
    _sync(device)
    took = time.perf_counter() - t0
    assert all(torch.isfinite(v) for v in losses.values()), losses
    if device.type == "cuda":
        peak_gib = torch.cuda.max_memory_allocated(device) / 2**30
    else:  # process-wide peak RSS (KiB on Linux)
        peak_gib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    del step, data
    return dict(
        config=config,
        batch=batch,
        precision=precision,
        img_s=steps * batch / took,
        step_ms=1000 * took / steps,
        warmup_s=warm,
        peak_gib=peak_gib,
    )


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m benchmarks.step", description=__doc__.split("\n\n")[0])
    p.add_argument("--config", nargs="+", default=["tiny"], choices=sorted(CONFIGS))
    p.add_argument("--batch", nargs="+", type=int, default=[1])
    p.add_argument("--precision", nargs="+", default=["fp32"], choices=["fp32", "bf16"])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--channels-last", action="store_true")
    a = p.parse_args(argv)
    device = torch.device(a.device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        print(f"device: {torch.cuda.get_device_name(device)}, torch {torch.__version__}")
    else:
        print(f"device: CPU ({torch.get_num_threads()} threads), torch {torch.__version__}")
    header = f"{'config':<12} {'batch':>5} {'prec':>5} {'img/s':>8} {'ms/step':>8} {'warmup s':>8} {'peak GiB':>8} {'ratio':>6}"
    print(header)
    base = None
    for config, batch, precision in itertools.product(a.config, a.batch, a.precision):
        r = measure(config, batch, precision, device, a.steps, a.warmup, channels_last=a.channels_last)
        base = base or r["img_s"]
        print(
            f"{r['config']:<12} {r['batch']:>5} {r['precision']:>5} {r['img_s']:>8.2f} {r['step_ms']:>8.1f} "
            f"{r['warmup_s']:>8.1f} {r['peak_gib']:>8.2f} {r['img_s'] / base:>6.2f}",
            flush=True,
        )


if __name__ == "__main__":
    main()
