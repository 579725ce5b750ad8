"""Does the optimised step learn the same thing? N steps of fp32 eager and of the optimised path on fixed data.

    python -m benchmarks.numerics --config global-1024 --batch 4 --steps 300 --mode bf16:compile --device cuda
    python -m benchmarks.numerics --config tiny --steps 300 --mode bf16:compile --device cpu   # CPU: inductor's C++

All runs start from the same weights (same seed) and see the same batch every step. Per loss, the curves are
smoothed (EMA 0.9) and compared after `--skip` steps: the figure is max |candidate - reference| / (|reference|
+ 0.05). A GAN amplifies rounding: Adam turns float noise in near-zero gradients (a conv bias before an
instance norm has none) into full-size steps, and D and G feed each other's errors back. So the same run also
measures the noise floor: fp32 eager against itself with every initial weight one ulp larger. The candidate
passes when its deviation is within the tolerance (default 0.15) or within twice that floor, whichever is
larger; a broken optimisation (wrong gradients, a dropped loss term) moves the curves far past both.
"""

from __future__ import annotations

import argparse

import torch

from benchmarks.step import CONFIGS, Row, build_step, synthetic_batch
from model.step import LOSS_NAMES, TrainStep


def nudge_weights(step: TrainStep) -> None:
    """Every parameter of G, D (and E) one ulp towards +inf: a change at the level of rounding."""
    with torch.no_grad():
        for m in (step.G, step.D, step.E):
            for p in m.parameters() if m is not None else ():
                p.copy_(torch.nextafter(p, torch.full_like(p, float("inf"))))


def curves(row: Row, steps: int, device: torch.device, vgg: bool, nudge: bool = False) -> dict[str, list[float]]:
    _, h, w = CONFIGS[row.config]
    step = build_step(row, device, vgg)
    if nudge:
        nudge_weights(step)
    data = synthetic_batch(step.opt, row.batch, h, w, device)
    out: dict[str, list[torch.Tensor]] = {n: [] for n in LOSS_NAMES}
    for _ in range(steps):
        for n, v in step.step(data).items():
            out[n].append(v)
    return {n: torch.stack(v).float().cpu().tolist() for n, v in out.items()}


def smooth(xs: list[float], beta: float = 0.9) -> list[float]:
    out, m = [], xs[0]
    for x in xs:
        m = beta * m + (1 - beta) * x
        out.append(m)
    return out


def deviation(ref: list[float], cand: list[float], skip: int) -> float:
    r, c = smooth(ref)[skip:], smooth(cand)[skip:]
    return max(abs(a - b) / (abs(a) + 0.05) for a, b in zip(r, c, strict=True)) if r else 0.0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.numerics", description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default="tiny", choices=sorted(CONFIGS))
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--skip", type=int, default=20, help="steps before the comparison starts")
    p.add_argument("--mode", nargs="+", default=["bf16:compile"], help="precision[:compile][:ckpt][:cl] candidates")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--tolerance", type=float, default=0.15, help="smallest allowed deviation (see above)")
    p.add_argument("--no-vgg", action="store_true", help="leave the VGG19 perceptual loss (random weights) out")
    a = p.parse_args(argv)
    device = torch.device(a.device)
    vgg = not a.no_vgg
    reference = Row(a.config, a.batch, "fp32")
    ref = curves(reference, a.steps, device, vgg)
    runs = {"floor": curves(reference, a.steps, device, vgg, nudge=True)}
    for mode in a.mode:
        runs[mode] = curves(Row.parse(f"{a.config}:{a.batch}:{mode}"), a.steps, device, vgg)
    print(
        f"{a.config} batch {a.batch}, {a.steps} steps on {device}: deviation from fp32 eager of the same with "
        f"weights one ulp larger (floor) and of {', '.join(a.mode)}"
    )
    print(f"  {'loss':<11} {'fp32 final':>10} " + " ".join(f"{k:>16}" for k in runs))
    worst = dict.fromkeys(runs, 0.0)
    for n in LOSS_NAMES:
        if all(max(r[n]) == 0 for r in (ref, *runs.values())):
            continue  # e.g. G_VGG without VGG weights
        dev = {k: deviation(ref[n], r[n], a.skip) for k, r in runs.items()}
        worst = {k: max(worst[k], dev[k]) for k in runs}
        print(f"  {n:<11} {smooth(ref[n])[-1]:10.4f} " + " ".join(f"{d:16.3f}" for d in dev.values()))
    floor = worst.pop("floor")
    allowed = max(a.tolerance, 2 * floor)
    print(f"allowed deviation {allowed:.3f} = max(tolerance {a.tolerance}, 2 x floor {floor:.3f})")
    failed = [m for m, w in worst.items() if w > allowed]
    for mode, w in worst.items():
        print(f"{mode}: max deviation {w:.3f}: {'FAIL' if mode in failed else 'PASS'}")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
