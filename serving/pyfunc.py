"""The registered generator as an MLflow pyfunc without pickle (what `mlflow models serve -m models:/...` runs).

A model version holds `generator/data/`: `weights.pt` (state dicts and the feature clusters: tensors only, read
with `torch.load(weights_only=True)`, which refuses any other object) and `options.json` (the pix2pixHD options).
MLflow calls this module's `_load_pyfunc(path)` (the version's `loader_module`); the networks are built by
`model/` from the options. No object is unpickled.

Request (MLflow's scoring protocol): `{"inputs": [[label ids (H x W)], [instance ids (H x W)]]], "params": {...}}`
— one int tensor (B, 2, H, W), H and W any multiples of the generator's `size_multiple` (2^downsamplings), at least twice it —
answered with `{"predictions": ...}`, the images (B, 3, H, W) in [-1, 1]. Optional params, for generators with
instance features: `seed` (the random style of each instance), `style_mode` ("random" or "largest"), `styles`
(a JSON object: instance id -> cluster index of its class, or a feature vector), `style_photo` and
`style_instances` (base64 PNG/JPEG of a photo and base64 PNG of its instance map: each instance takes the style E
computes for the same id in the photo; `styles` still wins for the ids it names). A wrong shape, dtype, size,
label id or style is HTTP 400 with a message that names it.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

from model.bundle import PhotoStyles, Pix2PixHDGenerator
from model.networks import build_encoder, build_generator
from model.options import ModelOptions
from serving.maps import decode_ids, decode_photo

WEIGHTS, OPTIONS, DIGESTS = "weights.pt", "options.json", "sha256.json"


class ArtifactMismatch(ValueError):
    """A served file is not the file that was registered."""


def file_digests(folder: Path) -> dict[str, str]:
    """sha256 of the files a version serves, by name."""
    return {name: hashlib.sha256((folder / name).read_bytes()).hexdigest() for name in (WEIGHTS, OPTIONS)}


def verify(folder: Path, expected: dict[str, str] | None = None) -> None:
    """The files match the digests written beside them at registration (sha256.json) and, given, those the
    registry recorded (its version tags: kept apart from the artifact store); else ArtifactMismatch naming the file."""
    recorded = json.loads((folder / DIGESTS).read_text()) if (folder / DIGESTS).exists() else None
    got = file_digests(folder)
    for where, wanted in (("sha256.json beside it", recorded), ("the registry's version tags", expected)):
        for name, digest in (wanted or {}).items():
            if got.get(name) != digest:
                raise ArtifactMismatch(
                    f"{name} (sha256 {got.get(name, 'missing')[:12]}) is not the file registered (sha256 {digest[:12]} "
                    f"in {where}): it was changed after registration. Register the run's checkpoint again "
                    f"(python -m jobs.register --run RUN_ID) rather than serve it"
                )


def save(bundle: Pix2PixHDGenerator, folder: Path) -> Path:
    """The generator as files: tensors and JSON only."""
    folder.mkdir(parents=True, exist_ok=True)
    state = {
        "G": bundle.G.state_dict(),
        "clusters": bundle.clusters.detach().cpu(),
        "cluster_counts": bundle.cluster_counts.detach().cpu(),
    }
    if bundle.E is not None:
        state["E"] = bundle.E.state_dict()
    torch.save(state, folder / WEIGHTS)
    (folder / OPTIONS).write_text(json.dumps(bundle.options, indent=1, sort_keys=True))
    (folder / DIGESTS).write_text(json.dumps(file_digests(folder), indent=1))
    return folder


def load(folder: str | Path, expected: dict[str, str] | None = None) -> Pix2PixHDGenerator:
    """The generator of a version's files, verified (see verify) before anything is read from them."""
    folder = Path(folder)
    verify(folder, expected)
    options = json.loads((folder / OPTIONS).read_text())
    opt = ModelOptions(**options)
    state = torch.load(folder / WEIGHTS, map_location="cpu", weights_only=True)
    G = build_generator(opt)
    G.load_state_dict(state["G"])
    E = None
    if opt.instance_feat:
        E = build_encoder(opt)
        E.load_state_dict(state["E"])
    if E is None:
        return Pix2PixHDGenerator(asdict(opt), G.eval())
    return Pix2PixHDGenerator(asdict(opt), G.eval(), E, state["clusters"], state["cluster_counts"])


