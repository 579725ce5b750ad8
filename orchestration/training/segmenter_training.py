"""Train the seg-score segmenter (model/segmenter.py) on a dataset's real photos with Ray Train, report its mIoU
on the real validation photos, and register it in MLflow as `segmenter-<dataset>` (jobs.train_segmenter).

Same shards and Ray Data pipeline as the curriculum (at stage 3's geometry, no instance maps), same failure policy:
a worker group that restarts resumes from the latest epoch checkpoint; bad input stops at once. Storage:
{storage}/segmenters/<dataset>/<run id>/ (Ray Train's run folder): a new one per job unless `--run-id` names an
earlier one to resume, which must have been started with the same settings (`settings.json` there says which). The registered version is a folder of two files, no
pickle: `segmenter.pt` (TorchScript, loadable without this project's code) and `class_map.yaml` (channel i is
label id i; ids that never occur in the training labels are not scored, nor Cityscapes' ignored ids).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import ray
import ray.train
import ray.train.torch
import torch

from data import shards, storage
from data.labels import CITYSCAPES, LABEL_SETS
from data.layouts import label_set
from data.pipeline import build_dataset, execution_options, iter_epoch, iter_local_batches, started
from data.pipeline_config import PipelineConfig
from evaluation.segscore import BUILT_IN, UNSCORED, ClassMap, SegScore
from model.segmenter import SegmenterOptions, UNetSegmenter
from orchestration.cluster.failures import Trainer, fit
from orchestration.cluster.resources import connect_ray, wait_until_free
from orchestration.records.segmenter_registry import CLASS_MAP_FILE, MODEL_FILE, register_segmenter
from orchestration.records.tracking import MLFLOW_CLIENT_ENV
from orchestration.run.config import Config, ConfigError, available_val_split, check_name, differing_keys, from_dict
from orchestration.run.config import pipeline_config as stage_pipeline_config
from orchestration.training.worker import emit, quiet_ray_train_reports, reduce_sum


@dataclass
class SegmenterPlan:
    cfg: Config
    data_uri: str
    storage_uri: str
    tracking_uri: str | None  # None: trained and saved, not registered
    run_id: str | None = None  # None: a new run folder (seg-YYYYmmdd-HHMMSS-xxxx); an earlier one's id resumes it

    def __post_init__(self) -> None:
        if self.run_id is None:
            self.run_id = f"seg-{time.strftime('%Y%m%d-%H%M%S')}-{os.urandom(2).hex()}"
        check_name(self.run_id, "--run-id")
        # absolute: Train workers run in their staging folder, where a relative path names nothing
        self.data_uri = storage.resolve(self.data_uri).uri


def pipeline_config(cfg: Config) -> PipelineConfig:
    """The curriculum's pipeline settings at stage 3's geometry, without instance maps, the segmenter's batch."""
    return dataclasses.replace(
        stage_pipeline_config(cfg, 3),
        geometry=cfg.segmenter_geometry(),
        instance_output="none",
        batch_size=cfg.segmenter.batch_size,
    )


def service_class_map(class_histogram: list[int], label_set_name: str) -> ClassMap:
    """Channel i means label id i; ids without a pixel in the training labels (the train manifest's histogram)
    are not scored (the network never learned them), nor, for Cityscapes, the ids its benchmark ignores."""
    labels = LABEL_SETS[label_set_name]
    ignored = {i for i in range(labels.label_nc) if i >= len(class_histogram) or class_histogram[i] == 0}
    if labels is CITYSCAPES:
        ignored |= set(BUILT_IN["cityscapes-trainids"].ignore)
    classes = tuple(UNSCORED if i in ignored else i for i in range(labels.label_nc))
    return ClassMap(classes, tuple(sorted(ignored)), "of the service-trained segmenter")


def build_network(cfg: Config, label_nc: int) -> UNetSegmenter:
    s = cfg.segmenter
    return UNetSegmenter(SegmenterOptions(num_classes=label_nc, width=s.width, depth=s.depth))


