"""Ray Tune sweeps of the loss weights over one curriculum stage.

Ray Train V2 pattern: each trial is a function that builds and fits the stage's TorchTrainer, reporting every
epoch to Tune through `TuneReportCallback`; ASHA stops weak trials early on the validation metric. Each trial is
an MLflow run nested under a sweep parent run (`MLflowLoggerCallback`). The best trial's configuration is
written as a YAML file that `jobs.train` accepts.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from pathlib import Path

from data import shards, storage
from data.layouts import label_set
from orchestration.config import Config, ConfigError, from_dict
from orchestration.curriculum import available_val_split, checkpoint_uri, experiment_name, stage_trainer
from orchestration.tracking import SWEEP_TAG, ensure_experiment, find_or_create_run, quiet_client
from orchestration.worker import StageContext

SAMPLED = ("lambda_feat", "lambda_vgg", "lr", "gan_mode")


@dataclass
class SweepPlan:
    cfg: Config
    name: str
    data_uri: str
    storage_uri: str
    tracking_uri: str | None
    init_checkpoint: str | None = None  # stages 2 and 3 start from an earlier stage's checkpoint
    resume: bool = False
    out: str | None = None  # best config YAML; default {storage}/sweeps/{name}/best.yaml and outputs/


def trial_config(base: dict, sampled: dict) -> Config:
    """The base configuration with a trial's sampled values applied."""
    cfg = from_dict(base)
    model = {k: v for k, v in sampled.items() if k in SAMPLED and v is not None}
    return dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, **model))


def _trial(config: dict, fixed: dict) -> None:
    """One Tune trial: fit the stage's TorchTrainer with the sampled weights (`config`), reporting each epoch to
    Tune. `fixed` is the same for every trial (passed with tune.with_parameters, so MLflow params are only the
    sampled values)."""
    from ray import tune
    from ray.tune.integration.ray_train import TuneReportCallback

    cfg = trial_config(fixed["base"], config)
    k = fixed["stage"]
    ctx = tune.get_context()
    root = storage.resolve(fixed["storage"])
    context = StageContext(cfg.to_dict(), k, root.uri, fixed["init_checkpoint"], fixed["labels"],
                           run_id=f"{fixed['sweep']}/{ctx.get_trial_id()}")  # fmt: skip
    trainer = stage_trainer(cfg, k, fixed["data_uri"], fixed["val_split"], context, root, ctx.get_trial_id(),
                            callbacks=[TuneReportCallback()])  # fmt: skip
    checkpoint_uri(trainer.fit(), root, f"trial {ctx.get_trial_id()}")


def search_space(cfg: Config) -> dict:
    from ray import tune

    w = cfg.sweep
    space = {"lambda_feat": tune.loguniform(*w.lambda_feat), "lambda_vgg": tune.loguniform(*w.lambda_vgg)}
    if w.lr:
        space["lr"] = tune.loguniform(*w.lr)
    if w.gan_mode:
        space["gan_mode"] = tune.choice(w.gan_mode)
    return space


