"""Stream a prepared split to Ray Train workers with Ray Data.

Driver side: `build_dataset(uri, split, cfg)` reads the manifest, verifies the shards, and returns a Ray
Dataset: `read_parquet` of the shards -> `map_batches(decode + resize)` on CPU workers. Pass it to the trainer
as `datasets={"train": ds}`; Ray Train splits it across workers (`streaming_split(equal=True)`): each worker
sees a disjoint part, together the whole split each epoch (up to num_workers - 1 rows dropped for equal parts).

Worker side: `iter_epoch(ray.train.get_dataset_shard("train"), cfg, epoch)` yields torch batches:
    label  uint8 (B, H, W) class ids
    inst   int64 (B, H, W) instance ids      when cfg.instance_output == "ids"
    edges  float (B, H, W) boundary map      when cfg.instance_output == "edges"
    image  float (B, 3, H, W) in [-1, 1]
    index  int64 (B,) sample index in the manifest
Order is reproducible from cfg.seed: shard order is seeded (a different order each epoch), execution preserves
order (`execution_options()`), and the local shuffle buffer is seeded with (seed, epoch).
"""

from __future__ import annotations

import dataclasses
import re
import threading
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from ray.data.collate_fn import NumpyBatchCollateFn

from data import encoding as encodings
from data import shards
from data.causes import causes
from data.pipeline_config import PipelineConfig
from data.transforms import Geometry, edges_of, load_geometry, random_crop_flip

COLUMNS = ["index", "stem", "label", "inst", "image", "height", "width"]


class Decode:
    """Ray Data batch function: stored bytes (`data.encoding`) -> arrays at the load geometry (+ edges). Keeps
    `index`. Each sample's stored bytes are checked against their crc32 first: a sample that differs from what
    prepare_data wrote, or cannot be decoded, is a `ShardContentError` naming its shard and stem."""

    def __init__(self, geometry: Geometry, instance_output: str, manifest: shards.Manifest):
        self.geometry = geometry
        self.instance_output = instance_output
        self.encoding = encodings.check(manifest.encoding)
        self.check_crc = manifest.has_crc32
        self.shards = [
            (e["first_index"], e["count"], loc.uri)
            for e, loc in zip(manifest.data["shards"], manifest.shard_locations, strict=True)
        ]

    def _shard(self, index: int) -> str:
        return next((uri for first, n, uri in self.shards if first <= index < first + n), "a shard of this split")

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        labels, insts, images = [], [], []
        for k in range(len(batch["index"])):
            stem, index = batch["stem"][k], int(batch["index"][k])
            if self.check_crc and shards.sample_crc32(batch["label"][k], batch["inst"][k], batch["image"][k]) != int(
                batch["crc32"][k]
            ):
                raise shards.ShardContentError(
                    f"{self._shard(index)}: sample {stem} (index {index}) is not what prepare_data wrote (crc32 "
                    f"mismatch): the shard was altered after it was written; re-run prepare_data to rewrite it"
                )
            inst_bytes = batch["inst"][k]
            if self.instance_output != "none" and inst_bytes is None:
                raise ValueError(
                    f"sample {stem} has no instance map but instance_output={self.instance_output!r}; "
                    f"set no_instance for datasets without instances"
                )
            try:
                h, w, enc = int(batch["height"][k]), int(batch["width"][k]), self.encoding
                label = encodings.decode_label(batch["label"][k], enc, h, w)
                inst = encodings.decode_inst(inst_bytes, enc, h, w) if self.instance_output != "none" else None
                image = encodings.decode_image(batch["image"][k], enc, h, w)
            except Exception as e:  # noqa: BLE001 - PIL, zstd and numpy raise many kinds for damaged bytes
                raise shards.ShardContentError(
                    f"{self._shard(index)}: sample {stem} (index {index}) cannot be decoded ({type(e).__name__}: {e}); "
                    f"re-run prepare_data to rewrite the shard"
                ) from None
            label, inst, image = load_geometry(self.geometry, label, inst, image)
            labels.append(label)
            images.append(image)
            if inst is not None:
                insts.append(edges_of(inst) if self.instance_output == "edges" else inst)
        shapes = {a.shape for a in labels}
        if len(shapes) > 1:
            raise ValueError(
                f"samples {list(batch['stem'])} have different sizes after resize_or_crop="
                f"{self.geometry.resize_or_crop}: {sorted(shapes)}; use a mode that fixes the size"
            )
        out = {"index": np.asarray(batch["index"], np.int64), "label": np.stack(labels), "image": np.stack(images)}
        if insts:
            out["edges" if self.instance_output == "edges" else "inst"] = np.stack(insts)
        return out


