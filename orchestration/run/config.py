"""The job configuration: one YAML file, typed, with pix2pixHD's option names, a section per stage.

    name: label2city_1024p          # run name prefix
    dataset: cityscapes             # registry name: pix2pixhd-<dataset>
    model:  {label_nc: 35, ngf: 32, ...}      # ModelOptions; ngf is the local enhancer's (G1 uses ngf*2^n)
    data:   {uri: s3://..., resize_or_crop: none, ...}
    train:  {num_workers: 8, use_gpu: true, batch_size: 1, save_epoch_freq: 10, storage: s3://..., ...}
    stage1: {niter: 100, niter_decay: 100, resize_or_crop: scale_width, load_size: 1024, num_D: 2}
    stage2: {niter: 10, niter_decay: 0, niter_fix_global: 10}
    stage3: {niter: 50, niter_decay: 50}

Unknown keys and invalid values are errors naming the key (and the file). `--set stage2.niter=5` overrides.
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
import re
import types
import typing
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Literal

import yaml

from data import shards, storage, strict_yaml
from data.pipeline_config import PipelineConfig
from data.transforms import Geometry
from model.options import ModelOptions
from model.step import COMPILE_MODES


class ConfigError(ValueError):
    """A configuration problem; the message names the file and key."""


@dataclass(frozen=True)
class Range:
    """The values a numeric config field accepts; checked, naming the key, when the config is built."""

    low: float
    strict: bool = False  # True: value > low; False: value >= low

    def check(self, value: float | list[float], key: str) -> None:
        for v in value if isinstance(value, list) else [value]:
            if v < self.low or (self.strict and v == self.low):
                raise ConfigError(f"{key}={value} must be {'>' if self.strict else '>='} {self.low}")


def at_least(low: float, default: Any) -> Any:
    return field(default=default, metadata={"range": Range(low)})


def positive(default: Any) -> Any:
    return field(default=default, metadata={"range": Range(0, strict=True)})


NAME_PATTERN = re.compile(r"[A-Za-z0-9._-]+")


def check_name(value: str, what: str) -> str:
    """Run ids, sweep and dataset names become storage folders and MLflow tag values: letters, digits, '.', '_'
    and '-' only, no '..' (so no path can leave the storage folder), at most 128 characters."""
    if not NAME_PATTERN.fullmatch(value) or ".." in value or value.startswith(".") or len(value) > 128:
        raise ConfigError(
            f"{what} {value!r} is not a valid name: use letters, digits, '.', '_' and '-' (no '/', no '..', not "
            f"starting with '.', at most 128 characters), e.g. {re.sub(r'[^A-Za-z0-9_-]+', '-', value).strip('-') or 'run-01'}"
        )
    return value


ResizeOrCrop = Literal["resize_and_crop", "scale_width", "scale_width_and_crop", "crop", "none"]


@dataclass
class DataConfig:
    uri: str | None = None  # a prepared dataset (jobs.prepare_data --dest); --data overrides
    train_split: str = "train"
    val_split: str | None = "val"  # None: no validation
    resize_or_crop: ResizeOrCrop = "scale_width"
    load_size: int = at_least(1, 1024)
    fine_size: int = at_least(1, 512)
    no_flip: bool = False
    shuffle_buffer: int = at_least(0, 16)
    # shard check before each stage: sha256 (every byte), size, none; every sample's own digest is checked as it is
    # decoded, whatever this says
    verify: Literal["sha256", "size", "none"] = "sha256"
    read_cpus: float = positive(0.25)
    decode_cpus: float = positive(0.5)
    prefetch_batches: int = at_least(0, 2)  # batches each Train worker prepares ahead of its step


@dataclass
class TrainConfig:
    # workers, or [min, max] for an elastic stage: it goes on with fewer workers when nodes leave (>= min) and
    # grows back when they return, each time from the latest checkpoint
    num_workers: int | list[int] = at_least(1, 1)
    use_gpu: bool = False
    cpus_per_worker: float = positive(1.0)
    gpus_per_worker: float = positive(1.0)
    placement: Literal["pack", "spread", "strict_spread"] = "pack"  # workers on as few nodes as possible, or apart
    # samples per worker per step at the maximum worker count; the global batch (batch_size x max workers) stays
    # the same at any worker count (fewer workers take larger batches), so steps, lr and results do not change
    batch_size: int = at_least(1, 1)
    save_epoch_freq: int = at_least(1, 10)  # epochs between checkpoints (and always at stage end)
    checkpoint_every_steps: int = at_least(0, 0)  # also checkpoint every N steps (0: at epoch ends only)
    # steps between asking Ray whether a node of the stage is being drained (a spot notice, `ray drain-node`; a
    # checkpoint follows at once); the question is a broadcast across workers (~4 ms on CPU), hence not every step
    preemption_check_steps: int = at_least(0, 10)
    resize_check_s: float = positive(60.0)  # elastic: how often a healthy stage looks for returned nodes
    # how long a worker group may take to start before Ray Train gives up and decides again (after a node is lost,
    # Ray may first try the old size until it has marked the node dead)
    worker_start_timeout_s: float = positive(60.0)
    check_resources: bool = True  # refuse requests the cluster's nodes can never hold (off: autoscaling clusters)
    # a stage whose workers fit the cluster but not what is free now (other jobs, Serve replicas hold the rest):
    # say so, naming what holds them, and wait for them (a line a minute), or fail at once
    when_busy: Literal["wait", "fail"] = "wait"
    busy_timeout_s: float = at_least(0.0, 0.0)  # wait: give up after this long (0: wait as long as it takes)
    ray_logs: Literal["quiet", "info"] = "quiet"  # quiet: Ray's routine INFO lines stay out of the job log
    max_failures: int = at_least(
        -1, 3
    )  # worker-group restarts per stage (-1: unlimited), each from the latest checkpoint
    storage: str | None = None  # run storage: a path or s3://; default outputs/runs
    precision: Literal["auto", "bf16", "fp32"] = "auto"  # auto: bf16 on GPU, fp32 on CPU
    channels_last: bool = False
    compile: str = "auto"  # torch.compile of G, D, E, VGG: auto (inductor on GPU, off on CPU), none, a mode
    # (reduce-overhead = + CUDA graphs, max-autotune; GPU only, eager on CPU) or a backend name
    activation_checkpointing: bool = False  # recompute G's residual blocks in backward: less memory, more time
    image_every: int = at_least(1, 1)  # epochs between image grids
    log_every: int = at_least(0, 0)  # steps between progress lines; 0 = once per epoch
    system_metrics_s: float = at_least(0.0, 5.0)  # rank 0's host CPU/memory/GPU into the stage's MLflow run; 0: off
    val_samples: int = at_least(0, 4)  # held-out samples shown in image grids
    seed: int = at_least(0, 0)


@dataclass
class StageConfig:
    niter: int = at_least(0, 1)
    niter_decay: int = at_least(0, 0)
    niter_fix_global: int = at_least(0, 0)  # stage 2: epochs during which G1 is frozen
    # optional per-stage overrides of the shared sections
    batch_size: int | None = at_least(1, None)
    lr: float | None = positive(None)
    num_D: int | None = at_least(1, None)
    resize_or_crop: ResizeOrCrop | None = None
    load_size: int | None = at_least(1, None)
    fine_size: int | None = at_least(1, None)
    save_epoch_freq: int | None = at_least(1, None)

    @property
    def epochs(self) -> int:
        return self.niter + self.niter_decay


SWEPT_RANGES = ("lambda_feat", "lambda_vgg", "lambda_l1", "lr")  # SweepConfig's log-uniform [low, high] fields


@dataclass
class SweepConfig:
    """Ray Tune over the loss weights (log-uniform ranges); lambda_l1, lr and gan_mode optionally."""

    stage: Literal[1, 2, 3] = 1
    num_samples: int = at_least(1, 8)
    lambda_feat: list[float] = field(default_factory=lambda: [1.0, 30.0])
    lambda_vgg: list[float] = field(default_factory=lambda: [1.0, 30.0])
    lambda_l1: list[float] | None = None  # log-uniform range, e.g. [3, 100] (pix2pix's L1 term; off unless given)
    lr: list[float] | None = None  # log-uniform range, e.g. [5e-5, 5e-4]
    gan_mode: list[str] | None = None  # choices, e.g. [lsgan, hinge]
    metric: str = "auto"  # auto: the eval section's metric and direction (orchestration/judging/selection.py)
    mode: Literal["auto", "min", "max"] = "auto"
    grace_period: int = at_least(1, 1)  # ASHA: epochs before a trial can be stopped
    reduction_factor: int = at_least(2, 2)
    max_concurrent_trials: int | None = at_least(1, None)  # default: GPUs / GPUs per trial (1 on CPU)
    trial_cpus: float = positive(0.1)  # the trial's own driver; its Train workers take train.cpus_per_worker each


@dataclass
class EvalConfig:
    """How generators are judged while they train and chosen afterwards (the registry's champion, sweeps)."""

    # seg_miou (a segmenter's mIoU on the generated images; max), kid / fid (against real photos; min), val_L1
    # (min; rewards blur), or auto: seg_miou when a segmenter is given or registered, else kid with `inception`,
    # else val_L1 with a warning
    metric: Literal["auto", "seg_miou", "kid", "fid", "val_L1"] = "auto"
    every: int = at_least(1, 1)  # epochs between quality scores
    images: int = at_least(2, 16)  # held-out images a per-epoch score uses
    segmenter: str | None = None  # a TorchScript file (with class_map) or models:/ URI; default: segmenter-<dataset>
    class_map: str | None = None  # YAML file or cityscapes-trainids
    inception: str | None = None  # feature network file for kid / fid (e.g. inception-2015-12-05.pt)


@dataclass
class SegmenterConfig:
    """The seg-score segmenter the service trains on the dataset's real photos (jobs.train_segmenter): a U-Net
    (model/segmenter.py) at the final stage's resolution, on train.num_workers workers."""

    width: int = at_least(1, 32)  # channels at full resolution, doubled at each level down
    depth: int = at_least(1, 4)
    epochs: int = at_least(1, 30)
    lr: float = positive(1e-3)  # Adam; cosine decay to 0 over the epochs
    batch_size: int = at_least(1, 4)  # samples per worker per step
    load_size: int | None = at_least(1, None)  # default: stage 3's


@dataclass
class Config:
    name: str = "pix2pixhd"
    dataset: str = "dataset"
    model: ModelOptions = field(default_factory=ModelOptions)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    stage1: StageConfig = field(default_factory=StageConfig)
    stage2: StageConfig = field(default_factory=StageConfig)
    stage3: StageConfig = field(default_factory=StageConfig)
    sweep: SweepConfig = field(default_factory=SweepConfig)
    segmenter: SegmenterConfig = field(default_factory=SegmenterConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def stage(self, k: int) -> StageConfig:
        return getattr(self, f"stage{k}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def hash(self) -> str:
        return hashlib.sha256(json.dumps(self.to_dict(), sort_keys=True).encode()).hexdigest()[:16]

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    # ---- what each stage trains ----------------------------------------------------------------
    def stage_model(self, k: int) -> ModelOptions:
        """ModelOptions of stage k: G1 (ngf*2^n) in stage 1, the local enhancer after; stage lr / epochs."""
        s = self.stage(k)
        m = self.model
        overrides: dict[str, Any] = dict(niter=s.niter, niter_decay=s.niter_decay, lr=s.lr or m.lr)
        if s.num_D is not None:
            overrides["num_D"] = s.num_D
        if k == 1:
            overrides.update(netG="global", ngf=m.ngf * 2**m.n_local_enhancers)
        else:
            overrides.update(netG="local")
        return dataclasses.replace(m, **overrides)

    def stage_geometry(self, k: int) -> Geometry:
        s, d = self.stage(k), self.data
        return Geometry(
            resize_or_crop=s.resize_or_crop or d.resize_or_crop,
            load_size=s.load_size or d.load_size,
            fine_size=s.fine_size or d.fine_size,
            size_multiple=self.stage_model(k).size_multiple,
            no_flip=d.no_flip,
        )

    def segmenter_geometry(self) -> Geometry:
        """What the segmenter trains on: stage 3's geometry (it judges the final generator's images)."""
        g = self.stage_geometry(3)
        size = self.segmenter.load_size or g.load_size
        return dataclasses.replace(g, load_size=size, fine_size=min(g.fine_size, size))

    def stage_batch_size(self, k: int) -> int:
        """Samples per worker per step at the maximum worker count."""
        return self.stage(k).batch_size or self.train.batch_size

    @property
    def workers(self) -> tuple[int, int]:
        """(min, max) Train workers; equal unless the stage is elastic."""
        n = self.train.num_workers
        return (n, n) if isinstance(n, int) else (n[0], n[1])

    def global_batch(self, k: int) -> int:
        return self.stage_batch_size(k) * self.workers[1]

    def worker_batch(self, k: int, world_size: int) -> int:
        """Samples per worker per step with `world_size` workers. The elastic rule: the global batch is kept
        (split evenly) at every worker count that divides it, so lr, steps per epoch and the result do not depend
        on the count; at a count that does not divide it, each worker takes the nearest share and the lr follows
        the global batch it makes (lr_scale, the linear scaling rule)."""
        return max(1, round(self.global_batch(k) / world_size))

    def lr_scale(self, k: int, world_size: int) -> float:
        return world_size * self.worker_batch(k, world_size) / self.global_batch(k)

    def stage_save_freq(self, k: int) -> int:
        return self.stage(k).save_epoch_freq or self.train.save_epoch_freq

    def instance_output(self) -> str:
        if self.model.instance_feat:
            return "ids"
        return "none" if self.model.no_instance else "edges"

    def validate(self) -> None:
        """Cross-field checks (each field's type and range were checked when its section was built)."""
        check_name(self.name, "name")
        check_name(self.dataset, "dataset")
        for k in (1, 2, 3):
            s = self.stage(k)
            where = f"stage{k}"
            if s.epochs < 1:
                raise ConfigError(f"{where}: niter + niter_decay must be >= 1 (got {s.niter} + {s.niter_decay})")
            if s.niter_fix_global and k != 2:
                raise ConfigError(f"{where}.niter_fix_global: only stage 2 freezes the global generator")
            if s.niter_fix_global > s.epochs:
                raise ConfigError(f"stage2.niter_fix_global={s.niter_fix_global} exceeds stage 2's {s.epochs} epochs")
            try:
                self.stage_model(k)
                self.stage_geometry(k)
            except ValueError as e:
                raise ConfigError(f"{where}: {e}") from None
        if self.stage_model(2).num_D < self.stage_model(1).num_D:
            raise ConfigError("stage2.num_D must be >= stage1.num_D (stage 2 adds a discriminator scale)")
        if self.stage_model(3).num_D != self.stage_model(2).num_D:
            raise ConfigError("stage3.num_D must equal stage2.num_D (stage 3 continues stage 2's networks)")
        for name in SWEPT_RANGES:
            r = getattr(self.sweep, name)
            if r is not None and (len(r) != 2 or not 0 < r[0] <= r[1]):
                raise ConfigError(f"sweep.{name}={r}: give a range [low, high] with 0 < low <= high")
        _check_compile(self.train.compile)
        self._check_workers()

    def _check_workers(self) -> None:
        n = self.train.num_workers
        if isinstance(n, list) and (len(n) != 2 or n[0] > n[1]):
            raise ConfigError(
                f"train.num_workers={n}: give a worker count or [min, max] with 1 <= min <= max, e.g. [2, 8]"
            )
        if isinstance(n, list) and self.train.placement == "strict_spread":
            # Ray 2.60's elastic policy counts workers per node by resources alone: after losing a node it keeps
            # asking for a group strict_spread cannot place (a worker-group start timeout, again and again)
            raise ConfigError(
                f"train.placement=strict_spread with an elastic train.num_workers={n}: Ray's elastic scaling does not "
                f"follow strict_spread; use spread (with cpus_per_worker / gpus_per_worker that fill a node, one "
                f"worker per node is what fits)"
            )

    def uneven_worker_counts(self, k: int) -> list[int]:
        """Elastic worker counts that do not divide stage k's global batch (see worker_batch)."""
        low, high = self.workers
        return [w for w in range(low, high + 1) if self.global_batch(k) % w]


def _check_compile(value: str) -> None:

    if value in ("auto", "none", *COMPILE_MODES):
        return
    import torch._dynamo

    backends = torch._dynamo.list_backends(exclude_tags=())
    if value not in backends:
        raise ConfigError(
            f"train.compile={value!r} is not auto, none, a torch.compile mode ({', '.join(COMPILE_MODES)}) or a "
            f"backend ({', '.join(backends)})"
        )


# ---- building from YAML ---------------------------------------------------------------------------------


def _type_name(tp) -> str:
    return getattr(tp, "__name__", str(tp)).replace("NoneType", "null")


def _coerce(value: Any, tp, key: str) -> Any:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if errors else f"{key}: invalid value {value!r}")
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        (item,) = typing.get_args(tp)
        return [_coerce(v, item, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is typing.Literal:
        if value not in typing.get_args(tp):
            raise ConfigError(f"{key}: {value!r} is not one of {', '.join(map(str, typing.get_args(tp)))}")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads 1e-4 (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return value
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, key)
    raise ConfigError(f"{key}: unsupported type {_type_name(tp)}")


def _build(cls, raw: Any, prefix: str):
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{prefix or 'config'}: expected a mapping of keys, got {raw!r}")
    hints = typing.get_type_hints(cls)
    known = {f.name: f for f in fields(cls)}
    kwargs = {}
    for key, value in raw.items():
        path = f"{prefix}.{key}" if prefix else str(key)
        if key not in known:
            close = difflib.get_close_matches(str(key), sorted(known), n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else f" (known: {', '.join(sorted(known))})"
            raise ConfigError(f"unknown key '{path}'{hint}")
        kwargs[key] = _coerce(value, hints[key], path)
        limits = known[key].metadata.get("range")
        if limits is not None and kwargs[key] is not None:
            limits.check(kwargs[key], path)
    try:
        return cls(**kwargs)
    except ValueError as e:
        raise ConfigError(f"{prefix}: {e}" if prefix else str(e)) from None


def differing_keys(before: dict, now: dict, prefix: str = "") -> list[str]:
    """The dotted keys whose values differ between two nested dicts."""
    keys = []
    for k in sorted(set(before) | set(now)):
        a, b = before.get(k), now.get(k)
        if isinstance(a, dict) and isinstance(b, dict):
            keys += differing_keys(a, b, f"{prefix}{k}.")
        elif a != b:
            keys.append(prefix + k)
    return keys


# keys that say how a run is carried out, not what it trains: a resumed run may change them
OPERATIONAL_KEYS = tuple(
    f"train.{k}"
    for k in [
        "use_gpu",
        "cpus_per_worker",
        "gpus_per_worker",
        "placement",
        "preemption_check_steps",
        "resize_check_s",
        "worker_start_timeout_s",
        "check_resources",
        "when_busy",
        "busy_timeout_s",
        "ray_logs",
        "max_failures",
        "storage",
        "compile",
        "channels_last",
        "activation_checkpointing",
        "image_every",
        "log_every",
        "system_metrics_s",
        "save_epoch_freq",
        "checkpoint_every_steps",
    ]
) + ("sweep",)


def run_defining_differences(before: dict, now: dict) -> list[str]:
    """The keys of config `now` that differ from `before` in what the run trains (OPERATIONAL_KEYS aside, and keys
    `before` does not have: options added since it was written)."""

    def recorded(key: str) -> bool:
        node = before
        for part in key.split("."):
            if not isinstance(node, dict) or part not in node:
                return False
            node = node[part]
        return True

    return [
        k
        for k in differing_keys(before, now)
        if recorded(k) and not any(k == op or k.startswith(op + ".") for op in OPERATIONAL_KEYS)
    ]


def apply_override(raw: dict, assignment: str) -> None:
    """`section.key=value` (value parsed as YAML) into the raw mapping."""
    if "=" not in assignment:
        raise ConfigError(f"--set {assignment!r}: expected section.key=value, e.g. stage2.niter=5")
    path, text = assignment.split("=", 1)
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ConfigError(f"--set {assignment!r}: value is not valid YAML ({e})") from None
    node = raw
    parts = path.strip().split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"--set {assignment!r}: '{part}' is not a section")
    node[parts[-1]] = value


def _read_config(path: str | Path) -> str:
    """A config file's text from a local path or a storage URI (s3://, file://)."""
    text_path = str(path)
    if "://" in text_path:
        try:
            return storage.read_bytes(storage.resolve(text_path)).decode()
        except FileNotFoundError:
            raise ConfigError(f"config file {text_path} does not exist") from None
        except (storage.StorageError, UnicodeDecodeError) as e:
            raise ConfigError(f"config file {text_path} cannot be read: {e}") from None
    p = Path(path)
    try:
        return p.read_text()
    except FileNotFoundError:
        raise ConfigError(f"config file {p} does not exist (see configs/ for examples)") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"config file {p} cannot be read: {getattr(e, 'strerror', None) or e}") from None


def load_config(path: str | Path, overrides: list[str] | None = None) -> Config:
    """The config in a YAML file (a local path or a storage URI), with `section.key=value` overrides."""
    text = _read_config(path)
    try:
        raw = strict_yaml.load(text)
    except yaml.YAMLError as e:
        raise ConfigError(f"config file {path} is not valid YAML: {e}") from None
    if raw is None:
        raise ConfigError(
            f"config file {path} is empty: a recipe names at least its dataset and stages; start from one in configs/"
        )
    try:
        if not isinstance(raw, dict):
            raise ConfigError(f"expected a mapping of sections (model:, data:, train:, ...), got {raw!r:.80}")
        for assignment in overrides or []:
            apply_override(raw, assignment)
        cfg = _build(Config, raw, "")
        missing = [f"stage{k}" for k in (1, 2, 3) if f"stage{k}" not in raw]
        if missing:
            raise ConfigError(
                f"no {', '.join(missing)} section: each stage says how long it trains (e.g. "
                f"'{missing[0]}: {{niter: 10, niter_decay: 10}}'); a stage left out would train a default epoch"
            )
        cfg.validate()
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None
    return cfg


def from_dict(raw: dict) -> Config:
    cfg = _build(Config, raw, "")
    cfg.validate()
    return cfg


def pipeline_config(cfg: Config, k: int, world_size: int | None = None) -> PipelineConfig:
    """Stage k's data pipeline; with `world_size`, the batch is one worker's share of the global batch."""
    d = cfg.data
    return PipelineConfig(
        geometry=cfg.stage_geometry(k),
        instance_output=cfg.instance_output(),
        batch_size=cfg.worker_batch(k, world_size) if world_size else cfg.stage_batch_size(k),
        seed=cfg.train.seed,
        shuffle_buffer=d.shuffle_buffer,
        read_cpus=d.read_cpus,
        decode_cpus=d.decode_cpus,
        prefetch_batches=d.prefetch_batches,
        verify=d.verify,
    )


def available_val_split(cfg: Config, data_uri: str, log=print) -> str | None:
    """The configured validation split if the dataset has it (else images and val_L1 use training samples)."""
    if cfg.data.val_split:
        try:
            shards.load_manifest(data_uri, cfg.data.val_split)
            return cfg.data.val_split
        except shards.ManifestError:
            log(f"note: {data_uri} has no '{cfg.data.val_split}' split; images and val_L1 use training samples")
    return None
