"""The per-worker training loop of one curriculum stage (runs inside Ray Train workers).

Every rank runs the same loop; rank 0 alone prints progress, writes image grids and checkpoints.
`ray.train.report` is called once per epoch on every rank (it is a barrier), and mid-epoch when a checkpoint
is due: every `train.checkpoint_every_steps` steps, or when Ray announces that a node of this stage is being
drained (a spot/preemptible node's notice, `ray drain-node`), within `train.preemption_check_steps` steps.

Elastic stages (`train.num_workers: [min, max]`): Ray Train restarts the worker group at a new size when nodes
leave or return, and the loop resumes from the latest checkpoint. The global batch stays the same at every
size that divides it (each worker takes global / workers samples), so the lr, the number of steps per epoch and
the result do not depend on the size (other sizes: `Config.worker_batch`); a checkpoint taken mid-epoch resumes that epoch after the steps it already did (each
worker skips its share of them: the same number of samples, though not the same samples, since the split
across workers depends on their count). Each resize is logged (time, old -> new, epoch, step) in the progress
line and in MLflow (`workers` metric, `resize.N` tags).
"""

from __future__ import annotations

import contextlib
import logging
import sys
import tempfile
import time
from dataclasses import dataclass
from typing import Any

import ray.train
import ray.train.torch
import torch
import torch.distributed as dist

from data import storage
from data.labels import LABEL_SETS
from data.pipeline import PipelineConfig, iter_epoch, read_samples, started
from model.inference import generate
from model.step import LOSS_NAMES, TrainStep
from orchestration import checkpoint
from orchestration.config import Config, from_dict
from orchestration.tracking import RUN_TAG, STAGE_TAG, Tracker, unsent_file
from orchestration.visuals import comparison_rows, grid, to_png_bytes


@dataclass
class StageContext:
    """What the driver hands each worker (as train_loop_config)."""

    config: dict
    stage: int
    run_root: str  # URI of {storage}/{run_id}
    init_checkpoint: str | None  # URI of the previous stage's final checkpoint
    label_set: str = "cityscapes"
    run_id: str = ""
    tracking_uri: str | None = None  # None: no MLflow tracking
    experiment: str = "pix2pixhd"
    mid_epoch_checkpoints: bool = True  # False in sweep trials: Tune counts every report as an iteration
    data_uri: str | None = None  # held-out samples (images, val_L1): read by rank 0 from this dataset's
    heldout_split: str = "train"  # validation split, or the training split when there is none
    selection: Any = None  # orchestration.selection.Selection: the quality metric scored on held-out samples


def pipeline_config(cfg: Config, k: int, world_size: int | None = None) -> PipelineConfig:
    """Stage k's data pipeline; with `world_size`, the batch is one worker's share of the global batch."""
    d = cfg.data
    return PipelineConfig(
        geometry=cfg.stage_geometry(k),
        instance_output=cfg.instance_output(),
        batch_size=cfg.worker_batch(k, world_size) if world_size else cfg.stage_batch_size(k),
        seed=cfg.train.seed,
        shuffle_buffer=d.shuffle_buffer,
        read_cpus=d.read_cpus,
        decode_cpus=d.decode_cpus,
        prefetch_batches=d.prefetch_batches,
        verify=d.verify,
    )


def _wrap(module: torch.nn.Module) -> torch.nn.Module:
    return ray.train.torch.prepare_model(module, move_to_device=False)


def _load_checkpoint_uri(uri: str) -> dict:
    loc = storage.resolve(uri)
    return _load(ray.train.Checkpoint(path=loc.path, filesystem=loc.fs), uri)


def _load(ckpt: ray.train.Checkpoint, stored: str | None = None) -> dict:
    """Each worker downloads its own copy. `Checkpoint.as_directory()` shares one temporary folder per checkpoint
    among the processes of a host and deletes it when the last reader leaves: a worker then read meta.json while
    another process re-downloaded it, half-written (seen with two nodes on one host after an elastic resize; a
    host with several GPU workers is the same)."""
    with tempfile.TemporaryDirectory(prefix="p2p-checkpoint-") as tmp:
        where = stored or (f"s3://{ckpt.path}" if ckpt.filesystem.type_name == "s3" else ckpt.path)
        return checkpoint.load(ckpt.to_directory(tmp), where)


