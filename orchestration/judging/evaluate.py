"""jobs.evaluate: judge generators on a whole split the way the field does (pix2pixHD Table 1): seg-score (a
segmenter's mIoU / pixel accuracy on the generated images against the input label maps, beside the same on the
real photos), FID and KID against the real photos (with a feature network file), and L1.

Everything is checked before any compute: the split, each model, that all share the dataset's label set, the
segmenter and its class map, the feature network. Then one Ray Data pass over the split: actors (GPU ones when
`gpus` is set) run every generator, the segmenter and the feature network on each batch and emit per-image
confusion matrices, feature vectors and L1; the driver sums them, printing progress.

Models: a registry URI (`models:/pix2pixhd-<dataset>@champion`, `.../3`, `.../latest`), a run id of the run
storage (its last finished stage), or a checkpoint URI (a folder holding meta.json).
"""

from __future__ import annotations

import json
import logging
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import ray
import ray.data
import torch

from data import shards, storage
from data.labels import LABEL_SETS, LabelSet
from data.layouts import label_set
from data.pipeline import build_dataset, read_samples, to_model_batch
from data.pipeline_config import PipelineConfig
from data.transforms import Geometry
from evaluation.fid import FeatureDistance, load_feature_net
from evaluation.modules import pack_module, unpack_module
from evaluation.report import per_class_chart, table
from evaluation.segscore import EvaluationError, SegScore, SegScoreResult
from model.bundle import Pix2PixHDGenerator
from model.inference import to_uint8
from orchestration.records.evaluation_tracking import log_evaluation
from orchestration.records.registry import DIGEST_TAG, ModelNotFound, build_bundle, load_generator, pinned_version
from orchestration.records.segmenter_registry import resolve_segmenter
from orchestration.run import checkpoint
from orchestration.run.config import Config, from_dict
from orchestration.run.run_state import RunState, run_root
from orchestration.run.stopping import signal_handlers_kept
from orchestration.run.visuals import comparison_rows, grid, save_png, titled
from serving.pyfunc import WEIGHTS

REAL = "real photos"
QUIET_DATA = {"env_vars": {"RAY_DATA_LOG_LEVEL": "WARNING"}}


@dataclass
class ModelRef:
    spec: str  # as the user named it
    name: str  # how tables and charts call it
    bundle: Pix2PixHDGenerator
    label_nc: int
    registry: tuple[str, str] | None = None  # (registered model, version)
    mlflow_run: str | None = None  # the MLflow run the model was trained (or logged) in
    run_id: str | None = None  # the curriculum run id
    sha256: str | None = None  # what was scored: the checkpoint's state.pt, or the version's weights.pt


@dataclass
class EvalPlan:
    models: list[str]
    data_uri: str
    split: str = "val"
    segmenter: str | None = None  # a file (with class_map), models:/ URI, or None: the dataset's registered one
    class_map: str | None = None
    inception: str | None = None  # a feature network file for FID/KID
    storage_uri: str = "outputs/runs"  # where run ids are found
    tracking_uri: str | None = None
    out: str = "outputs/evaluation"
    batch_size: int = 4
    limit: int | None = None  # at most this many images (the first of the split)
    load_size: int | None = None  # scale the split's images to this width (default: as stored)
    workers: int = 1  # Ray Data actors
    cpus: float = 1.0  # per actor
    gpus: float = 0.0  # per actor
    networks: tuple | None = None  # (Segmenter | None, FeatureNet | None) already loaded: instead of the above


@dataclass
class SourceResult:
    name: str
    seg: SegScoreResult | None = None
    fid: float | None = None
    kid: tuple[float, float] | None = None
    l1: float | None = None
    images: int = 0
    extra: dict = field(default_factory=dict)

    def metrics(self, real: SourceResult | None = None) -> dict[str, float]:
        m: dict[str, float] = {"images": float(self.images)}
        if self.seg is not None:
            m |= self.seg.as_metrics()
            if real is not None and real.seg is not None and real.seg.miou > 0:
                m["seg_miou_ratio"] = self.seg.miou / real.seg.miou
        if self.fid is not None:
            m["fid"] = self.fid
        if self.kid is not None:
            m["kid"], m["kid_std"] = self.kid
        if self.l1 is not None:
            m["l1"] = self.l1
        return m


# ---- resolving what the user named ---------------------------------------------------------------------------


