"""Write procedural datasets to disk in the real datasets' layouts (flat, cityscapes, celebamask).

python -m data.synthetic.write --kind city --layout flat --out /tmp/city --count 200 --height 256 --width 512
python -m data.synthetic.write --kind faces --out /tmp/faces --count 100 --size 256
"""

from __future__ import annotations

import argparse
import os
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

from PIL import Image

from data.synthetic.city import street_scene
from data.synthetic.faces import face

CITY_NAMES = ("synthtown", "procville", "rendham")  # three "cities" for the cityscapes layout


def _city_stem(i: int) -> str:
    return f"{CITY_NAMES[i % len(CITY_NAMES)]}_{i:06d}_000019"


def _write_city_sample(out: str, layout: str, split: str, i: int, height: int, width: int, seed: int) -> None:
    s = street_scene(height, width, seed + i)
    stem = _city_stem(i)
    root = Path(out)
    if layout == "flat":
        dirs = {k: root / f"{split}_{k}" for k in ("label", "inst", "img")}
    else:
        city = stem.split("_")[0]
        gt = root / "gtFine" / split / city
        dirs = {"label": gt, "inst": gt, "img": root / "leftImg8bit" / split / city}
    for d in dirs.values():
        d.mkdir(parents=True, exist_ok=True)
    Image.fromarray(s.label, mode="L").save(dirs["label"] / f"{stem}_gtFine_labelIds.png")
    Image.fromarray(s.inst).save(dirs["inst"] / f"{stem}_gtFine_instanceIds.png")
    Image.fromarray(s.image).save(dirs["img"] / f"{stem}_leftImg8bit.png")


def _write_face_sample(out: str, i: int, size: int, seed: int) -> None:
    f = face(size, seed + i)
    root = Path(out)
    img_dir, mask_dir = root / "CelebA-HQ-img", root / "CelebAMask-HQ-mask-anno" / str(i // 2000)
    img_dir.mkdir(parents=True, exist_ok=True)
    mask_dir.mkdir(parents=True, exist_ok=True)
    Image.fromarray(f.image).save(img_dir / f"{i}.jpg", quality=92)
    for part, m in f.masks.items():
        Image.fromarray(m.astype("uint8") * 255, mode="L").save(mask_dir / f"{i:05d}_{part}.png")


def write_city(
    out,
    count: int,
    height: int,
    width: int,
    layout: str = "flat",
    split: str = "train",
    seed: int = 0,
    start: int = 0,
    workers: int | None = None,
) -> Path:
    if layout not in ("flat", "cityscapes"):
        raise ValueError(f"street scenes are written in the flat or cityscapes layout, not '{layout}'")
    idx = list(range(start, start + count))
    _parallel(
        workers,
        _write_city_sample,
        [str(out)] * count,
        [layout] * count,
        [split] * count,
        idx,
        [height] * count,
        [width] * count,
        [seed] * count,
    )
    return Path(out)


def write_faces(out, count: int, size: int, seed: int = 0, workers: int | None = None) -> Path:
    _parallel(workers, _write_face_sample, [str(out)] * count, list(range(count)), [size] * count, [seed] * count)
    return Path(out)


def _parallel(workers, fn, *args) -> None:
    workers = workers or os.cpu_count() or 1
    if workers == 1:
        list(map(fn, *args))
        return
    with ProcessPoolExecutor(workers) as pool:
        list(pool.map(fn, *args, chunksize=8))


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m data.synthetic.write", description=__doc__.split("\n\n")[0])
    p.add_argument("--kind", choices=["city", "faces"], required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--count", type=int, default=100)
    p.add_argument("--layout", choices=["flat", "cityscapes"], default="flat", help="city only")
    p.add_argument("--split", default="train", help="city only")
    p.add_argument("--height", type=int, default=256, help="city only")
    p.add_argument("--width", type=int, default=512, help="city only")
    p.add_argument("--size", type=int, default=256, help="faces only: image side (masks are half of it)")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    if a.kind == "city":
        write_city(a.out, a.count, a.height, a.width, a.layout, a.split, a.seed)
    else:
        write_faces(a.out, a.count, a.size, a.seed)
    print(f"wrote {a.count} {a.kind} samples to {a.out}")


if __name__ == "__main__":
    main()