def _heldout(ctx: StageContext, pcfg: PipelineConfig, n: int, device) -> dict[str, torch.Tensor] | None:
    """The first `n` samples of the held-out split (no augmentation), kept for images and val_L1; read in this
    process, not through Ray Data (see data.pipeline.iter_local_batches)."""
    if ctx.data_uri is None or n <= 0:
        return None
    samples = read_samples(ctx.data_uri, ctx.heldout_split, pcfg, n)
    return {k: v.to(device) for k, v in samples.items()}


def reduce_sum(values: torch.Tensor) -> torch.Tensor:
    if dist.is_available() and dist.is_initialized():
        values = values.clone()
        dist.all_reduce(values)
    return values


def quiet_ray_train_reports() -> None:
    """Ray Train logs every `report` at INFO on every rank, with the whole metrics dict, and DDP wrapping of each
    network; the progress line below says what matters once. The first logger is named after its module's file."""
    logging.getLogger("ray.train.torch.train_loop_utils").setLevel(logging.WARNING)
    try:
        from ray.train.v2._internal.execution import context as train_context
    except ImportError:  # another Ray version: keep its logging as it is
        return
    logging.getLogger(train_context.__file__).setLevel(logging.WARNING)


def train_stage(context: dict) -> None:
    quiet_ray_train_reports()
    ctx = StageContext(**context)
    cfg = from_dict(ctx.config)
    k = ctx.stage
    stage_cfg = cfg.stage(k)
    train_ctx = ray.train.get_context()
    rank, world = train_ctx.get_world_rank(), train_ctx.get_world_size()
    device = ray.train.torch.get_device()
    torch.set_num_threads(max(1, int(cfg.train.cpus_per_worker)))
    opt = cfg.stage_model(k)
    t = cfg.train
    step = TrainStep(
        opt,
        device,
        wrap=_wrap,
        precision=t.precision,
        channels_last=t.channels_last,
        compile=t.compile,
        activation_checkpointing=t.activation_checkpointing,
        seed=t.seed,
    )
    say = emit if rank == 0 else (lambda *a, **kw: None)

    start_epoch, global_step, skip, resized = 0, 0, 0, None
    resume = ray.train.get_checkpoint()
    if resume is not None:
        state = _load(resume)
        checkpoint.restore(step, state)
        start_epoch, global_step, skip = state["epoch"], state["global_step"], state.get("epoch_step", 0)
        where = f"epoch {start_epoch}" + (f" + {skip} steps" if skip else "") + f", step {global_step}"
        say(f"[stage {k}] resuming from its checkpoint: {where}")
        if state.get("world_size", world) != world:
            resized = (state["world_size"], world)
            before, now = (w * cfg.worker_batch(k, w) for w in resized)
            batch = f"global batch {now} as before" if before == now else f"global batch {before} -> {now}, lr scaled"
            say(
                f"[stage {k}] resized {resized[0]} -> {world} workers at {time.strftime('%H:%M:%S')} ({where}); "
                f"per-worker batch {cfg.worker_batch(k, resized[0])} -> {cfg.worker_batch(k, world)}, {batch}"
            )
    elif ctx.init_checkpoint:
        say(f"[stage {k}] {checkpoint.init_from_previous_stage(step, _load_checkpoint_uri(ctx.init_checkpoint), k)}")

    pcfg = pipeline_config(cfg, k, world)
    shard = ray.train.get_dataset_shard("train")
    labels = LABEL_SETS[ctx.label_set]
    judge = ctx.selection.judge(labels, device) if rank == 0 and ctx.selection is not None else None
    pictured = cfg.train.val_samples  # held-out samples in the image grids; a quality score reads eval.images
    heldout = _heldout(ctx, pcfg, max(pictured, cfg.eval.images) if judge else pictured, device) if rank == 0 else None
    tracker = None
    if rank == 0 and ctx.tracking_uri:
        tracker = Tracker(
            ctx.tracking_uri,
            ctx.experiment,
            {RUN_TAG: ctx.run_id, STAGE_TAG: str(k)},
            f"{ctx.run_id}/stage{k}",
            parent_tags={RUN_TAG: ctx.run_id},
            log=say,
            unsent=unsent_file(storage.resolve(ctx.run_root)),
        )
        tracker.params(
            {
                "stage": k,
                "model": vars(opt),
                "geometry": vars(pcfg.geometry),
                "global_batch": cfg.global_batch(k),
                "num_workers": str(cfg.train.num_workers),
            }
        )
        tracker.tags_({"checkpoint_dir": storage.resolve(ctx.run_root).join(f"stage{k}").uri})
        tracker.metrics({"workers": world}, global_step)
        if resized:
            tracker.tags_(
                {
                    f"resize.{int(time.time())}": f"{resized[0]} -> {world} workers at epoch {start_epoch} "
                    f"(+{skip} steps), step {global_step}"
                }
            )
    stage_root = storage.resolve(ctx.run_root).join(f"stage{k}")
    images_root = stage_root.join("images")
    epochs = stage_cfg.epochs
    stage_start = time.perf_counter()
    upcoming = started(iter_epoch(shard, pcfg, start_epoch)) if start_epoch < epochs else None
    every = cfg.train.checkpoint_every_steps if ctx.mid_epoch_checkpoints else 0
    preempted = False  # a just-in-time checkpoint was taken for the current drain notice

    def save_and_report(metrics: dict, epoch: int, epoch_step: int, lr: float) -> None:
        with tempfile.TemporaryDirectory() as tmp:
            ckpt = None
            if rank == 0:
                checkpoint.save(
                    tmp,
                    step,
                    stage=k,
                    epoch=epoch,
                    epoch_step=epoch_step,
                    global_step=global_step,
                    lr=lr,
                    config=ctx.config,
                    world_size=world,
                )
                ckpt = ray.train.Checkpoint.from_directory(tmp)
            stored = set(storage.list_dirs(stage_root)) if ckpt else set()
            try:
                ray.train.report(metrics, checkpoint=ckpt)  # rank 0's checkpoint is copied into the run's storage
            except Exception as e:
                full = storage.refused(e)
                if full is None:
                    raise
                for partial in set(storage.list_dirs(stage_root)) - stored:  # the copy that failed, half written
                    with contextlib.suppress(OSError):
                        storage.delete_tree(stage_root.join(partial))
                raise checkpoint.CheckpointError(
                    f"cannot store stage {k}'s checkpoint (epoch {epoch}, step {global_step}) in "
                    f"{ctx.run_root}/stage{k}: {str(full).splitlines()[0][:200]}. Free space (or make it writable) "
                    f"and resubmit: the run resumes from its last stored checkpoint"
                ) from None

    for epoch in range(start_epoch, epochs):
        trainable = "local" if k == 2 and epoch < stage_cfg.niter_fix_global else "all"
        step.set_trainable(trainable)
        step.train(True)
        lr = step.set_epoch(epoch, cfg.lr_scale(k, world))
        sums = torch.zeros(len(LOSS_NAMES), device=device)
        batches, samples, wait = 0, 0, 0.0
        done_before = skip if epoch == start_epoch else 0  # steps a mid-epoch checkpoint already did
        epoch_step = 0
        t_epoch = time.perf_counter()
        t_ready = t_epoch
        for batch in upcoming:
            epoch_step += 1
            if epoch_step <= done_before:
                t_ready = time.perf_counter()
                continue
            wait += time.perf_counter() - t_ready
            losses = step.step(batch)
            sums += torch.stack([losses[n] for n in LOSS_NAMES])
            batches += 1
            samples += len(batch["index"])
            global_step += 1
            if cfg.train.log_every and global_step % cfg.train.log_every == 0:
                values = {n: v.item() for n, v in losses.items()}
                say(
                    f"[stage {k}] epoch {epoch + 1}/{epochs} step {global_step} "
                    + " ".join(f"{n}={v:.3f}" for n, v in values.items())
                )
                if tracker:
                    tracker.metrics({f"step/{n}": v for n, v in values.items()}, global_step)
            if ctx.mid_epoch_checkpoints:
                ask = cfg.train.preemption_check_steps and global_step % cfg.train.preemption_check_steps == 0
                notice = ray.train.get_preemption_info() if ask else None  # a broadcast: one answer on every rank
                due = bool(every) and global_step % every == 0
                draining = notice is not None and not preempted
                if due or draining:
                    save_and_report(
                        {
                            "stage": k,
                            "epoch": epoch,
                            "epoch_step": epoch_step,
                            "global_step": global_step,
                            "lr": lr,
                            "partial_epoch": True,
                        },
                        epoch,
                        epoch_step,
                        lr,
                    )
                if draining:  # said once the checkpoint is reported, not before: the node may go at any moment
                    say(
                        f"[stage {k}] node(s) {', '.join(notice.preempted_node_to_ranks)} draining: checkpointed at "
                        f"step {global_step} (epoch {epoch + 1}, step {epoch_step} of it)"
                    )
                if ask:
                    preempted = notice is not None
            t_ready = time.perf_counter()
        took = time.perf_counter() - t_epoch
        last = epoch + 1 == epochs
        if not last:  # the next epoch's data starts now, while this one is validated, saved and reported
            upcoming = started(iter_epoch(shard, pcfg, epoch + 1))
        totals = reduce_sum(torch.cat([sums, torch.tensor([batches, samples], device=device, dtype=sums.dtype)]))
        n_batches, n_samples = totals[-2].item(), totals[-1].item()
        metrics = {name: (totals[i] / max(n_batches, 1)).item() for i, name in enumerate(LOSS_NAMES)}
        metrics.update(
            stage=k,
            epoch=epoch + 1,
            global_step=global_step,
            lr=lr,
            trainable=trainable,
            workers=world,
            img_per_s=n_samples / took,
            epoch_seconds=took,
            data_wait=wait / took,
            samples=n_samples,
        )

        t_val = time.perf_counter()
        if heldout is not None:
            fake = generate(
                step.G,
                opt,
                heldout["label"],
                inst=heldout.get("inst"),
                edges=heldout.get("edges"),
                features=_features(step, heldout),
            )
            metrics["val_L1"] = (fake.float() - heldout["image"]).abs().mean().item()
            if judge is not None and (last or (epoch + 1) % cfg.eval.every == 0):
                metrics.update(judge.score(fake, heldout["image"], heldout["label"]))
            if step.vgg_loss is not None:
                metrics["val_VGG"] = (step.vgg_loss(fake.float(), heldout["image"]) / step.vgg_loss.lambda_vgg).item()
            if last or (epoch + 1) % cfg.train.image_every == 0:
                shown_rows = slice(0, min(4, pictured, len(fake)))
                png = to_png_bytes(
                    grid(
                        comparison_rows(
                            labels, heldout["label"][shown_rows], fake[shown_rows], heldout["image"][shown_rows]
                        )
                    )
                )
                storage.write_bytes_atomic(images_root.join(f"epoch_{epoch + 1:04d}.png"), png)
                if tracker:
                    tracker.artifact(png, f"images/epoch_{epoch + 1:04d}.png")
            metrics["val_seconds"] = time.perf_counter() - t_val  # benchmarks.validation: its share of an epoch
        if tracker:
            tracker.metrics(
                {n: v for n, v in metrics.items() if n not in ("stage", "epoch", "global_step")} | {"epoch": epoch + 1},
                global_step,
            )

        if last or (epoch + 1) % cfg.stage_save_freq(k) == 0:
            save_and_report(metrics, epoch + 1, 0, lr)
        else:
            ray.train.report(metrics)

        elapsed = time.perf_counter() - stage_start
        eta = elapsed / (epoch + 1 - start_epoch) * (epochs - epoch - 1)
        shown = " ".join(f"{n}={metrics[n]:.3f}" for n in LOSS_NAMES)
        val = "".join(f" {n}={metrics[n]:.3f}" for n in ("val_L1", "val_seg_miou", "val_kid") if n in metrics)
        say(
            f"[stage {k}] epoch {epoch + 1}/{epochs} step {global_step} {shown}{val} lr={lr:.2e} "
            f"{metrics['img_per_s']:.1f} img/s data-wait {100 * metrics['data_wait']:.0f}% {world} workers "
            f"eta {eta:.0f}s{' (G1 frozen)' if trainable == 'local' else ''}"
        )
    if start_epoch >= epochs:
        say(f"[stage {k}] already complete ({epochs} epochs)")
    if tracker:
        tracker.close("FINISHED")


def emit(line: str) -> None:
    """One progress line on stdout (Ray forwards it to the driver and the job log). Ray Train's patched `print`
    would log it twice."""
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def _features(step: TrainStep, heldout: dict[str, torch.Tensor]) -> torch.Tensor | None:
    """Instance features for rendering held-out samples: E's output on the real image (reconstruction)."""
    if step.E is None:
        return None
    with torch.no_grad():
        return step.E(heldout["image"], heldout["inst"])
