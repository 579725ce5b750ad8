"""Validate a dataset on disk and publish it as Parquet shards + manifest in object storage.

    python -m jobs.prepare_data --layout flat|cityscapes|celebamask --source PATH --dest URI \
        [--split train] [--val-fraction 0.1] [--name NAME] [--shard-mb 256] [--skip-bad] [--encoding png|zstd]

URI: a local path, file://..., or s3://bucket/prefix (AWS environment; AWS_ENDPOINT_URL_S3 for MinIO etc.).
Re-running resumes: shards written from the same source bytes (sha256 of every source file) are kept, the others
rewritten; a val split carved by an earlier --val-fraction is removed when this run has none. The manifest is
written last; nothing is left in --dest when validation fails.
--encoding zstd stores raw arrays (≈1.65x the bytes of png, ≈11x faster to decode: for GPU nodes, see
data/encoding.py).
"""

from __future__ import annotations

from data.encoding import ENCODINGS
from data.layouts import LAYOUTS
from data.shards import PrepareOptions, prepare
from jobs import cli
from orchestration.run.stopping import finish


def main(argv: list[str] | None = None) -> int:
    p = cli.parser("prepare_data", __doc__)
    p.add_argument("--layout", required=True, help=f"one of {', '.join(LAYOUTS)}")
    p.add_argument("--source", required=True, help="dataset folder on local disk")
    p.add_argument("--dest", required=True, help="destination URI (path, file://, s3://bucket/prefix)")
    p.add_argument("--split", default="train")
    p.add_argument("--val-fraction", type=float, default=0.0, help="move this fraction of samples to a 'val' split")
    p.add_argument("--name", help="dataset name recorded in the manifest (default: the source folder's name)")
    p.add_argument("--label-nc", type=int, help="number of label classes (default: 35 Cityscapes, 19 faces)")
    p.add_argument("--shard-mb", type=float, default=256.0, help="target shard size in MB")
    p.add_argument("--skip-bad", action="store_true", help="skip bad samples and write a report instead of stopping")
    p.add_argument(
        "--instance-scheme",
        choices=["cityscapes", "any"],
        default="cityscapes",
        help="cityscapes: instance ids must be class or class*1000+k; any: no check",
    )
    p.add_argument(
        "--encoding",
        choices=ENCODINGS,
        default="png",
        help="png: compact (original image bytes); zstd: raw arrays, much faster to decode",
    )
    p.add_argument("--workers", type=int, default=None, help="processes for decoding (default: all cores)")
    a = p.parse_args(argv)
    opts = PrepareOptions(
        layout=a.layout,
        source=a.source,
        dest=a.dest,
        split=a.split,
        val_fraction=a.val_fraction,
        name=a.name,
        label_nc=a.label_nc,
        shard_mb=a.shard_mb,
        skip_bad=a.skip_bad,
        instance_scheme=a.instance_scheme,
        encoding=a.encoding,
    )
    if a.workers:
        opts.workers = a.workers

    def body() -> None:
        prepare(opts)

    return cli.run("prepare_data", body, also=(ValueError,))


if __name__ == "__main__":
    finish(main())
