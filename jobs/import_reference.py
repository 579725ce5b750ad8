"""Import generators trained with NVIDIA's pix2pixHD code: into a run (stage 3 can fine-tune from it) or the registry.

    python -m jobs.import_reference --checkpoints DIR --config CONFIG [--opt DIR/opt.txt] [--epoch latest]
        (--to-run RUN_ID | --register) [--storage URI] [--data URI] [--tracking-uri URI] [--set KEY=VALUE]

DIR holds the reference's {epoch}_net_G.pth (and _net_D.pth, _net_E.pth when present) and, with instance
features, features_clustered_010.npy (its encode_features.py). --opt: the reference run's opt.txt, whose network
options (ngf, n_blocks_global, num_D, instance_feat, ...) replace the config's model keys; without it the config's
must match. Every tensor is checked by name and shape; the first that does not fit is named with the option that
probably differs. --to-run writes a stage-3 checkpoint of that new run (optimizers fresh) and prints how to
fine-tune it; --register also registers it (into run id imported-<time> unless --to-run names one), judged by
seg-score when the dataset has a segmenter, like any trained run's generator.
Exit status: 0 done, 2 bad input, 3 not registered.
"""

from __future__ import annotations

import time

from jobs import cli
from model.reference import ReferenceError
from orchestration.records.tracking import resolve_tracking_uri
from orchestration.run.config import load_config
from orchestration.run.stopping import finish
from orchestration.services.reference_files import import_to_run, read_reference, register_imported


def main(argv: list[str] | None = None) -> int:
    p = cli.parser("import_reference", __doc__)
    p.add_argument("--checkpoints", required=True, metavar="DIR", help="the reference's checkpoints folder")
    p.add_argument("--config", required=True, help="this project's recipe for the dataset (configs/...)")
    p.add_argument("--opt", help="the reference run's opt.txt (its network options replace the config's)")
    p.add_argument("--epoch", default="latest", help="which files: {epoch}_net_G.pth (default latest)")
    p.add_argument("--to-run", metavar="RUN_ID", help="write a stage-3 checkpoint of this new run")
    p.add_argument("--register", action="store_true", help="register the imported generator")
    p.add_argument("--storage", default="outputs/runs", help="run storage (default outputs/runs)")
    p.add_argument("--data", help="the prepared dataset it belongs to (default: the config's data.uri)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override, repeatable")
    cli.add_tracking(p)
    a = p.parse_args(argv)
    if not (a.to_run or a.register):
        p.error("give --to-run RUN_ID, --register, or both")

    def body() -> None:
        cfg = load_config(a.config, a.set)
        data_uri = a.data or cfg.data.uri
        files = read_reference(a.checkpoints, cfg, a.opt, a.epoch)
        run_id = a.to_run or f"imported-{time.strftime('%Y%m%d-%H%M%S')}"
        uri = import_to_run(files, a.storage, run_id, data_uri)
        print(
            f"to fine-tune it in stage 3: python -m jobs.train --config {a.config} --run-id {run_id}-tuned --stages 3 "
            f"--init-checkpoint {uri} --storage {a.storage}"
        )
        if a.register:
            result = register_imported(a.storage, run_id, data_uri, resolve_tracking_uri(a.tracking_uri))
            print(f"{result['name']} version {result['version']}: {result['uri']}")

    return cli.run("import_reference", body, also=(ReferenceError,))


if __name__ == "__main__":
    finish(main())
