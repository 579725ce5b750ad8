"""Register the final generator in the MLflow model registry and move the `champion` alias when it is no worse.

Registered model: `pix2pixhd-<dataset>`. Each version carries tags: run id, config hash, data manifest sha256
and the validation metric; tags are set when the version is created (one call), so a version never exists
without them. The alias `champion` moves only when the new version's val_L1 is <= the current champion's.
"""

from __future__ import annotations

import hashlib
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

from data import storage
from data.pipeline import read_samples
from model.bundle import Pix2PixHDGenerator, feature_clusters
from model.networks import build_encoder, build_generator
from orchestration import checkpoint
from orchestration.config import Config
from orchestration.tracking import RUN_TAG, STAGE_TAG, ensure_experiment

ALIAS = "champion"
METRIC = "val_L1"  # lower is better
MODEL_DIR = Path(__file__).resolve().parents[1] / "model"


def model_name(cfg: Config) -> str:
    return f"pix2pixhd-{cfg.dataset}"


def manifest_sha256(data_uri: str, split: str) -> str:
    return hashlib.sha256(storage.read_bytes(storage.resolve(data_uri).join(split, "manifest.json"))).hexdigest()


def build_bundle(cfg: Config, state: dict, k: int, data_uri: str) -> Pix2PixHDGenerator:
    opt = cfg.stage_model(k)
    G = build_generator(opt)
    G.load_state_dict(state["G"])
    E, clusters = None, None
    if opt.instance_feat:
        E = build_encoder(opt)
        E.load_state_dict(state["E"])
        clusters = _clusters(cfg, k, E, data_uri)
    return Pix2PixHDGenerator(asdict(opt), G.eval(), E, clusters)


@torch.no_grad()
def _clusters(cfg: Config, k: int, E, data_uri: str, n: int = 64) -> torch.Tensor:
    """E's instance features over up to n training samples, clustered per class (paper: k-means, k=10)."""
    from orchestration.worker import pipeline_config

    samples = read_samples(data_uri, cfg.data.train_split, pipeline_config(cfg, k), n)
    feats = E.eval()(samples["image"], samples["inst"])  # instance-wise means
    per_class: dict[int, list[torch.Tensor]] = {}
    for b in range(feats.shape[0]):
        inst = samples["inst"][b]
        for i in inst.unique().tolist():
            y, x = (inst == i).nonzero()[0].tolist()
            cls = i // 1000 if i >= 1000 else i
            per_class.setdefault(cls, []).append(feats[b, :, y, x])
    stacked = {c: torch.stack(v) for c, v in per_class.items()}
    return feature_clusters(stacked, cfg.model.label_nc, cfg.model.feat_num)


def register(cfg: Config, run_id: str, final_checkpoint: str, k: int, data_uri: str, val_metric: float | None,
             tracking_uri: str, log=print) -> dict:  # fmt: skip
    """Log the generator to the curriculum's parent run, create a tagged version, maybe move the alias."""
    import mlflow
    from mlflow import MlflowClient
    from mlflow.models import infer_signature

    mlflow.set_tracking_uri(tracking_uri)
    mlflow.set_registry_uri(tracking_uri)
    client = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
    with tempfile.TemporaryDirectory() as tmp:
        state = checkpoint.fetch(final_checkpoint, tmp)
    bundle = build_bundle(cfg, state, k, data_uri)
    h, w = (2 * cfg.stage_model(k).size_multiple,) * 2
    example = np.zeros((2, 2, h, w), np.int64)
    signature = infer_signature(example, bundle(torch.from_numpy(example)).numpy())

    exp = ensure_experiment(client, f"pix2pixhd-{cfg.dataset}", tracking_uri)
    parent = client.search_runs(
        [exp], f"tags.`{RUN_TAG}` = '{run_id}' and tags.`{STAGE_TAG}` = 'parent'", max_results=1
    )
    parent_id = parent[0].info.run_id if parent else None
    with mlflow.start_run(run_id=parent_id, experiment_id=exp, run_name=run_id):
        info = mlflow.pytorch.log_model(
            bundle, name="generator", serialization_format="pickle", code_paths=[str(MODEL_DIR)],
            pip_requirements=[f"torch>={torch.__version__.split('+')[0]}", "numpy"], signature=signature,
            input_example=example,
        )  # fmt: skip
        mlflow_run_id = mlflow.active_run().info.run_id
    name = model_name(cfg)
    if not client.search_registered_models(f"name = '{name}'"):
        client.create_registered_model(name, description="pix2pixHD generator: label ids + instance ids -> image")
    tags = {
        "run_id": run_id,
        "config_hash": cfg.hash(),
        "data_manifest_sha256": manifest_sha256(data_uri, cfg.data.train_split),
    }
    if val_metric is not None:
        tags[METRIC] = f"{val_metric:.6f}"
    version = client.create_model_version(name, info.model_uri, run_id=mlflow_run_id, tags=tags, model_id=info.model_id)
    _wait_ready(client, name, version.version)
    moved, reason = _maybe_move_alias(client, name, version.version, val_metric)
    log(f"registered {name} version {version.version} ({METRIC} {val_metric if val_metric is not None else 'n/a'}); "
        f"alias '{ALIAS}' {'moved to it' if moved else 'kept'}: {reason}")  # fmt: skip
    return {"name": name, "version": version.version, "alias_moved": moved, "uri": f"models:/{name}@{ALIAS}"}


def _wait_ready(client, name: str, version: str, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while client.get_model_version(name, version).status != "READY":
        if time.monotonic() > deadline:
            raise RuntimeError(f"model version {name}/{version} not READY after {timeout}s")
        time.sleep(0.5)


def _maybe_move_alias(client, name: str, version: str, metric: float | None) -> tuple[bool, str]:
    from mlflow.exceptions import MlflowException

    try:
        champion = client.get_model_version_by_alias(name, ALIAS)
    except MlflowException:
        champion = None
    if champion is None:
        client.set_registered_model_alias(name, ALIAS, version)
        return True, "there was no champion"
    champ_metric = champion.tags.get(METRIC)
    if metric is None:
        return False, f"this version has no {METRIC}"
    if champ_metric is None or metric <= float(champ_metric):
        client.set_registered_model_alias(name, ALIAS, version)
        return True, f"{METRIC} {metric:.4f} <= champion v{champion.version}'s {champ_metric}"
    return False, f"{METRIC} {metric:.4f} is worse than champion v{champion.version}'s {float(champ_metric):.4f}"


def load_generator(model_uri: str, tracking_uri: str | None = None) -> Pix2PixHDGenerator:
    import mlflow

    if tracking_uri:
        mlflow.set_tracking_uri(tracking_uri)
        mlflow.set_registry_uri(tracking_uri)
    return mlflow.pytorch.load_model(model_uri, map_location="cpu")
