"""Judge generators on a whole split: seg-score (mIoU, pixel accuracy, per-class IoU, against the real photos'),
FID / KID (with a feature network file), L1; a side-by-side table, a grid and a per-class chart for two or more.

    python -m jobs.evaluate --model models:/pix2pixhd-<dataset>@champion [--model RUN_ID|CHECKPOINT_URI ...]
        --data URI [--split val] [--segmenter FILE --class-map MAP | --segmenter models:/segmenter-<dataset>/N]
        [--inception inception-2015-12-05.pt] [--out DIR] [--storage URI] [--tracking-uri URI | --no-tracking]
        [--batch-size 4] [--limit N] [--load-size W] [--workers 1] [--cpus 1] [--gpus 0]

Without --segmenter: the dataset's latest registered `segmenter-<dataset>` (jobs.train_segmenter), if any.
Writes DIR/report.md, metrics.json, grid.png (label | each model | real), per_class_iou.png; with tracking, an
MLflow run per model nested under its training run, and eval.* tags on registry versions.
Exit status: 0 evaluated; 2 bad input (nothing computed).
"""

from __future__ import annotations

from jobs import cli
from orchestration.judging.evaluate import EvalPlan, evaluate
from orchestration.records.tracking import resolve_tracking_uri
from orchestration.run.stopping import finish


def main(argv: list[str] | None = None) -> int:
    p = cli.parser("evaluate", __doc__)
    p.add_argument("--model", action="append", required=True, help="registry URI, run id or checkpoint URI; repeat")
    p.add_argument("--data", required=True, help="prepared dataset URI")
    p.add_argument("--split", default="val")
    p.add_argument("--segmenter", help="a TorchScript / torch.export file (with --class-map) or a models:/ URI")
    p.add_argument("--class-map", help="YAML {classes: [...], ignore: [...]} or a built-in: cityscapes-trainids")
    p.add_argument("--inception", help="feature network file for FID/KID (e.g. inception-2015-12-05.pt)")
    p.add_argument("--out", default="outputs/evaluation", help="report folder (default outputs/evaluation)")
    p.add_argument("--storage", default="outputs/runs", help="run storage, where run ids are found")
    cli.add_tracking(p, no_tracking="no MLflow: registry models and segmenters unavailable")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--limit", type=int, help="only the first N images of the split")
    p.add_argument("--load-size", type=int, help="scale images to this width (default: as stored)")
    p.add_argument("--workers", type=int, default=1, help="Ray Data actors scoring batches")
    p.add_argument("--cpus", type=float, default=1.0, help="CPUs per actor")
    p.add_argument("--gpus", type=float, default=0.0, help="GPUs per actor")
    a = p.parse_args(argv)

    def body() -> None:
        plan = EvalPlan(
            models=a.model,
            data_uri=a.data,
            split=a.split,
            segmenter=a.segmenter,
            class_map=a.class_map,
            inception=a.inception,
            storage_uri=a.storage,
            tracking_uri=None if a.no_tracking else resolve_tracking_uri(a.tracking_uri, ray_job=False),
            out=a.out,
            batch_size=a.batch_size,
            limit=a.limit,
            load_size=a.load_size,
            workers=a.workers,
            cpus=a.cpus,
            gpus=a.gpus,
        )
        evaluate(plan)

    return cli.run("evaluate", body)


if __name__ == "__main__":
    finish(main())