def train_loop(context: dict) -> None:
    """One Ray Train worker: cross-entropy on the real photos' label maps, Adam with cosine decay; rank 0 scores
    the whole validation split each epoch; a checkpoint each epoch."""
    quiet_ray_train_reports()
    cfg = context["config"]  # the Config itself, validated in the driver
    labels = LABEL_SETS[context["label_set"]]
    s = cfg.segmenter
    rank = ray.train.get_context().get_world_rank()
    device = ray.train.torch.get_device()
    torch.set_num_threads(max(1, int(cfg.train.cpus_per_worker)))
    torch.manual_seed(cfg.train.seed)
    net = build_network(cfg, labels.label_nc).to(device)
    optim = torch.optim.Adam(net.parameters(), lr=s.lr)
    start = 0
    if (ckpt := ray.train.get_checkpoint()) is not None:
        with tempfile.TemporaryDirectory() as tmp:
            state = torch.load(Path(ckpt.to_directory(tmp)) / "state.pt", map_location="cpu", weights_only=True)
        net.load_state_dict(state["net"])
        optim.load_state_dict(state["optim"])
        start = state["epoch"]
    model = ray.train.torch.prepare_model(net, move_to_device=False)
    pcfg = pipeline_config(cfg)
    shard = ray.train.get_dataset_shard("train")
    upcoming = started(iter_epoch(shard, pcfg, start)) if start < s.epochs else None
    for epoch in range(start, s.epochs):
        for group in optim.param_groups:
            group["lr"] = s.lr * 0.5 * (1 + math.cos(math.pi * epoch / s.epochs))
        t0 = time.perf_counter()
        loss_sum, seen = _segmenter_epoch(model, optim, upcoming, device)
        took = time.perf_counter() - t0
        if epoch + 1 < s.epochs:
            upcoming = started(iter_epoch(shard, pcfg, epoch + 1))
        totals = reduce_sum(torch.cat([loss_sum, torch.tensor([float(seen)])]))
        metrics = {
            "epoch": epoch + 1,
            "loss": (totals[0] / max(totals[1], 1)).item(),
            "img_per_s": totals[2].item() / took,
        }
        if rank == 0:  # the whole validation split, read here (a second Ray Dataset could deadlock the split's)
            metrics |= _validate(net, model, context, pcfg, labels, device)
            emit(
                f"[segmenter] epoch {epoch + 1}/{s.epochs} loss={metrics['loss']:.3f} val mIoU={metrics['val_miou']:.3f} "
                f"pixel acc={metrics['val_pixel_acc']:.3f} {metrics['img_per_s']:.1f} img/s"
            )
        with tempfile.TemporaryDirectory() as tmp:
            checkpoint = None
            if rank == 0:
                state = {"net": net.state_dict(), "optim": optim.state_dict(), "epoch": epoch + 1}
                state |= {"config": cfg.to_dict()} | {k: context[k] for k in ("label_set", "class_histogram")}
                torch.save(state, Path(tmp) / "state.pt")
                checkpoint = ray.train.Checkpoint.from_directory(tmp)
            ray.train.report(metrics, checkpoint=checkpoint)


def _segmenter_epoch(model, optim, batches, device) -> tuple[torch.Tensor, int]:
    """One pass over this worker's share: (summed loss x samples, samples), samples seen."""
    model.train()
    loss_sum, seen = torch.zeros(2), 0
    for batch in batches:
        image, label = (batch["image"].to(device) + 1) / 2, batch["label"].long().to(device)
        loss = torch.nn.functional.cross_entropy(model(image), label)
        optim.zero_grad(set_to_none=True)
        loss.backward()
        optim.step()
        loss_sum += torch.tensor([loss.item() * len(label), len(label)])
        seen += len(label)
    return loss_sum, seen


def _validate(net, model, context: dict, pcfg: PipelineConfig, labels, device) -> dict:
    """mIoU and pixel accuracy over the whole validation split (under the service class map)."""
    score = SegScore(service_class_map(context["class_histogram"], labels.name), labels)
    model.eval()
    with torch.no_grad():
        for batch in iter_local_batches(context["data_uri"], context["val_split"], pcfg):
            score.update(net((batch["image"].to(device) + 1) / 2).cpu(), batch["label"])
    r = score.result()
    return {"val_miou": r.miou, "val_pixel_acc": r.pixel_accuracy}


def export(state: dict, into: Path) -> tuple[Path, ClassMap]:
    """The trained network as TorchScript plus its class map, written into `into`."""
    cfg = from_dict(state["config"])
    labels = LABEL_SETS[state["label_set"]]
    net = build_network(cfg, labels.label_nc)
    net.load_state_dict(state["net"])
    cmap = service_class_map(state["class_histogram"], labels.name)
    path = into / MODEL_FILE
    torch.jit.script(net.eval()).save(str(path))
    (into / CLASS_MAP_FILE).write_text(cmap.to_yaml())
    return path, cmap


