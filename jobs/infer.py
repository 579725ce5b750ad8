"""Render images from label maps with a registered generator.

    python -m jobs.infer --model models:/pix2pixhd-<dataset>@champion --labels DIR|URI [--instances DIR|URI]
        --out DIR [--device cpu|cuda] [--tracking-uri URI]

Label maps: single-channel PNGs of class ids (e.g. *_gtFine_labelIds.png), any size the network accepts
(a multiple of 2^(downsamplings)); instance maps pair with them by stem. Writes <stem>_synthesized.png.
"""

from __future__ import annotations

import argparse
import io
import sys
from pathlib import Path

import numpy as np
import pyarrow.fs as pafs
import torch
from PIL import Image

from data import storage
from data.layouts import IMAGE_EXTS, stem_of
from orchestration.registry import load_generator
from orchestration.tracking import resolve_tracking_uri
from orchestration.visuals import to_uint8


def list_maps(uri: str) -> dict[str, storage.Location]:
    loc = storage.resolve(uri)
    storage.check_reachable(loc)
    try:
        infos = loc.fs.get_file_info(pafs.FileSelector(loc.path, recursive=False))
    except FileNotFoundError:
        raise FileNotFoundError(f"{uri} does not exist") from None
    files = sorted(i.path for i in infos if i.type == pafs.FileType.File and i.path.lower().endswith(IMAGE_EXTS))
    if not files:
        raise FileNotFoundError(f"{uri} holds no PNG/JPEG label maps")
    return {stem_of(Path(f)): storage.Location(loc.fs, f, loc.join(Path(f).name).uri) for f in files}


def read_ids(loc: storage.Location) -> np.ndarray:
    img = Image.open(io.BytesIO(storage.read_bytes(loc)))
    if img.mode not in ("L", "P", "I", "I;16"):
        raise ValueError(f"{loc}: expected a single-channel id map, got a {img.mode} image")
    return np.asarray(img).astype(np.int64)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m jobs.infer", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="e.g. models:/pix2pixhd-cityscapes@champion")
    p.add_argument("--labels", required=True, help="folder or URI of label maps")
    p.add_argument("--instances", help="folder or URI of instance maps (paired by stem)")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--tracking-uri", help="MLflow server (default: MLFLOW_TRACKING_URI, else the local store)")
    a = p.parse_args(argv)
    try:
        labels = list_maps(a.labels)
        instances = list_maps(a.instances) if a.instances else {}
        missing = sorted(set(labels) - set(instances)) if instances else []
        if missing:
            raise FileNotFoundError(f"{labels[missing[0]]} has no instance map in {a.instances} (stem '{missing[0]}')")
        G = load_generator(a.model, resolve_tracking_uri(a.tracking_uri)).to(a.device)
        out = Path(a.out)
        out.mkdir(parents=True, exist_ok=True)
        for stem, loc in labels.items():
            label = read_ids(loc)
            inst = read_ids(instances[stem]) if stem in instances else label
            x = torch.from_numpy(np.stack([label, inst])[None])
            try:
                image = G(x)[0]
            except ValueError as e:
                raise ValueError(f"{loc}: {e}") from None
            Image.fromarray(to_uint8(image)).save(out / f"{stem}_synthesized.png")
            print(f"{loc} -> {out / f'{stem}_synthesized.png'} ({label.shape[1]}x{label.shape[0]})")
    except (FileNotFoundError, ValueError, storage.StorageError) as e:
        print(f"infer: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
