"""The three-stage pix2pixHD curriculum, each stage one Ray Train `TorchTrainer.fit()`.

    stage 1: GlobalGenerator G1 at half resolution
    stage 2: LocalEnhancer at full resolution, G1 loaded from stage 1 and frozen for niter_fix_global epochs,
             D scales carried over (one new, finest scale)
    stage 3: everything jointly, lr constant for niter then linear decay over niter_decay

Run layout in storage (a local folder by default, s3://... on a cluster):
    {storage}/{run_id}/run.json           the run's data, stage status and final checkpoints, its registered version
    {storage}/{run_id}/stage{k}/...       Ray Train's run folder: checkpoints, images/epoch_NNNN.png

A resubmitted run id skips finished stages and resumes an unfinished one from its latest checkpoint. The MLflow
runs of a curriculum always end: FINISHED, FAILED (an error, or a registration that did not happen) or KILLED
(the job was stopped), the nested stage runs with their parent.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from data import shards, storage
from data.layouts import label_set
from data.pipeline import build_dataset, execution_options
from model.networks import check_discriminator_fits
from orchestration.cluster import resources
from orchestration.cluster.failures import Trainer, fit
from orchestration.judging.selection import final_judgement, resolve_selection
from orchestration.records.registry import RegistrationError, register_run
from orchestration.records.tracking import (
    MLFLOW_CLIENT_ENV,
    RUN_TAG,
    STAGE_TAG,
    Tracker,
    send_kept_records,
    unsent_file,
)
from orchestration.run import checkpoint
from orchestration.run.config import Config, ConfigError, available_val_split, pipeline_config, run_defining_differences
from orchestration.run.run_lease import RunLease
from orchestration.run.run_state import RunState, run_root
from orchestration.run.stopping import run_status
from orchestration.training.worker import StageContext, train_stage


@dataclass(frozen=True)
class Stage:
    k: int
    what: str


STAGES = (
    Stage(1, "global generator G1 at half resolution"),
    Stage(2, "local enhancer at full resolution, G1 frozen for niter_fix_global epochs"),
    Stage(3, "joint fine-tune of G1 and the enhancer"),
)


@dataclass
class RunPlan:
    cfg: Config
    run_id: str
    stages: list[int]
    data_uri: str
    storage_uri: str
    from_run: str | None = None
    init_checkpoint: str | None = None  # the checkpoint the first stage starts from (default: the previous stage's)
    tracking_uri: str | None = None  # None: no tracking (resolve_tracking_uri gives the embedded default)
    register: bool = True  # register the generator after stage 3
    take_over: bool = False  # take the run's lease from a job that holds it (and is dead: orchestration/run_lease)

    def __post_init__(self) -> None:
        # absolute: Train workers run in their staging folder, where a relative path names nothing
        self.data_uri = storage.resolve(self.data_uri).uri


def default_run_id(cfg: Config) -> str:
    return f"{cfg.name}-{time.strftime('%Y%m%d-%H%M%S')}"


def preflight(plan: RunPlan, log=print) -> tuple[storage.Location, RunState, dict[int, str]]:
    """Every check that can fail before a worker starts: names, data manifest, storage, the checkpoint the first
    stage starts from (verified byte for byte)."""
    if not plan.stages or any(k not in (1, 2, 3) for k in plan.stages) or plan.stages != sorted(set(plan.stages)):
        raise ConfigError(f"--stages {plan.stages}: give increasing stage numbers from 1, 2, 3 (e.g. 2,3)")
    root = run_root(plan.storage_uri, plan.run_id)
    source = RunState(run_root(plan.storage_uri, plan.from_run, "--from-run")) if plan.from_run else None
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
    storage.check_writable(root)
    state = RunState(root)
    check_same_run(plan, state, root)
    inits: dict[int, str] = {}
    first = plan.stages[0]
    if plan.init_checkpoint and (first == 1 or state.done(first)):
        raise ConfigError(f"--init-checkpoint: stage {first} does not start from a checkpoint in this run")
    if first > 1 and not state.done(first):
        init = plan.init_checkpoint
        if init is None:
            prev = (source and source.done(first - 1)) or state.done(first - 1)
            if prev is None:
                raise ConfigError(
                    f"stage {first} starts from stage {first - 1}'s final checkpoint, but run "
                    f"'{plan.from_run or plan.run_id}' in {plan.storage_uri} has no finished stage {first - 1}; "
                    f"pass --from-run RUN_ID of a run that finished it"
                )
            init = prev["checkpoint"]
        recorded = None if plan.init_checkpoint else prev.get("checkpoint_sha256")
        inits[first] = verified_init(init, first, plan.cfg, log, recorded)
    pending = [k for k in plan.stages if not state.done(k)]
    check_steps(plan.cfg, pending, manifest, plan.data_uri)
    check_sizes(plan.cfg, pending, manifest, plan.data_uri)
    return root, state, inits


def check_same_run(plan: RunPlan, state: RunState, root: storage.Location) -> None:
    """A run is its config: resubmitting a run id with a config that trains something else (or other data) would
    mix two trainings under one name (skipped stages, another config hash in run.json, checkpoints that no longer
    load). Refused naming the keys; run.json is left as it is."""
    before = state.data.get("config")
    if before is None:
        return
    differ = run_defining_differences(before, plan.cfg.to_dict())
    if state.data.get("data_uri") not in (None, plan.data_uri):
        differ.append(f"data ({state.data['data_uri']} -> {plan.data_uri})")
    if differ:
        shown = ", ".join(differ[:8]) + (f" and {len(differ) - 8} more" if len(differ) > 8 else "")
        raise ConfigError(
            f"run {plan.run_id} in {root.uri} was trained with another config: {shown} differ from its run.json. "
            f"Resubmit it with its own config to resume it, or start a new run: --run-id NEW_ID (with --from-run "
            f"{plan.run_id} --stages K,... to start from its finished stages)"
        )


def check_sizes(cfg: Config, stages: list[int], manifest: dict, data_uri: str) -> None:
    """Each stage's training size (the manifest's smallest image through the stage's resize/crop) fits its crop and
    its discriminator's scales: found here, not by every worker in turn."""
    res = manifest["resolution"]
    h, w = (res["height"], res["width"]) if "height" in res else tuple(res["min"])
    for k in stages:
        geo = cfg.stage_geometry(k)
        try:
            loaded = geo.load_size_of(h, w)  # with a crop: raises when the crop does not fit what is loaded
            check_discriminator_fits(cfg.stage_model(k), *((geo.fine_size,) * 2 if geo.crops else loaded))
        except ValueError as e:
            raise ConfigError(f"stage {k} on {data_uri} ({w}x{h} images): {e}") from None


