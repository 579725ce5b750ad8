"""Throughput and peak memory of the full pix2pixHD training step (G, D on [fake, real], D on fake for G,
losses, both Adam updates), on CPU or CUDA.

    python -m benchmarks.step --preset reference --device cuda     # the GPU issue's table + optimised rows
    python -m benchmarks.step --config global-1024 --batch 1 4 --precision fp32 bf16 --device cuda
    python -m benchmarks.step --row local-2048:1:bf16:compile:ckpt --device cuda
    python -m benchmarks.step --config tiny --batch 2 --steps 10          # CPU smoke run

A row is config:batch:precision[:compile][:ckpt][:cl] (torch.compile of the networks, activation
checkpointing, channels_last). --config/--batch/--precision give their product as rows. All rows run in one
invocation; `ratio` is img/s relative to the first row (the preset starts with fp32 batch-1 eager), so figures
from a noisy machine compare within the run. Warm-up steps (allocator, cuDNN autotune, compilation) are timed
apart. TFLOP/s uses the FLOPs of one step counted by torch.utils.flop_counter (per image, per config).
"""

from __future__ import annotations

import argparse
import itertools
import resource
import time
from dataclasses import dataclass

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


PRESETS = {
    "reference": [
        "global-1024:1:fp32",
        "global-1024:4:fp32",
        "global-1024:4:bf16",
        "local-2048:1:fp32",
        "local-2048:2:bf16",
        "global-1024:1:bf16:compile",
        "global-1024:4:bf16:compile",
        "global-1024:8:bf16:compile",
        "local-2048:1:bf16:compile",
        "local-2048:2:bf16:compile",
        "local-2048:4:bf16:compile",
        "local-2048:1:bf16:compile:ckpt",
    ],
}


@dataclass(frozen=True)
class Row:
    config: str
    batch: int
    precision: str
    compile: bool = False
    ckpt: bool = False
    channels_last: bool = False

    @classmethod
    def parse(cls, text: str) -> Row:
        parts = text.split(":")
        if len(parts) < 3 or parts[0] not in CONFIGS or parts[2] not in ("fp32", "bf16"):
            raise SystemExit(
                f"row {text!r}: expected config:batch:fp32|bf16[:compile][:ckpt][:cl], configs {sorted(CONFIGS)}"
            )
        flags = set(parts[3:])
        unknown = flags - {"compile", "ckpt", "cl"}
        if unknown:
            raise SystemExit(f"row {text!r}: unknown flags {sorted(unknown)} (compile, ckpt, cl)")
        return cls(parts[0], int(parts[1]), parts[2], "compile" in flags, "ckpt" in flags, "cl" in flags)

    @property
    def label(self) -> str:
        return ":".join([self.precision] + [f for f, on in (("compile", self.compile), ("ckpt", self.ckpt),
                                                             ("cl", self.channels_last)) if on])  # fmt: skip


def flops_per_image(config: str, device: torch.device) -> float:
    """FLOPs of one training step at batch 1 (forward + backward + the G pass through D), eager fp32."""
    from torch.utils.flop_counter import FlopCounterMode

    overrides, h, w = CONFIGS[config]
    opt = ModelOptions(**overrides)
    step = TrainStep(opt, device, precision="fp32", compile=None)
    data = synthetic_batch(opt, 1, h, w, device)
    with FlopCounterMode(display=False) as counter:
        step.step(data)
    return float(counter.get_total_flops())


def measure_row(row: Row, device: torch.device, steps: int, warmup: int) -> dict:
    return measure(row.config, row.batch, row.precision, device, steps, warmup, channels_last=row.channels_last,
                   compile="inductor" if row.compile else None, activation_checkpointing=row.ckpt)  # fmt: skip


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
    p.add_argument("--preset", choices=sorted(PRESETS))
    p.add_argument("--row", action="append", default=[], help="config:batch:precision[:compile][:ckpt][:cl]")
    p.add_argument("--config", nargs="+", default=[], choices=sorted(CONFIGS))
    p.add_argument("--batch", nargs="+", type=int, default=[1])
    p.add_argument("--precision", nargs="+", default=["fp32"], choices=["fp32", "bf16"])
    p.add_argument("--compile", action="store_true", help="torch.compile the networks (product rows)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--channels-last", action="store_true")
    p.add_argument("--no-flops", action="store_true", help="skip counting FLOPs (TFLOP/s column empty)")
    a = p.parse_args(argv)
    rows = [Row.parse(r) for r in PRESETS.get(a.preset, [])] + [Row.parse(r) for r in a.row]
    rows += [
        Row(c, b, pr, a.compile, False, a.channels_last)
        for c, b, pr in itertools.product(a.config, a.batch, a.precision)
    ]
    if not rows:
        rows = [Row("tiny", 1, "fp32")]
    device = torch.device(a.device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        print(f"device: {torch.cuda.get_device_name(device)}, torch {torch.__version__}")
    else:
        print(f"device: CPU ({torch.get_num_threads()} threads), torch {torch.__version__}")
    flops = {} if a.no_flops else {c: flops_per_image(c, device) for c in dict.fromkeys(r.config for r in rows)}
    for c, f in flops.items():
        print(f"{c}: {f / 1e12:.2f} TFLOP per image per step")
    print(f"{'config':<12} {'batch':>5} {'mode':<22} {'img/s':>8} {'TFLOP/s':>8} {'ms/step':>8} {'warmup s':>8} "
          f"{'peak GiB':>8} {'ratio':>6}")  # fmt: skip
    base = None
    for row in rows:
        r = measure_row(row, device, a.steps, a.warmup)
        base = base or r["img_s"]
        tflops = f"{r['img_s'] * flops[row.config] / 1e12:8.1f}" if row.config in flops else f"{'':>8}"
        print(f"{row.config:<12} {row.batch:>5} {row.label:<22} {r['img_s']:>8.2f} {tflops} {r['step_ms']:>8.1f} "
              f"{r['warmup_s']:>8.1f} {r['peak_gib']:>8.2f} {r['img_s'] / base:>6.2f}", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
