"""jobs.cluster_features: the per-object styles of a run's final generator, computed over the whole training split
on Ray (Ray Data actors run the encoder E, GPU ones when asked), clustered in the driver (model/styles.py: the
reference's rules), stored in the run's storage as `clusters/stage3.pt` (tensors only) with what they were made
from; registration then uses them instead of encoding the split in its own process.

Memory: the driver keeps one feature vector per kept instance (feat_num floats), never images; the actors hold
one batch at a time. The job reports both peaks.
"""

from __future__ import annotations

import dataclasses
import logging
import resource
import tempfile
import time

import numpy as np
import torch

from data import shards, storage
from data.pipeline import build_dataset, to_model_batch
from data.pipeline_config import PipelineConfig
from data.transforms import Geometry
from evaluation.modules import pack_module, unpack_module
from model.averaging import shipped
from model.networks import build_encoder
from model.styles import MIN_SHARE, cluster, instance_features
from orchestration.records.registry import load_generator, register_clusters, resolve_version, store_clusters
from orchestration.run import checkpoint
from orchestration.run.config import ConfigError, from_dict, pipeline_config
from orchestration.run.run_state import RunState
from orchestration.run.stopping import signal_handlers_kept


def _peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


class EncodeInstances:
    """Ray Data actor: a batch of samples -> one row per instance larger than MIN_SHARE of its image: its class
    and E's feature vector (and this process's peak memory so far)."""

    def __init__(self, encoder: bytes, pcfg: PipelineConfig):
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.E = unpack_module(encoder).to(self.device).eval()
        self.pcfg = pcfg

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        tensors = {k: torch.from_numpy(np.array(v)) for k, v in batch.items() if v.dtype != object}
        b = to_model_batch(tensors, self.pcfg, 0, train=False)
        with torch.no_grad():
            feats = self.E(b["image"].to(self.device), b["inst"].to(self.device))
        rows = list(instance_features(feats, b["inst"].to(self.device)))
        if not rows:  # one placeholder row (class -1) so the batch's samples are still counted
            rows = [(-1, np.zeros(feats.shape[1], np.float32))]
        n = len(rows)
        return {
            "cls": np.array([c for c, _ in rows], np.int64),
            "vec": np.stack([v for _, v in rows]),
            "samples": np.full(n, len(b["label"]) / max(n, 1)),  # sums to the batch's sample count
            "rss_mib": np.full(n, _peak_rss_mib()),
        }


def cluster_run(
    root: storage.Location, data_uri: str | None, workers: int = 1, cpus: float = 1.0, gpus: float = 0.0, log=print
) -> dict:
    """Cluster E's features of the run's final checkpoint over its training split; write {root}/clusters/stage3.pt."""

    state = RunState(root)
    final = state.done(3)
    if final is None:
        raise ConfigError(f"run at {root} has no finished stage 3: nothing to cluster")
    data_uri = data_uri or state.data.get("data_uri")
    if not data_uri:
        raise ConfigError(f"{state.loc} does not record the dataset: pass --data URI")
    cfg = from_dict(state.data["config"])
    if not cfg.model.instance_feat:
        raise ConfigError(
            f"run at {root} trained without instance features (model.instance_feat): no styles to cluster"
        )
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = checkpoint.fetch(final["checkpoint"], tmp)
    opt = cfg.stage_model(3)
    E = build_encoder(opt)
    E.load_state_dict(shipped(ckpt, "E"))
    pcfg = dataclasses.replace(pipeline_config(cfg, 3), instance_output="ids", batch_size=8, verify="size")
    found = cluster_split(E, opt, data_uri, cfg.data.train_split, pcfg, final["checkpoint"], workers, cpus, gpus, log)
    out = store_clusters(root, found.pop("clusters"), found.pop("cluster_counts"), found)
    log(f"cluster_features: written to {out.uri}")
    return {**found, "uri": out.uri}


