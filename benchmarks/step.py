"""Throughput and peak memory of the full pix2pixHD training step (G, D, feature matching, VGG19, both Adam
updates), on CPU or CUDA, for the optimised step and the straightforward reference step.

    python -m benchmarks.step --preset reference --device cuda     # the GPU issue's table + optimised rows
    python -m benchmarks.step --config global-1024 --batch 1 4 --precision fp32 bf16 --device cuda
    python -m benchmarks.step --row local-2048:1:bf16:compile:ckpt --device cuda
    python -m benchmarks.step --config tiny --batch 2 --steps 10          # CPU smoke run

A row is config:batch:precision[:compile][:graphs][:ckpt][:cl][:ref]: torch.compile of the networks (inductor,
also on a CPU), the same with CUDA graphs (mode reduce-overhead; eager on a CPU), activation checkpointing,
channels_last, and `ref` for `benchmarks.reference_step.ReferenceStep` (the step written the
straightforward way: three D passes, D weight gradients in G's backward, fp32 labels). --config/--batch/
--precision give their product as rows. All rows run in one invocation; `ratio` is img/s relative to the first
row (the preset starts with the reference fp32 batch-1 eager row), so figures from a noisy machine compare
within the run. Warm-up steps (allocator, cuDNN autotune, compilation) are timed apart; `graphs` counts what
Dynamo captured in warm-up, `+n` recompilations during the timed steps and `/nbr` graph breaks. The VGG19 loss
runs with random weights (its cost does not depend on them; --no-vgg drops it). FLOPs per image are counted
once per kind of step with torch.utils.flop_counter on the CPU, at 1/16 and 1/4 of the pixels and extrapolated
to full size (the count is linear in the pixel count, up to padding effects): seconds to a minute per kind of step.
"""

from __future__ import annotations

import argparse
import itertools
import resource
import time
from dataclasses import dataclass, replace

import torch

from benchmarks.reference_step import ReferenceStep
from model.inputs import synthetic_batch as make_batch
from model.memory import reduced_sizes
from model.options import ModelOptions
from model.step import TrainStep
from model.vgg import random_weights_file

# Named configurations: (options, height, width). The paper's Cityscapes networks and a CPU-sized one.
CONFIGS: dict[str, tuple[dict, int, int]] = {
    "global-1024": (dict(netG="global", ngf=64, num_D=2), 512, 1024),
    "local-2048": (dict(netG="local", ngf=32, num_D=3), 1024, 2048),
    "tiny": (dict(netG="global", ngf=16, n_downsample_global=3, n_blocks_global=3, ndf=16, num_D=2), 64, 128),
}


def synthetic_batch(opt: ModelOptions, n: int, h: int, w: int, device: torch.device) -> dict[str, torch.Tensor]:
    """`model.inputs.synthetic_batch`; for CUDA in pinned host memory, as the data pipeline delivers batches: the
    step checks label ids on the host and copies asynchronously (a batch already on the GPU would cost a
    synchronisation per step)."""
    batch = make_batch(opt, n, h, w)
    return {k: v.pin_memory() for k, v in batch.items()} if device.type == "cuda" else batch


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


PRESETS = {
    "reference": [
        "global-1024:1:fp32:ref",
        "global-1024:4:fp32:ref",
        "global-1024:4:bf16:ref",
        "local-2048:1:fp32:ref",
        "local-2048:2:bf16:ref",
        "global-1024:1:fp32",
        "global-1024:1:bf16:compile",
        "global-1024:4:bf16:compile",
        "global-1024:8:bf16:compile",
        "local-2048:1:fp32",
        "local-2048:1:bf16:compile",
        "local-2048:2:bf16:compile",
        "local-2048:4:bf16:compile",
        "local-2048:1:bf16:compile:ckpt",
        "local-2048:1:bf16:ckpt",  # the eager memory mode (7.6 GiB estimated), beside the compiled one above
        "global-1024:1:bf16:graphs",
        "global-1024:4:bf16:graphs",
        "local-2048:1:bf16:graphs:ckpt",
    ],
}
FLAGS = ("compile", "graphs", "ckpt", "cl", "ref")


