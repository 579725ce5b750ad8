"""Dataset layouts on disk: find every sample's files, pair them by stem, load them as arrays and bytes.

- flat (pix2pixHD's): {split}_label/, {split}_inst/ (optional), {split}_img/
- cityscapes (official release): gtFine/{split}/{city}/*_gtFine_labelIds.png, *_gtFine_instanceIds.png,
  leftImg8bit/{split}/{city}/*_leftImg8bit.png
- celebamask (CelebAMask-HQ): CelebA-HQ-img/{i}.jpg, CelebAMask-HQ-mask-anno/{i // 2000}/{i:05d}_{part}.png,
  the 19 part masks painted into one label map in a fixed order (later parts overwrite earlier)

Files are paired by their common stem (e.g. `aachen_000000_000019`), never by sorted position.
"""

from __future__ import annotations

import io
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow.fs as pafs
from PIL import Image

from data import storage
from data.labels import CELEBAMASK_PARTS, CITYSCAPES, FACES, LabelSet

LAYOUTS = ("flat", "cityscapes", "celebamask")
IMAGE_EXTS = (".png", ".jpg", ".jpeg")
# Suffixes that name a file's role, stripped to get the common stem.
_ROLE_SUFFIXES = ("_gtFine_labelIds", "_gtFine_instanceIds", "_leftImg8bit", "_labelIds", "_instanceIds")


class LayoutError(ValueError):
    """The dataset on disk does not match its layout; the message names the file or folder."""


class BadSample(ValueError):
    """One sample is unusable; `path` is the offending file."""

    def __init__(self, path: str | Path, problem: str):
        super().__init__(f"{path}: {problem}")
        self.path = str(path)
        self.problem = problem


@dataclass
class SampleFiles:
    stem: str
    image: Path
    label: Path | None = None  # flat / cityscapes
    inst: Path | None = None
    masks: dict[str, Path] = field(default_factory=dict)  # celebamask: part name -> mask file


@dataclass
class LoadedSample:
    """Decoded label / instance maps and the image's original bytes (stored as they are: pixel-exact)."""

    stem: str
    label: np.ndarray  # (H, W) uint8
    inst: np.ndarray | None  # (H, W) int32
    image_bytes: bytes
    image_size: tuple[int, int]  # (H, W)
    files: SampleFiles


def label_set(layout: str) -> LabelSet:
    return FACES if layout == "celebamask" else CITYSCAPES


def stem_of(path: Path) -> str:
    name = path.name
    for ext in IMAGE_EXTS:
        if name.lower().endswith(ext):
            name = name[: -len(ext)]
            break
    for suffix in _ROLE_SUFFIXES:
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


def _index_by_stem(files: list[Path]) -> dict[str, Path]:
    out: dict[str, Path] = {}
    for f in files:
        s = stem_of(f)
        if s in out:
            raise LayoutError(f"{f} and {out[s]} share the stem '{s}': one sample, two files")
        out[s] = f
    return out


def _images_in(folder: Path, pattern: str = "*") -> list[Path]:
    return sorted(p for p in folder.glob(pattern) if p.is_file() and p.suffix.lower() in IMAGE_EXTS)


def _pair(parts: dict[str, dict[str, Path]], required: tuple[str, ...]) -> list[SampleFiles]:
    stems = sorted(set().union(*(set(d) for d in parts.values())))
    samples = []
    for s in stems:
        present = {role: parts[role].get(s) for role in parts}
        missing = [role for role in required if present.get(role) is None]
        if missing:
            have = next(p for p in present.values() if p is not None)
            raise LayoutError(f"{have} has no matching {' / '.join(missing)} file (stem '{s}'): unpaired file")
        samples.append(SampleFiles(stem=s, image=present["image"], label=present["label"], inst=present.get("inst")))
    return samples