def resolve_model(spec: str, plan: EvalPlan, used: set[str]) -> ModelRef:
    if spec.startswith("models:/"):
        return _registry_model(spec, plan, used)
    if "://" in spec or "/" in spec:
        return _checkpoint_model(spec, plan, used, run_id=None)
    root = run_root(plan.storage_uri, spec, "--model")
    state = RunState(root)
    done = [int(k) for k, v in state.data["stages"].items() if v.get("status") == "done"]
    if not done:
        raise EvaluationError(
            f"--model {spec}: not a registry URI (models:/...), and run '{spec}' in {plan.storage_uri} has no finished "
            f"stage (give --storage where it ran, or a checkpoint URI)"
        )
    ref = _checkpoint_model(state.data["stages"][str(max(done))]["checkpoint"], plan, used, run_id=spec)
    ref.name = _unique(f"{spec} (stage {max(done)})", used)
    return ref


def _unique(name: str, used: set[str]) -> str:
    out, i = name, 2
    while out in used:
        out, i = f"{name} #{i}", i + 1
    used.add(out)
    return out


def _checkpoint_model(uri: str, plan: EvalPlan, used: set[str], run_id: str | None) -> ModelRef:

    with tempfile.TemporaryDirectory() as tmp:
        try:
            state = checkpoint.fetch(uri, tmp)
        except (FileNotFoundError, checkpoint.CheckpointError) as e:
            raise EvaluationError(f"--model {uri}: no checkpoint there ({e})") from None
    cfg = from_dict(checkpoint.stored_config(state))
    k = int(state.get("stage", 3))
    bundle = build_bundle(cfg, state, k, plan.data_uri).eval()
    name = _unique(f"{Path(uri.rstrip('/')).name} (stage {k})" if run_id is None else uri, used)
    return ModelRef(uri, name, bundle, cfg.model.label_nc, run_id=run_id, sha256=checkpoint.stored_sha256(uri))


def _registry_model(spec: str, plan: EvalPlan, used: set[str]) -> ModelRef:
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    if plan.tracking_uri is None:
        raise EvaluationError(f"--model {spec}: a registry URI needs MLflow tracking (--tracking-uri)")
    client = MlflowClient(tracking_uri=plan.tracking_uri, registry_uri=plan.tracking_uri)
    try:
        name, version = pinned_version(client, spec)
        mv = client.get_model_version(name, version)
    except MlflowException as e:
        raise EvaluationError(
            f"--model {spec}: not in the registry at {plan.tracking_uri} ({e.message[:200]})"
        ) from None
    try:
        bundle = load_generator(f"models:/{name}/{version}", plan.tracking_uri).eval()
    except ModelNotFound as e:
        raise EvaluationError(f"--model {e}") from None
    ref_name = _unique(f"{name} v{version}", used)
    label_nc = int(bundle.options["label_nc"])
    weights = mv.tags.get(f"{DIGEST_TAG}{WEIGHTS}")  # load_generator checked the files against it
    return ModelRef(spec, ref_name, bundle, label_nc, (name, version), mv.run_id, mv.tags.get("run_id"), weights)


# ---- the Ray Data pass ----------------------------------------------------------------------------------------


class ScoreBatch:
    """Ray Data actor: one batch of the split -> per image and per source (real photos, then each model): its
    seg-score confusion matrix, its feature vector, its L1 to the photo."""

    def __init__(self, generators: list[bytes], segmenter, feature, pcfg: PipelineConfig, label_set_name: str):

        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.generators = [unpack_module(g).to(self.device).eval() for g in generators]
        self.seg = None
        if segmenter is not None:
            blob, class_map = segmenter
            self.seg = (unpack_module(blob).to(self.device), class_map)
        self.feature = None
        if feature is not None:
            blob, kwargs = feature
            self.feature = (unpack_module(blob).to(self.device), kwargs)
        self.pcfg, self.labels = pcfg, LABEL_SETS[label_set_name]

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        tensors = {k: torch.from_numpy(np.array(v)) for k, v in batch.items() if v.dtype != object}  # writable
        b = to_model_batch(tensors, self.pcfg, 0, train=False)
        label, real = b["label"].to(self.device), b["image"].to(self.device)
        x = torch.stack([label, b.get("inst", label).to(self.device)], 1)
        out: dict[str, np.ndarray] = {"index": b["index"].numpy()}
        with torch.no_grad():
            for i, image in enumerate([real] + [g(x) for g in self.generators]):
                if i > 0:
                    out[f"l1_{i}"] = (image.float() - real).abs().mean((1, 2, 3)).cpu().numpy()
                if self.seg is not None:
                    net, class_map = self.seg
                    logits = net((image.float() + 1) / 2)
                    logits = logits[0] if isinstance(logits, (tuple, list)) else logits
                    matrices = []
                    for j in range(len(label)):  # one matrix per image: rows of the output
                        score = SegScore(class_map, self.labels)
                        score.update(logits[j : j + 1].cpu(), label[j : j + 1].cpu())
                        matrices.append(score.matrix.numpy())
                    out[f"matrix_{i}"] = np.stack(matrices)
                if self.feature is not None:
                    net, kwargs = self.feature
                    f = net(to_uint8(image), **kwargs)
                    out[f"feat_{i}"] = (f[0] if isinstance(f, (tuple, list)) else f).float().flatten(1).cpu().numpy()
        return out


