"""Training checkpoints: one directory with `state.pt` and `meta.json`.

`state.pt` holds G, D, E, both optimizers, the trainable set, epoch (completed), global step, lr, RNG states
and the resolved config. `meta.json` is written last and carries state.pt's sha256: a directory without it, or
whose state.pt does not match it, is a partial checkpoint and is refused. Loading uses `weights_only=True`.
meta.json also names the networks' tensor shapes and the model options: whether a stage can start from a
checkpoint is known from it in the driver, without loading a tensor (`architecture_differences`).
"""

from __future__ import annotations

import json
import pickle
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from data import storage
from model.averaging import shipped
from model.networks import network_shapes, state_shapes
from model.options import ModelOptions
from model.step import TrainStep

STATE, META = "state.pt", "meta.json"


class CheckpointError(RuntimeError):
    pass


def rng_state() -> dict[str, Any]:
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {
            "keys": torch.from_numpy(keys.astype(np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached": float(cached),
        },
        "python": random.getstate(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached"]))
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save(
    directory: str | Path,
    step: TrainStep,
    *,
    stage: int,
    epoch: int,
    global_step: int,
    lr: float,
    config: dict,
    epoch_step: int = 0,
    world_size: int = 1,
) -> Path:
    """Write a checkpoint into `directory` (created): state.pt first, meta.json (with its sha256) last.

    `epoch` counts completed epochs; `epoch_step` the steps already done in the next one (a checkpoint taken
    mid-epoch: every N steps, or on a preemption notice); `world_size` the workers that trained it."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    state = step.state_dict()
    state.update(
        stage=stage,
        epoch=epoch,
        epoch_step=epoch_step,
        global_step=global_step,
        lr=lr,
        rng=rng_state(),
        world_size=world_size,
        config=json.loads(json.dumps(config)),  # the dict run.json holds too (JSON types: lists, not tuples)
    )
    meta = {
        "stage": stage,
        "epoch": epoch,
        "epoch_step": epoch_step,
        "global_step": global_step,
        "model": config.get("model"),
        "shapes": {net: state_shapes(state[net]) for net in ("G", "D", "E") if net in state},
    }
    tmp = d / (META + ".tmp")
    try:
        _write_state(state, d / STATE)
        meta |= {"sha256": storage.sha256(storage.resolve(d / STATE)), "world_size": world_size}
        tmp.write_text(json.dumps(meta))
        tmp.replace(d / META)
    except OSError as e:  # a full or read-only disk: nothing half-written stays, and it is not a fault to retry
        for partial in (d / STATE, tmp, d / META):
            partial.unlink(missing_ok=True)
        raise CheckpointError(f"cannot write checkpoint {d}: {e.strerror or e}") from None
    return d


class _WriteErrors:
    """A file for torch.save that keeps the OSError of a failed write: torch reports a full disk as a RuntimeError
    of its zip writer ("unexpected pos ...") that names no cause."""

    def __init__(self, f):
        self.f, self.error = f, None

    def write(self, data) -> int:
        try:
            return self.f.write(data)
        except OSError as e:
            self.error = e
            raise

    def flush(self) -> None:
        self.f.flush()


def _write_state(state: dict[str, Any], path: Path) -> None:
    with open(path, "wb") as f:
        out = _WriteErrors(f)
        try:
            torch.save(state, out)
        except RuntimeError:
            if out.error is None:
                raise
            raise out.error from None


def load(directory: str | Path, stored: str | None = None) -> dict[str, Any]:
    """A local checkpoint directory's state, once `verify` accepts it. `stored`: where the directory was copied
    from, the name errors give (a temporary copy's path means nothing to a user). A file that does not load as
    tensors is a CheckpointError; it is never retried with weights_only=False (that would run code stored in it)."""
    name = stored or str(directory)
    try:
        verify(str(directory))
    except CheckpointError as e:
        raise CheckpointError(str(e).replace(str(directory), name)) from None
    try:
        return torch.load(Path(directory) / STATE, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - torch raises UnpicklingError, RuntimeError, EOFError, ...
        why = (  # not PyTorch's text: it advises loading with weights_only=False
            "it holds objects other than tensors"
            if isinstance(e, pickle.UnpicklingError)
            else f"{type(e).__name__}: {str(e).strip().splitlines()[0][:160] if str(e).strip() else ''}"
        )
        raise CheckpointError(
            f"{name}/{STATE} does not load as tensors ({why}): a damaged checkpoint or one "
            f"not written by this project; it is not loaded with weights_only=False, which would run code stored "
            f"in it"
        ) from None


def stored_config(state: dict[str, Any]) -> dict:
    """The config a checkpoint was trained with, as run.json holds it (checkpoints before 2026-12-07 stored it as a
    JSON string)."""
    config = state["config"]
    return json.loads(config) if isinstance(config, str) else config


def restore(step: TrainStep, state: dict[str, Any]) -> None:
    """Resume within a stage: networks, optimizers, trainable set and RNG as they were."""
    step.load_state_dict(state)
    set_rng_state(state["rng"])


def shift_discriminator_scales(d_state: dict[str, torch.Tensor], shift: int) -> dict[str, torch.Tensor]:
    """Stage 1's D_k sees the half-resolution image pooled k times, which stage 2's D_{k+shift} sees at full
    resolution: rename `scales.k.` -> `scales.{k+shift}.`."""
    out = {}
    for name, t in d_state.items():
        _, k, rest = name.split(".", 2)
        out[f"scales.{int(k) + shift}.{rest}"] = t
    return out


def verify(uri: str) -> dict[str, Any]:
    """Check a checkpoint directory in any storage without loading it: meta.json present, state.pt's sha256 as
    meta.json says. Returns meta.json; raises CheckpointError naming the directory and what is wrong."""
    loc = storage.resolve(uri)
    try:
        meta = json.loads(storage.read_bytes(loc.join(META)))
    except FileNotFoundError:
        raise CheckpointError(f"{uri} has no {META}: a partly written checkpoint (or none), refused") from None
    except ValueError:
        raise CheckpointError(f"{uri}/{META} is not valid JSON: a damaged checkpoint") from None
    if storage.size(loc.join(STATE)) is None:
        raise CheckpointError(f"{uri}/{STATE} is missing: a partial checkpoint")
    if storage.sha256(loc.join(STATE)) != meta.get("sha256"):
        raise CheckpointError(f"{uri}/{STATE} does not match the sha256 in {META}: a damaged checkpoint")
    return meta


def architecture_differences(meta: dict, stage: int, previous: ModelOptions, current: ModelOptions) -> list[str]:
    """Why stage `stage` (networks of `current`) cannot start from the checkpoint whose meta.json is `meta`, a
    checkpoint of stage `stage - 1` (networks of `previous`), as `init_from_previous_stage` loads it: stage 2 takes
    G1 whole, D's scales shifted by name (extra or missing scales are fine) and E; stage 3 takes everything. Empty
    when the shapes agree, or when meta.json predates recorded shapes (the worker finds those)."""
    stored = meta.get("shapes")
    if not stored:
        return []
    want = network_shapes(current)
    if stage == 2:
        stored_d = shift_discriminator_scales(stored["D"], current.num_D - _scales(stored["D"]))
        pairs = [("G", stored["G"], network_shapes(previous)["G"], True), ("D", stored_d, want["D"], False)]
    else:
        pairs = [(net, stored.get(net, {}), want[net], True) for net in ("G", "D")]
    if "E" in want:
        pairs.append(("E", stored.get("E", {}), want["E"], stage == 3 or "E" in stored))
    out = []
    for net, have, need, strict in pairs:
        for name in sorted(set(have) | set(need)):
            a, b = have.get(name), need.get(name)
            if a is not None and b is not None and a != b:
                out.append(f"{net}.{name} is {tuple(a)} in the checkpoint, {tuple(b)} in this config")
            elif strict and a is None:
                out.append(f"{net}.{name} is not in the checkpoint")
            elif strict and b is None:
                out.append(f"{net}.{name} is not in this config's network")
    return out


def _scales(d_shapes: dict) -> int:
    return sum(1 for name in d_shapes if name.endswith("layers.0.0.weight"))


def stored_sha256(uri: str) -> str | None:
    """state.pt's sha256 as the checkpoint's meta.json records it (what run.json and the registry name a checkpoint
    by; `verify` checks the file against it)."""
    try:
        return json.loads(storage.read_bytes(storage.resolve(uri).join(META))).get("sha256")
    except (FileNotFoundError, ValueError):
        return None


def verified_alternative(uri: str) -> tuple[str, dict] | None:
    """Another checkpoint of the same stage folder that verifies (Ray Train keeps the latest two), newest first,
    with its meta.json; None if there is none."""
    loc = storage.resolve(uri)
    parent = storage.Location(loc.fs, str(Path(loc.path).parent), loc.uri.rstrip("/").rsplit("/", 1)[0])
    for name in sorted(storage.list_dirs(parent), reverse=True):
        other = parent.join(name)
        if not name.startswith("checkpoint_") or other.uri.rstrip("/") == loc.uri.rstrip("/"):
            continue
        try:
            return other.uri, verify(other.uri)
        except CheckpointError:
            continue
    return None


def fetch(uri: str, into: str | Path) -> dict[str, Any]:
    """Load a checkpoint directory from any storage URI (S3 files are copied into the local folder `into`)."""
    loc = storage.resolve(uri)
    if not loc.is_s3:
        return load(loc.path)
    into = Path(into)
    into.mkdir(parents=True, exist_ok=True)
    for name in (STATE, META):
        (into / name).write_bytes(storage.read_bytes(loc.join(name)))
    return load(into)


def init_from_previous_stage(step: TrainStep, state: dict[str, Any], stage: int) -> str:
    """Start stage 2 from stage 1 (G1 into the enhancer's global part, D scales shifted, fresh optimizers) or
    stage 3 from stage 2 (everything, optimizers and averages included). With generator averaging, stage 2 starts
    from stage 1's averaged G1 and E (what stage 1 ships) and averages afresh from there. Returns a one-line
    report."""
    if stage == 2:
        report = step.load_stage1_generator(shipped(state, "G"))
        shift = step.opt.num_D - _scales(state["D"])
        missing, _ = step.D.load_state_dict(shift_discriminator_scales(state["D"], shift), strict=False)
        if step.E is not None and "E" in state:
            step.E.load_state_dict(shipped(state, "E"))
        step.restart_averages()
        averaged = " (stage 1's averages)" if "G_ema" in state else ""
        return (
            f"stage 1 -> 2: loaded {len(report['loaded'])} G1 tensors{averaged} into the global generator, "
            f"{len(report['initialised'])} enhancer parameters new; D scales 0..{shift - 1} new "
            f"({len(missing)} tensors), the rest from stage 1"
        )
    step.load_state_dict(state)
    nets = f"G, D{', E' if step.E is not None else ''} and both optimizers"
    if step.G_avg is not None and "G_ema" not in state:
        nets += "; the generator's average starts here (stage 2 kept none)"
    elif step.G_avg is not None:
        nets += f", the generator's average ({step.G_avg.updates} updates)"
    return f"stage {stage - 1} -> {stage}: loaded {nets}"