def discover(layout: str, source: str | Path, split: str = "train") -> list[SampleFiles]:
    """List the samples of one split, paired by stem. Raises LayoutError naming what is wrong."""
    if layout not in LAYOUTS:
        raise LayoutError(f"unknown layout '{layout}': use one of {', '.join(LAYOUTS)}")
    root = Path(source)
    if not root.is_dir():
        raise LayoutError(f"source folder {root} does not exist")
    if layout == "flat":
        dirs = {"label": root / f"{split}_label", "inst": root / f"{split}_inst", "image": root / f"{split}_img"}
        for role in ("label", "image"):
            if not dirs[role].is_dir():
                raise LayoutError(f"flat layout needs {dirs[role]} (and {split}_inst/ for instance maps)")
        parts = {role: _index_by_stem(_images_in(d)) for role, d in dirs.items() if d.is_dir()}
        return _pair(parts, tuple(parts))
    if layout == "cityscapes":
        gt, img = root / "gtFine" / split, root / "leftImg8bit" / split
        for d in (gt, img):
            if not d.is_dir():
                raise LayoutError(
                    f"cityscapes layout needs {d} (gtFine/{split}/<city>/ and leftImg8bit/{split}/<city>/)"
                )
        parts = {
            "label": _index_by_stem(_images_in(gt, "*/*_gtFine_labelIds.png")),
            "inst": _index_by_stem(_images_in(gt, "*/*_gtFine_instanceIds.png")),
            "image": _index_by_stem(_images_in(img, "*/*_leftImg8bit.png")),
        }
        return _pair(parts, ("label", "inst", "image"))
    return _discover_celebamask(root)


_MASK_RE = re.compile(r"^(\d+)_(" + "|".join(CELEBAMASK_PARTS[1:]) + r")\.png$")


