"""Label and instance maps as PNG files, the way Cityscapes stores them and the editor sends them: one channel of
integer ids, 8-bit grey for label ids (`*_labelIds.png`), 16-bit or 32-bit grey for instance ids
(`*_instanceIds.png`: class * 1000 + k for things). Decoding checks what a server must not trust: the size before
the pixels are read, the format, the mode; errors are `MapError`s that name the map and say what fits."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

MAX_PIXELS = 4096 * 2048  # twice pix2pixHD's 2048x1024 in each dimension


class MapError(ValueError):
    """A map that cannot be used; `status` is the HTTP status a server answers with (400, or 413 for too large)."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


def decode_ids(data: bytes, what: str, max_pixels: int = MAX_PIXELS) -> np.ndarray:
    """PNG bytes -> (H, W) int64 ids."""
    try:
        img = Image.open(io.BytesIO(data))
    except (OSError, SyntaxError, ValueError) as e:
        raise MapError(f"{what}: not a PNG image ({type(e).__name__}: {str(e)[:120]})") from None
    w, h = img.size
    if w * h > max_pixels:
        raise MapError(f"{what}: {w}x{h} is larger than this server takes ({max_pixels} pixels)", 413)
    if img.format != "PNG":
        raise MapError(f"{what}: a {img.format} file; maps are PNG (lossless: ids must survive)")
    if img.mode not in ("L", "P", "I", "I;16"):
        raise MapError(
            f"{what}: a {img.mode} PNG; a map is one channel of ids: 8-bit grey for label ids, 16-bit grey for "
            f"instance ids"
        )
    try:
        img.load()
    except (OSError, SyntaxError, ValueError) as e:
        raise MapError(f"{what}: a damaged PNG ({type(e).__name__}: {str(e)[:120]})") from None
    return np.asarray(img).astype(np.int64)


def decode_photo(data: bytes, what: str, max_pixels: int = MAX_PIXELS) -> np.ndarray:
    """A photo (PNG or JPEG) -> (3, H, W) float32 in [-1, 1], the generator's range."""
    try:
        img = Image.open(io.BytesIO(data))
        w, h = img.size
        if w * h > max_pixels:
            raise MapError(f"{what}: {w}x{h} is larger than this server takes ({max_pixels} pixels)", 413)
        rgb = np.asarray(img.convert("RGB"), np.float32)
    except (OSError, SyntaxError, ValueError) as e:
        if isinstance(e, MapError):
            raise
        raise MapError(f"{what}: not an image PIL reads ({type(e).__name__}: {str(e)[:120]})") from None
    return rgb.transpose(2, 0, 1) / 127.5 - 1.0


def encode_ids(ids: np.ndarray) -> bytes:
    """(H, W) ids -> PNG: 8-bit grey when every id fits, else 16-bit grey."""
    ids = np.asarray(ids)
    if ids.min(initial=0) < 0 or ids.max(initial=0) > 65535:
        raise MapError(f"ids must lie in 0..65535 to be stored as PNG, got {ids.min()}..{ids.max()}")
    img = Image.fromarray(ids.astype(np.uint8)) if ids.max(initial=0) < 256 else Image.fromarray(ids.astype(np.uint16))
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def encode_rgb(image: np.ndarray) -> bytes:
    """(H, W, 3) uint8 -> PNG bytes."""
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    return buf.getvalue()
