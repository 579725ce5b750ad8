"""`make demo`: the main job on embedded defaults. Usage: python -m jobs.demo [--epochs N] [--out DIR]"""

from __future__ import annotations

import argparse

from orchestration.quick_demo import DemoSettings, run


def main(argv: list[str] | None = None) -> None:
    d = DemoSettings()
    p = argparse.ArgumentParser(prog="python -m jobs.demo", description=__doc__)
    p.add_argument("--epochs", type=int, default=d.epochs)
    p.add_argument("--out", default=d.out_dir, help="output folder for the PNG grid")
    p.add_argument("--seed", type=int, default=d.seed)
    a = p.parse_args(argv)
    run(DemoSettings(out_dir=a.out, epochs=a.epochs, seed=a.seed))


if __name__ == "__main__":
    main()