@dataclass(frozen=True)
class Row:
    config: str
    batch: int
    precision: str
    compile: bool = False
    graphs: bool = False
    ckpt: bool = False
    channels_last: bool = False
    ref: bool = False

    @classmethod
    def parse(cls, text: str) -> Row:
        parts = text.split(":")
        if len(parts) < 3 or parts[0] not in CONFIGS or parts[2] not in ("fp32", "bf16") or not parts[1].isdigit():
            raise SystemExit(
                f"row {text!r}: expected config:batch:fp32|bf16[:{']['.join(FLAGS)}], configs {sorted(CONFIGS)}"
            )
        flags = set(parts[3:])
        unknown = flags - set(FLAGS)
        if unknown:
            raise SystemExit(f"row {text!r}: unknown flags {sorted(unknown)} ({', '.join(FLAGS)})")
        return cls(parts[0], int(parts[1]), parts[2], *(f in flags for f in FLAGS))

    @property
    def label(self) -> str:
        flags = [
            f
            for f, on in zip(FLAGS, (self.compile, self.graphs, self.ckpt, self.channels_last, self.ref), strict=True)
            if on
        ]
        return ":".join([self.precision, *flags])


def _compile_option(row: Row) -> str | None:
    """inductor (on a CPU too: its C++ backend), or inductor with CUDA graphs (a GPU mode: eager on a CPU)."""
    if not (row.compile or row.graphs):
        return None
    return "reduce-overhead" if row.graphs else "inductor"


def build_step(row: Row, device: torch.device, vgg: bool, seed: int = 0) -> TrainStep:
    overrides, _, _ = CONFIGS[row.config]
    opt = ModelOptions(**overrides, vgg_weights=random_weights_file() if vgg else None)
    cls = ReferenceStep if row.ref else TrainStep
    return cls(
        opt,
        device,
        precision=row.precision,
        channels_last=row.channels_last,
        seed=seed,
        compile=_compile_option(row),
        activation_checkpointing=row.ckpt,
    )


def flops_per_image(row: Row, vgg: bool) -> float:
    """FLOPs of one training step per image (forward, backward, recomputation), counted on the CPU in fp32."""
    from torch.utils.flop_counter import FlopCounterMode

    overrides, h, w = CONFIGS[row.config]
    counts = []
    sizes = reduced_sizes((h, w), ModelOptions(**overrides).size_multiple, (4, 2))
    for hh, ww in sizes:
        step = build_step(
            replace(row, batch=1, precision="fp32", compile=False, graphs=False), torch.device("cpu"), vgg
        )
        data = synthetic_batch(step.opt, 1, hh, ww, torch.device("cpu"))
        with FlopCounterMode(display=False) as counter:
            step.step(data)
        counts.append(float(counter.get_total_flops()))
    (p1, p2), pt = (a * b for a, b in sizes), h * w
    return counts[0] + (counts[1] - counts[0]) * (pt - p1) / (p2 - p1)


def flops_key(row: Row) -> tuple[str, bool, bool]:
    return row.config, row.ref, row.ckpt


def _graphs(compiled: bool, warm: int, total: int, breaks: int) -> str:
    """Graphs Dynamo captured during warm-up, '+n' recompiled during the timed steps, '/nbr' graph breaks."""
    if not compiled:
        return "-"
    return f"{warm}" + (f"+{total - warm}" if total > warm else "") + (f"/{breaks}br" if breaks else "")


