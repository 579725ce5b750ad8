"""`make demo`: the whole service on embedded defaults, on a laptop.

1. procedural street scenes (Cityscapes ids) in the flat layout, then `prepare_data` shards + manifest
2. the three-stage curriculum on local Ray (2 CPU workers), checkpoints in a local folder
3. MLflow tracking (MLFLOW_TRACKING_URI, else a local sqlite store); the generator registered and pulled back
   through models:/pix2pixhd-synthetic-city@champion
4. a PNG grid of held-out scenes: label | stage-1 output | final output (from the pulled model) | real, and the
   editing figure: one car in two of its styles (styles.png)
5. seg-score on the held-out scenes, by the synthetic-city segmenter the demo trains first (or reuses: one registered
   from the same scenes with the same settings): the real photos, the stage-1, the final and an untrained generator
"""

from __future__ import annotations

import dataclasses
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from data.labels import CITYSCAPES
from data.layouts import label_set
from data.pipeline import read_samples
from data.shards import PrepareOptions, load_manifest, prepare
from data.synthetic.write import write_city
from model.step import TrainStep
from model.styles import change_near, instance_class
from orchestration.judging.evaluate import EvalPlan, evaluate
from orchestration.records.registry import build_bundle, load_generator
from orchestration.records.segmenter_registry import find_trained_alike, resolve_segmenter
from orchestration.records.tracking import resolve_tracking_uri
from orchestration.run import checkpoint
from orchestration.run.config import load_config, pipeline_config
from orchestration.run.visuals import comparison_rows, grid, rgb_array, save_png, titled
from orchestration.training.curriculum import RunPlan, RunResult, experiment_name, run
from orchestration.training.segmenter_training import SegmenterPlan, train


@dataclass
class DemoSettings:
    out_dir: str = "outputs/demo"
    config: str = "configs/tiny.yaml"
    samples: int = 480
    height: int = 64
    width: int = 128
    # configs/tiny.yaml is sized for tests; the demo trains longer so the picture shows something. The recipe was
    # ranked with benchmarks/demo_recipe.py (BENCHMARKS.md, "Demo recipe"): in the same training time, one sample
    # per worker per step (4x the updates of batch 4 per epoch; the reference's batch is 1 too), fewer stage-1
    # epochs (its gains did not survive the full-resolution stages), generator averaging and bf16 autocast took
    # the final generator's seg-score from 0.83 to 0.87 of the real photos'; pix2pix's L1 term, in place of the
    # VGG loss the demo has no weights for, to 0.91 and 0.93 over two seeds (in one process; make demo: README).
    overrides: tuple[str, ...] = (
        "model.instance_feat=true",  # E and per-object styles: the registered model is one the editor can restyle
        "model.ema_beta=0.999",  # generator averaging: the average is judged, registered and rendered
        "model.lambda_l1=30",  # L1 to the photo: colours and edges in few steps (no VGG weights here)
        "train.batch_size=1",
        "train.precision=bf16",  # bf16 autocast: this CPU has avx512_bf16 (stage 3 0.86x the time, same quality)
        "segmenter.width=12",
        "segmenter.depth=3",
        "segmenter.epochs=8",
        "segmenter.lr=0.003",
        "stage1.niter=2",
        "stage1.niter_decay=1",
        "stage2.niter=2",
        "stage2.niter_fix_global=2",
        "stage3.niter=3",
        "stage3.niter_decay=3",
    )


def stage_generator(uri: str, cfg, k: int, data_uri: str):
    """Stage k's checkpoint as the registry would hold it (with instance features: its E's styles clustered)."""

    with tempfile.TemporaryDirectory() as tmp:
        state = checkpoint.fetch(uri, tmp)
    return build_bundle(cfg, state, k, data_uri, log=lambda *a: None).eval()


def stage_comparison(cfg, data_uri: str, result: RunResult, pulled, n: int = 4):
    """Rows of label | stage-1 output (upsampled) | final output | real, on held-out samples. The final output is
    rendered by `pulled`, the generator pulled back from the registry."""
    split = cfg.data.val_split or cfg.data.train_split
    held = read_samples(data_uri, split, dataclasses.replace(pipeline_config(cfg, 3), instance_output="ids"), n)
    final = pulled(torch.stack([held["label"].long(), held["inst"]], 1))
    half = read_samples(data_uri, split, dataclasses.replace(pipeline_config(cfg, 1), instance_output="ids"), n)
    coarse = stage_generator(result.stages[1]["checkpoint"], cfg, 1, data_uri)(
        torch.stack([half["label"].long(), half["inst"]], 1)
    )
    coarse = torch.nn.functional.interpolate(coarse, size=final.shape[-2:], mode="nearest")
    rows = comparison_rows(CITYSCAPES, held["label"], coarse, final, held["image"])
    l1 = {"stage 1": (coarse - held["image"]).abs().mean().item(), "final": (final - held["image"]).abs().mean().item()}
    return rows, l1


