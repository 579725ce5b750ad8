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
from data.pipeline import iter_epoch, read_samples, started
from data.pipeline_config import PipelineConfig
from model.inference import generate
from model.step import LOSS_NAMES, TrainStep
from orchestration.records.tracking import RUN_TAG, STAGE_TAG, Tracker, unsent_file
from orchestration.run import checkpoint
from orchestration.run.config import Config, pipeline_config
from orchestration.run.visuals import comparison_rows, grid
from serving.maps import encode_rgb


@dataclass
class StageContext:
    """What the driver hands each worker (as train_loop_config)."""

    config: Config  # validated once, in the driver; crosses to the workers as itself
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
    selection: Any = None  # orchestration.judging.selection.Selection: the quality metric scored on held-out samples


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
    """What each Ray Train worker runs: the stage's loop, read top to bottom in StageLoop's methods."""
    quiet_ray_train_reports()
    loop = StageLoop(StageContext(**context))  # Ray Train hands train_loop_config over as a dict of its fields
    loop.resume()
    loop.open_tracker()
    loop.run()


class StageLoop:
    """One worker's stage: resume (or start from the previous stage), open the tracker, then per epoch: train,
    checkpoint mid-epoch when due, validate and picture, report, say how it went."""

    def __init__(self, ctx: StageContext):
        self.ctx = ctx
        self.cfg = cfg = ctx.config
        self.k = k = ctx.stage
        self.stage_cfg = cfg.stage(k)
        train_ctx = ray.train.get_context()
        self.rank, self.world = train_ctx.get_world_rank(), train_ctx.get_world_size()
        self.device = ray.train.torch.get_device()
        torch.set_num_threads(max(1, int(cfg.train.cpus_per_worker)))
        self.opt = cfg.stage_model(k)
        t = cfg.train
        self.step = TrainStep(
            self.opt,
            self.device,
            wrap=_wrap,
            precision=t.precision,
            channels_last=t.channels_last,
            compile=t.compile,
            activation_checkpointing=t.activation_checkpointing,
            seed=t.seed,
        )
        self.say = emit if self.rank == 0 else (lambda *a, **kw: None)
        self.pcfg = pipeline_config(cfg, k, self.world)
        self.shard = ray.train.get_dataset_shard("train")
        self.labels = LABEL_SETS[ctx.label_set]
        chosen = ctx.selection is not None and self.rank == 0
        self.judge = ctx.selection.judge(self.labels, self.device) if chosen else None
        self.pictured = t.val_samples  # held-out samples in the image grids; a quality score reads eval.images
        n = max(self.pictured, cfg.eval.images) if self.judge else self.pictured
        self.heldout = _heldout(ctx, self.pcfg, n, self.device) if self.rank == 0 else None
        self.stage_root = storage.resolve(ctx.run_root).join(f"stage{k}")
        self.epochs = self.stage_cfg.epochs
        self.every = t.checkpoint_every_steps if ctx.mid_epoch_checkpoints else 0
        self.preempted = False  # a just-in-time checkpoint was taken for the current drain notice
        self.start_epoch, self.global_step, self.skip, self.resized = 0, 0, 0, None
        self.tracker: Tracker | None = None

    # ---- before the first epoch ------------------------------------------------------------------------------

    def resume(self) -> None:
        """From this stage's latest checkpoint (a restart, a resize), else from the previous stage's final one."""
        k, world, say = self.k, self.world, self.say
        resume = ray.train.get_checkpoint()
        if resume is None:
            if self.ctx.init_checkpoint:
                state = _load_checkpoint_uri(self.ctx.init_checkpoint)
                say(f"[stage {k}] {checkpoint.init_from_previous_stage(self.step, state, k)}")
            return
        state = _load(resume)
        checkpoint.restore(self.step, state)
        self.start_epoch, self.global_step = state["epoch"], state["global_step"]
        self.skip = state.get("epoch_step", 0)
        where = (
            f"epoch {self.start_epoch}" + (f" + {self.skip} steps" if self.skip else "") + f", step {self.global_step}"
        )
        say(f"[stage {k}] resuming from its checkpoint: {where}")
        if state.get("world_size", world) != world:
            self.resized = (state["world_size"], world)
            before, now = (w * self.cfg.worker_batch(k, w) for w in self.resized)
            batch = f"global batch {now} as before" if before == now else f"global batch {before} -> {now}, lr scaled"
            say(
                f"[stage {k}] resized {self.resized[0]} -> {world} workers at {time.strftime('%H:%M:%S')} ({where}); "
                f"per-worker batch {self.cfg.worker_batch(k, self.resized[0])} -> {self.cfg.worker_batch(k, world)}, "
                f"{batch}"
            )

    def open_tracker(self) -> None:
        """Rank 0's MLflow run of the stage (nested under the curriculum's), when tracking is on."""
        ctx, k = self.ctx, self.k
        if self.rank != 0 or not ctx.tracking_uri:
            return
        self.tracker = tracker = Tracker(
            ctx.tracking_uri,
            ctx.experiment,
            {RUN_TAG: ctx.run_id, STAGE_TAG: str(k)},
            f"{ctx.run_id}/stage{k}",
            parent_tags={RUN_TAG: ctx.run_id},
            log=self.say,
            unsent=unsent_file(storage.resolve(ctx.run_root)),
            system_metrics_s=self.cfg.train.system_metrics_s,
        )
        tracker.params(
            {
                "stage": k,
                "model": vars(self.opt),
                "geometry": vars(self.pcfg.geometry),
                "global_batch": self.cfg.global_batch(k),
                "num_workers": str(self.cfg.train.num_workers),
            }
        )
        tracker.tags_({"checkpoint_dir": self.stage_root.uri})
        tracker.metrics({"workers": self.world}, self.global_step)
        if self.resized:
            tracker.tags_(
                {
                    f"resize.{int(time.time())}": f"{self.resized[0]} -> {self.world} workers at epoch "
                    f"{self.start_epoch} (+{self.skip} steps), step {self.global_step}"
                }
            )

    # ---- the epochs ---------------------------------------------------------------------------------------

    def run(self) -> None:
        start = time.perf_counter()
        upcoming = (
            started(iter_epoch(self.shard, self.pcfg, self.start_epoch)) if self.start_epoch < self.epochs else None
        )
        for epoch in range(self.start_epoch, self.epochs):
            trainable = "local" if self.k == 2 and epoch < self.stage_cfg.niter_fix_global else "all"
            self.step.set_trainable(trainable)
            self.step.train(True)
            lr = self.step.set_epoch(epoch, self.cfg.lr_scale(self.k, self.world))
            counts = self.train_epoch(upcoming, epoch, lr)
            last = epoch + 1 == self.epochs
            if not last:  # the next epoch's data starts now, while this one is validated, saved and reported
                upcoming = started(iter_epoch(self.shard, self.pcfg, epoch + 1))
            metrics = self.epoch_metrics(counts, epoch, lr, trainable)
            self.validate_and_picture(metrics, epoch, last)
            self.report(metrics, epoch, last, lr)
            self.progress(metrics, epoch, start, trainable)
        if self.start_epoch >= self.epochs:
            self.say(f"[stage {self.k}] already complete ({self.epochs} epochs)")
        if self.tracker:
            self.tracker.close("FINISHED")

    def train_epoch(self, batches, epoch: int, lr: float) -> dict:
        """The epoch's steps (after those a mid-epoch checkpoint already did): summed losses, counts, timings."""
        sums = torch.zeros(len(LOSS_NAMES), device=self.device)
        n, samples, wait = 0, 0, 0.0
        done_before = self.skip if epoch == self.start_epoch else 0
        epoch_step = 0
        t_epoch = t_ready = time.perf_counter()
        for batch in batches:
            epoch_step += 1
            if epoch_step <= done_before:
                t_ready = time.perf_counter()
                continue
            wait += time.perf_counter() - t_ready
            losses = self.step.step(batch)
            sums += torch.stack([losses[name] for name in LOSS_NAMES])
            n += 1
            samples += len(batch["index"])
            self.global_step += 1
            self.log_step(losses, epoch)
            if self.ctx.mid_epoch_checkpoints:
                self.checkpoint_mid_epoch(epoch, epoch_step, lr)
            t_ready = time.perf_counter()
        return {"sums": sums, "batches": n, "samples": samples, "wait": wait, "took": time.perf_counter() - t_epoch}

    def log_step(self, losses: dict, epoch: int) -> None:
        every = self.cfg.train.log_every
        if not every or self.global_step % every:
            return
        values = {name: v.item() for name, v in losses.items()}
        self.say(
            f"[stage {self.k}] epoch {epoch + 1}/{self.epochs} step {self.global_step} "
            + " ".join(f"{name}={v:.3f}" for name, v in values.items())
        )
        if self.tracker:
            self.tracker.metrics({f"step/{name}": v for name, v in values.items()}, self.global_step)

    def checkpoint_mid_epoch(self, epoch: int, epoch_step: int, lr: float) -> None:
        """Every `checkpoint_every_steps` steps, and once per drain notice (asked every `preemption_check_steps`)."""
        t, step = self.cfg.train, self.global_step
        ask = t.preemption_check_steps and step % t.preemption_check_steps == 0
        notice = ray.train.get_preemption_info() if ask else None  # a broadcast: one answer on every rank
        due = bool(self.every) and step % self.every == 0
        draining = notice is not None and not self.preempted
        if due or draining:
            metrics = {"stage": self.k, "epoch": epoch, "epoch_step": epoch_step, "global_step": step, "lr": lr}
            self.save_and_report(metrics | {"partial_epoch": True}, epoch, epoch_step, lr)
        if draining:  # said once the checkpoint is reported, not before: the node may go at any moment
            self.say(
                f"[stage {self.k}] node(s) {', '.join(notice.preempted_node_to_ranks)} draining: checkpointed at "
                f"step {step} (epoch {epoch + 1}, step {epoch_step} of it)"
            )
        if ask:
            self.preempted = notice is not None

    def epoch_metrics(self, counts: dict, epoch: int, lr: float, trainable: str) -> dict:
        """The epoch's mean losses over every worker, throughput and data wait."""
        sums = counts["sums"]
        tail = torch.tensor([counts["batches"], counts["samples"]], device=self.device, dtype=sums.dtype)
        totals = reduce_sum(torch.cat([sums, tail]))
        n_batches, n_samples = totals[-2].item(), totals[-1].item()
        metrics = {name: (totals[i] / max(n_batches, 1)).item() for i, name in enumerate(LOSS_NAMES)}
        took = counts["took"]
        return metrics | dict(
            stage=self.k,
            epoch=epoch + 1,
            global_step=self.global_step,
            lr=lr,
            trainable=trainable,
            workers=self.world,
            img_per_s=n_samples / took,
            epoch_seconds=took,
            data_wait=counts["wait"] / took,
            samples=n_samples,
        )

    def validate_and_picture(self, metrics: dict, epoch: int, last: bool) -> None:
        """Rank 0: val_L1 (and val_VGG, the selection metric when due) on the held-out samples, the image grid."""
        heldout, step, cfg = self.heldout, self.step, self.cfg
        if heldout is None:
            return
        t_val = time.perf_counter()
        features = _features(step, heldout)
        fake = generate(
            step.G_eval,
            self.opt,
            heldout["label"],
            inst=heldout.get("inst"),
            edges=heldout.get("edges"),
            features=features,
        )
        metrics["val_L1"] = (fake.float() - heldout["image"]).abs().mean().item()
        if self.judge is not None and (last or (epoch + 1) % cfg.eval.every == 0):
            metrics.update(self.judge.score(fake, heldout["image"], heldout["label"]))
        if step.vgg_loss is not None:
            metrics["val_VGG"] = (step.vgg_loss(fake.float(), heldout["image"]) / step.vgg_loss.lambda_vgg).item()
        if last or (epoch + 1) % cfg.train.image_every == 0:
            rows = slice(0, min(4, self.pictured, len(fake)))
            png = encode_rgb(
                grid(comparison_rows(self.labels, heldout["label"][rows], fake[rows], heldout["image"][rows]))
            )
            name = f"epoch_{epoch + 1:04d}.png"
            storage.write_bytes_atomic(self.stage_root.join("images", name), png)
            if self.tracker:  # the UI's image view: the grid of each epoch at its step
                self.tracker.image(png, "held-out", self.global_step)
        metrics["val_seconds"] = time.perf_counter() - t_val  # benchmarks.validation: its share of an epoch

    def report(self, metrics: dict, epoch: int, last: bool, lr: float) -> None:
        """To MLflow (rank 0) and Ray Train (every rank: a barrier), with a checkpoint when one is due."""
        if self.tracker:
            shown = {n: v for n, v in metrics.items() if n not in ("stage", "epoch", "global_step")}
            self.tracker.metrics(shown | {"epoch": epoch + 1}, self.global_step)
        if last or (epoch + 1) % self.cfg.stage_save_freq(self.k) == 0:
            self.save_and_report(metrics, epoch + 1, 0, lr)
        else:
            ray.train.report(metrics)

    def progress(self, metrics: dict, epoch: int, start: float, trainable: str) -> None:
        elapsed = time.perf_counter() - start
        eta = elapsed / (epoch + 1 - self.start_epoch) * (self.epochs - epoch - 1)
        shown = " ".join(f"{n}={metrics[n]:.3f}" for n in LOSS_NAMES)
        val = "".join(f" {n}={metrics[n]:.3f}" for n in ("val_L1", "val_seg_miou", "val_kid") if n in metrics)
        self.say(
            f"[stage {self.k}] epoch {epoch + 1}/{self.epochs} step {self.global_step} {shown}{val} lr={metrics['lr']:.2e} "
            f"{metrics['img_per_s']:.1f} img/s data-wait {100 * metrics['data_wait']:.0f}% {self.world} workers "
            f"eta {eta:.0f}s{' (G1 frozen)' if trainable == 'local' else ''}"
        )

    def save_and_report(self, metrics: dict, epoch: int, epoch_step: int, lr: float) -> None:
        """Rank 0 writes a checkpoint; every rank reports it (Ray Train copies rank 0's into the run's storage). A
        storage that refuses the copy (full, read-only) is a CheckpointError, its half-copied folder removed."""
        with tempfile.TemporaryDirectory() as tmp:
            ckpt = None
            if self.rank == 0:
                checkpoint.save(
                    tmp,
                    self.step,
                    stage=self.k,
                    epoch=epoch,
                    epoch_step=epoch_step,
                    global_step=self.global_step,
                    lr=lr,
                    config=self.cfg.to_dict(),
                    world_size=self.world,
                )
                ckpt = ray.train.Checkpoint.from_directory(tmp)
            stored = set(storage.list_dirs(self.stage_root)) if ckpt else set()
            try:
                ray.train.report(metrics, checkpoint=ckpt)
            except Exception as e:
                full = storage.refused(e)
                if full is None:
                    raise
                for partial in set(storage.list_dirs(self.stage_root)) - stored:  # the copy that failed
                    with contextlib.suppress(OSError):
                        storage.delete_tree(self.stage_root.join(partial))
                raise checkpoint.CheckpointError(
                    f"cannot store stage {self.k}'s checkpoint (epoch {epoch}, step {self.global_step}) in "
                    f"{self.ctx.run_root}/stage{self.k}: {str(full).splitlines()[0][:200]}. Free space (or make it "
                    f"writable) and resubmit: the run resumes from its last stored checkpoint"
                ) from None


def emit(line: str) -> None:
    """One progress line on stdout (Ray forwards it to the driver and the job log). Ray Train's patched `print`
    would log it twice."""
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def _features(step: TrainStep, heldout: dict[str, torch.Tensor]) -> torch.Tensor | None:
    """Instance features for rendering held-out samples: (averaged) E's output on the real image (reconstruction)."""
    if step.E_eval is None:
        return None
    with torch.no_grad():
        return step.E_eval(heldout["image"], heldout["inst"])