def measure(row: Row, device: torch.device, steps: int, warmup: int, vgg: bool) -> dict:
    from torch._dynamo.utils import counters

    _, h, w = CONFIGS[row.config]
    torch._dynamo.reset()
    counters.clear()
    step = build_step(row, device, vgg)
    data = synthetic_batch(step.opt, row.batch, h, w, device)
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    t0 = time.perf_counter()
    for _ in range(warmup):
        step.step(data)
    _sync(device)
    warm = time.perf_counter() - t0
    graphs_warm = counters["stats"]["unique_graphs"]
    t0 = time.perf_counter()
    for _ in range(steps):
        losses = step.step(data)
    _sync(device)
    took = time.perf_counter() - t0
    graphs = _graphs(
        step.compiled is not None,
        graphs_warm,
        counters["stats"]["unique_graphs"],
        sum(counters["graph_break"].values()),
    )
    assert all(torch.isfinite(v) for v in losses.values()), losses
    if device.type == "cuda":
        peak_gib = torch.cuda.max_memory_allocated(device) / 2**30
    else:  # process-wide peak RSS (KiB on Linux)
        peak_gib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    del step, data
    return dict(
        img_s=steps * row.batch / took, step_ms=1000 * took / steps, warmup_s=warm, peak_gib=peak_gib, graphs=graphs
    )


def rows_from_args(a: argparse.Namespace) -> list[Row]:
    rows = [Row.parse(r) for r in PRESETS.get(a.preset, [])] + [Row.parse(r) for r in a.row]
    rows += [
        Row(c, b, pr, compile=a.compile, channels_last=a.channels_last)
        for c, b, pr in itertools.product(a.config, a.batch, a.precision)
    ]
    return rows or [Row("tiny", 1, "fp32")]


def row_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--preset", choices=sorted(PRESETS))
    p.add_argument("--row", action="append", default=[], help=f"config:batch:precision[:{']['.join(FLAGS)}]")
    p.add_argument("--config", nargs="+", default=[], choices=sorted(CONFIGS))
    p.add_argument("--batch", nargs="+", type=int, default=[1])
    p.add_argument("--precision", nargs="+", default=["fp32"], choices=["fp32", "bf16"])
    p.add_argument("--compile", action="store_true", help="torch.compile the networks (product rows)")
    p.add_argument("--channels-last", action="store_true")
    p.add_argument("--no-vgg", action="store_true", help="leave the VGG19 perceptual loss out of the step")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m benchmarks.step", description=__doc__.split("\n\n")[0])
    row_arguments(p)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--no-flops", action="store_true", help="skip counting FLOPs (TFLOP/s column empty)")
    a = p.parse_args(argv)
    rows = rows_from_args(a)
    vgg = not a.no_vgg
    device = torch.device(a.device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        print(f"device: {torch.cuda.get_device_name(device)}, torch {torch.__version__}")
    else:
        print(f"device: CPU ({torch.get_num_threads()} threads), torch {torch.__version__}")
    flops = {}
    if not a.no_flops:
        for row in rows:
            if flops_key(row) not in flops:
                flops[flops_key(row)] = f = flops_per_image(row, vgg)
                kind = "reference step" if row.ref else "step" + (" with checkpointing" if row.ckpt else "")
                print(f"work per image, {row.config} {kind}: {f / 1e12:.3g} TFLOP" + ("" if vgg else " (no VGG)"))
    print(
        f"{'config':<12} {'batch':>5} {'mode':<24} {'img/s':>8} {'TFLOP/s':>8} {'ms/step':>8} {'warmup s':>8} "
        f"{'peak GiB':>8} {'graphs':>6} {'ratio':>6}"
    )
    base = None
    for row in rows:
        r = measure(row, device, a.steps, a.warmup, vgg)
        base = base or r["img_s"]
        f = flops.get(flops_key(row))
        tflops = f"{r['img_s'] * f / 1e12:8.3g}" if f else f"{'':>8}"
        print(
            f"{row.config:<12} {row.batch:>5} {row.label:<24} {r['img_s']:>8.2f} {tflops} {r['step_ms']:>8.1f} "
            f"{r['warmup_s']:>8.1f} {r['peak_gib']:>8.2f} {r['graphs']:>6} {r['img_s'] / base:>6.2f}",
            flush=True,
        )


if __name__ == "__main__":
    main()
