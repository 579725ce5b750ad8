"""Segmenters in the MLflow registry: `segmenter-<dataset>` versions are folders of `segmenter.pt` (TorchScript)
and `class_map.yaml`, tagged with their validation mIoU, the file's sha256 and the data manifest they were trained
on. `resolve_segmenter` turns what a user names (a registry URI, a file with its class map, or nothing: the
dataset's latest registered segmenter) into a loaded, checked `Segmenter` that says which network it is."""

from __future__ import annotations

import json
import logging
import tempfile
from pathlib import Path

from data.labels import LabelSet
from data.shards import content_sha256
from evaluation.modules import file_identity, load_module
from evaluation.segmenters import Segmenter, check_segmenter, load_segmenter_file
from evaluation.segscore import EvaluationError, load_class_map
from orchestration.records.registry import manifest_sha256, pinned_version
from orchestration.records.tracking import configure_mlflow_client, ensure_experiment, filter_value
from orchestration.run.config import Config

MODEL_FILE, CLASS_MAP_FILE = "segmenter.pt", "class_map.yaml"  # what a segmenter folder (and version) holds


def segmenter_model_name(dataset: str) -> str:
    return f"segmenter-{dataset}"


def register_segmenter(folder: Path, cfg: Config, data_uri: str, metrics: dict, tracking_uri: str, log=print) -> dict:
    """Log the exported segmenter as an MLflow run of the dataset's experiment and create a version of
    `segmenter-<dataset>` from it, its tags set in the same call."""
    configure_mlflow_client()
    import mlflow
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
    exp = ensure_experiment(client, f"pix2pixhd-{cfg.dataset}", tracking_uri)
    mlflow.set_tracking_uri(tracking_uri)
    name = segmenter_model_name(cfg.dataset)
    with mlflow.start_run(experiment_id=exp, run_name=name, tags={"p2p.kind": "segmenter"}) as run:
        mlflow.log_params({f"segmenter.{k}": v for k, v in vars(cfg.segmenter).items()} | {"data_uri": data_uri})
        mlflow.log_metrics({k: float(v) for k, v in metrics.items() if isinstance(v, int | float)})
        mlflow.log_artifacts(str(folder), "segmenter")
        source = mlflow.get_artifact_uri("segmenter")
    if not client.search_registered_models(f"name = {filter_value(name)}"):
        client.create_registered_model(name, description="seg-score segmenter: RGB in [0, 1] -> label-id logits")
    tags = {
        "sha256": file_identity(folder / MODEL_FILE).removeprefix("sha256:"),
        "data_manifest_sha256": manifest_sha256(data_uri, cfg.data.train_split),
        "data_content_sha256": content_sha256(data_uri, cfg.data.train_split),
        "settings": settings_tag(cfg),
    }
    tags |= {k: f"{metrics[k]:.6f}" for k in ("val_miou", "val_pixel_acc") if k in metrics}
    logging.getLogger("mlflow.store.model_registry.abstract_store").setLevel(logging.WARNING)
    version = client.create_model_version(name, source, run_id=run.info.run_id, tags=tags)
    log(f"registered {name} version {version.version} (val mIoU {metrics.get('val_miou', float('nan')):.3f})")
    return {"name": name, "version": version.version, "uri": f"models:/{name}/{version.version}"}


def settings_tag(cfg: Config) -> str:
    """The segmenter's training settings, as a version tag (a reused segmenter must have been trained alike)."""
    return json.dumps(vars(cfg.segmenter), sort_keys=True)


def find_trained_alike(cfg: Config, data_uri: str, tracking_uri: str) -> str | None:
    """models:/segmenter-<dataset>/N of the newest version trained on the same samples with the same settings."""
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
    name = segmenter_model_name(cfg.dataset)
    if not client.search_registered_models(f"name = {filter_value(name)}"):
        return None
    digest, settings = content_sha256(data_uri, cfg.data.train_split), settings_tag(cfg)
    alike = [
        int(v.version)
        for v in client.search_model_versions(f"name = {filter_value(name)}")
        if v.tags.get("data_content_sha256") == digest and v.tags.get("settings") == settings
    ]
    return f"models:/{name}/{max(alike)}" if alike else None


def resolve_segmenter(
    spec: str | None,
    cfg: Config,
    labels: LabelSet,
    tracking_uri: str | None,
    class_map: str | None = None,
    log=print,
) -> Segmenter | None:
    """`spec`: a segmenter file (with `class_map`), a models:/ URI, or None for the latest registered
    `segmenter-<dataset>` (None when there is none, no tracking, or a registry that does not answer: said)."""
    if spec and not spec.startswith("models:/"):
        if class_map is None:
            raise EvaluationError(
                f"segmenter {spec}: give its class map too (--class-map FILE.yaml, or a built-in: cityscapes-trainids)"
            )
        return load_segmenter_file(spec, class_map, labels)
    if tracking_uri is None:
        if spec:
            raise EvaluationError(f"segmenter {spec}: a registry URI needs MLflow tracking (--tracking-uri)")
        return None
    configure_mlflow_client()
    import mlflow
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    client = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
    name = segmenter_model_name(cfg.dataset)
    try:
        if spec is None:
            try:
                if not client.search_registered_models(f"name = {filter_value(name)}"):
                    return None
            except MlflowException as e:
                if not _unreachable(e):
                    raise
                log(f"note: the registry at {tracking_uri} does not answer: no registered {name} is looked for")
                return None
            spec = f"models:/{name}/latest"
        pinned = "models:/{}/{}".format(*pinned_version(client, spec))
        mlflow.set_registry_uri(tracking_uri)
        with tempfile.TemporaryDirectory() as tmp:
            folder = Path(mlflow.artifacts.download_artifacts(pinned, dst_path=tmp, tracking_uri=tracking_uri))
            module = load_module(folder / MODEL_FILE, f"segmenter {pinned}")
            cmap = load_class_map(class_map or folder / CLASS_MAP_FILE)
            sha = file_identity(folder / MODEL_FILE)
    except MlflowException as e:
        why = "it does not answer" if _unreachable(e) else e.message[:200]
        raise EvaluationError(f"segmenter {spec}: not loaded from the registry at {tracking_uri} ({why})") from None
    check_segmenter(module, cmap, labels, f"segmenter {pinned}")
    return Segmenter(module, cmap, f"{pinned} ({sha[:15]})")


def _unreachable(error) -> bool:
    text = str(getattr(error, "message", error))
    return "API request to" in text and "failed with exception" in text  # MLflow's wording for a transport error