def max_concurrent(cfg: Config) -> int:
    import ray

    if cfg.sweep.max_concurrent_trials:
        return cfg.sweep.max_concurrent_trials
    if not cfg.train.use_gpu:
        return 1
    per_trial = cfg.train.num_workers * cfg.train.gpus_per_worker
    return max(1, int(ray.cluster_resources().get("GPU", 0) // per_trial))


def run_sweep(plan: SweepPlan, log=print) -> dict:
    import ray
    from ray import tune
    from ray.air.integrations.mlflow import MLflowLoggerCallback
    from ray.tune.schedulers import ASHAScheduler

    cfg, w = plan.cfg, plan.cfg.sweep
    k = w.stage
    manifest = shards.load_manifest(plan.data_uri, cfg.data.train_split)
    if k > 1 and not plan.init_checkpoint:
        raise ConfigError(f"sweeping stage {k} needs the checkpoint it starts from: pass --from-run RUN_ID")
    root = storage.resolve(plan.storage_uri).join("sweeps", plan.name)
    storage.check_writable(root)
    val_split = available_val_split(cfg, plan.data_uri, log)
    if not ray.is_initialized():
        ray.init()

    callbacks = []
    if plan.tracking_uri:
        client = quiet_client(plan.tracking_uri)
        exp = ensure_experiment(client, experiment_name(cfg), plan.tracking_uri)
        parent = find_or_create_run(client, exp, {SWEEP_TAG: plan.name}, f"sweep {plan.name}")
        if not client.get_run(parent).data.params:
            for key, value in dataclasses.asdict(w).items():
                client.log_param(parent, f"sweep.{key}", str(value))
        callbacks.append(MLflowLoggerCallback(tracking_uri=plan.tracking_uri, experiment_name=experiment_name(cfg),
                                              tags={"mlflow.parentRunId": parent, SWEEP_TAG: plan.name},
                                              save_artifact=False))  # fmt: skip
        log(f"sweep {plan.name}: trials are MLflow runs under run {parent} at {plan.tracking_uri}")

    fixed = {"base": cfg.to_dict(), "stage": k, "storage": root.join("trials").uri, "data_uri": plan.data_uri,
             "val_split": val_split, "init_checkpoint": plan.init_checkpoint, "sweep": plan.name,
             "labels": label_set(manifest["layout"]).name}  # fmt: skip
    trainable = tune.with_resources(tune.with_parameters(_trial, fixed=fixed), {"CPU": w.trial_cpus})
    tune_path = root.join("tune")
    if plan.resume and tune.Tuner.can_restore(tune_path.path, storage_filesystem=tune_path.fs):
        log(f"sweep {plan.name}: resuming from {tune_path}")
        tuner = tune.Tuner.restore(tune_path.path, trainable, resume_unfinished=True, resume_errored=True,
                                   storage_filesystem=tune_path.fs)  # fmt: skip
    else:
        tuner = tune.Tuner(
            trainable,
            param_space=search_space(cfg),
            tune_config=tune.TuneConfig(
                metric=w.metric,
                mode=w.mode,
                num_samples=w.num_samples,
                max_concurrent_trials=max_concurrent(cfg),
                scheduler=ASHAScheduler(
                    max_t=cfg.stage(k).epochs, grace_period=w.grace_period, reduction_factor=w.reduction_factor
                ),
            ),  # fmt: skip
            run_config=tune.RunConfig(
                name="tune", storage_path=root.path, storage_filesystem=root.fs, callbacks=callbacks
            ),  # fmt: skip
        )
    t0 = time.perf_counter()
    results = tuner.fit()
    best = results.get_best_result(metric=w.metric, mode=w.mode)
    if best is None or best.metrics is None:
        raise RuntimeError(f"sweep {plan.name}: no trial reported {w.metric}; see the trial errors above")
    chosen = {key: best.config[key] for key in SAMPLED if key in best.config}
    best_cfg = trial_config(cfg.to_dict(), chosen)
    yaml_text = (
        f"# best trial of sweep {plan.name}: {w.metric}={best.metrics[w.metric]:.4f}, {chosen}\n" + best_cfg.to_yaml()
    )
    storage.write_bytes_atomic(root.join("best.yaml"), yaml_text.encode())
    out = Path(plan.out or f"outputs/sweeps/{plan.name}/best.yaml")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(yaml_text)
    errors = sum(1 for r in results if r.error is not None)
    log(f"sweep {plan.name}: {len(results)} trials ({errors} errored) in {time.perf_counter() - t0:.0f}s")
    log(f"best trial: {w.metric}={best.metrics[w.metric]:.4f} with {chosen}")
    log(f"best config: {out} (and {root.join('best.yaml')}); train it with python -m jobs.train --config {out}")
    return {"best": chosen, "metric": best.metrics[w.metric], "config_path": str(out), "trials": len(results)}