def two_styles(pulled, cfg, data_uri: str, out: Path, n: int = 16) -> dict | None:
    """The editing figure (paper Fig. 8): the largest car of the held-out scenes rendered in the two of its class's
    styles that lie farthest apart, every other instance's style from the same seed. Writes styles.png (label |
    style a | style b | change, darker = more) and returns how much of the change lies near that car."""

    if not pulled.opt.instance_feat:
        return None
    split = cfg.data.val_split or cfg.data.train_split
    held = read_samples(data_uri, split, dataclasses.replace(pipeline_config(cfg, 3), instance_output="ids"), n)
    car = CITYSCAPES.names.index("car")
    if int(pulled.cluster_counts[car]) < 2:
        print("[demo] the car class has fewer than 2 styles: no editing figure")
        return None
    sizes = [
        (int((held["inst"][i] == j).sum()), i, j)
        for i in range(len(held["inst"]))
        for j in held["inst"][i].unique().tolist()
        if instance_class(j) == car
    ]
    if not sizes:
        return None
    _, i, car_id = max(sizes)
    centres = pulled.clusters[car, : int(pulled.cluster_counts[car])]
    far = torch.cdist(centres, centres)
    a, b = divmod(int(far.argmax()), len(centres))
    x = torch.stack([held["label"][i].long(), held["inst"][i]])[None]
    first, second = (pulled.render(x, {car_id: k}, seed=0)[0] for k in (a, b))
    same = torch.equal(first, pulled.render(x, {car_id: a}, seed=0)[0])
    near = change_near(first, second, held["inst"][i] == car_id, dilate=4)
    change = (first - second).abs().sum(0)
    heat = (255 - (change / change.max().clamp_min(1e-8) * 255)).round().to(torch.uint8).numpy()
    tiles = [
        CITYSCAPES.colorize(held["label"][i].numpy()),
        rgb_array(first),
        rgb_array(second),
        np.repeat(heat[..., None], 3, 2),
    ]
    titles = ["label", f"car {car_id}: style {a}", f"car {car_id}: style {b}", "change"]
    k = max(1, 256 // x.shape[-1])  # small scenes are shown larger (nearest neighbour)
    tiles = [t.repeat(k, 0).repeat(k, 1) for t in tiles]
    path = save_png(titled(grid([tiles]), titles, k * x.shape[-1]), out / "styles.png")
    print(
        f"[demo] two styles ({a}, {b}) for car {car_id}: {near['share']:.0%} of the change lies within 4 px of it "
        f"({near['area']:.0%} of the image, {near['density']:.1f}x the change per pixel elsewhere); the same seed "
        f"renders {'the same image' if same else 'ANOTHER image'}; {path}"
    )
    return {**near, "reproduces": same, "styles": (a, b), "instance": car_id, "path": str(path)}


def demo_segmenter(cfg, data_uri: str, out: Path, tracking_uri: str) -> str:
    """The registry URI of a segmenter for these scenes: one trained alike before, else trained now."""

    found = find_trained_alike(cfg, data_uri, tracking_uri)
    if found:
        print(f"[demo] seg-score segmenter: reusing {found} (trained on the same scenes with the same settings)")
        return found
    print("[demo] training the seg-score segmenter on the real photos (python -m jobs.train_segmenter)")
    return train(SegmenterPlan(cfg, data_uri, str(out / "runs"), tracking_uri))["registry"]["uri"]


def untrained_checkpoint(cfg, into: Path) -> str:
    """The final stage's generator as initialised (seed 0), saved as a checkpoint: the table's floor."""

    step = TrainStep(cfg.stage_model(3), seed=0)
    return str(checkpoint.save(into, step, stage=3, epoch=0, global_step=0, lr=0.0, config=cfg.to_dict()))


def seg_score_table(cfg, data_uri: str, result: RunResult, segmenter_uri: str, tracking_uri: str, out: Path):
    """seg-score of the real photos, the final, the untrained and the stage-1 generator on the held-out split
    (stage 1 at its own half size, beside the real photos at that size); markdown and the rows' metrics."""

    split = cfg.data.val_split or cfg.data.train_split
    labels = label_set(load_manifest(data_uri, split)["layout"])
    networks = (resolve_segmenter(segmenter_uri, cfg, labels, tracking_uri), None)
    final, untrained = result.stages[3]["checkpoint"], untrained_checkpoint(cfg, out / "untrained")
    quiet = lambda *a: None  # noqa: E731 - the summary below says it all
    full = evaluate(EvalPlan([final, untrained], data_uri, split, out=str(out / "scores"), networks=networks), quiet)
    half = evaluate(
        EvalPlan(
            [result.stages[1]["checkpoint"]],
            data_uri,
            split,
            out=str(out / "scores-stage1"),
            load_size=cfg.stage1.load_size,
            networks=networks,
        ),
        quiet,
    )
    f, h = list(full["results"].values()), list(half["results"].values())
    size = f"{cfg.stage1.load_size * 2}px wide"
    rows = [
        (f"real photos ({size})", f[0]),
        (f"final generator ({result.registry['uri']})", f[1]),
        ("untrained generator (same network, seed 0)", f[2]),
        (f"real photos ({cfg.stage1.load_size}px wide)", h[0]),
        ("stage-1 generator (G1 at half size)", h[1]),
    ]
    lines = ["| source | seg mIoU | / real | pixel acc | L1 |", "|---|---|---|---|---|"]
    for name, m in rows:
        ratio, l1 = m.get("seg_miou_ratio"), m.get("l1")
        lines.append(
            f"| {name} | {m['seg_miou']:.3f} | {'-' if ratio is None else f'{ratio:.2f}'} | {m['seg_pixel_acc']:.3f} "
            f"| {'-' if l1 is None else f'{l1:.3f}'} |"
        )
    text = f"seg-score on {int(f[0]['images'])} held-out scenes by {full['segmenter']}:\n" + "\n".join(lines)
    (out / "scores.md").write_text(text + "\n")
    return text, dict(rows)


def run_demo(s: DemoSettings) -> Path:
    t0 = time.perf_counter()
    out = Path(s.out_dir)
    source, data_uri = out / "source", str(out / "data")
    print(f"[demo] writing {s.samples} procedural street scenes ({s.width}x{s.height}) to {source}")
    write_city(source, s.samples, s.height, s.width)
    prepare(PrepareOptions("flat", str(source), data_uri, val_fraction=0.05, name="synthetic-city"))
    cfg = load_config(s.config, list(s.overrides))
    tracking_uri = resolve_tracking_uri()
    run_id = f"demo-{time.strftime('%Y%m%d-%H%M%S')}"
    segmenter_uri = demo_segmenter(cfg, data_uri, out, tracking_uri)
    cfg.eval.segmenter = segmenter_uri  # judge the generators by this one's seg-score (mIoU)
    plan = RunPlan(
        cfg=cfg,
        run_id=run_id,
        stages=[1, 2, 3],
        data_uri=data_uri,
        storage_uri=str(out / "runs"),
        tracking_uri=tracking_uri,
    )
    result = run(plan)
    if result.registry is None:
        raise RuntimeError(f"the generator was not registered in {tracking_uri}; see the messages above")
    print(f"[demo] pulling {result.registry['uri']} back from the registry")
    pulled = load_generator(result.registry["uri"], tracking_uri)
    rows, l1 = stage_comparison(cfg, data_uri, result, pulled)
    path = save_png(grid(rows), out / "demo.png")
    print(f"[demo] held-out L1 to the real image: stage 1 {l1['stage 1']:.3f}, final {l1['final']:.3f}")
    two_styles(pulled, cfg, data_uri, out)
    text, _ = seg_score_table(cfg, data_uri, result, segmenter_uri, tracking_uri, out)
    print(f"[demo] {text}")
    print(f"[demo] run {run_id} in {out / 'runs' / run_id}; per-epoch images under stage*/images/")
    if tracking_uri.startswith("sqlite:"):
        print(
            f"[demo] MLflow UI: .venv/bin/mlflow ui --backend-store-uri {tracking_uri} --port 5000  "
            f"then open http://127.0.0.1:5000 (experiment {experiment_name(cfg)})"
        )
    else:
        print(f"[demo] MLflow: {tracking_uri} (experiment {experiment_name(cfg)})")
    print(f"[demo] done in {time.perf_counter() - t0:.0f}s")
    print(f"[demo] wrote {path.resolve()}  (columns: label | stage-1 output | final output (pulled model) | real)")
    return path