def evaluate(plan: EvalPlan, log=print) -> dict:
    """Check the inputs, score every model and the real photos over the split, write the report; returns
    {"results": {name: metrics}, "report": path, ...}."""
    manifest = shards.load_manifest(plan.data_uri, plan.split)  # a split that does not exist: ManifestError
    labels = label_set(manifest["layout"])
    models = _models(plan, labels)
    cfg = _dataset_config(plan)
    segmenter, feature = _networks(plan, cfg, labels, manifest, log)
    storage.check_writable(storage.resolve(plan.out))
    total = min(manifest["sample_count"], plan.limit or manifest["sample_count"])
    multiple = max(m.bundle.opt.size_multiple for m in models)
    geometry = Geometry(
        resize_or_crop="scale_width" if plan.load_size else "none",
        load_size=plan.load_size or 1,
        fine_size=multiple,
        size_multiple=multiple,
        no_flip=True,
    )
    pcfg = PipelineConfig(geometry=geometry, instance_output="ids", batch_size=plan.batch_size, verify="size")
    log(
        f"evaluating {len(models)} model(s) on {total} images of {plan.data_uri} '{plan.split}'"
        + (f", seg-score by {segmenter.identity}" if segmenter else "")
        + (f", FID/KID by {feature.identity[:19]}" if feature else "")
    )
    scored = _scored(plan, pcfg, models, segmenter, feature, labels)
    sources = [REAL] + [m.name for m in models]
    results = _accumulate(scored, sources, segmenter, feature, labels, total, log)
    return _report(plan, cfg.dataset, models, results, segmenter, feature, labels, pcfg, log)


def _models(plan: EvalPlan, labels: LabelSet) -> list[ModelRef]:
    """The models named, resolved; they must share the dataset's label set."""
    if not plan.models:
        raise EvaluationError("no --model given: name one or more (a models:/ URI, a run id, a checkpoint URI)")
    used: set[str] = set()
    models = [resolve_model(spec, plan, used) for spec in plan.models]
    if any(m.label_nc != labels.label_nc for m in models):
        named = ", ".join(f"{m.spec} ({m.label_nc} labels)" for m in models)
        raise EvaluationError(
            f"the models do not share {plan.data_uri}'s label set ({labels.name}, {labels.label_nc} labels): {named}; "
            f"compare models of one dataset against that dataset"
        )
    return models


def _networks(plan: EvalPlan, cfg, labels: LabelSet, manifest, log):
    """(segmenter, feature network): the plan's own, else the ones named or registered; a note for each missing."""
    if plan.networks is not None:  # the caller chose what to score
        return plan.networks
    segmenter = resolve_segmenter(plan.segmenter, cfg, labels, plan.tracking_uri, plan.class_map, log)
    if segmenter is not None and plan.class_map:  # a map the user wrote: it claims what this split can score
        segmenter.class_map.check_split(manifest["class_histogram"], labels, f"{plan.data_uri} '{plan.split}'")
    feature = load_feature_net(plan.inception) if plan.inception else None
    if segmenter is None:
        log(
            "note: no segmenter (--segmenter, or one registered by jobs.train_segmenter): seg-score is unavailable; "
            f"train one: python -m jobs.train_segmenter --config ... --data {plan.data_uri}"
        )
    if feature is None:
        log(
            "note: FID/KID unavailable: give --inception PATH (NVIDIA's TorchScript inception-2015-12-05.pt, or any "
            "TorchScript network mapping uint8 images to one vector each)"
        )
    return segmenter, feature


def _scored(plan: EvalPlan, pcfg: PipelineConfig, models, segmenter, feature, labels: LabelSet):
    """The split as a Ray Dataset scored by a pool of ScoreBatch actors (on the cluster of RAY_ADDRESS, else a
    local Ray)."""
    if not ray.is_initialized():
        logging.getLogger("ray.data").setLevel(logging.WARNING)  # progress: the lines below
        logging.getLogger("ray.experimental.tqdm_ray").setLevel(logging.ERROR)
        with signal_handlers_kept():  # ray.init sets its own SIGTERM handler
            ray.init(logging_config=ray.LoggingConfig(log_level="WARNING"), runtime_env=QUIET_DATA)
    ds = build_dataset(plan.data_uri, plan.split, pcfg)
    if plan.limit:
        ds = ds.limit(plan.limit)
    return ds.map_batches(
        ScoreBatch,
        fn_constructor_kwargs={
            "generators": [pack_module(m.bundle) for m in models],
            "segmenter": (pack_module(segmenter.module), segmenter.class_map) if segmenter else None,
            "feature": (pack_module(feature.module), feature.kwargs) if feature else None,
            "pcfg": pcfg,
            "label_set_name": labels.name,
        },
        batch_size=plan.batch_size,
        batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(size=plan.workers),
        num_cpus=plan.cpus,
        num_gpus=plan.gpus or None,
    )