def columns(manifest: shards.Manifest) -> list[str]:
    return COLUMNS + (["crc32"] if manifest.has_crc32 else [])


def execution_options():
    """Ray Data execution options for deterministic order (use in Train's DataConfig)."""
    from ray.data import ExecutionOptions

    return ExecutionOptions(preserve_order=True)


def build_dataset(uri: str, split: str, cfg: PipelineConfig):
    """Verify the split's manifest and shards, then build the (lazy) Ray Dataset of decoded samples."""
    import ray.data
    from ray.data import DataContext, FileShuffleConfig

    ctx = DataContext.get_current()  # captured by the dataset: keep per-epoch executions out of the job log
    ctx.print_on_execution_start = False
    # progress stays on (off, Ray Data warns once per process that it is off) and, without a TTY, is logged at
    # INFO, which the orchestration's quiet Ray logs (RAY_DATA_LOG_LEVEL) keep out of the job log. Not through
    # ray's tqdm: in the Train workers that printed a blank line per update into the job log
    ctx.enable_progress_bars = True
    ctx.use_ray_tqdm = False
    ctx.raise_original_map_exception = True  # a ShardContentError reaches the Train worker as itself
    # Ray 2.60's datasource V2 lists files in tasks of 1 CPU (ListFiles sets no num_cpus) inside the Train run's
    # Ray Data budget, which excludes the workers' CPUs: on 1-CPU nodes that task never runs and the stage hangs
    # ("Cluster resources are not enough to run any task from ReadFilesParquetV2"). V1 lists the (known) shard
    # paths in the driver and reads them with `read_cpus` per task.
    ctx.use_datasource_v2 = False
    manifest = shards.load_manifest(uri, split)
    if cfg.verify != "none":
        shards.verify(manifest, cfg.verify)
    locs = manifest.shard_locations
    # Shard order is shuffled per execution (= per epoch), deterministically from the seed; a file-level
    # shuffle keeps the pipeline streaming (randomize_block_order would be an all-to-all barrier).
    # read_parquet samples the files and fetches their metadata here, each with a progress bar that, without tqdm,
    # prints "Run `pip install tqdm`" once per process: off for that, on again for the executions
    ctx.enable_progress_bars = False
    try:
        ds = ray.data.read_parquet(
            [loc.path for loc in locs],
            filesystem=locs[0].fs,
            num_cpus=cfg.read_cpus,
            shuffle=FileShuffleConfig(seed=cfg.seed, reseed_after_execution=True),
        )
    finally:
        ctx.enable_progress_bars = True
    ds.context.enable_progress_bars = True  # the dataset copied the context while it was off
    ds = ds.select_columns(columns(manifest))
    return ds.map_batches(
        Decode(cfg.geometry, cfg.instance_output, manifest),
        batch_size=cfg.decode_batch,
        batch_format="numpy",
        num_cpus=cfg.decode_cpus,
    )


class ModelBatches(NumpyBatchCollateFn):
    """Ray Data collate function: numpy batch -> model tensors (`to_model_batch`). Ray runs it in its prefetch
    threads, so crop/flip and the float conversion stay off the training loop."""

    def __init__(self, cfg: PipelineConfig, epoch: int, train: bool):
        self.cfg, self.epoch, self.train = cfg, epoch, train

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
        tensors = {k: torch.from_numpy(v if v.flags.writeable else v.copy()) for k, v in batch.items()}
        return to_model_batch(tensors, self.cfg, self.epoch, self.train)


def iter_epoch(shard, cfg: PipelineConfig, epoch: int, train: bool = True):
    """Torch batches of one epoch from a worker's DataIterator (or a Dataset), random crop/flip applied.

    Batches stay on the CPU (pinned when CUDA is available): the model validates label ids there and copies
    them to the GPU without blocking, so the training loop never waits for the GPU to finish a step.
    """
    shuffle = cfg.shuffle_buffer if train and cfg.shuffle_buffer > 0 else None
    try:
        yield from shard.iter_torch_batches(
            batch_size=cfg.batch_size,
            drop_last=train,
            local_shuffle_buffer_size=shuffle,
            local_shuffle_seed=(cfg.seed * 1_000_003 + epoch) if shuffle else None,
            collate_fn=ModelBatches(cfg, epoch, train),
            device="cpu",
            pin_memory=torch.cuda.is_available(),
            prefetch_batches=cfg.prefetch_batches,
        )
    except Exception as e:
        content = content_error(e) or gone_shard_error(e)
        if content is None:
            raise
        raise content from None  # as itself, not inside Ray's task-error wrappers