def cluster_version(
    spec: str, tracking_uri: str, data_uri: str | None, split: str, workers: int, cpus: float, gpus: float, log=print
) -> dict:
    """Cluster a registered version's E over `split` of `data_uri` (default: the data it was registered from), as
    stored (stage 3's full resolution), and register the result as a new version: the same weights with these
    clusters. The alias is left where it is."""
    from mlflow import MlflowClient

    mv = resolve_version(spec, tracking_uri)
    name, version = mv.name, mv.version
    data_uri = data_uri or mv.tags.get("data_uri")
    if not data_uri:
        raise ConfigError(
            f"{spec} (version {version}) does not record its data (registered before 2026-11-27): pass --data URI"
        )
    client = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
    bundle = load_generator(f"models:/{name}/{version}", tracking_uri)
    opt = bundle.opt
    if not opt.instance_feat:
        raise ConfigError(f"{spec} (version {version}) has no instance features (instance_feat): no styles to cluster")
    geometry = Geometry(resize_or_crop="none", size_multiple=opt.size_multiple, no_flip=True)
    pcfg = PipelineConfig(geometry, instance_output="ids", batch_size=8, verify="size")
    found = cluster_split(bundle.E, opt, data_uri, split, pcfg, f"models:/{name}/{version}", workers, cpus, gpus, log)
    return register_clusters(client, name, version, bundle, found, tracking_uri, log)


def cluster_split(
    E, opt, data_uri: str, split: str, pcfg: PipelineConfig, source: str, workers, cpus, gpus, log=print
) -> dict:
    """E's features of every instance larger than 1/64 of its image over the whole split, in Ray Data actors;
    k-means++ per class in the driver. Returns the clusters with what they were made from and the peak memory."""
    import ray
    import ray.data

    manifest = shards.load_manifest(data_uri, split)
    if not ray.is_initialized():
        logging.getLogger("ray.data").setLevel(logging.WARNING)
        with signal_handlers_kept():  # ray.init sets its own SIGTERM handler
            ray.init(logging_config=ray.LoggingConfig(log_level="WARNING"))
    total = manifest["sample_count"]
    log(
        f"clustering E's instance features of {source} over {total} samples of {data_uri} '{split}' "
        f"({workers} actor(s), {cpus} CPU / {gpus} GPU each)"
    )
    rows = build_dataset(data_uri, split, pcfg).map_batches(
        EncodeInstances,
        fn_constructor_kwargs={"encoder": pack_module(E.eval()), "pcfg": pcfg},
        batch_size=8,
        batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(size=workers),
        num_cpus=cpus,
        num_gpus=gpus or None,
    )
    per_class: dict[int, list[np.ndarray]] = {}
    seen, actor_peak, t0, shown = 0.0, 0.0, time.perf_counter(), 0.0
    for batch in rows.iter_batches(batch_size=None, batch_format="numpy"):
        for c, v in zip(batch["cls"].tolist(), batch["vec"], strict=True):
            if c >= 0:
                per_class.setdefault(c, []).append(v)
        seen += float(batch["samples"].sum())
        actor_peak = max(actor_peak, float(batch["rss_mib"].max(initial=0)))
        if time.perf_counter() - shown > 5:
            log(f"cluster_features: {round(seen)}/{total} samples, {sum(map(len, per_class.values()))} instances")
            shown = time.perf_counter()
    centres, counts = cluster(per_class, opt.label_nc, opt.feat_num)
    kept = sum(len(v) for v in per_class.values())
    took = time.perf_counter() - t0
    log(
        f"cluster_features: {kept} instances larger than 1/64 of their image in {total} samples, clustered into "
        f"{int(counts.sum())} styles over {int((counts > 0).sum())} classes in {took:.0f}s; peak memory: driver "
        f"{_peak_rss_mib():.0f} MiB, encoder actor {actor_peak:.0f} MiB"
    )
    return {
        "clusters": centres,
        "cluster_counts": counts,
        "checkpoint": source,
        "data": data_uri,
        "split": split,
        "instances": kept,
        "min_share": MIN_SHARE,
        "per_class": {int(c): int(n) for c, n in enumerate(counts.tolist()) if n},
        "driver_peak_mib": _peak_rss_mib(),
        "actor_peak_mib": actor_peak,
    }