def _dataset_config(plan: EvalPlan):
    """A config naming the dataset (the registry's segmenter is `segmenter-<dataset>`), as its manifest does."""

    return Config(dataset=shards.load_manifest(plan.data_uri, plan.split)["dataset"])


def _accumulate(scored, sources, segmenter, feature, labels, total, log) -> dict[str, SourceResult]:
    matrices = {i: None for i in range(len(sources))}
    per_model_feats = {i: FeatureDistance() for i in range(1, len(sources))} if feature else {}
    l1 = {i: 0.0 for i in range(1, len(sources))}
    seen, t0, shown = 0, time.perf_counter(), 0.0
    for batch in scored.iter_batches(batch_size=None, batch_format="numpy"):
        n = len(batch["index"])
        seen += n
        for i in range(len(sources)):
            if f"matrix_{i}" in batch:
                m = batch[f"matrix_{i}"].sum(0)
                matrices[i] = m if matrices[i] is None else matrices[i] + m
            if f"feat_{i}" in batch:
                f = torch.from_numpy(batch[f"feat_{i}"])
                if i == 0:
                    for d in per_model_feats.values():
                        d.update(f, real=True)
                else:
                    per_model_feats[i].update(f, real=False)
            if i > 0:
                l1[i] += float(batch[f"l1_{i}"].sum())
        now = time.perf_counter()
        if now - shown > 5 or seen >= total:
            log(f"evaluate: {seen}/{total} images, {seen / (now - t0):.1f} img/s")
            shown = now
    results = {}
    for i, name in enumerate(sources):
        r = SourceResult(name, images=seen)
        if segmenter is not None and matrices[i] is not None:
            score = SegScore(segmenter.class_map, labels)
            score.matrix = torch.from_numpy(matrices[i])
            r.seg = score.result()
        if i > 0:
            r.l1 = l1[i] / max(seen, 1)
            if feature is not None:
                r.fid, r.kid = per_model_feats[i].fid(), per_model_feats[i].kid()
        results[name] = r
    return results


def _report(plan, dataset: str, models, results, segmenter, feature, labels: LabelSet, pcfg, log) -> dict:
    """The table in the log; metrics.json, report.md, grid.png and per_class_iou.png written to `plan.out` (a
    folder or an s3:// prefix, each file atomically) and, with tracking, logged to MLflow."""

    real = results[REAL]
    text = table(list(results.values()), real)
    log(text)
    metrics = {name: r.metrics(real if name != REAL else None) for name, r in results.items()}
    report = {
        "dataset": dataset,
        "data": plan.data_uri,
        "split": plan.split,
        "segmenter": segmenter.identity if segmenter else None,
        "feature_network": feature.identity if feature else None,
        "models": {m.name: m.spec for m in models},
        "sha256": {m.name: m.sha256 for m in models},  # the files scored: a checkpoint's state.pt, weights.pt
        "data_sha256": shards.content_sha256(plan.data_uri, plan.split),
        "metrics": metrics,
        "per_class_iou": {name: r.seg.per_class for name, r in results.items() if r.seg is not None},
    }
    out = storage.resolve(plan.out)
    with tempfile.TemporaryDirectory(prefix="p2p-evaluation-") as tmp:
        folder = Path(tmp)
        (folder / "metrics.json").write_text(json.dumps(report, indent=1, default=float))
        (folder / "report.md").write_text(text + "\n")
        samples = read_samples(plan.data_uri, plan.split, pcfg, 4)
        x = torch.stack([samples["label"], samples.get("inst", samples["label"])], 1)
        with torch.no_grad():
            fakes = [m.bundle(x) for m in models]
        picture = grid(comparison_rows(labels, samples["label"], *fakes, samples["image"]))
        titles = ["label", *(m.name for m in models), "real photo"]
        save_png(titled(picture, titles, samples["label"].shape[-1]), folder / "grid.png")
        files = [folder / "report.md", folder / "metrics.json", folder / "grid.png"]
        if segmenter is not None:
            files.append(per_class_chart(results, folder / "per_class_iou.png"))
        for f in files:
            storage.write_bytes_atomic(out.join(f.name), f.read_bytes())
        log(f"evaluate: report in {out.uri} ({', '.join(f.name for f in files)})")
        if plan.tracking_uri:
            log_evaluation(plan, models, metrics, report, files, log)
    return {"results": metrics, "files": [out.join(f.name).uri for f in files], **report}