def content_error(error: BaseException) -> shards.ShardContentError | None:
    """The ShardContentError behind a Ray Data failure."""
    for e in causes(error):
        if isinstance(e, shards.ShardContentError):
            return shards.ShardContentError(*e.args)
    return None


def gone_shard_error(error: BaseException) -> shards.ManifestError | None:
    """A shard the manifest lists, verified when the stage began, deleted while it streams: a read task's
    FileNotFoundError. An input error (every retry would miss it too), named by its path."""
    for e in causes(error):
        if isinstance(e, FileNotFoundError):
            named = re.search(r"[\w./:-]*shard-\d+\.parquet", str(e))
            return shards.ManifestError(
                f"{named.group(0) if named else 'a shard of the split'} is listed in the manifest but was deleted "
                f"while the stage read it: restore it (or re-run prepare_data) and resubmit; not retried"
            )
    return None


def started(batches: Iterator[dict]) -> Iterator[dict]:
    """`batches`, with its first item already being fetched on a thread: call it for the next epoch where the
    current one ends, so Ray Data's start-up (the split barrier, the executor, the first read and decode) overlaps
    validation, checkpointing and reporting instead of being waited for. Errors surface when iterated."""
    box: dict[str, Any] = {}

    def first() -> None:
        try:
            box["item"] = next(batches)
        except StopIteration:
            pass
        except BaseException as e:  # re-raised in the consumer's thread
            box["error"] = e

    # a daemon thread: a consumer that stops early must not keep the process alive
    fetch = threading.Thread(target=first, name="next-epoch-first-batch", daemon=True)
    fetch.start()

    def resumed() -> Iterator[dict]:
        fetch.join()
        if "error" in box:
            raise box["error"]
        if "item" in box:
            yield box.pop("item")
            yield from batches

    return resumed()


def iter_local_batches(uri: str, split: str, cfg: PipelineConfig, limit: int | None = None) -> Iterator[dict]:
    """The split's samples in manifest order, decoded at the load geometry in this process (no Ray), in batches of
    `cfg.batch_size` (the last one smaller), `limit` samples at most. Same tensors as `iter_epoch(..., train=False)`.

    For held-out samples inside a Train worker: reading them through a second Ray Dataset there raced the
    training split's execution for Ray Data's CPU budget and could deadlock the stage (rank 0 waiting for the
    held-out decode, which waited for CPUs the training split held while it waited for rank 0)."""
    import pyarrow.parquet as pq

    manifest = shards.load_manifest(uri, split)
    decode = Decode(cfg.geometry, cfg.instance_output, manifest)
    left = manifest["sample_count"] if limit is None else limit
    for loc in manifest.shard_locations:
        with loc.fs.open_input_file(loc.path) as f:
            table = pq.read_table(f, columns=columns(manifest))
        for start in range(0, min(table.num_rows, left), cfg.batch_size):
            rows = table.slice(start, min(cfg.batch_size, left - start)).to_pylist()
            arrays = decode({k: [r[k] for r in rows] for k in rows[0]})
            yield to_model_batch({k: torch.from_numpy(v) for k, v in arrays.items()}, cfg, 0, train=False)
        left -= min(table.num_rows, left)
        if left <= 0:
            return


def read_samples(uri: str, split: str, cfg: PipelineConfig, n: int) -> dict[str, torch.Tensor]:
    """The first `n` samples of a split in one batch, decoded in this process (see iter_local_batches)."""
    batches = list(iter_local_batches(uri, split, dataclasses.replace(cfg, batch_size=max(n, 1)), limit=n))
    return {k: torch.cat([b[k] for b in batches]) for k in batches[0]}


def to_model_batch(batch: dict[str, torch.Tensor], cfg: PipelineConfig, epoch: int, train: bool) -> dict:
    """Decoded arrays -> model tensors: crop/flip, image (B, 3, H, W) in [-1, 1], int64 ids, float edges."""
    batch["image"] = batch["image"].permute(0, 3, 1, 2)  # crop and flip act on the last two dimensions
    batch = random_crop_flip(cfg.geometry, batch, cfg.seed, epoch, train=train)
    out = {"index": batch["index"], "label": batch["label"], "image": batch["image"].float().div_(127.5).sub_(1.0)}
    if "inst" in batch:
        out["inst"] = batch["inst"].long()
    if "edges" in batch:
        out["edges"] = batch["edges"].float()
    return out
