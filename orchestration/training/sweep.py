"""Ray Tune sweeps of the loss weights over one curriculum stage, on a laptop or submitted to a cluster.

Ray Train V2 pattern: each trial is a function that builds and fits the stage's TorchTrainer, reporting every
epoch to Tune through `TuneReportCallback`; ASHA stops weak trials early on the validation metric. The stage's
datasets are built (and their shards verified) once, in the sweep's driver while the cluster is idle, and
shared by every trial. Before anything starts, the cluster is checked to hold a trial's driver, its workers and
Ray Data's tasks at once. Each trial is an MLflow run nested under the sweep's parent run, found again by its
trial id (a resumed trial logs into its run); every run ends FINISHED, FAILED or KILLED. Swept parameters that
the config turns off (lambda_vgg without VGG weights, lambda_feat without the feature-matching loss) are named
and not swept. The best trial's configuration is written as YAML into the sweep's storage (and locally when the
sweep runs on this machine): `python -m jobs.train --config` accepts both.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from pathlib import Path

from ray.tune import Callback

from data import shards, storage
from data.layouts import label_set
from evaluation.quality import QUALITY
from model.step import LOSS_NAMES
from orchestration.cluster.failures import fit
from orchestration.cluster.ray_address import cluster_address
from orchestration.cluster.resources import connect_ray
from orchestration.judging.selection import objective, resolve_selection
from orchestration.records.tracking import (
    MLFLOW_CLIENT_ENV,
    STAGE_TAG,
    SWEEP_TAG,
    Tracker,
    send_kept_records,
    unsent_file,
)
from orchestration.run.config import SWEPT_RANGES, Config, ConfigError, available_val_split
from orchestration.run.stopping import run_status
from orchestration.training.curriculum import (
    checkpoint_uri,
    experiment_name,
    stage_datasets,
    stage_trainer,
    verified_init,
)
from orchestration.training.worker import StageContext

SAMPLED = (*SWEPT_RANGES, "gan_mode")
TRIAL_TAG = "p2p.trial"
TRACKED = (*LOSS_NAMES, "val_L1", "val_VGG", *QUALITY, "lr", "img_per_s", "data_wait")


@dataclass
class SweepPlan:
    cfg: Config
    name: str
    data_uri: str
    storage_uri: str
    tracking_uri: str | None
    init_checkpoint: str | None = None  # stages 2 and 3 start from an earlier stage's checkpoint
    resume: bool = False
    out: str | None = None  # a local copy of best.yaml (default: outputs/sweeps/NAME/best.yaml off a cluster)

    def __post_init__(self) -> None:
        self.data_uri = storage.resolve(self.data_uri).uri  # absolute: trials and best.yaml name it wherever they run


def trial_config(base: Config, sampled: dict) -> Config:
    """The base configuration with a trial's sampled values applied: to the model section, and a sampled lr also
    to the swept stage when that stage sets its own (stageK.lr overrides model.lr: the sample would do nothing)."""
    cfg = base
    model = {k: v for k, v in sampled.items() if k in SAMPLED and v is not None}
    cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, **model))
    k = cfg.sweep.stage
    if "lr" in model and cfg.stage(k).lr:
        cfg = dataclasses.replace(cfg, **{f"stage{k}": dataclasses.replace(cfg.stage(k), lr=model["lr"])})
    return cfg


def _trial(config: dict, fixed: dict) -> None:
    """One Tune trial: fit the stage's TorchTrainer with the sampled weights (`config`), reporting each epoch to
    Tune. `fixed` is the same for every trial (passed with tune.with_parameters: the datasets travel once)."""
    from ray import tune
    from ray.tune.integration.ray_train import TuneReportCallback

    cfg = trial_config(fixed["base"], config)
    k = fixed["stage"]
    trial = tune.get_context().get_trial_id()
    root = storage.resolve(fixed["storage"]).join(trial)  # a run folder of its own: checkpoints, images, records
    context = StageContext(
        cfg,
        k,
        root.uri,
        fixed["init_checkpoint"],
        fixed["labels"],
        run_id=f"{fixed['sweep']}/{trial}",
        mid_epoch_checkpoints=False,
        data_uri=fixed["data_uri"],
        heldout_split=fixed["heldout_split"],
        selection=fixed["selection"],
    )
    trainer = stage_trainer(cfg, k, fixed["datasets"], context, root, f"stage{k}", callbacks=[TuneReportCallback()])
    checkpoint_uri(fit(trainer, f"trial {trial}"), root, f"trial {trial}")


def search_space(cfg: Config, log=print) -> dict:
    """Log-uniform ranges (and the gan_mode choice) of the parameters that take effect in this config."""
    from ray import tune

    w, m = cfg.sweep, cfg.model
    inactive = {
        "lambda_vgg": None if m.vgg_enabled else "the VGG loss is off (no model.vgg_weights)",
        "lambda_feat": "model.no_ganFeat_loss is true" if m.no_ganFeat_loss else None,
    }
    space = {}
    for name in SWEPT_RANGES:
        r = getattr(w, name)
        if r is None:
            continue
        if inactive.get(name):
            log(f"sweep: warning: sweep.{name}={r} is not swept: {inactive[name]}; remove it or turn that loss on")
            continue
        space[name] = tune.loguniform(*r)
    if w.gan_mode:
        space["gan_mode"] = tune.choice(w.gan_mode)
    if not space:
        raise ConfigError("sweep: nothing left to sweep (every swept parameter is inactive in this config)")
    return space


def max_concurrent(cfg: Config) -> int:
    import ray

    if cfg.sweep.max_concurrent_trials:
        return cfg.sweep.max_concurrent_trials
    if not cfg.train.use_gpu:
        return 1
    per_trial = cfg.workers[1] * cfg.train.gpus_per_worker
    return max(1, int(ray.cluster_resources().get("GPU", 0) // per_trial))


class TrialTracking(Callback):
    """Each trial an MLflow run under the sweep's parent, found again by its trial id (a resumed trial logs into
    its own run) and ended with the trial; one line per trial event in the job log."""

    def __init__(self, uri: str, experiment: str, sweep: str, max_epochs: int, root: storage.Location):
        self.uri, self.experiment, self.sweep, self.max_epochs, self.root = uri, experiment, sweep, max_epochs, root
        self.runs: dict[str, Tracker] = {}

    def __getstate__(self) -> dict:  # Tune saves its callbacks with the experiment; open runs stay behind
        return {**self.__dict__, "runs": {}}

    def _run(self, trial) -> Tracker:
        if trial.trial_id not in self.runs:
            self.runs[trial.trial_id] = Tracker(
                self.uri,
                self.experiment,
                {SWEEP_TAG: self.sweep, TRIAL_TAG: trial.trial_id},
                f"{self.sweep}/{trial.trial_id}",
                parent_tags={SWEEP_TAG: self.sweep, STAGE_TAG: "parent"},
                unsent=unsent_file(self.root),
            )
        return self.runs[trial.trial_id]

    def on_trial_start(self, iteration, trials, trial, **info):
        sampled = {k: v for k, v in trial.config.items() if k in SAMPLED}
        self._run(trial).params(sampled)
        shown = " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in sampled.items())
        print(f"sweep {self.sweep}: trial {trial.trial_id} started: {shown}", flush=True)

    def on_trial_result(self, iteration, trials, trial, result, **info):
        self._run(trial).metrics({k: result[k] for k in TRACKED if k in result}, int(result.get("epoch", 0)))

    def on_trial_complete(self, iteration, trials, trial, **info):
        last = trial.last_result or {}
        early = int(last.get("epoch", 0)) < self.max_epochs
        print(
            f"sweep {self.sweep}: trial {trial.trial_id} {'stopped early by ASHA' if early else 'finished'} after "
            f"{last.get('epoch', 0)} epochs, "
            + ", ".join(f"{k}={last[k]:.4f}" for k in ("val_L1", *QUALITY) if isinstance(last.get(k), float)),
            flush=True,
        )
        self._end(trial, "FINISHED")

    def on_trial_error(self, iteration, trials, trial, **info):
        print(
            f"sweep {self.sweep}: trial {trial.trial_id} failed: {trial.error_file or 'see the trial log'}", flush=True
        )
        self._end(trial, "FAILED")

    def _end(self, trial, status: str) -> None:
        self._run(trial).close(status, timeout=30)
        self.runs.pop(trial.trial_id, None)


def run_sweep(plan: SweepPlan, log=print) -> dict:

    cfg, w = plan.cfg, plan.cfg.sweep
    k = w.stage
    manifest = shards.load_manifest(plan.data_uri, cfg.data.train_split)
    if k > 1 and not plan.init_checkpoint:
        raise ConfigError(f"sweeping stage {k} needs the checkpoint it starts from: pass --from-run RUN_ID")
    init = verified_init(plan.init_checkpoint, k, plan.cfg, log) if k > 1 else None
    root = storage.resolve(plan.storage_uri).join("sweeps", plan.name)
    storage.check_writable(root)
    space = search_space(cfg, log)
    val_split = available_val_split(cfg, plan.data_uri, log)
    selection = resolve_selection(cfg, label_set(manifest["layout"]), plan.tracking_uri, log)
    connect_ray(cfg, trial_cpus=w.trial_cpus, what="each sweep trial", client_env=MLFLOW_CLIENT_ENV)
    datasets = stage_datasets(cfg, k, plan.data_uri)

    parent, callbacks = None, []
    if plan.tracking_uri:
        parent = Tracker(
            plan.tracking_uri,
            experiment_name(cfg),
            {SWEEP_TAG: plan.name},
            f"sweep {plan.name}",
            log=log,
            unsent=unsent_file(root),
        )
        parent.params({f"sweep.{key}": value for key, value in dataclasses.asdict(w).items()})
        callbacks.append(TrialTracking(plan.tracking_uri, experiment_name(cfg), plan.name, cfg.stage(k).epochs, root))
        log(f"sweep {plan.name}: trials are MLflow runs under the sweep's run at {plan.tracking_uri}")
    try:
        heldout = val_split or cfg.data.train_split
        labels = label_set(manifest["layout"]).name
        result = _tune(plan, space, datasets, heldout, selection, init, root, labels, callbacks, log)
    except BaseException as e:
        if parent:
            parent.close(run_status(e), end_children=True)
        raise
    if parent:
        parent.metrics({f"best_{result['metric_name']}": result["metric"]}, 0)
        parent.tags_({"best_config": result["config_uri"]})
        send_kept_records(parent, root, log)
        parent.close("FINISHED", end_children=True)
    return result


CREDENTIALS = {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SECURITY_TOKEN", "AWS_SESSION_TOKEN"}


def keep_credentials_out_of_runtime_envs() -> None:
    """Ray Tune 2.60 copies the driver's AWS credentials into every trial actor's runtime env, which each node's
    runtime_env_agent.log then prints in plain text. Trials run on nodes that hold their own credentials (the
    nodes' environment, an instance role), as every Train worker does: Tune's list (a module global that it reads
    when it registers a trainable) drops them."""
    from ray.tune.execution import class_cache

    class_cache.ENV_VARS_TO_PROPAGATE = class_cache.ENV_VARS_TO_PROPAGATE - CREDENTIALS


def _tune(
    plan: SweepPlan,
    space: dict,
    datasets: dict,
    heldout_split: str,
    selection,
    init: str | None,
    root: storage.Location,
    labels: str,
    callbacks: list,
    log,
) -> dict:
    """Run (or resume) the Tune experiment and write its best trial's config as best.yaml."""
    keep_credentials_out_of_runtime_envs()
    cfg, w = plan.cfg, plan.cfg.sweep
    fixed = {
        "base": cfg,
        "stage": w.stage,
        "storage": root.join("trials").uri,
        "datasets": datasets,
        "init_checkpoint": init,
        "sweep": plan.name,
        "labels": labels,
        "data_uri": plan.data_uri,
        "heldout_split": heldout_split,
        "selection": selection,
    }
    metric, mode = objective(cfg, selection)
    tuner = _tuner(plan, space, fixed, metric, mode, root, callbacks, log)
    t0 = time.perf_counter()
    log(
        f"sweep {plan.name}: {w.num_samples} trials of stage {w.stage}, {max_concurrent(cfg)} at a time, over "
        f"{', '.join(space)}"
    )
    results = tuner.fit()
    best = results.get_best_result(metric=metric, mode=mode)
    if best is None or best.metrics is None or metric not in best.metrics:
        raise RuntimeError(f"sweep {plan.name}: no trial reported {metric}; see the trial errors above")
    chosen = {key: best.config[key] for key in SAMPLED if key in best.config}
    config_loc, out = _write_best(plan, root, chosen, f"{metric}={best.metrics[metric]:.4f}")
    errors = sum(1 for r in results if r.error is not None)
    log(f"sweep {plan.name}: {len(results)} trials ({errors} errored) in {time.perf_counter() - t0:.0f}s")
    log(f"best trial: {metric}={best.metrics[metric]:.4f} with {chosen}")
    log(
        f"best config: {config_loc}"
        + (f" (and {out})" if out else "")
        + f"; train it with python -m jobs.train --config {config_loc}"
    )
    return {
        "best": chosen,
        "metric": best.metrics[metric],
        "metric_name": metric,
        "config_path": out,
        "config_uri": config_loc.uri,
        "trials": len(results),
    }


def _tuner(plan: SweepPlan, space: dict, fixed: dict, metric: str, mode: str, root, callbacks: list, log):
    """A new Tuner over `space` (ASHA stops weak trials early), or the stored one of an interrupted sweep."""
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler

    cfg, w = plan.cfg, plan.cfg.sweep
    trainable = tune.with_resources(tune.with_parameters(_trial, fixed=fixed), {"CPU": w.trial_cpus})
    tune_path = root.join("tune")
    if plan.resume and tune.Tuner.can_restore(tune_path.path, storage_filesystem=tune_path.fs):
        log(f"sweep {plan.name}: resuming from {tune_path}")
        return tune.Tuner.restore(
            tune_path.path, trainable, resume_unfinished=True, resume_errored=True, storage_filesystem=tune_path.fs
        )
    scheduler = ASHAScheduler(
        max_t=cfg.stage(w.stage).epochs, grace_period=w.grace_period, reduction_factor=w.reduction_factor
    )
    return tune.Tuner(
        trainable,
        param_space=space,
        tune_config=tune.TuneConfig(
            metric=metric,
            mode=mode,
            num_samples=w.num_samples,
            max_concurrent_trials=max_concurrent(cfg),
            scheduler=scheduler,
        ),
        run_config=tune.RunConfig(
            name="tune", storage_path=root.path, storage_filesystem=root.fs, callbacks=callbacks, verbose=0
        ),
    )


def _write_best(plan: SweepPlan, root, chosen: dict, score: str):
    """best.yaml in the sweep's storage (and locally): the base config with the chosen values and, as absolute
    URIs, the data and storage the sweep ran on, so that the printed command works wherever it is submitted (a
    relative data.uri named a folder in the sweep job's working-directory cache)."""
    best_cfg = trial_config(plan.cfg, chosen)
    best_cfg = dataclasses.replace(
        best_cfg,
        data=dataclasses.replace(best_cfg.data, uri=plan.data_uri),
        train=dataclasses.replace(best_cfg.train, storage=storage.resolve(plan.storage_uri).uri),
    )
    yaml_text = f"# best trial of sweep {plan.name}: {score}, {chosen}\n" + best_cfg.to_yaml()
    config_loc = root.join("best.yaml")
    storage.write_bytes_atomic(config_loc, yaml_text.encode())
    out = plan.out or (None if cluster_address() else f"outputs/sweeps/{plan.name}/best.yaml")
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(yaml_text)
    return config_loc, out
