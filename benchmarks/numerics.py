"""Does the optimised step learn the same thing? N steps of fp32 eager and of the optimised path on fixed data.

    python -m benchmarks.numerics --config global-1024 --batch 4 --steps 300 --mode bf16:compile --device cuda
    python -m benchmarks.numerics --config tiny --steps 100 --mode bf16 --device cpu       # CPU smoke

Both runs start from the same weights (same seed) and see the same batch every step. Per loss, the curves are
smoothed (EMA 0.9) and compared after `--skip` steps: the figure is max |candidate - reference| / (|reference|
+ 0.05). The stated tolerance (default 0.15) is what bf16 rounding in a GAN's feedback loop allows; a broken
optimisation (wrong gradients, a dropped loss term) moves the curves far past it.
"""

from __future__ import annotations

import argparse

import torch

from benchmarks.step import CONFIGS, Row, build_step, synthetic_batch
from model.step import LOSS_NAMES


def curves(row: Row, steps: int, device: torch.device, vgg: bool) -> dict[str, list[float]]:
    _, h, w = CONFIGS[row.config]
    step = build_step(row, device, vgg)
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
    p.add_argument("--mode", default="bf16:compile", help="precision[:compile][:ckpt][:cl] of the candidate")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--tolerance", type=float, default=0.15)
    p.add_argument("--no-vgg", action="store_true", help="leave the VGG19 perceptual loss (random weights) out")
    a = p.parse_args(argv)
    device = torch.device(a.device)
    vgg = not a.no_vgg
    ref = curves(Row(a.config, a.batch, "fp32"), a.steps, device, vgg)
    cand = curves(Row.parse(f"{a.config}:{a.batch}:{a.mode}"), a.steps, device, vgg)
    worst = 0.0
    print(f"{a.config} batch {a.batch}, {a.steps} steps on {device}: fp32 eager vs {a.mode}")
    for n in LOSS_NAMES:
        if max(ref[n]) == 0 and max(cand[n]) == 0:
            continue  # e.g. G_VGG without VGG weights
        d = deviation(ref[n], cand[n], a.skip)
        worst = max(worst, d)
        print(f"  {n:<11} final {smooth(ref[n])[-1]:8.4f} vs {smooth(cand[n])[-1]:8.4f}   max deviation {d:.3f}")
    ok = worst <= a.tolerance
    print(f"max deviation {worst:.3f} {'<=' if ok else '>'} tolerance {a.tolerance}: {'PASS' if ok else 'FAIL'}")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