def _discover_celebamask(root: Path) -> list[SampleFiles]:
    img_dir, mask_dir = root / "CelebA-HQ-img", root / "CelebAMask-HQ-mask-anno"
    for d in (img_dir, mask_dir):
        if not d.is_dir():
            raise LayoutError(f"celebamask layout needs {d}")
    images = {}
    for p in _images_in(img_dir):
        if not p.stem.isdigit():
            raise LayoutError(f"{p}: CelebA-HQ images are named <index>.jpg")
        images[int(p.stem)] = p
    masks: dict[int, dict[str, Path]] = {}
    for p in sorted(mask_dir.glob("*/*.png")):
        m = _MASK_RE.match(p.name)
        if not m:
            raise LayoutError(
                f"{p}: not a CelebAMask-HQ part mask (<index:05d>_<part>.png, part one of {CELEBAMASK_PARTS[1:]})"
            )
        i = int(m.group(1))
        if p.parent.name != str(i // 2000):
            raise LayoutError(f"{p}: mask of image {i} belongs in folder {i // 2000}/")
        masks.setdefault(i, {})[m.group(2)] = p
    for i in sorted(set(masks) - set(images)):
        raise LayoutError(f"{next(iter(masks[i].values()))} has no image {img_dir}/{i}.jpg: unpaired file")
    for i in sorted(set(images) - set(masks)):
        raise LayoutError(f"{images[i]} has no part masks in {mask_dir}/{i // 2000}/: unpaired file")
    return [SampleFiles(stem=str(i), image=images[i], masks=masks[i]) for i in sorted(images)]


# ---- loading ---------------------------------------------------------------------------------------------


MAX_PIXELS = 8192 * 4096  # per image; Cityscapes' are 2048x1024. Checked from the header, before decoding


def _open(path: Path) -> Image.Image:
    try:
        img = Image.open(path)  # reads the header only
        w, h = img.size
        if w * h > MAX_PIXELS:
            raise BadSample(
                path,
                f"image is {w}x{h}, over the {MAX_PIXELS // 1_000_000} M pixels a sample may have: resize it first",
            )
        img.load()
        return img
    except BadSample:
        raise
    except FileNotFoundError:
        raise BadSample(path, "file is missing") from None
    except Exception as e:  # noqa: BLE001 - PIL raises many kinds for a corrupt file
        raise BadSample(path, f"cannot decode image ({type(e).__name__}: {e})") from None


def _ids(path: Path, what: str) -> np.ndarray:
    img = _open(path)
    if img.mode not in ("L", "P", "I", "I;16", "I;16B", "1"):
        raise BadSample(path, f"{what} must be a single-channel id map (PNG mode L/P/I;16), got mode {img.mode}")
    return np.asarray(img)


# photo modes whose conversion to 8-bit RGB keeps the picture; 16-bit and float greys ("I;16", "I", "F") do not:
# PIL clips them to 255, a photo of pure white
PHOTO_MODES = ("RGB", "RGBA", "RGBX", "L", "LA", "P", "PA", "1", "CMYK", "YCbCr")


def load(layout: str, files: SampleFiles) -> LoadedSample:
    """Read and decode one sample. Raises BadSample naming the file at fault."""
    image_bytes = _read(files.image)
    image = _open(files.image)
    if image.mode not in PHOTO_MODES:
        raise BadSample(
            files.image,
            f"photo mode {image.mode} is not supported (16-bit or float pixels would be read as clipped 8-bit): "
            f"convert it to 8-bit RGB, e.g. with PIL: (im >> 8) for 16-bit grey, then .convert('RGB')",
        )
    w, h = image.size
    if layout == "celebamask":
        label = _compose_masks(files, (h, w))
        inst = None
    else:
        label = _ids(files.label, "label map").astype(np.int64)
        inst = _ids(files.inst, "instance map").astype(np.int64) if files.inst is not None else None
        if label.max(initial=0) > 255:
            raise BadSample(files.label, f"label ids up to {label.max()} do not fit 8 bits")
        label = label.astype(np.uint8)
        if inst is not None:
            inst = inst.astype(np.int32)
    return LoadedSample(files.stem, label, inst, image_bytes, (h, w), files)


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise BadSample(path, "file is missing") from None


def _compose_masks(files: SampleFiles, image_hw: tuple[int, int]) -> np.ndarray:
    """Paint part masks in CelebAMask-HQ order; the label is brought to the image size (nearest, integer factor)."""
    label = None
    for cls, part in enumerate(CELEBAMASK_PARTS):
        path = files.masks.get(part)
        if path is None:
            continue
        m = np.asarray(_open(path).convert("L")) > 127
        if label is None:
            label = np.zeros(m.shape, np.uint8)
        elif m.shape != label.shape:
            raise BadSample(
                path, f"mask is {m.shape[1]}x{m.shape[0]}, other masks are {label.shape[1]}x{label.shape[0]}"
            )
        label[m] = cls
    assert label is not None  # discover() guarantees at least one mask
    h, w = image_hw
    if label.shape != (h, w):
        fy, fx = h / label.shape[0], w / label.shape[1]
        if fy != fx or fy != int(fy) or fy < 1:
            raise BadSample(
                files.image,
                f"image is {w}x{h} but its masks are {label.shape[1]}x{label.shape[0]} (not an integer multiple)",
            )
        label = label.repeat(int(fy), 0).repeat(int(fx), 1)
    return label


def encode_png(array: np.ndarray) -> bytes:
    """Lossless PNG of an id map: 8-bit for uint8, 16-bit for instance ids."""
    buf = io.BytesIO()
    if array.dtype == np.uint8:
        Image.fromarray(array, mode="L").save(buf, format="PNG", compress_level=1)
    else:
        if array.min(initial=0) < 0 or array.max(initial=0) > 65535:
            raise ValueError("instance ids must lie in 0..65535 to be stored as 16-bit PNG")
        Image.fromarray(array.astype(np.uint16)).save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


def decode_png_ids(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)))


def list_maps(uri: str) -> dict[str, storage.Location]:
    """The image files of a folder or URI (not recursive) by stem, sorted."""
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
