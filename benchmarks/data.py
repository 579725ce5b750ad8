"""Decoded + augmented samples per second per CPU core, from local disk and from an S3 server.

    python -m benchmarks.data [--samples 24] [--source ../shared/datasets/cityscapes_samples]

Uses the real Cityscapes samples when `--source` exists (their PNG compression is what decoding costs in
practice), repeated to `--samples`; otherwise procedural street scenes. Shards go to a local folder and to
moto's S3 server on 127.0.0.1, in both shard encodings (png, zstd: `data.encoding`). Two measurements per
(storage, encoding, resolution):
  - one process: read shards with pyarrow, decode, resize, crop/flip, to float tensors (= 1 core)
  - Ray Data on all cores: `build_dataset` + `iter_epoch` as a Train worker iterates it, divided by cores
Resolutions: 2048x1024 (resize_or_crop none, the 1024p recipe) and 1024x512 (scale_width to 1024).
Last, the wait for each epoch's first batch from a Train-style split iterator, with the next epoch's pipeline
started when asked and started while the previous epoch ends (`data.pipeline.started`, as the worker does).
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from pathlib import Path

import pyarrow.parquet as pq

from data import shards
from data.pipeline import Decode, ModelBatches, build_dataset, columns, iter_epoch, started
from data.pipeline_config import PipelineConfig
from data.shards import PrepareOptions, prepare
from data.synthetic.write import write_city
from data.transforms import Geometry

RESOLUTIONS = {
    "2048x1024": Geometry("none", size_multiple=32),
    "1024x512": Geometry("scale_width", load_size=1024, size_multiple=32),
}


def make_source(src: Path | None, n: int, out: Path) -> Path:
    if src is not None and src.is_dir():
        for d in ("train_label", "train_inst", "train_img"):
            (out / d).mkdir(parents=True)
        files = {d: sorted((src / d).iterdir()) for d in ("train_label", "train_inst", "train_img")}
        for i in range(n):
            for d, lst in files.items():
                f = lst[i % len(lst)]
                shutil.copy(f, out / d / f.name.replace("_000019_", f"_{i:06d}_"))
        return out
    return write_city(out, n, 1024, 2048)


def one_process(uri: str, cfg: PipelineConfig) -> float:
    """Samples/s on one core: the same work Ray Data's tasks and the Train worker do, in one loop."""
    m = shards.load_manifest(uri, "train")
    decode, collate = Decode(cfg.geometry, cfg.instance_output, m), ModelBatches(cfg, 0, train=True)
    n, t0 = 0, time.perf_counter()
    for loc in m.shard_locations:
        with loc.fs.open_input_file(loc.path) as f:
            table = pq.read_table(f, columns=columns(m))
        for batch in table.to_batches(max_chunksize=cfg.decode_batch):
            cols = {k: batch.column(k).to_pylist() for k in batch.schema.names}
            collate(decode(cols))
            n += len(cols["index"])
    return n / (time.perf_counter() - t0)


def ray_data(uri: str, cfg: PipelineConfig) -> float:
    ds = build_dataset(uri, "train", cfg)
    n, t0 = 0, time.perf_counter()
    for b in iter_epoch(ds, cfg, 0):
        n += len(b["index"])
    return n / (time.perf_counter() - t0)


def epoch_start_waits(uri: str, cfg: PipelineConfig, overlap: bool, epochs: int = 4, work_s: float = 2.0) -> list:
    """Seconds the first batch of each epoch is waited for, from a Train-style split iterator, with `work_s` of
    end-of-epoch work (validation, checkpoint, report) between epochs; `overlap`: the next epoch `started`."""
    split = build_dataset(uri, "train", cfg).streaming_split(1, equal=True)[0]

    def epoch_batches(epoch: int):
        return started(iter_epoch(split, cfg, epoch)) if overlap else iter_epoch(split, cfg, epoch)

    upcoming, waits = epoch_batches(0), []
    for epoch in range(epochs):
        t0 = time.perf_counter()
        for i, _ in enumerate(upcoming):
            if i == 0:
                waits.append(time.perf_counter() - t0)
        upcoming = epoch_batches(epoch + 1)
        time.sleep(work_s)
    return waits


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m benchmarks.data", description=__doc__.split("\n\n")[0])
    p.add_argument("--samples", type=int, default=24)
    p.add_argument(
        "--source", type=Path, default=Path(__file__).resolve().parents[2] / "shared/datasets/cityscapes_samples"
    )
    a = p.parse_args(argv)
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    import ray

    from tests.services import apply_env, make_bucket, moto_s3_server, s3_environment

    cores = os.cpu_count() or 1
    with tempfile.TemporaryDirectory() as tmp, moto_s3_server(Path(tmp)) as endpoint:
        tmp = Path(tmp)
        apply_env(s3_environment(endpoint))
        make_bucket(endpoint, "bench")
        source = make_source(a.source, a.samples, tmp / "src")
        kind = "real Cityscapes samples" if a.source.is_dir() else "procedural scenes"
        uris = {
            (where, enc): f"{root}-{enc}"
            for where, root in (("local", str(tmp / "shards")), ("s3", "s3://bench/shards"))
            for enc in ("png", "zstd")
        }
        for (_, enc), uri in uris.items():
            prepare(PrepareOptions("flat", str(source), uri, shard_mb=64, encoding=enc), log=lambda m: None)
        ray.init(num_cpus=cores, object_store_memory=1 << 30, include_dashboard=False, log_to_driver=False)
        ray.data.DataContext.get_current().enable_progress_bars = False
        print(f"{a.samples} {kind} at 2048x1024, {cores} cores")
        print(
            f"{'storage':<7} {'encoding':<8} {'output':<10} {'1 process':>10} {'Ray Data':>10} {'Ray/core':>9}"
            "   (samples/s)"
        )
        for res, geometry in RESOLUTIONS.items():
            cfg = PipelineConfig(geometry=geometry, batch_size=2, verify="size")
            for (name, enc), uri in uris.items():
                single = one_process(uri, cfg)
                ray_data(uri, cfg)  # warm: worker processes, imports
                total = ray_data(uri, cfg)
                print(f"{name:<7} {enc:<8} {res:<10} {single:>10.2f} {total:>10.2f} {total / cores:>9.2f}", flush=True)
        cfg = PipelineConfig(geometry=RESOLUTIONS["1024x512"], batch_size=2, verify="size")
        print("first batch of each epoch waited for (s), 2 s of end-of-epoch work between epochs (local, zstd):")
        for overlap in (False, True):
            waits = epoch_start_waits(uris[("local", "zstd")], cfg, overlap)
            print(
                f"  {'started while the last epoch ends' if overlap else 'started when asked':<34} "
                + " ".join(f"{w:.2f}" for w in waits),
                flush=True,
            )
        ray.shutdown()


if __name__ == "__main__":
    main()
