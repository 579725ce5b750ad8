"""`make demo`: generate data, shard it, run the three-stage curriculum on local Ray, write a PNG grid.

python -m jobs.demo [--out DIR] [--samples N] [--set section.key=value ...]
"""

from __future__ import annotations

from jobs import cli
from orchestration.run.stopping import finish
from orchestration.services.demo import DemoSettings, run_demo


def main(argv: list[str] | None = None) -> int:
    d = DemoSettings()
    p = cli.parser("demo", __doc__)
    p.add_argument("--out", default=d.out_dir, help="output folder (data, runs, demo.png)")
    p.add_argument("--config", default=d.config)
    p.add_argument("--samples", type=int, default=d.samples, help="procedural scenes to generate")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override, repeatable")
    a = p.parse_args(argv)
    settings = DemoSettings(out_dir=a.out, config=a.config, samples=a.samples, overrides=d.overrides + tuple(a.set))

    def body() -> None:
        run_demo(settings)

    return cli.run("demo", body, not_registered="training finished but ")


if __name__ == "__main__":
    finish(main())
