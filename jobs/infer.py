"""Render images from label maps with a registered generator.

    python -m jobs.infer --model models:/pix2pixhd-<dataset>@champion --labels DIR|URI [--instances DIR|URI]
        --out DIR [--device cpu|cuda] [--tracking-uri URI] [--styles JSON] [--seed N]
        [--style-photo PHOTO --style-instances INSTANCES]

Label maps: single-channel PNGs of class ids (e.g. *_gtFine_labelIds.png), any size the network accepts
(a multiple of 2^(downsamplings)); instance maps pair with them by stem. Writes <stem>_synthesized.png, and for
a generator with instance features a style sheet per class (styles_<id>_<name>.png: the first map rendered with
each of the class's styles) so one sees what style k looks like before choosing it with --styles.
Everything is checked before the first image is written: the output folder, every label / instance pair (mode,
size, ids), then the model (one line when it or its server cannot be found) and the sizes it accepts.
--style-photo / --style-instances: the paper's styles from a real photo (the reference's use_encoded_image): each
instance of a map takes the feature the encoder computes for the same instance id in the photo; ids the photo does
not have keep the seed's draw (the output says which); --styles still wins for the ids it names.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from data import storage
from data.labels import label_set_of
from data.layouts import list_maps
from jobs import cli
from model.styles import instance_class
from orchestration.records.registry import load_generator
from orchestration.records.tracking import resolve_tracking_uri
from orchestration.run.stopping import finish
from orchestration.run.visuals import grid, rgb_array, save_png, titled
from serving.maps import MapError, decode_ids, decode_photo
from serving.pyfunc import parse_styles


def read_ids(loc: storage.Location) -> np.ndarray:
    try:
        return decode_ids(storage.read_bytes(loc), str(loc))
    except MapError as e:
        raise ValueError(str(e)) from None


def check_out(out: Path) -> None:
    """The output folder exists or can be created, and a file can be written in it."""
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is a file: give a folder to write the images into")
    try:
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=out):
            pass
    except OSError as e:
        raise ValueError(f"--out {out}: cannot write there ({e.strerror or e})") from None


def check_pairs(labels: dict[str, storage.Location], instances: dict[str, storage.Location]) -> dict[str, tuple]:
    """Every label map (and its instance map) decodes as a single-channel id map of one size; returns
    {stem: (height, width, largest label id)}."""
    sizes = {}
    for stem, loc in labels.items():
        label = read_ids(loc)
        if stem in instances:
            inst = read_ids(instances[stem])
            if inst.shape != label.shape:
                raise ValueError(
                    f"{instances[stem]} is {inst.shape[1]}x{inst.shape[0]} but its label map {loc} is "
                    f"{label.shape[1]}x{label.shape[0]}: a label map and its instance map must have one size"
                )
        sizes[stem] = (*label.shape, int(label.max(initial=0)))
    return sizes


def check_model_accepts(G, sizes: dict[str, tuple], labels: dict[str, storage.Location]) -> None:
    opt = G.opt
    for stem, (h, w, top) in sizes.items():
        fit = opt.fit_size(h, w)
        if fit:
            raise ValueError(
                f"{labels[stem]} is {w}x{h}; this generator needs multiples of {opt.size_multiple}, at least "
                f"{opt.min_size} (e.g. {fit[1]}x{fit[0]})"
            )
        if opt.label_nc and top >= opt.label_nc:
            raise ValueError(f"{labels[stem]} holds label id {top}; this generator knows ids 0..{opt.label_nc - 1}")


def write_style_sheets(G, x: torch.Tensor, out: Path) -> list[Path]:
    """For each class with style clusters that has instances in `x` (1, 2, H, W): the map rendered once per
    style, every instance of that class in that style (the others in their largest cluster's), side by side."""

    labels = label_set_of(G.opt.label_nc)
    names = labels.names if labels else None
    written = []
    ids = x[0, 1].unique().tolist()
    for c in sorted({instance_class(i) for i in ids}):
        n = int(G.cluster_counts[c]) if c < len(G.cluster_counts) else 0
        if n == 0:
            continue
        mine = [i for i in ids if instance_class(i) == c]
        tiles = [rgb_array(G.render(x, {i: k for i in mine}, mode="largest")[0]) for k in range(n)]
        name = names[c] if names else f"class {c}"
        sheet = titled(grid([tiles]), [f"{name}: style {k}" for k in range(n)], x.shape[-1])
        written.append(save_png(sheet, out / f"styles_{c:03d}_{name.replace(' ', '-')}.png"))
    return written


def read_style_photo(photo: str, instances: str) -> tuple[torch.Tensor, torch.Tensor]:
    """--style-photo and --style-instances as (1, 3, H, W) in [-1, 1] and (1, H, W) ids."""
    try:
        image = decode_photo(storage.read_bytes(storage.resolve(photo)), photo)
    except MapError as e:
        raise ValueError(str(e)) from None
    return torch.from_numpy(image)[None], torch.from_numpy(read_ids(storage.resolve(instances)))[None]


def main(argv: list[str] | None = None) -> int:
    p = cli.parser("infer", __doc__)
    p.add_argument("--model", required=True, help="e.g. models:/pix2pixhd-cityscapes@champion")
    p.add_argument("--labels", required=True, help="folder or URI of label maps")
    p.add_argument("--instances", help="folder or URI of instance maps (paired by stem)")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    cli.add_tracking(p)
    p.add_argument(
        "--styles",
        default="",
        help="instance features: JSON instance id -> cluster index or feature vector, e.g. '{\"26002\": 3}'",
    )
    p.add_argument("--seed", type=int, default=0, help="instance features: the seed of each instance's random style")
    p.add_argument(
        "--style-mode",
        choices=("random", "largest"),
        help="instance features: the style of instances not in --styles (default: the model's style_mode)",
    )
    p.add_argument("--style-photo", help="instance features: a photo whose instances lend their styles")
    p.add_argument("--style-instances", help="the instance map of --style-photo (ids as in the maps)")
    a = p.parse_args(argv)
    if bool(a.style_photo) != bool(a.style_instances):
        p.error("--style-photo and --style-instances go together: a photo and its instance map")

    def body() -> None:
        out = Path(a.out)
        check_out(out)
        labels = list_maps(a.labels)
        instances = list_maps(a.instances) if a.instances else {}
        missing = sorted(set(labels) - set(instances)) if instances else []
        if missing:
            raise FileNotFoundError(f"{labels[missing[0]]} has no instance map in {a.instances} (stem '{missing[0]}')")
        styles = parse_styles(a.styles)
        sizes = check_pairs(labels, instances)
        G = load_generator(a.model, resolve_tracking_uri(a.tracking_uri, ray_job=False)).to(a.device)
        check_model_accepts(G, sizes, labels)
        photo = read_style_photo(a.style_photo, a.style_instances) if a.style_photo else None
        for n, (stem, loc) in enumerate(labels.items()):
            label = read_ids(loc)
            inst = read_ids(instances[stem]) if stem in instances else label
            x = torch.from_numpy(np.stack([label, inst])[None])
            chosen = styles
            if photo is not None:
                taken = G.photo_styles(*photo, x)
                chosen = {**taken.styles, **styles}
                print(f"{loc}: {taken.said()} ({a.style_photo})")
            image = G.render(x, chosen, a.seed, a.style_mode)[0]
            Image.fromarray(rgb_array(image)).save(out / f"{stem}_synthesized.png")
            print(f"{loc} -> {out / f'{stem}_synthesized.png'} ({label.shape[1]}x{label.shape[0]})")
            if n == 0 and G.opt.instance_feat:
                sheets = write_style_sheets(G, x, out)
                print(f"style sheets (each class's styles on {stem}): {', '.join(p.name for p in sheets)}")

    return cli.run("infer", body, also=(FileNotFoundError, ValueError))


if __name__ == "__main__":
    finish(main())
