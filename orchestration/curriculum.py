"""The three-stage pix2pixHD curriculum, each stage one Ray Train `TorchTrainer.fit()`.

    stage 1: GlobalGenerator G1 at half resolution
    stage 2: LocalEnhancer at full resolution, G1 loaded from stage 1 and frozen for niter_fix_global epochs,
             D scales carried over (one new, finest scale)
    stage 3: everything jointly, lr constant for niter then linear decay over niter_decay

Run layout in storage (a local folder by default, s3://... on a cluster):
    {storage}/{run_id}/run.json           stage status and final checkpoints (written after each stage)
    {storage}/{run_id}/stage{k}/...       Ray Train's run folder: checkpoints, images/epoch_NNNN.png

A resubmitted run id skips finished stages and resumes an unfinished one from its latest checkpoint.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass

from data import shards, storage
from data.layouts import label_set
from data.pipeline import build_dataset, execution_options
from orchestration.config import Config, ConfigError
from orchestration.tracking import RUN_TAG, STAGE_TAG, Tracker
from orchestration.worker import StageContext, pipeline_config, train_stage


@dataclass(frozen=True)
class Stage:
    k: int
    what: str


STAGES = (
    Stage(1, "global generator G1 at half resolution"),
    Stage(2, "local enhancer at full resolution, G1 frozen for niter_fix_global epochs"),
    Stage(3, "joint fine-tune of G1 and the enhancer"),
)


class RunState:
    """run.json: which stages finished, with their final checkpoints. Written atomically by the driver."""

    def __init__(self, root: storage.Location):
        self.loc = root.join("run.json")
        try:
            self.data = json.loads(storage.read_bytes(self.loc))
        except FileNotFoundError:
            self.data = {"stages": {}}

    def done(self, k: int) -> dict | None:
        entry = self.data["stages"].get(str(k))
        return entry if entry and entry.get("status") == "done" else None

    def record(self, k: int, **entry) -> None:
        self.data["stages"][str(k)] = {"status": "done", **entry}
        storage.write_bytes_atomic(self.loc, json.dumps(self.data, indent=1).encode())


@dataclass
class RunPlan:
    cfg: Config
    run_id: str
    stages: list[int]
    data_uri: str
    storage_uri: str
    from_run: str | None = None
    tracking_uri: str | None = None  # None: no tracking (resolve_tracking_uri gives the embedded default)
    register: bool = True  # register the generator after stage 3


def default_run_id(cfg: Config) -> str:
    return f"{cfg.name}-{time.strftime('%Y%m%d-%H%M%S')}"


def preflight(plan: RunPlan) -> tuple[storage.Location, RunState, dict[int, str]]:
    """Every check that can fail before a worker starts: data manifest, storage, earlier stages."""
    if not plan.stages or any(k not in (1, 2, 3) for k in plan.stages) or plan.stages != sorted(set(plan.stages)):
        raise ConfigError(f"--stages {plan.stages}: give increasing stage numbers from 1, 2, 3 (e.g. 2,3)")
    manifest = shards.load_manifest(plan.data_uri, plan.cfg.data.train_split)
    label_nc = plan.cfg.model.label_nc
    if label_nc and manifest["label_nc"] > label_nc:
        raise ConfigError(
            f"model.label_nc={label_nc} but the dataset {plan.data_uri} has label_nc {manifest['label_nc']}"
        )
    if plan.cfg.instance_output() != "none" and not manifest["has_instances"]:
        raise ConfigError(
            f"{plan.data_uri} has no instance maps: set model.no_instance: true (and instance_feat: false)"
        )
    root = storage.resolve(plan.storage_uri).join(plan.run_id)
    storage.check_writable(root)
    state = RunState(root)
    inits: dict[int, str] = {}
    first = plan.stages[0]
    if first > 1:
        source = state if plan.from_run is None else RunState(storage.resolve(plan.storage_uri).join(plan.from_run))
        prev = source.done(first - 1) or state.done(first - 1)
        if prev is None:
            raise ConfigError(
                f"stage {first} starts from stage {first - 1}'s final checkpoint, but run "
                f"'{plan.from_run or plan.run_id}' in {plan.storage_uri} has no finished stage {first - 1}; "
                f"pass --from-run RUN_ID of a run that finished it"
            )
        inits[first] = prev["checkpoint"]
    return root, state, inits


def experiment_name(cfg: Config) -> str:
    return f"pix2pixhd-{cfg.dataset}"


@dataclass
class RunResult:
    stages: dict[int, dict]  # run.json entries of the stages run or skipped
    registry: dict | None = None  # the registered model version, when stage 3 ran and tracking is on

    @property
    def final(self) -> dict:
        return self.stages[max(self.stages)]


def run(plan: RunPlan, log=print) -> RunResult:
    """Run the planned stages, tracked in MLflow when plan.tracking_uri is set; after stage 3 the generator is
    registered (plan.register)."""
    parent = None
    if plan.tracking_uri:
        parent = Tracker(plan.tracking_uri, experiment_name(plan.cfg), {RUN_TAG: plan.run_id}, plan.run_id, log=log)
    try:
        result = RunResult(_run_stages(plan, parent, log))
    except BaseException:
        if parent:
            parent.close("FAILED", timeout=10)
        raise
    if parent:
        parent.metrics({f"stage{k}/{m}": v for k, r in result.stages.items() for m, v in (r.get("metrics") or {}).items()
                        if m in ("val_L1", "val_VGG")}, step=0)  # fmt: skip
        if plan.register and 3 in result.stages:
            parent.flush()
            result.registry = _register(plan, result.final, log)
        parent.close("FINISHED")
    return result


def _register(plan: RunPlan, final: dict, log) -> dict | None:
    from orchestration.registry import register

    metric = (final.get("metrics") or {}).get("val_L1")
    for attempt in range(3):
        try:
            return register(
                plan.cfg, plan.run_id, final["checkpoint"], 3, plan.data_uri, metric, plan.tracking_uri, log
            )
        except Exception as e:  # noqa: BLE001 - the trained model is safe in storage; registration can be redone
            log(f"registry: attempt {attempt + 1} failed ({type(e).__name__}: {str(e).splitlines()[0][:200]})")
            time.sleep(5 * (attempt + 1))
    log(f"registry: not registered; the final checkpoint is {final['checkpoint']}")
    return None


def available_val_split(cfg: Config, data_uri: str, log=print) -> str | None:
    """The configured validation split if the dataset has it (else images and val_L1 use training samples)."""
    if cfg.data.val_split:
        try:
            shards.load_manifest(data_uri, cfg.data.val_split)
            return cfg.data.val_split
        except shards.ManifestError:
            log(f"note: {data_uri} has no '{cfg.data.val_split}' split; images and val_L1 use training samples")
    return None


def stage_trainer(cfg: Config, k: int, data_uri: str, val_split: str | None, context: StageContext,
                  storage_root: storage.Location, name: str, callbacks: list | None = None):  # fmt: skip
    """The TorchTrainer of stage k: datasets, workers, checkpoints and restarts as configured."""
    from ray.train import CheckpointConfig, DataConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    pcfg = pipeline_config(cfg, k)
    datasets = {
        "train": build_dataset(data_uri, cfg.data.train_split, pcfg),
        "val": build_dataset(data_uri, val_split or cfg.data.train_split, pcfg),
    }
    resources = {"CPU": cfg.train.cpus_per_worker}
    if cfg.train.use_gpu:
        resources["GPU"] = cfg.train.gpus_per_worker
    return TorchTrainer(
        train_stage,
        train_loop_config=vars(context),
        scaling_config=ScalingConfig(
            num_workers=cfg.train.num_workers, use_gpu=cfg.train.use_gpu, resources_per_worker=resources
        ),  # fmt: skip
        run_config=RunConfig(
            name=name,
            storage_path=storage_root.path,
            storage_filesystem=storage_root.fs,
            checkpoint_config=CheckpointConfig(num_to_keep=2),
            failure_config=FailureConfig(max_failures=cfg.train.max_failures),
            callbacks=callbacks,
        ),
        datasets=datasets,
        dataset_config=DataConfig(datasets_to_split=["train"], execution_options=execution_options()),
    )


def _run_stages(plan: RunPlan, parent: Tracker | None, log) -> dict[int, dict]:
    import ray

    cfg = plan.cfg
    root, state, inits = preflight(plan)
    val_split = available_val_split(cfg, plan.data_uri, log)
    if not ray.is_initialized():
        ray.init()
    log(f"run {plan.run_id}: stages {plan.stages}, data {plan.data_uri}, storage {root}")
    if parent:
        log(f"tracking: MLflow at {plan.tracking_uri}, experiment {experiment_name(cfg)}")
        parent.params(cfg.to_dict())
        parent.tags_({"data_uri": plan.data_uri, "storage": root.uri, "config_hash": cfg.hash()})
    labels = label_set(shards.load_manifest(plan.data_uri, cfg.data.train_split)["layout"]).name
    results: dict[int, dict] = {}
    for k in plan.stages:
        done = state.done(k)
        if done:
            log(f"[stage {k}] already finished in run {plan.run_id} ({done['epochs']} epochs): skipped")
            results[k] = done
            inits[k + 1] = done["checkpoint"]
            continue
        model, geo = cfg.stage_model(k), cfg.stage_geometry(k)
        log(
            f"[stage {k}] {STAGES[k - 1].what}: netG={model.netG} ngf={model.ngf} num_D={model.num_D} "
            f"{geo.resize_or_crop}/{geo.load_size} batch {cfg.stage_batch_size(k)} x {cfg.train.num_workers} workers, "
            f"{cfg.stage(k).epochs} epochs"
        )
        context = StageContext(cfg.to_dict(), k, root.uri, inits.get(k), labels, plan.run_id, plan.tracking_uri,
                               experiment_name(cfg))  # fmt: skip
        t0 = time.perf_counter()
        result = stage_trainer(cfg, k, plan.data_uri, val_split, context, root, f"stage{k}").fit()
        ckpt_uri = checkpoint_uri(result, root, f"stage {k}")
        metrics = result.metrics or {}
        entry = dict(checkpoint=ckpt_uri, epochs=metrics.get("epoch"), global_step=metrics.get("global_step"),
                     seconds=round(time.perf_counter() - t0, 1), metrics=metrics)  # fmt: skip
        state.record(k, **entry)
        if parent:
            parent.tags_({f"stage{k}.checkpoint": ckpt_uri})
            stage_run = Tracker(plan.tracking_uri, experiment_name(cfg), {RUN_TAG: plan.run_id, STAGE_TAG: str(k)},
                                f"{plan.run_id}/stage{k}", parent_tags={RUN_TAG: plan.run_id}, log=log)  # fmt: skip
            stage_run.tags_({"checkpoint": ckpt_uri})
            stage_run.close("FINISHED", timeout=30)
        results[k] = state.done(k)
        inits[k + 1] = ckpt_uri
        log(f"[stage {k}] finished: {entry['epochs']} epochs, {entry['global_step']} steps in {entry['seconds']}s; "
            f"checkpoint {ckpt_uri}")  # fmt: skip
    return results


def checkpoint_uri(result, root: storage.Location, what: str) -> str:
    """The final checkpoint of a finished fit() as a URI, or a clear error."""
    if result.error is not None:
        raise RuntimeError(f"{what} failed: {result.error}") from result.error
    if result.checkpoint is None:
        raise RuntimeError(f"{what} finished without a checkpoint")
    return ("s3://" if root.is_s3 else "") + result.checkpoint.path