def check_request(x: np.ndarray, opt: ModelOptions) -> None:
    """A request's maps as the generator needs them, else ValueError naming what is wrong and what fits."""
    if x.ndim != 4 or x.shape[1] != 2:
        raise ValueError(
            f"inputs have shape {tuple(x.shape)}; expected (batch, 2, height, width): label ids, then instance ids"
        )
    if not np.issubdtype(x.dtype, np.integer):
        raise ValueError(f"inputs are {x.dtype}; label and instance maps are integer ids")
    h, w = x.shape[2:]
    fit = opt.fit_size(h, w)
    if fit:
        raise ValueError(
            f"the maps are {h}x{w} (height x width); this generator needs multiples of {opt.size_multiple}, at least "
            f"{opt.min_size} (e.g. {fit[0]}x{fit[1]})"
        )
    labels = x[:, 0]
    if labels.min() < 0 or labels.max() >= opt.label_nc:
        bad = sorted({int(v) for v in np.unique(labels) if v < 0 or v >= opt.label_nc})[:8]
        raise ValueError(f"label ids {bad} are outside 0..{opt.label_nc - 1}, the ids this generator knows")


class GeneratorModel:
    """What MLflow's pyfunc wraps: predict(int array (B, 2, H, W)) -> float32 images (B, 3, H, W)."""

    def __init__(self, bundle: Pix2PixHDGenerator):
        self.bundle = bundle.eval()

    def predict(self, model_input, params: dict | None = None) -> np.ndarray:
        params = params or {}
        x = np.asarray(model_input)
        try:
            check_request(x, self.bundle.opt)
            styles = parse_styles(params.get("styles") or "")
            mode = params.get("style_mode") or None
            maps = torch.from_numpy(x.astype(np.int64))
            if params.get("style_photo") or params.get("style_instances"):
                styles = {**self.photo_styles(params, maps).styles, **styles}
            with torch.no_grad():
                out = self.bundle.render(maps, styles, int(params.get("seed", 0)), mode)
        except ValueError as e:
            from mlflow.exceptions import MlflowException

            raise MlflowException.invalid_parameter_value(str(e)) from None
        return out.float().numpy()

    def photo_styles(self, params: dict, maps: torch.Tensor) -> PhotoStyles:
        if not (params.get("style_photo") and params.get("style_instances")):
            raise ValueError("style_photo and style_instances go together: a photo and its instance map")
        photo = decode_photo(_base64(params["style_photo"], "style_photo"), "style_photo")
        inst = decode_ids(_base64(params["style_instances"], "style_instances"), "style_instances")
        return self.bundle.photo_styles(torch.from_numpy(photo)[None], torch.from_numpy(inst)[None], maps)


def _base64(text: str, what: str) -> bytes:
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise ValueError(f"{what} is not base64 (a PNG or JPEG file, base64-encoded)") from None


def parse_styles(text: str) -> dict[int, int | list[float]]:
    """`{"26002": 3, "26005": [0.1, -0.4, 0.2]}` (JSON: instance id -> cluster index or feature vector)."""
    if not text:
        return {}
    try:
        raw = json.loads(text)
        if not isinstance(raw, dict):
            raise ValueError("not an object")
        return {int(k): v for k, v in raw.items()}
    except (ValueError, RecursionError) as e:  # the message names a position at most, never the text
        why = "nested too deep" if isinstance(e, RecursionError) else str(e)
        raise ValueError(
            f"the styles parameter: {why}; it is a JSON object of instance id -> cluster index or feature vector"
        ) from None


def _load_pyfunc(path: str) -> GeneratorModel:
    """MLflow's loader_module entry point: `path` is the version's data folder."""
    return GeneratorModel(load(path))
