"""Does activation checkpointing still save memory when the networks are compiled? Measured, not estimated.

    python -m benchmarks.compiled_memory --config local-2048                  # G at 2048x1024, ~12 min on 2 cores
    python -m benchmarks.compiled_memory --config tiny --part step            # the whole step, a quick look

`benchmarks.memory` follows tensors through the eager step; inside a compiled graph there is nothing to follow
(inductor's kernels allocate their own buffers). So this measures the process: each variant (eager, eager +
checkpointing, inductor, inductor + checkpointing with and without inductor's layout optimisation, which
`model.step.compile_kwargs` turns off with checkpointing) runs in a fresh process with glibc's malloc set to give
large blocks straight back to the system, warms up twice (compilation included), then runs once more while a
thread samples the resident set every 0.2 ms. The figure is the peak above the level just before that run:
activations, recomputation, gradients and temporaries of one forward + backward (`--part g`: G under bf16
autocast) or one training step (`--part step`). On a GPU, `benchmarks.step` reports
torch.cuda.max_memory_allocated for the same rows instead.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import threading
import time

import torch

from benchmarks.step import CONFIGS, Row, build_step
from model.inputs import prepare_inputs, synthetic_batch
from model.networks import build_generator, set_activation_checkpointing
from model.options import ModelOptions

# (compile, checkpointing, inductor's layout optimisation): TrainStep turns the latter off with checkpointing
VARIANTS = (
    ("eager", False, True),
    ("eager", True, True),
    ("inductor", False, True),
    ("inductor", True, True),
    ("inductor", True, False),
)
MALLOC = {"MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0"}


def _resident_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _runner(config: str, part: str, compile: str, ckpt: bool, layout_opt: bool, h: int, w: int):
    overrides, _, _ = CONFIGS[config]
    if part == "step":
        row = Row(config, 1, "bf16", compile=compile == "inductor", ckpt=ckpt)
        step = build_step(row, torch.device("cpu"), vgg=True)
        batch = synthetic_batch(step.opt, 1, h, w)
        return lambda: step.step(batch)
    opt = ModelOptions(**overrides)
    torch.manual_seed(0)
    g = build_generator(opt)
    set_activation_checkpointing(g, ckpt)
    if compile == "inductor":
        g.compile(backend="inductor", options={"layout_optimization": layout_opt}, dynamic=False)
    batch = synthetic_batch(opt, 1, h, w)
    x = prepare_inputs(opt, batch["label"], inst=batch.get("inst")).label  # one-hot labels + instance edges

    def run() -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = g(x)
        y.float().mean().backward()
        for p in g.parameters():
            p.grad = None

    return run


def measure_one(config: str, part: str, compile: str, ckpt: bool, layout_opt: bool, h: int, w: int):
    """(peak GiB above the pre-run level, seconds) of one warmed-up run, in this process."""
    run = _runner(config, part, compile, ckpt, layout_opt, h, w)
    run()
    run()
    peak, stop = [0], threading.Event()

    def sample() -> None:
        while not stop.is_set():
            peak[0] = max(peak[0], _resident_bytes())
            time.sleep(0.0002)

    base = _resident_bytes()
    sampler = threading.Thread(target=sample)
    sampler.start()
    t0 = time.perf_counter()
    run()
    took = time.perf_counter() - t0
    stop.set()
    sampler.join()
    return (peak[0] - base) / 2**30, took


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m benchmarks.compiled_memory", description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default="local-2048", choices=sorted(CONFIGS))
    p.add_argument("--part", default="g", choices=["g", "step"])
    p.add_argument("--size", type=int, nargs=2, metavar=("H", "W"), help="default: the config's training size")
    p.add_argument("--one", nargs=3, help=argparse.SUPPRESS)  # a child process: compile ckpt layout-opt
    a = p.parse_args(argv)
    h, w = a.size or CONFIGS[a.config][1:]
    if a.one:
        gib, took = measure_one(a.config, a.part, a.one[0], a.one[1] == "ckpt", a.one[2] == "layout", h, w)
        print(f"{gib:.3f} {took:.2f}")
        return
    print(
        f"{a.config} {'G forward+backward (bf16)' if a.part == 'g' else 'training step (bf16)'} at {h}x{w}, "
        f"CPU ({torch.get_num_threads()} threads), torch {torch.__version__}"
    )
    print(f"  {'variant':<56} {'peak GiB':>9} {'s/run':>7}")
    for compile, ckpt, layout_opt in VARIANTS:
        if a.part == "step" and compile == "inductor" and not layout_opt:
            continue  # the step's own choice (model.step.compile_kwargs) is the row above
        args = [
            "--config",
            a.config,
            "--part",
            a.part,
            "--size",
            str(h),
            str(w),
            "--one",
            compile,
            "ckpt" if ckpt else "-",
            "layout" if layout_opt else "-",
        ]
        out = subprocess.run(
            [sys.executable, "-m", "benchmarks.compiled_memory", *args],
            env={**os.environ, **MALLOC},
            capture_output=True,
            text=True,
            check=True,
        ).stdout.split()
        name = compile + (" + checkpointing" if ckpt else "")
        if compile == "inductor" and a.part == "g":
            name += ", layout optimisation " + ("on" if layout_opt else "off")
        print(f"  {name:<56} {float(out[-2]):>9.3f} {float(out[-1]):>7.2f}", flush=True)


if __name__ == "__main__":
    main()
