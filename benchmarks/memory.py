"""Peak tensor memory of the training step at full size, estimated on the CPU (no GPU needed).

    python -m benchmarks.memory --preset reference              # the step benchmark's rows
    python -m benchmarks.memory --row local-2048:1:bf16:ckpt --row local-2048:1:fp32:ref

Rows are those of `benchmarks.step` (config:batch:precision[:compile][:graphs][:ckpt][:cl][:ref]); compile
flags are ignored: this is the eager step (inductor's partitioner usually stores less, recomputing cheap
pointwise ops). Each row runs its step (after one warm-up step, so Adam's moments exist) at 1/64 and 1/16 of
the pixels under `model.memory.StorageTracker`, and extrapolates op by op to full size. The figure counts
tensors exactly; a GPU adds allocator rounding and fragmentation, cuDNN workspaces and the CUDA context, so
compare with `torch.cuda.max_memory_allocated` with some margin.
"""

from __future__ import annotations

import argparse
from dataclasses import replace
from functools import partial

import torch

from benchmarks.step import CONFIGS, Row, build_step, row_arguments, rows_from_args
from model.inputs import synthetic_batch
from model.memory import PeakEstimate, step_peak
from model.options import ModelOptions


def estimate(row: Row, vgg: bool) -> PeakEstimate:
    overrides, h, w = CONFIGS[row.config]
    opt = ModelOptions(**overrides)
    build = partial(build_step, replace(row, compile=False, graphs=False), torch.device("cpu"), vgg)
    return step_peak(build, partial(synthetic_batch, opt, row.batch), (h, w), opt.size_multiple)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m benchmarks.memory", description=__doc__.split("\n\n")[0])
    row_arguments(p)
    a = p.parse_args(argv)
    print(f"{'config':<12} {'batch':>5} {'mode':<24} {'peak GiB':>9} {'held between steps GiB':>23}")
    for row in rows_from_args(a):
        e = estimate(row, vgg=not a.no_vgg)
        print(
            f"{row.config:<12} {row.batch:>5} {row.label:<24} {e.peak_gib:>9.2f} {e.static_bytes / 2**30:>23.2f}",
            flush=True,
        )


if __name__ == "__main__":
    main()
