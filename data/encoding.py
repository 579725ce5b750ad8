"""How a sample's label, instance and image are stored in a shard.

    png   the compact default: the image's original file bytes (PNG/JPEG, pixel-exact), id maps as PNG
    zstd  raw arrays compressed with zstd (level 3): for a 2048x1024 Cityscapes sample about 1.65x the bytes of
          png but about 11x faster to decode (7.5 ms instead of 86 ms per sample on one core), for GPU nodes
          whose cores cannot decode PNGs as fast as the GPU trains (BENCHMARKS.md, data pipeline)

Arrays: label (H, W) uint8, inst (H, W) int32, image (H, W, 3) uint8 RGB. Both encodings are lossless
with respect to these arrays; the shards record their height and width, which raw arrays need.
"""

from __future__ import annotations

import io

import numpy as np
import pyarrow as pa
from PIL import Image

from data.layouts import LoadedSample, decode_png_ids, encode_png

ENCODINGS = ("png", "zstd")
_ZSTD = pa.Codec("zstd", compression_level=3)


def check(encoding: str) -> str:
    if encoding not in ENCODINGS:
        raise ValueError(f"encoding={encoding!r} is not one of {', '.join(ENCODINGS)}")
    return encoding


def decode_image_bytes(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


def encode_sample(sample: LoadedSample, encoding: str) -> dict[str, bytes | None]:
    """{'label', 'inst', 'image'} bytes of one loaded sample (inst None without instance maps)."""
    if check(encoding) == "png":
        return {
            "label": encode_png(sample.label),
            "inst": encode_png(sample.inst) if sample.inst is not None else None,
            "image": sample.image_bytes,
        }
    return {
        "label": _compress(sample.label.astype(np.uint8)),
        "inst": _compress(sample.inst.astype(np.int32)) if sample.inst is not None else None,
        "image": _compress(decode_image_bytes(sample.image_bytes)),
    }


def decode_label(data: bytes, encoding: str, h: int, w: int) -> np.ndarray:
    return decode_png_ids(data).astype(np.uint8) if encoding == "png" else _decompress(data, (h, w), np.uint8)


def decode_inst(data: bytes, encoding: str, h: int, w: int) -> np.ndarray:
    return decode_png_ids(data).astype(np.int32) if encoding == "png" else _decompress(data, (h, w), np.int32)


def decode_image(data: bytes, encoding: str, h: int, w: int) -> np.ndarray:
    return decode_image_bytes(data) if encoding == "png" else _decompress(data, (h, w, 3), np.uint8)


def _compress(a: np.ndarray) -> bytes:
    return _ZSTD.compress(np.ascontiguousarray(a).tobytes(), asbytes=True)


def _decompress(data: bytes, shape: tuple[int, ...], dtype) -> np.ndarray:
    n = int(np.prod(shape)) * np.dtype(dtype).itemsize
    return np.frombuffer(_ZSTD.decompress(data, decompressed_size=n, asbytes=True), dtype).reshape(shape)