def check_steps(cfg: Config, stages: list[int], manifest: dict, data_uri: str) -> None:
    """Every stage trains at least one step per epoch at every worker count it may run with (each worker takes an
    equal share of the split and drops its last partial batch): else a stage would record "done" untrained."""
    n = int(manifest["sample_count"])
    low, high = cfg.workers
    for k in stages:
        for w in range(low, high + 1):
            batch = cfg.worker_batch(k, w)
            if (n // w) // batch == 0:
                raise ConfigError(
                    f"stage {k}: the {cfg.data.train_split} split of {data_uri} has {n} sample(s), fewer than one "
                    f"global batch of {w * batch} ({w} worker(s) x {batch}): no "
                    f"step would train. Lower the batch (stage{k}.batch_size or train.batch_size) or the workers, or "
                    f"prepare more samples"
                )


def verified_init(uri: str, stage: int, cfg: Config, log=print, recorded: str | None = None) -> str:
    """The checkpoint stage `stage` starts from, verified in the driver (bytes, stage, the networks' shapes from its
    meta.json; `recorded`: the sha256 run.json names it by); a damaged one names a good alternative."""
    log(f"[stage {stage}] verifying the checkpoint it starts from: {uri}")
    try:
        meta = checkpoint.verify(uri)
    except checkpoint.CheckpointError as e:
        alternative = checkpoint.verified_alternative(uri)
        hint = (
            f"; an older checkpoint of that stage verifies: {alternative[0]} (epoch {alternative[1].get('epoch')}); "
            f"start from it with --init-checkpoint {alternative[0]}"
            if alternative
            else "; no other checkpoint of that stage verifies: run that stage again"
        )
        raise ConfigError(f"{e}{hint}") from None
    if recorded and meta.get("sha256") != recorded:
        raise ConfigError(
            f"{uri} is not the checkpoint its run recorded: its state.pt has sha256 {meta.get('sha256', '?')[:12]}..., "
            f"run.json names {recorded[:12]}... (replaced since stage {stage - 1} finished). Restore it, or start from "
            f"a checkpoint you trust with --init-checkpoint URI"
        )
    if meta.get("stage") != stage - 1 and not (stage == 3 and meta.get("stage") == 3):  # stage 3 may go on
        raise ConfigError(
            f"{uri} is a stage {meta.get('stage')} checkpoint; stage {stage} starts from a stage {stage - 1} one"
            + (" (or a stage-3 one, to fine-tune it)" if stage == 3 else "")
        )
    differ = checkpoint.architecture_differences(meta, stage, cfg.stage_model(stage - 1), cfg.stage_model(stage))
    if differ:
        mine = cfg.to_dict()["model"]
        keys = [
            f"model.{k}={v} (this config: {mine.get(k)})"
            for k, v in sorted((meta.get("model") or {}).items())
            if mine.get(k) != v
        ]
        raise ConfigError(
            f"{uri} holds networks of another shape than this config's stage {stage} loads: {'; '.join(differ[:3])}"
            f"{f' (and {len(differ) - 3} more)' if len(differ) > 3 else ''}. "
            + (f"It was trained with {', '.join(keys)}. " if keys else "")
            + f"Start stage {stage} from a checkpoint of this config's networks, or set the model keys as that "
            f"checkpoint's run had them"
        )
    return uri


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
    registered (plan.register): a registration that does not happen raises RegistrationError once training is
    done (the model is safe in storage; `jobs.register` retries it)."""
    checked = preflight(plan, log)  # bad input fails here, before Ray or MLflow hear of the run
    with RunLease(checked[0], plan.run_id, plan.take_over, log):  # one writer per run, before anything is written
        return _run_checked(plan, checked, log)


def _run_checked(plan: RunPlan, checked: tuple, log) -> RunResult:

    labels = label_set(shards.load_manifest(plan.data_uri, plan.cfg.data.train_split)["layout"])
    selection = resolve_selection(plan.cfg, labels, plan.tracking_uri, log)  # and a segmenter that does not load
    resources.connect_ray(plan.cfg, client_env=MLFLOW_CLIENT_ENV)  # and a request the cluster can never hold fails here
    parent, root = None, checked[0]
    if plan.tracking_uri:
        parent = Tracker(
            plan.tracking_uri,
            experiment_name(plan.cfg),
            {RUN_TAG: plan.run_id},
            plan.run_id,
            log=log,
            unsent=unsent_file(root),
        )
    try:
        result = RunResult(_run_stages(plan, checked, parent, selection, log))
        if 3 in result.stages and selection.metric != "val_L1" and "judgement" not in checked[1].data:
            split = available_val_split(plan.cfg, plan.data_uri, log=lambda m: None) or plan.cfg.data.train_split
            out = root.join("evaluation").uri
            checked[1].update(
                judgement=final_judgement(selection, result.final["checkpoint"], plan.data_uri, split, out, log)
            )
        if parent:
            parent.metrics(
                {
                    f"stage{k}/{m}": v
                    for k, r in result.stages.items()
                    for m, v in (r.get("metrics") or {}).items()
                    if m in ("val_L1", "val_VGG")
                },
                step=0,
            )
            send_kept_records(parent, root, log)  # flushes the parent when the server answers
            if plan.register and 3 in result.stages:
                if not parent.flush():
                    raise RegistrationError(
                        f"MLflow at {plan.tracking_uri} is unreachable: the generator was not registered. It is safe "
                        f"at {result.final['checkpoint']}; once the server answers: python -m jobs.register --run "
                        f"{plan.run_id} --storage {plan.storage_uri} --tracking-uri {plan.tracking_uri}"
                    )
                result.registry = register_run(root, plan.tracking_uri, log)
    except BaseException as e:
        if parent:
            parent.close(run_status(e), end_children=True)
        raise
    if parent:
        parent.close("FINISHED")
    return result


def stage_datasets(cfg: Config, k: int, data_uri: str) -> dict:
    """The Ray Dataset of stage k's training split (shards verified as data.verify says); build it where CPUs are
    free (the driver, before the stage's workers start): Ray Data's metadata tasks take 1 CPU each. Held-out
    samples are not a second dataset: rank 0 reads them itself (StageContext.data_uri)."""
    return {"train": build_dataset(data_uri, cfg.data.train_split, pipeline_config(cfg, k))}


def stage_trainer(
    cfg: Config,
    k: int,
    datasets: dict,
    context: StageContext,
    storage_root: storage.Location,
    name: str,
    callbacks: list | None = None,
):
    """The TorchTrainer of stage k: workers (elastic for [min, max]), placement, checkpoints and restarts."""
    from ray.train import CheckpointConfig, DataConfig, FailureConfig, LoggingConfig, RunConfig, ScalingConfig

    t = cfg.train
    low, high = cfg.workers
    resources = {"CPU": t.cpus_per_worker}
    if t.use_gpu:
        resources["GPU"] = t.gpus_per_worker
    return Trainer(
        train_stage,
        train_loop_config=vars(context),
        scaling_config=ScalingConfig(
            num_workers=high if low == high else (low, high),
            use_gpu=t.use_gpu,
            resources_per_worker=resources,
            placement_strategy=t.placement.upper(),
            elastic_resize_monitor_interval_s=t.resize_check_s,
        ),
        run_config=RunConfig(
            name=name,
            storage_path=storage_root.path,
            storage_filesystem=storage_root.fs,
            checkpoint_config=CheckpointConfig(num_to_keep=2),
            failure_config=FailureConfig(max_failures=t.max_failures),
            logging_config=LoggingConfig(log_level="WARNING" if t.ray_logs == "quiet" else "INFO"),
            callbacks=callbacks,
        ),
        datasets=datasets,
        dataset_config=DataConfig(datasets_to_split=["train"], execution_options=execution_options()),
    )


def _run_stages(plan: RunPlan, checked: tuple, parent: Tracker | None, selection, log) -> dict[int, dict]:
    """Each planned stage in turn: skipped when run.json says it finished, else fitted and recorded."""
    cfg = plan.cfg
    root, state, inits = checked
    data_sha256 = shards.content_sha256(plan.data_uri, cfg.data.train_split)  # what the stages train on
    state.update(run_id=plan.run_id, data_uri=plan.data_uri, data_sha256=data_sha256, config=cfg.to_dict())
    val_split = available_val_split(cfg, plan.data_uri, log)
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
        else:
            say_stage_plan(cfg, k, log)
            context = StageContext(
                cfg,
                k,
                root.uri,
                inits.get(k),
                labels,
                plan.run_id,
                plan.tracking_uri,
                experiment_name(cfg),
                data_uri=plan.data_uri,
                heldout_split=val_split or cfg.data.train_split,
                selection=selection,
            )
            done = _fit_stage(plan, k, context, root, state, parent, log)
        results[k] = done
        inits[k + 1] = done["checkpoint"]
    return results


def say_stage_plan(cfg: Config, k: int, log) -> None:
    """What stage k trains, at what size, on how many workers (and a note when a worker count splits the global
    batch unevenly)."""
    model, geo = cfg.stage_model(k), cfg.stage_geometry(k)
    low, high = cfg.workers
    workers = f"{high}" if low == high else f"{low}-{high} (elastic)"
    uneven = cfg.uneven_worker_counts(k)
    if uneven:
        log(
            f"[stage {k}] note: at {', '.join(map(str, uneven))} workers the global batch of {cfg.global_batch(k)} "
            f"does not split evenly: those sizes train with {', '.join(str(w * cfg.worker_batch(k, w)) for w in uneven)} "
            f"samples per step and the lr scaled to match"
        )
    log(
        f"[stage {k}] {STAGES[k - 1].what}: netG={model.netG} ngf={model.ngf} num_D={model.num_D} "
        f"{geo.resize_or_crop}/{geo.load_size}, global batch {cfg.global_batch(k)} on {workers} workers, "
        f"{cfg.stage(k).epochs} epochs"
    )


def _fit_stage(plan: RunPlan, k: int, context: StageContext, root, state: RunState, parent, log) -> dict:
    """Stage k's fit() once the cluster has room, recorded in run.json (and its MLflow run tagged with the
    checkpoint); returns run.json's entry."""
    cfg = plan.cfg
    resources.wait_until_free(cfg, f"stage {k}", log)  # others' work (Serve replicas, jobs) may hold them
    t0 = time.perf_counter()
    datasets = stage_datasets(cfg, k, plan.data_uri)
    result = fit(stage_trainer(cfg, k, datasets, context, root, f"stage{k}"), f"stage {k}")
    ckpt_uri = checkpoint_uri(result, root, f"stage {k}")
    metrics = result.metrics or {}
    entry = dict(
        checkpoint=ckpt_uri,
        checkpoint_sha256=checkpoint.stored_sha256(ckpt_uri),
        epochs=metrics.get("epoch"),
        global_step=metrics.get("global_step"),
        seconds=round(time.perf_counter() - t0, 1),
        metrics=metrics,
    )
    state.record(k, **entry)
    if parent:
        parent.tags_({f"stage{k}.checkpoint": ckpt_uri})
        stage_run = Tracker(
            plan.tracking_uri,
            experiment_name(cfg),
            {RUN_TAG: plan.run_id, STAGE_TAG: str(k)},
            f"{plan.run_id}/stage{k}",
            parent_tags={RUN_TAG: plan.run_id},
            log=log,
            unsent=unsent_file(root),
            reopen=False,  # the worker's tracker ended it: this only adds the checkpoint's tag
        )
        stage_run.tags_({"checkpoint": ckpt_uri})
        stage_run.close("FINISHED", timeout=30)
        send_kept_records(parent, root, log)
    log(
        f"[stage {k}] finished: {entry['epochs']} epochs, {entry['global_step']} steps in {entry['seconds']}s; "
        f"checkpoint {ckpt_uri}"
    )
    return state.done(k)


def checkpoint_uri(result, root: storage.Location, what: str) -> str:
    """The final checkpoint of a finished fit() as a URI, or a clear error."""
    if result.error is not None:
        raise RuntimeError(f"{what} failed: {result.error}") from result.error
    if result.checkpoint is None:
        raise RuntimeError(f"{what} finished without a checkpoint")
    return ("s3://" if root.is_s3 else "") + result.checkpoint.path
