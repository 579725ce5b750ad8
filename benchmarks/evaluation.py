"""How fast generators are judged, and what judging costs training.

    python -m benchmarks.evaluation [--samples 96] [--batch 8]
        jobs.evaluate's pass (Ray Data, one actor) over procedural scenes at the demo's size (128x64): one generator
        of configs/tiny.yaml, scored by a demo-sized U-Net segmenter alone and with the FID Inception-v3 network
        (random weights: the cost is the same) as well; the same scoring in this process without Ray beside it.
    python -m benchmarks.evaluation --validation [--tracking-uri URI]
        the per-epoch validation's share of each epoch in the newest `make demo` run (what the Train workers report:
        val_seconds, the held-out images generated and scored on rank 0, and epoch_seconds, the training loop).

Images/s are wall-clock over the whole pass (actor start-up included) and, for the in-process row, over the
batches alone. Figures go to BENCHMARKS.md with the machine.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from data.pipeline import build_dataset
from data.pipeline_config import PipelineConfig
from data.shards import PrepareOptions, load_manifest, prepare
from data.synthetic.write import write_city
from data.transforms import Geometry
from evaluation.fid import FeatureNet
from evaluation.modules import pack_module
from evaluation.segmenters import Segmenter
from model.inception import FIDInceptionV3
from orchestration.judging.evaluate import EvalPlan, ScoreBatch, evaluate, resolve_model
from orchestration.run.config import load_config
from orchestration.services.demo import DemoSettings, untrained_checkpoint
from orchestration.training.segmenter_training import build_network, service_class_map


def networks(cfg, data_uri: str, inception: bool):
    manifest = load_manifest(data_uri, "train")
    seg = torch.jit.script(build_network(cfg, manifest["label_nc"]).eval())
    cmap = service_class_map(manifest["class_histogram"], "cityscapes")
    feature = FeatureNet(torch.jit.script(FIDInceptionV3().eval()), "random", 2048, {}) if inception else None
    return Segmenter(seg, cmap, "demo-sized U-Net"), feature


def in_process(plan: EvalPlan) -> float:
    """ScoreBatch on the split's batches in this process (no Ray Data actor): images/s of the scoring alone."""
    seg, feature = plan.networks
    bundle = resolve_model(plan.models[0], plan, set()).bundle
    m = bundle.opt.size_multiple
    pcfg = PipelineConfig(Geometry("none", 1, m, m, no_flip=True), instance_output="ids", batch_size=plan.batch_size)
    scorer = ScoreBatch(
        [pack_module(bundle)],
        (pack_module(seg.module), seg.class_map),
        (pack_module(feature.module), feature.kwargs) if feature else None,
        pcfg,
        "cityscapes",
    )
    batches = [
        {k: np.asarray(v) for k, v in b.items()}
        for b in build_dataset(plan.data_uri, plan.split, pcfg).iter_batches(batch_size=plan.batch_size)
    ]
    scorer(batches[0])  # warm-up
    t0, n = time.perf_counter(), 0
    for b in batches:
        n += len(scorer(b)["index"])
    return n / (time.perf_counter() - t0)


def throughput(samples: int, batch: int) -> None:
    cfg = load_config("configs/tiny.yaml", list(DemoSettings().overrides))
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        write_city(root / "source", samples, 64, 128)
        data = str(root / "data")
        prepare(PrepareOptions("flat", str(root / "source"), data, val_fraction=0.0, name="synthetic-city"))
        model = untrained_checkpoint(cfg, root / "untrained")
        rows = []
        for inception in (False, True):
            plan = EvalPlan(
                [model],
                data,
                "train",
                out=str(root / "report"),
                batch_size=batch,
                networks=networks(cfg, data, inception),
            )
            t0 = time.perf_counter()
            evaluate(plan, log=lambda *a: None)
            wall = samples / (time.perf_counter() - t0)
            rows.append((inception, wall, in_process(plan)))
    print(f"evaluation of 1 generator on {samples} scenes at 128x64, batch {batch}, {torch.get_num_threads()} threads")
    print("| scoring | jobs.evaluate pass (Ray Data, 1 actor) img/s | in-process img/s | pass / in-process |")
    print("|---|---|---|---|")
    for inception, wall, local in rows:
        what = "seg-score + Inception-v3 features (FID/KID)" if inception else "seg-score (U-Net width 12, depth 3)"
        print(f"| {what} | {wall:.1f} | {local:.1f} | {wall / local:.2f} |")


def validation_share(tracking_uri: str | None) -> None:
    from mlflow import MlflowClient

    from orchestration.records.tracking import RUN_TAG, STAGE_TAG, resolve_tracking_uri

    uri = tracking_uri or resolve_tracking_uri()
    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name("pix2pixhd-synthetic-city")
    parents = client.search_runs(
        [exp.experiment_id],
        f"tags.`{STAGE_TAG}` = 'parent' and tags.`{RUN_TAG}` LIKE 'demo-%'",
        order_by=["attributes.start_time DESC"],
        max_results=1,
    )
    if not parents:
        raise SystemExit(f"no demo run in {uri}: run make demo first")
    parent = parents[0]
    stages = client.search_runs([exp.experiment_id], f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
    print(f"demo run {parent.data.tags[RUN_TAG]} ({uri})")
    print("| stage | epochs | training loop s / epoch | validation s / epoch | validation share |")
    print("|---|---|---|---|---|")
    for run in sorted(stages, key=lambda r: r.data.tags.get(STAGE_TAG, "")):
        val = [m.value for m in client.get_metric_history(run.info.run_id, "val_seconds")]
        loop = [m.value for m in client.get_metric_history(run.info.run_id, "epoch_seconds")]
        if not val or not loop:
            continue
        v, t = sum(val) / len(val), sum(loop) / len(loop)
        print(f"| {run.data.tags[STAGE_TAG]} | {len(val)} | {t:.2f} | {v:.3f} | {100 * v / (v + t):.1f}% |")


def main() -> None:
    p = argparse.ArgumentParser(prog="python -m benchmarks.evaluation", description=__doc__.split("\n\n")[0])
    p.add_argument("--samples", type=int, default=96)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--validation", action="store_true", help="the newest demo run's per-epoch validation share")
    p.add_argument("--tracking-uri", default=None)
    a = p.parse_args()
    if a.validation:
        validation_share(a.tracking_uri)
    else:
        throughput(a.samples, a.batch)


if __name__ == "__main__":
    main()