def claim_run_folder(segmenters: storage.Location, plan: SegmenterPlan, log=print) -> None:
    """{segmenters}/{run_id}/settings.json: what the run trains. A new run id writes it; an existing one resumes
    only with the same settings (another width would not load the run's checkpoints)."""
    settings = {"data_uri": plan.data_uri, "segmenter": dataclasses.asdict(plan.cfg.segmenter)}
    settings["geometry"] = dataclasses.asdict(plan.cfg.segmenter_geometry())
    settings = json.loads(json.dumps(settings))  # as stored: tuples are lists
    loc = segmenters.join(plan.run_id, "settings.json")
    if storage.exists(loc):
        before = json.loads(storage.read_bytes(loc))
        differ = differing_keys(before, settings)
        if differ:
            raise ConfigError(
                f"segmenter run '{plan.run_id}' in {segmenters} was started with other settings ({', '.join(differ)} "
                f"differ): leave out --run-id for a new run, or give the run's own settings to resume it"
            )
        log(f"[segmenter] resuming run {plan.run_id} (same settings)")
        return
    storage.write_bytes_atomic(loc, json.dumps(settings, indent=1, sort_keys=True).encode())
    log(f"[segmenter] run {plan.run_id}: {segmenters.join(plan.run_id)}")


def train(plan: SegmenterPlan, log=print) -> dict:
    """Train, export, and (with a tracking URI) register; returns the final metrics and where the model went."""
    cfg = plan.cfg
    manifest = shards.load_manifest(plan.data_uri, cfg.data.train_split)
    labels = label_set(manifest["layout"])
    val_split = available_val_split(cfg, plan.data_uri, log)
    if val_split is None:
        log("note: no validation split: the segmenter's mIoU is measured on its training photos")
    segmenters = storage.resolve(plan.storage_uri).join("segmenters", cfg.dataset)
    storage.check_writable(segmenters)
    claim_run_folder(segmenters, plan, log)
    connect_ray(cfg, what="the segmenter", client_env=MLFLOW_CLIENT_ENV)
    wait_until_free(cfg, "the segmenter", log)
    g = cfg.segmenter_geometry()
    log(
        f"[segmenter] U-Net width {cfg.segmenter.width} depth {cfg.segmenter.depth} on {labels.name} real photos "
        f"({g.resize_or_crop}/{g.load_size}), {cfg.workers[1]} workers x batch {cfg.segmenter.batch_size}, "
        f"{cfg.segmenter.epochs} epochs"
    )
    loop_config = {
        "config": cfg,
        "label_set": labels.name,
        "class_histogram": list(manifest.data.get("class_histogram") or [1] * labels.label_nc),
        "data_uri": plan.data_uri,
        "val_split": val_split or cfg.data.train_split,
    }
    result = fit(_trainer(plan, loop_config, segmenters), "the segmenter")
    if result.error is not None or result.checkpoint is None:
        raise RuntimeError(f"the segmenter's training failed: {result.error or 'no checkpoint'}")
    metrics = dict(result.metrics or {})
    with tempfile.TemporaryDirectory() as tmp:
        state = torch.load(Path(result.checkpoint.to_directory(tmp)) / "state.pt", map_location="cpu")
        out = Path(tmp) / "export"
        out.mkdir()
        path, cmap = export(state, out)
        checkpoint_uri = ("s3://" if segmenters.is_s3 else "") + result.checkpoint.path
        summary = {"metrics": metrics, "checkpoint": checkpoint_uri, "scored": len(cmap.scored)}
        if plan.tracking_uri:
            summary["registry"] = register_segmenter(out, cfg, plan.data_uri, metrics, plan.tracking_uri, log)
    log(
        f"[segmenter] done: val mIoU {metrics.get('val_miou', float('nan')):.3f} over {len(cmap.scored)} scored "
        f"classes; checkpoint {checkpoint_uri}"
    )
    return summary


def _trainer(plan: SegmenterPlan, loop_config: dict, segmenters: storage.Location) -> Trainer:
    from ray.train import CheckpointConfig, DataConfig, FailureConfig, LoggingConfig, RunConfig, ScalingConfig

    cfg, t = plan.cfg, plan.cfg.train
    resources = {"CPU": t.cpus_per_worker} | ({"GPU": t.gpus_per_worker} if t.use_gpu else {})
    return Trainer(
        train_loop,
        train_loop_config=loop_config,
        scaling_config=ScalingConfig(num_workers=cfg.workers[1], use_gpu=t.use_gpu, resources_per_worker=resources),
        run_config=RunConfig(
            name=plan.run_id,
            storage_path=segmenters.path,
            storage_filesystem=segmenters.fs,
            checkpoint_config=CheckpointConfig(num_to_keep=2),
            failure_config=FailureConfig(max_failures=t.max_failures),
            logging_config=LoggingConfig(log_level="WARNING" if t.ray_logs == "quiet" else "INFO"),
        ),
        datasets={"train": build_dataset(plan.data_uri, cfg.data.train_split, pipeline_config(cfg))},
        dataset_config=DataConfig(datasets_to_split=["train"], execution_options=execution_options()),
    )
